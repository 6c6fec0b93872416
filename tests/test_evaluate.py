"""Evaluation: batched metrics equal plain one-at-a-time computations; data sets, downloads, errors.

The reference computations here are deliberately plain: one sequence per forward pass, full
logits, float64 log-softmax, their own tokenization and window arithmetic.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import zipfile

import pytest
import torch

from gpt2ipu.cli import main as cli_main
from gpt2ipu.data.tokenizer import load_tokenizer
from gpt2ipu.errors import UserError
from gpt2ipu.evaluate import data as evaldata
from gpt2ipu.evaluate.lambada import score_lambada
from gpt2ipu.evaluate.wiki import count_words, score_wikitext_megatron, sliding_windows, wikitext_detokenize

WINDOW = 64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def wiki_text() -> str:
    return evaldata.sample_wikitext(2, seed=11)


# ----------------------------------------------------------------------------------------------
# Plain references

def plain_log_probs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1, one sequence alone, full logits, float64."""
    with torch.no_grad():
        logits = model.logits(torch.tensor([ids]))[0]
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    return log_probs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])], logits.argmax(-1)[:-1] == torch.tensor(ids[1:])


def reference_wiki(model, tokenizer, text: str, window: int, stride: int) -> dict:
    tokens = tokenizer.encode(wikitext_detokenize(text))
    nll, correct, scored = 0.0, 0, set()
    end = min(window, len(tokens))
    chunks = [(0, end, 1)]
    while end < len(tokens):
        new_end = min(end + stride, len(tokens))
        chunks.append((max(0, new_end - window), new_end, end))
        end = new_end
    for start, end, first in chunks:
        log_probs, hits = plain_log_probs(model, tokens[start:end])
        nll -= float(log_probs[first - start - 1:].sum())
        correct += int(hits[first - start - 1:].sum())
        scored.update(range(first, end))
    assert scored == set(range(1, len(tokens)))
    words = sum(len(line.split()) + 1 for line in text.split("\n")[:-1])
    n = len(tokens)
    return {"token_perplexity": math.exp(nll / (n - 1)), "word_perplexity": math.exp(nll / words),
            "adjusted_perplexity": math.exp(nll / (words - 1)), "correct": correct, "tokens": n, "words": words}


def reference_lambada(model, tokenizer, texts: list[str], window: int) -> dict:
    result = {}
    for convention in ("last_word", "last_token"):
        nlls, tokens, correct = [], 0, 0
        for text in texts:
            passage = text.strip()
            if convention == "last_word":
                word = passage.split()[-1]
                context = tokenizer.encode(passage[:len(passage) - len(word)].strip())
                target = tokenizer.encode(" " + word)
            else:
                ids = tokenizer.encode(passage)
                context, target = ids[:-1], ids[-1:]
            ids = (context + target)[-window:]
            log_probs, hits = plain_log_probs(model, ids)
            nlls.append(-float(log_probs[-len(target):].sum()))
            tokens += len(target)
            correct += bool(hits[-len(target):].all())
        result[convention] = {"correct": correct, "perplexity": math.exp(sum(nlls) / len(texts)),
                              "token_perplexity": math.exp(sum(nlls) / tokens)}
    return result


def greedy_passages(model, tokenizer, prompts: list[str], new_tokens: int = 3) -> list[str]:
    """Passages ending in the model's own greedy continuation, so some are scored correct."""
    passages = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt)[-40:]
        for _ in range(new_tokens):
            with torch.no_grad():
                ids.append(int(model.logits(torch.tensor([ids]))[0, -1].argmax()))
        passages.append(tokenizer.decode(ids))
    return passages


def assert_close(actual: float, expected: float, rel: float = 1e-6) -> None:
    assert actual == pytest.approx(expected, rel=rel), (actual, expected)


# ----------------------------------------------------------------------------------------------
# WikiText

