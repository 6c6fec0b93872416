"""lm-eval's conventions (`lambada_openai`, WikiText `lm_eval`) equal lm-evaluation-harness's definitions.

A small random-weight GPT-2 made by `transformers` (seeded, 64-token context so that documents
need several windows) is scored by our evaluator, and per sample compared with:

- an independent reimplementation here of lm-eval 0.4.13's definitions (the `lambada_openai`
  split and `_encode_pair`, `get_rolling_token_windows` + `make_disjoint_window`, the word and
  byte counts, the EleutherAI/wikitext_document_level article split), scored by `transformers`'
  own forward pass in float64: to 1e-6;
- lm-eval itself, when it is installed (the optional extra `compare`; skipped otherwise).
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from conftest import save_tiny_hf_gpt2

from gpt2ipu.cli import main as cli_main
from gpt2ipu.errors import UserError
from gpt2ipu.evaluate import data as evaldata
from gpt2ipu.evaluate.lambada import score_lambada
from gpt2ipu.evaluate.wiki import score_wikitext_lm_eval, split_articles, wikitext_detokenize

WINDOW = 64
EOT = 50256

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Passages of the official file whose last separator is a newline (lm-eval's target differs from
# the whitespace split's), and edge cases of lm-eval's split.
NEWLINE_TARGETS = [426, 1053]
EDGE_PASSAGES = ["He said  goodbye", "no-space-here\nat all", 'She looked at the door and said "Mara"']


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    return save_tiny_hf_gpt2(tmp_path_factory.mktemp("hf") / "m", seed=3, n_positions=WINDOW)


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    import transformers

    return transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()


@pytest.fixture(scope="module")
def ours(hf_dir):
    from gpt2ipu.pretrained import load_pretrained

    model, tokenizer, _ = load_pretrained(hf_dir, "cpu")
    return model, tokenizer


@pytest.fixture(scope="module")
def hf_tokenizer(hf_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(hf_dir)


# ----------------------------------------------------------------------------------------------
# lm-eval 0.4.13's definitions, written out again

def reference_loglikelihood(hf_model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """HFLM._loglikelihood_tokens for one request: the last max_length + 1 tokens, the last not fed."""
    tokens = (context + continuation)[-(WINDOW + 1):]
    with torch.no_grad():
        logits = hf_model(torch.tensor([tokens[:-1]])).logits[0].double()
    picked = torch.log_softmax(logits, -1)[-len(continuation):]
    wanted = torch.tensor(continuation)
    greedy = bool((picked.argmax(-1) == wanted).all())
    return float(picked[torch.arange(len(continuation)), wanted].sum()), greedy


def reference_lambada_request(hf_tokenizer, text: str) -> tuple[list[int], list[int]]:
    """lambada_openai.yaml's doc_to_text / doc_to_target, then HFLM.loglikelihood / _encode_pair."""
    encode = lambda s: hf_tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    context = " ".join(text.split(" ")[:-1])
    continuation = " " + text.split(" ")[-1]
    if context == "":
        return [EOT], encode(continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(context + continuation)
    context_enc = encode(context)
    return context_enc, whole[len(context_enc):]


def rolling_token_windows(token_list, prefix_token, max_seq_len, context_len):
    """lm_eval.utils.get_rolling_token_windows."""
    pred_len = max_seq_len - context_len + 1
    predicted = 0
    first_seq_len = min(max_seq_len, len(token_list))
    if not token_list:
        return
    yield [prefix_token] + token_list[:first_seq_len - 1], token_list[:first_seq_len]
    predicted += first_seq_len
    while predicted < len(token_list):
        window_pred_len = min(len(token_list) - predicted, pred_len)
        window_end = predicted + window_pred_len
        yield (token_list[window_end - max_seq_len - 1:window_end - 1],
               token_list[window_end - window_pred_len:window_end])
        predicted += window_pred_len


def disjoint(pair):
    """lm_eval.utils.make_disjoint_window."""
    a, b = pair
    return a[:len(a) - (len(b) - 1)], b


def reference_document(hf_model, hf_tokenizer, page: str) -> dict:
    """HFLM.loglikelihood_rolling of one document, and wikitext's process_results counts."""
    tokens = hf_tokenizer.encode(wikitext_detokenize(page), add_special_tokens=False)
    loglikelihood = 0.0
    for context, continuation in map(disjoint, rolling_token_windows(tokens, EOT, WINDOW, 1)):
        loglikelihood += reference_loglikelihood(hf_model, context, continuation)[0]
    return {"loglikelihood": loglikelihood, "words": len(re.split(r"\s+", page)),
            "bytes": len(page.encode("utf-8")), "tokens": len(tokens)}


def reference_articles(text: str) -> list[str]:
    """EleutherAI/wikitext_document_level's _generate_examples."""
    pages, ret = [], []
    for line in text.split("\n"):
        rline = line.replace("= = =", "===").replace("= =", "==").strip()
        if rline.startswith("= ") and rline.strip().endswith(" ="):
            page = "\n".join(ret)
            if page.strip():
                pages.append(page)
            ret = []
        ret.append(line)
    pages.append("\n".join(ret))
    return pages


# ----------------------------------------------------------------------------------------------
# Against the reimplementation

def greedy_passages(hf_model, hf_tokenizer, prompts: list[str]) -> list[str]:
    """Prompts followed by the model's greedy next token when it is a word after a space: passages
    that lambada_openai scores correct, so the greedy flag is tested both ways."""
    passages = []
    for prompt in prompts:
        ids = hf_tokenizer.encode(prompt)[-(WINDOW - 1):]
        with torch.no_grad():
            word = hf_tokenizer.decode([int(hf_model(torch.tensor([ids])).logits[0, -1].argmax())])
        if re.fullmatch(r" [A-Za-z]+", word) and hf_tokenizer.encode(prompt + word)[-1:] == hf_tokenizer.encode(word):
            passages.append(prompt + word)
    return passages


@pytest.fixture(scope="module")
def lambada_passages(hf_model, hf_tokenizer):
    samples = evaldata.sample_lambada_texts(40, seed=7)
    correct = greedy_passages(hf_model, hf_tokenizer, [" ".join(t.split(" ")[:-1]) for t in samples])
    assert correct, "no prompt had a word as the greedy continuation"
    return samples[:6] + correct[:3] + EDGE_PASSAGES


def check_lambada(ours, hf_model, hf_tokenizer, texts):
    model, tokenizer = ours
    samples = []
    result = score_lambada(model, tokenizer, texts, conventions=["lambada_openai"], batch_size=4, log_samples=samples)
    expected = []
    for text, sample in zip(texts, samples):
        context, continuation = reference_lambada_request(hf_tokenizer, text)
        assert sample["target_ids"] == continuation, text
        expected.append(reference_loglikelihood(hf_model, context, continuation))
        assert sample["loglikelihood"] == pytest.approx(expected[-1][0], abs=1e-6)
        assert sample["greedy"] == expected[-1][1]
    figures = result["lambada_openai"]
    assert figures["accuracy"] == sum(g for _, g in expected) / len(texts)
    assert figures["perplexity"] == pytest.approx(math.exp(-sum(ll for ll, _ in expected) / len(texts)), rel=1e-6)
    return samples


def test_lambada_openai_equals_lm_evals_definition(ours, hf_model, hf_tokenizer, lambada_passages):
    samples = check_lambada(ours, hf_model, hf_tokenizer, lambada_passages)
    assert 0 < sum(s["greedy"] for s in samples) < len(samples)
    by_text = dict(zip(lambada_passages, samples))
    assert by_text["He said  goodbye"]["target"] == "  goodbye"   # the context's trailing space moved
    assert by_text["no-space-here\nat all"]["context"] == "no-space-here\nat"
    assert "<|endoftext|>" not in by_text["no-space-here\nat all"]["context"]


def test_lambada_openai_on_real_passages_with_newline_targets(ours, hf_model, hf_tokenizer, shared_file):
    texts = evaldata.read_lambada(shared_file("lambada_test.jsonl"))
    chosen = [texts[i] for i in NEWLINE_TARGETS] + texts[:4]
    samples = check_lambada(ours, hf_model, hf_tokenizer, chosen)
    # lm-eval's target there is the text after the last space: a newline inside, unlike last_word's
    assert "\n" in samples[0]["target"] and samples[0]["target"] != " " + chosen[0].split()[-1]


def test_a_passage_without_a_space_has_the_eot_as_context(ours, hf_model, hf_tokenizer):
    check_lambada(ours, hf_model, hf_tokenizer, ["one\ntwo", "a b c"])


def test_article_split_equals_the_document_level_loader(shared_file):
    text = evaldata.read_wikitext(shared_file("wikitext-2-wiki.test.tokens"))
    articles = split_articles(text)
    assert articles == reference_articles(text)
    assert "".join(articles).replace("\n", "") == text.replace("\n", "")[1:]   # only the leading " " line is dropped
    assert all(re.match(r" = [^=]", a) for a in articles)


@pytest.mark.parametrize("documents,batch_size", [("articles", 3), ("whole", 8)])
def test_wikitext_lm_eval_equals_lm_evals_definition(ours, hf_model, hf_tokenizer, documents, batch_size):
    model, tokenizer = ours
    text = evaldata.sample_wikitext(2, seed=11)
    samples = []
    result = score_wikitext_lm_eval(model, tokenizer, text, documents=documents, batch_size=batch_size,
                                    log_samples=samples)
    pages = reference_articles(text) if documents == "articles" else [text]
    expected = [reference_document(hf_model, hf_tokenizer, page) for page in pages]
    assert len(samples) == len(pages) == result["document_count"]
    for sample, reference in zip(samples, expected):
        assert sample["loglikelihood"] == pytest.approx(reference["loglikelihood"], rel=1e-6, abs=1e-6)
        assert (sample["words"], sample["bytes"], sample["tokens_scored"]) == \
            (reference["words"], reference["bytes"], reference["tokens"])
    assert result["windows"] > len(pages)   # documents span several windows
    nll = -sum(r["loglikelihood"] for r in expected)
    words, num_bytes = sum(r["words"] for r in expected), sum(r["bytes"] for r in expected)
    assert result["word_perplexity"] == pytest.approx(math.exp(nll / words), rel=1e-6)
    assert result["byte_perplexity"] == pytest.approx(math.exp(nll / num_bytes), rel=1e-6)
    assert result["bits_per_byte"] == pytest.approx(nll / num_bytes / math.log(2), rel=1e-6)


@pytest.mark.parametrize("num_tokens", [1, 63, 64, 65, 128, 129, 200])
def test_disjoint_windows_are_lm_evals(num_tokens):
    from gpt2ipu.evaluate.wiki import disjoint_windows

    tokens = list(range(1000, 1000 + num_tokens))
    sequence = [EOT] + tokens
    ours = [(sequence[start:stop][:first - start], sequence[first:stop])
            for start, stop, first in disjoint_windows(num_tokens, WINDOW)]
    assert ours == list(map(disjoint, rolling_token_windows(tokens, EOT, WINDOW, 1)))


# ----------------------------------------------------------------------------------------------
# Through the command line: --log-samples, --conventions, --documents; bad names

def test_cli_writes_results_and_samples_in_every_convention(tmp_path, hf_dir):
    texts = evaldata.sample_lambada_texts(4, seed=3)
    evaldata.write_lambada_jsonl(tmp_path / "lambada.jsonl", texts)
    (tmp_path / "wiki.tokens").write_text(evaldata.sample_wikitext(2, seed=2), encoding="utf-8")
    common = ["--model-dir", str(hf_dir), "--device", "cpu"]
    assert cli_main(["evaluate", "lambada", *common, "--data", str(tmp_path / "lambada.jsonl"),
                     "--out", str(tmp_path / "l.json"), "--log-samples", str(tmp_path / "l.jsonl")]) == 0
    assert cli_main(["evaluate", "wiki", *common, "--data", str(tmp_path / "wiki.tokens"), "--out",
                     str(tmp_path / "w.json"), "--documents", "whole", "--log-samples", str(tmp_path / "w.jsonl")]) == 0
    lambada = json.loads((tmp_path / "l.json").read_text())
    assert {"lambada_openai", "last_word", "last_token"} <= set(lambada)
    lines = [json.loads(line) for line in (tmp_path / "l.jsonl").read_text().splitlines()]
    assert len(lines) == 3 * len(texts)
    openai = [s for s in lines if s["convention"] == "lambada_openai"]
    assert sum(s["greedy"] for s in openai) == lambada["lambada_openai"]["correct"]
    assert math.exp(-sum(s["loglikelihood"] for s in openai) / len(texts)) == \
        pytest.approx(lambada["lambada_openai"]["perplexity"], rel=1e-9)
    wiki = json.loads((tmp_path / "w.json").read_text())
    assert wiki["lm_eval"]["document_count"] == 1 and "token_perplexity" in wiki   # megatron at the top level
    documents = [json.loads(line) for line in (tmp_path / "w.jsonl").read_text().splitlines()
                 if '"lm_eval"' in line]
    assert len(documents) == 1 and documents[0]["tokens_scored"] == wiki["lm_eval"]["tokens"]


def test_unknown_convention_is_a_clear_error(tmp_path, hf_dir, capsys):
    (tmp_path / "wiki.tokens").write_text(evaldata.sample_wikitext(1, seed=2), encoding="utf-8")
    code = cli_main(["evaluate", "wiki", "--model-dir", str(hf_dir), "--data", str(tmp_path / "wiki.tokens"),
                     "--out", str(tmp_path / "w.json"), "--conventions", "lm_eval,harness"])
    assert code == 2 and "WikiText convention 'harness'" in capsys.readouterr().err
    assert not (tmp_path / "w.json").exists()


# ----------------------------------------------------------------------------------------------
# Hub ids

def test_hub_id_resolves_from_the_local_cache(tmp_path, hf_dir, monkeypatch):
    from gpt2ipu.pretrained import resolve_model_dir

    commit = "0" * 40
    snapshot = tmp_path / "hub" / "models--someone--tiny-gpt2" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in hf_dir.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (tmp_path / "hub" / "models--someone--tiny-gpt2" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny-gpt2" / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_dir("someone/tiny-gpt2") == snapshot


def test_hub_id_offline_without_cache_is_one_clear_error(tmp_path, monkeypatch):
    from gpt2ipu.pretrained import resolve_model_dir

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"^gpt2: no such model folder, .*local cache.*HF_HUB_OFFLINE is set") as err:
        resolve_model_dir("gpt2")
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------------
# Against lm-eval itself (the optional extra `compare`)

@pytest.mark.slow   # lm-eval starts `git` in a child process; importing and running it takes a while
def test_our_lm_eval_conventions_equal_lm_eval_itself(ours, hf_dir, shared_file, lambada_passages):
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    from gpt2ipu.bench import lm_eval_baseline as baseline

    model, tokenizer = ours
    texts = evaldata.read_lambada(shared_file("lambada_test.jsonl"))
    texts = [texts[i] for i in NEWLINE_TARGETS] + texts[:6] + lambada_passages   # some scored correct
    pages = split_articles(evaldata.read_wikitext(shared_file("wikitext-2-wiki.test.tokens")))[:2]
    runs = baseline.run_lm_eval(baseline.lm_eval_model(hf_dir),
                                [baseline.lambada_task(texts), baseline.wikitext_task(pages)])
    lambada_samples, wiki_samples = [], []
    lambada = score_lambada(model, tokenizer, texts, conventions=["lambada_openai"], log_samples=lambada_samples)
    wiki = score_wikitext_lm_eval(model, tokenizer, "\n".join(pages), log_samples=wiki_samples)
    theirs = runs[baseline.LAMBADA_TASK]
    for sample, (_, loglikelihood, greedy) in zip(lambada_samples, theirs["samples"], strict=True):
        assert sample["loglikelihood"] == pytest.approx(loglikelihood, abs=1e-4) and sample["greedy"] == greedy
    assert lambada["lambada_openai"]["accuracy"] == theirs["results"]["acc"] > 0
    assert lambada["lambada_openai"]["perplexity"] == pytest.approx(theirs["results"]["perplexity"], rel=1e-5)
    theirs = runs[baseline.WIKITEXT_TASK]
    # lm-eval sums each window's log-probabilities in float32: about 1e-8 of the document's total.
    for sample, (_, loglikelihood, _) in zip(wiki_samples, theirs["samples"], strict=True):
        assert sample["loglikelihood"] == pytest.approx(loglikelihood, rel=1e-7)
    for key in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert wiki[key] == pytest.approx(theirs["results"][key], rel=1e-6), key