def test_detokenizer_undoes_wikitext_tokenization():
    text = (' \n = Robert <unk> = \n \n He had a guest @-@ starring role ( 2000 ) in " The Bill " , '
            "earning 1 @,@ 000 @.@ 5 pounds ; it 's Simon 's play . \n \n = = Career = = \n")
    assert wikitext_detokenize(text) == (
        '\n= Robert <unk> =\n\nHe had a guest-starring role (2000) in "The Bill", '
        "earning 1,000.5 pounds; it's Simon's play.\n\n== Career ==\n")


def test_word_count_of_the_real_wikitext2_test_set(shared_file):
    path = shared_file("wikitext-2-wiki.test.tokens")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == evaldata.WIKITEXT2_TEST_SHA256
    text = evaldata.read_wikitext(path)
    assert count_words(text) == 245_569
    detok = wikitext_detokenize(text)
    assert " @-@ " not in detok and " @,@ " not in detok and " , " not in detok


@pytest.mark.parametrize("num_tokens,window,stride", [(1000, 64, 32), (1000, 64, 63), (1000, 64, 1),
                                                      (50, 64, 32), (64, 64, 10), (65, 64, 7)])
def test_sliding_windows_score_each_token_once_with_most_context(num_tokens, window, stride):
    windows = sliding_windows(num_tokens, window, stride)
    scored = [t for _, end, first in windows for t in range(first, end)]
    assert sorted(scored) == list(range(1, num_tokens))
    for i, (start, end, first) in enumerate(windows):
        assert end - start == min(window, num_tokens)
        assert start <= first - 1 < end
        if i:
            assert end - first <= stride and first - start >= window - stride


def test_window_arguments_are_checked():
    with pytest.raises(UserError, match="stride"):
        sliding_windows(100, 64, 64)


@pytest.mark.parametrize("batch_size,stride", [(1, 32), (3, 17), (8, 63), (5, None)])
def test_wikitext_batched_equals_one_window_at_a_time(model, tokenizer, wiki_text, batch_size, stride):
    result = score_wikitext_megatron(model, tokenizer, wiki_text, stride=stride, batch_size=batch_size)
    expected = reference_wiki(model, tokenizer, wiki_text, WINDOW, stride or WINDOW // 2)
    assert result["tokens"] == expected["tokens"] and result["words"] == expected["words"]
    assert result["windows"] > 10
    for key in ("token_perplexity", "word_perplexity", "adjusted_perplexity"):
        assert_close(result[key], expected[key])
    assert round(result["token_accuracy"] * (result["tokens"] - 1)) == expected["correct"]


# ----------------------------------------------------------------------------------------------
# LAMBADA

@pytest.mark.parametrize("vocab", [50, 64, 200])
def test_head_logits_in_the_padded_buffer_are_the_plain_head_s(vocab):
    # 50: no whole multiple of 64 (one small product); 64: no remainder; 200: both products.
    from gpt2ipu.evaluate.scoring import HeadLogits
    from gpt2ipu.model import GPT, GPTConfig
    from gpt2ipu.model.lowp import to_lowp

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab, n_positions=16, n_embd=32, n_layer=1, n_head=2)).eval()
    model.requires_grad_(False)   # as evaluation's models are: the buffer path has no autograd
    head = HeadLogits(model)
    for rows in (7, 3):   # a smaller call after a larger one reuses the buffer
        hidden = torch.randn(rows, 32)
        logits = head(hidden)
        assert logits.shape == (rows, vocab)
        torch.testing.assert_close(logits, model.lm_head(hidden), rtol=0, atol=1e-5)
    lowp = to_lowp(model, "int8")
    hidden = torch.randn(20, 32)
    torch.testing.assert_close(HeadLogits(lowp)(hidden), lowp.lm_head(hidden), rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def lambada_texts(model, tokenizer) -> list[str]:
    samples = evaldata.sample_lambada_texts(12, seed=5)
    return samples + greedy_passages(model, tokenizer, samples[:10])


@pytest.mark.parametrize("batch_size", [1, 4, 16])
def test_lambada_batched_equals_one_passage_at_a_time(model, tokenizer, lambada_texts, batch_size):
    result = score_lambada(model, tokenizer, lambada_texts, batch_size=batch_size)
    expected = reference_lambada(model, tokenizer, lambada_texts, WINDOW)
    for convention in ("last_word", "last_token"):
        assert result[convention]["correct"] == expected[convention]["correct"], convention
        assert_close(result[convention]["perplexity"], expected[convention]["perplexity"])
        assert_close(result[convention]["token_perplexity"], expected[convention]["token_perplexity"])
    # The check can fail both ways: some passages are right, some wrong.
    assert 0 < result["last_token"]["correct"] < len(lambada_texts)
    assert 0 < result["last_word"]["correct"] < len(lambada_texts)


def test_lambada_on_the_real_file(model, tokenizer, shared_file):
    path = shared_file("lambada_test.jsonl")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == evaldata.LAMBADA_SHA256
    texts = evaldata.read_lambada(path)
    assert len(texts) == 5153
    subset = texts[:24]
    result = score_lambada(model, tokenizer, subset, batch_size=8)
    expected = reference_lambada(model, tokenizer, subset, WINDOW)
    for convention in ("last_word", "last_token"):
        assert result[convention]["correct"] == expected[convention]["correct"]
        assert_close(result[convention]["perplexity"], expected[convention]["perplexity"])
    # Multi-token targets exist, so strict last_word differs from last_token.
    assert result["last_word"]["target_tokens"] > len(subset)


# ----------------------------------------------------------------------------------------------
# A transformers-made folder, through the command line

def test_transformers_gpt2_folder_evaluates_with_no_conversion(tmp_path, tokenizer):
    transformers = pytest.importorskip("transformers")
    from gpt2ipu.data.tokenizer import hf_gpt2_tokenizer_fast

    torch.manual_seed(1)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2)).eval()
    hf.save_pretrained(tmp_path / "hf")
    hf_gpt2_tokenizer_fast().save_pretrained(tmp_path / "hf")
    texts = evaldata.sample_lambada_texts(6, seed=3)
    evaldata.write_lambada_jsonl(tmp_path / "lambada.jsonl", texts)
    (tmp_path / "wiki.tokens").write_text(evaldata.sample_wikitext(1, seed=2), encoding="utf-8")
    common = ["--model-dir", str(tmp_path / "hf"), "--device", "cpu", "--batch-size", "4"]
    assert cli_main(["evaluate", "lambada", *common, "--data", str(tmp_path / "lambada.jsonl"),
                     "--out", str(tmp_path / "lambada.json")]) == 0
    assert cli_main(["evaluate", "wiki", *common, "--data", str(tmp_path / "wiki.tokens"),
                     "--out", str(tmp_path / "wiki.json"), "--window", "128", "--stride", "100"]) == 0
    lambada = json.loads((tmp_path / "lambada.json").read_text())
    wiki = json.loads((tmp_path / "wiki.json").read_text())
    assert lambada["provenance"]["stage"] == "evaluate_lambada" and lambada["samples"] == 6

    # The same figures from transformers' own forward pass.
    def hf_log_probs(ids):
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0]
        return torch.log_softmax(logits.double(), -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]

    nll = 0.0
    for text in texts:
        ids = tokenizer.encode(text.strip())
        nll -= float(hf_log_probs(ids)[-1])
    assert_close(lambada["last_token"]["perplexity"], math.exp(nll / len(texts)), rel=1e-5)
    tokens = tokenizer.encode(wikitext_detokenize((tmp_path / "wiki.tokens").read_text()))
    nll = 0.0
    for start, end, first in sliding_windows(len(tokens), 128, 100):
        nll -= float(hf_log_probs(tokens[start:end])[first - start - 1:].sum())
    assert_close(wiki["token_perplexity"], math.exp(nll / (len(tokens) - 1)), rel=1e-5)


# ----------------------------------------------------------------------------------------------
# Bad input: one clear message naming the file, and no results file

def run_cli(args, capsys):
    code = cli_main(args)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("content,message", [
    ('{"text": "a fine passage"}\n{"txt": "no text field"}\n', r"lambada\.jsonl:2: .*\"text\""),
    ("", r"lambada\.jsonl: no LAMBADA records"),
    ('{"text": "a b"}\nnot json\n', r"lambada\.jsonl:2: not a JSON line"),
])
def test_bad_lambada_file_is_a_clear_error_and_writes_nothing(tmp_path, model_dir, capsys, content, message):
    (tmp_path / "lambada.jsonl").write_text(content)
    out = tmp_path / "results.json"
    code, err = run_cli(["evaluate", "lambada", "--model-dir", str(model_dir), "--data",
                         str(tmp_path / "lambada.jsonl"), "--out", str(out), "--device", "cpu"], capsys)
    assert code == 2 and re.search(message, err), err
    assert "Traceback" not in err and not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "lambada.jsonl"]


def test_model_folder_without_weights_is_a_clear_error(tmp_path, model_dir, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((model_dir / "config.json").read_text())
    evaldata.write_lambada_jsonl(tmp_path / "lambada.jsonl", ["one two three"])
    out = tmp_path / "results.json"
    code, err = run_cli(["evaluate", "lambada", "--model-dir", str(broken), "--data",
                         str(tmp_path / "lambada.jsonl"), "--out", str(out), "--device", "cpu"], capsys)
    assert code == 2 and str(broken) in err and "model.safetensors" in err
    assert not out.exists()


def test_empty_wikitext_file_is_a_clear_error(tmp_path, model_dir, capsys):
    (tmp_path / "wiki.test.tokens").write_text(" \n \n")
    code, err = run_cli(["evaluate", "wiki", "--model-dir", str(model_dir), "--data", str(tmp_path),
                         "--out", str(tmp_path / "r.json"), "--device", "cpu"], capsys)
    assert code == 2 and "wiki.test.tokens: the WikiText file is empty" in err
    assert not (tmp_path / "r.json").exists()


# ----------------------------------------------------------------------------------------------
# Eval sets: generated, downloaded

def test_generated_sets_have_the_real_formats_and_are_deterministic(tmp_path):
    for name in ("lambada", "wikitext-103"):
        evaldata.write_sample_set(name, tmp_path / "a" / name, lambada_records=30, wikitext_articles=3)
        evaldata.write_sample_set(name, tmp_path / "b" / name, lambada_records=30, wikitext_articles=3)
        file = evaldata.EVAL_SETS[name]
        assert (tmp_path / "a" / name / file).read_bytes() == (tmp_path / "b" / name / file).read_bytes()
        assert (tmp_path / "a" / name / "provenance.json").is_file()
    lines = (tmp_path / "a" / "lambada" / "lambada_test.jsonl").read_text().splitlines()
    assert len(lines) == 30
    for line in lines:
        record = json.loads(line)
        assert list(record) == ["text"]
        *context, last = record["text"].split()
        # the target word occurs earlier; no final punctuation
        assert last.isalpha() and last in {word.strip(".,;") for word in context}
    text = (tmp_path / "a" / "wikitext-103" / "wiki.test.tokens").read_text()
    lines = text.split("\n")[:-1]
    assert text.startswith(" \n = ") and text.endswith(" \n")
    assert all(line.startswith(" ") and line.endswith(" ") for line in lines)
    headings = [line for line in lines if line.startswith(" = ")]
    assert len([h for h in headings if not h.startswith(" = = ")]) == 3
    assert all(re.fullmatch(r" (= )+\S.* (= )*=", h.rstrip()) or re.fullmatch(r" (= )+.*=", h.rstrip())
               for h in headings)
    for token in (" @-@ ", " @,@ ", " @.@ ", " <unk> ", " , ", " . "):
        assert token in text, token
    assert "@-@" not in wikitext_detokenize(text) and "well-known" in wikitext_detokenize(text)


def served(server, path: str, body: bytes) -> str:
    """conftest's RangeServer serving `body` at `path` too, with a fresh request log."""
    server.reset({**server.files, path: body})
    return server.url(path)


def test_download_checks_sha256_and_resumes(tmp_path, range_server):
    body = "".join(json.dumps({"text": t}) + "\n" for t in evaldata.sample_lambada_texts(20)).encode()
    url = served(range_server, "/lambada_test.jsonl", body)
    out = tmp_path / "lambada"
    (tmp_path / "lambada.partial").write_bytes(body[:1000])   # a download cut short earlier
    figures = evaldata.prepare_eval_set("lambada", out, source="download", url=url,
                                        sha256=hashlib.sha256(body).hexdigest(), retries=0)
    assert (out / "lambada_test.jsonl").read_bytes() == body and figures["records"] == 20
    assert range_server.ranges == ["bytes=1000-"] and not (tmp_path / "lambada.partial").exists()
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["params"]["url"] == url and provenance["figures"]["verified"] is True


def test_download_checksum_mismatch_leaves_nothing(tmp_path, range_server):
    url = served(range_server, "/bad.jsonl", b'{"text": "tampered passage"}\n')
    with pytest.raises(UserError, match=r"checksum mismatch for http://.*/bad\.jsonl: expected sha256 0{64}"):
        evaldata.prepare_eval_set("lambada", tmp_path / "lambada", source="download", url=url,
                                  sha256="0" * 64, retries=0)
    assert list(tmp_path.iterdir()) == []


def test_download_of_a_zip_member_checks_the_member(tmp_path, range_server):
    text = evaldata.sample_wikitext(1)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("wikitext-2/wiki.test.tokens", text)
        zf.writestr("wikitext-2/wiki.train.tokens", "not this one")
    url = served(range_server, "/wikitext-2-v1.zip", archive.getvalue())
    sha = hashlib.sha256(text.encode()).hexdigest()
    evaldata.prepare_eval_set("wikitext-2", tmp_path / "w2", source="download", url=url, sha256=sha,
                              member="wikitext-2/wiki.test.tokens", retries=0)
    assert (tmp_path / "w2" / "wiki.test.tokens").read_text() == text
    with pytest.raises(UserError, match="no member 'wikitext-2/wiki.valid.tokens'"):
        evaldata.prepare_eval_set("wikitext-2", tmp_path / "w3", source="download", url=url, sha256=sha,
                                  member="wikitext-2/wiki.valid.tokens", retries=0)
    assert not (tmp_path / "w3").exists()


def test_a_local_copy_of_the_real_lambada_is_verified_against_the_pinned_hash(tmp_path, shared_file):
    path = shared_file("lambada_test.jsonl")
    figures = evaldata.prepare_eval_set("lambada", tmp_path / "l", source="download", url=path.as_uri(),
                                        sha256=evaldata.LAMBADA_SHA256)
    assert figures["records"] == 5153 and figures["verified"]


# ----------------------------------------------------------------------------------------------
# The conventions' names, listed once (issue 19)


def test_the_convention_names_are_one_list_that_the_schema_matches():
    from pathlib import Path

    import yaml

    from gpt2ipu.evaluate import cli, conventions, hellaswag, lambada, wiki
    from gpt2ipu.report import evaluation as report_evaluation

    assert lambada.CONVENTIONS is conventions.LAMBADA and hellaswag.CONVENTIONS is conventions.HELLASWAG
    assert (wiki.CONVENTIONS, wiki.DOCUMENTS) == (conventions.WIKITEXT, conventions.WIKITEXT_DOCUMENTS)
    assert wiki.CONVENTIONS is conventions.WIKITEXT and wiki.DOCUMENTS is conventions.WIKITEXT_DOCUMENTS
    assert report_evaluation.conventions is conventions
    parser = __import__("argparse").ArgumentParser()
    cli.add_arguments(parser)
    tasks = next(a for a in parser._actions if a.dest == "task").choices
    for task, names in (("lambada", conventions.LAMBADA), ("wiki", conventions.WIKITEXT),
                        ("hellaswag", conventions.HELLASWAG)):
        assert tasks[task].get_default("conventions") == ",".join(names)
    # YAML cannot import: the schema's enums are checked against the list instead.
    schema = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "schema.yaml").read_text())
    listed = schema["properties"]["evaluate"]["properties"]["conventions"]["properties"]
    assert {task: tuple(entry["items"]["enum"]) for task, entry in listed.items()} == conventions.BY_TASK


def test_the_megatron_wikitext_scorer_is_named_for_its_convention():
    from gpt2ipu.evaluate import wiki

    assert not hasattr(wiki, "score_wikitext")   # it covered only the Megatron convention
    assert callable(wiki.score_wikitext_megatron) and callable(wiki.score_wikitext_lm_eval)


# ----------------------------------------------------------------------------------------------
# Low-precision weights (gpt2ipu/model/lowp.py) in evaluation, and the compute-limit figures


def test_evaluate_with_int8_weights_records_them_and_stays_near_fp32(tmp_path, model_dir, lambada_texts):
    data = tmp_path / "lambada.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in lambada_texts))
    results = {}
    for weights in ("fp32", "int8"):
        out = tmp_path / f"{weights}.json"
        assert cli_main(["evaluate", "lambada", "--model-dir", str(model_dir), "--data", str(data), "--out", str(out),
                         "--device", "cpu", "--conventions", "last_token", "--weights", weights]) == 0
        results[weights] = json.loads(out.read_text())
    assert results["int8"]["provenance"]["params"]["weights"] == "int8"
    fp32, int8 = results["fp32"]["last_token"], results["int8"]["last_token"]
    assert fp32["nll"] != int8["nll"]   # rounded weights: not the same numbers ...
    assert int8["nll"] == pytest.approx(fp32["nll"], rel=0.02)   # ... but close


def test_compute_limit_counts_what_each_task_runs(model, tokenizer, tmp_path):
    import argparse

    from gpt2ipu.bench.evaluate import compute_limit
    from gpt2ipu.evaluate.wiki import split_articles

    config = model.config
    texts = [t for t in evaldata.sample_lambada_texts(60, seed=5) if len(tokenizer.encode(t)) <= config.n_positions][:4]
    assert len(texts) == 4
    wiki_file = tmp_path / "wiki.test.tokens"
    wiki_file.write_text(evaldata.sample_wikitext(1))
    args = argparse.Namespace(wiki_data=wiki_file, wiki_articles=1, batch_size=4, repeats=1, weights="fp32")
    n_params = model.num_parameters()
    figures = compute_limit(model, n_params, tokenizer, texts, args)
    lambada, wiki = figures["lambada"], figures["wikitext"]
    head = config.vocab_size * config.n_embd

    def body(length):   # forward FLOPs of one sequence of `length` fed positions, head left out
        return length * (2 * (n_params - head) + 4 * config.n_layer * config.n_embd * length)

    # LAMBADA: every convention's sequence is the whole passage when it fits (one forward pass
    # each); n tokens feed n - 1 positions, and the head runs on the last word's tokens only.
    lengths = [min(len(tokenizer.encode(t)), config.n_positions) for t in texts]
    assert lambada["passages"] == 4 and lambada["tokens"] == sum(lengths)
    assert lambada["forward_sequences"] == 4 and lambada["forward_positions"] == sum(lengths) - 4
    assert 4 <= lambada["head_rows"] < sum(lengths) / 4
    assert lambada["forward_gflops"] * 1e9 == pytest.approx(
        sum(body(n - 1) for n in lengths) + lambada["head_rows"] * 2 * head)
    # WikiText: windows of n_positions + 1 tokens over one article; every token is scored once.
    article = [tokenizer.eos_id] + tokenizer.encode(wikitext_detokenize(split_articles(wiki_file.read_text())[0]))
    fed = len(article) - 1
    whole, rest = divmod(fed, config.n_positions)
    assert wiki["tokens"] == wiki["head_rows"] == fed and wiki["forward_sequences"] == whole + (rest > 0)
    full_last = [config.n_positions] if whole and rest else [rest] if rest else []
    assert wiki["forward_gflops"] * 1e9 == pytest.approx(
        whole * body(config.n_positions) + sum(body(n) for n in full_last) + fed * 2 * head)
    for task in (lambada, wiki):
        assert task["tokens_per_s"] > 0 and 0 < task["fraction_of_fp32_peak"] == pytest.approx(
            task["forward_gflops"] / task["seconds"] / figures["matmul_peak_gflops"]["fp32"])
