"""HellaSwag: lm-eval's and llm.c's conventions against plain references; the data set; errors.

The references here are written out again from the sources they follow (lm-eval 0.4.13's
tasks/hellaswag/utils.py, hellaswag.yaml, `_encode_pair` and `process_results`; llm.c's
dev/data/hellaswag.py), each ending scored alone by `transformers`' own forward pass in float64.
A small seeded `transformers` GPT-2 with a 64-token context makes some items too long, so the
truncation path is covered. Against lm-eval itself when it is installed (the extra `compare`).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import save_tiny_hf_gpt2

from gpt2ipu.cli import main as cli_main
from gpt2ipu.evaluate import data as evaldata
from gpt2ipu.evaluate.hellaswag import lm_eval_choices, lm_eval_query, preprocess, score_hellaswag

WINDOW = 64
EOT = 50256

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REAL_LIKE = {  # the first record of the released hellaswag_val.jsonl, as its format shows it
    "ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
    "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": 3,
    "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
    "source_id": "activitynet~v_-JhWjGDPHMY"}
WIKIHOW = {
    "ind": 4, "activity_label": "Personal Care and Style", "ctx_a": "[header] How to dye your hair [title] Buy dye. "
    "[step] Pick a color  you like.", "ctx_b": "", "ctx": "[header] How to dye your hair [title] Buy dye. [step] "
    "Pick a color  you like.", "split": "val", "split_type": "zeroshot", "label": 1,
    "endings": ["[substeps] Wash it first.", "Rinse it out [title] Dry it.", "  Café au lait [step] ", "Go."],
    "source_id": "wikihow~1"}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    return save_tiny_hf_gpt2(tmp_path_factory.mktemp("hf") / "m", seed=7, n_positions=WINDOW)


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    import transformers

    return transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(hf_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(hf_dir)


@pytest.fixture(scope="module")
def ours(hf_dir):
    from gpt2ipu.pretrained import load_pretrained

    model, tokenizer, _ = load_pretrained(hf_dir, "cpu")
    return model, tokenizer


@pytest.fixture(scope="module")
def records():
    return [REAL_LIKE, WIKIHOW] + evaldata.sample_hellaswag_records(10, seed=5)


# ----------------------------------------------------------------------------------------------
# The references

def loglikelihood(hf_model, context: list[int], ending: list[int], limit: int) -> float:
    tokens = (context + ending)[-limit:]
    with torch.no_grad():
        logits = hf_model(torch.tensor([tokens[:-1]])).logits[0].double()
    picked = torch.log_softmax(logits, -1)[-len(ending):]
    return float(picked[torch.arange(len(ending)), torch.tensor(ending)].sum())


def reference_lm_eval(hf_model, hf_tokenizer, record: dict) -> dict:
    """hellaswag.yaml + utils.process_docs, HFLM's `_encode_pair`, process_results' acc / acc_norm."""
    encode = lambda s: hf_tokenizer.encode(s, add_special_tokens=False)  # noqa: E731

    def prep(text):
        text = text.strip().replace(" [title]", ". ")
        return re.sub("\\[.*?\\]", "", text).replace("  ", " ")

    query = prep(record["activity_label"] + ": " + record["ctx_a"] + " " + record["ctx_b"].capitalize())
    choices = [prep(e) for e in record["endings"]]
    lls = []
    for choice in choices:
        context, continuation = query, " " + choice
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        context_enc = encode(context)
        lls.append(loglikelihood(hf_model, context_enc, encode(context + continuation)[len(context_enc):], WINDOW + 1))
    lls = np.array(lls)
    return {"lls": lls, "pred": int(np.argmax(lls)),
            "pred_norm": int(np.argmax(lls / np.array([float(len(c)) for c in choices])))}


def reference_llm_c(hf_model, hf_tokenizer, record: dict) -> dict:
    """llm.c's render_example + evaluate: ctx tokens, " " + ending tokens; summed and mean loss."""
    encode = lambda s: hf_tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    context = encode(record["ctx"])
    losses = [(-loglikelihood(hf_model, context, encode(" " + e), WINDOW), len(encode(" " + e)))
              for e in record["endings"]]
    total = torch.tensor([loss for loss, _ in losses])
    mean = torch.tensor([loss / n for loss, n in losses])
    return {"lls": -total.numpy(), "pred": int(total.argmin()), "pred_norm": int(mean.argmin())}


# ----------------------------------------------------------------------------------------------
# Preprocessing

def test_lm_eval_preprocessing_of_a_wikihow_record():
    # Stripped first, so a leading marker leaves a space (lm-eval's behaviour, kept).
    assert preprocess(" [header] How to x [title] Buy dye. [step] Pick  it. ") == " How to x. Buy dye. Pick it."
    assert lm_eval_query(REAL_LIKE) == "Roof shingle removal: A man is sitting on a roof. He"
    assert lm_eval_query(WIKIHOW) == "Personal Care and Style: How to dye your hair. Buy dye. Pick a color you like."
    assert lm_eval_choices(WIKIHOW) == [" Wash it first.", "Rinse it out. Dry it.", "Café au lait ", "Go."]


# ----------------------------------------------------------------------------------------------
# Both conventions, per ending and per item

@pytest.fixture(scope="module")
def references(hf_model, hf_tokenizer, records):
    return {(convention, index): reference(hf_model, hf_tokenizer, record)
            for convention, reference in (("lm_eval", reference_lm_eval), ("llm_c", reference_llm_c))
            for index, record in enumerate(records)}


@pytest.mark.parametrize("batch_size", [1, 5])
def test_both_conventions_equal_their_definitions(ours, references, records, batch_size):
    model, tokenizer = ours
    samples = []
    result = score_hellaswag(model, tokenizer, records, batch_size=batch_size, log_samples=samples)
    hits = {"lm_eval": [0, 0], "llm_c": [0, 0]}
    for sample in samples:
        expected = references[sample["convention"], sample["index"]]
        np.testing.assert_allclose(sample["loglikelihoods"], expected["lls"], rtol=0, atol=1e-5)
        assert (sample["pred"], sample["pred_norm"]) == (expected["pred"], expected["pred_norm"]), sample
        hits[sample["convention"]][0] += expected["pred"] == sample["label"]
        hits[sample["convention"]][1] += expected["pred_norm"] == sample["label"]
    for convention, (acc, acc_norm) in hits.items():
        assert result[convention]["correct"] == acc and result[convention]["correct_norm"] == acc_norm
        assert result[convention]["acc_norm"] == acc_norm / len(records)
    # Some contexts did not fit the 64-token window with every ending: those items' endings were
    # scored with their own truncated contexts.
    assert result["forward_rows"] > 2 * len(records)


def test_through_the_command_line(tmp_path, hf_dir, records, capsys):
    path = tmp_path / "hellaswag_val.jsonl"
    evaldata.write_hellaswag_jsonl(path, records[:4])
    assert cli_main(["evaluate", "hellaswag", "--model-dir", str(hf_dir), "--data", str(tmp_path), "--device", "cpu",
                     "--out", str(tmp_path / "h.json"), "--log-samples", str(tmp_path / "h.jsonl")]) == 0
    result = json.loads((tmp_path / "h.json").read_text())
    assert result["provenance"]["stage"] == "evaluate_hellaswag" and result["samples"] == 4
    assert set(result["lm_eval"]) >= {"acc", "acc_norm", "acc_bytes"} and set(result["llm_c"]) >= {"acc", "acc_norm"}
    lines = [json.loads(line) for line in (tmp_path / "h.jsonl").read_text().splitlines()]
    assert [(s["convention"], s["index"]) for s in lines] == [(c, i) for c in ("lm_eval", "llm_c") for i in range(4)]
    assert sum(s["acc"] for s in lines if s["convention"] == "llm_c") == result["llm_c"]["correct"]


# ----------------------------------------------------------------------------------------------
# The data set: generated in the release's format; bad input

def test_generated_set_has_the_release_format_and_is_deterministic(tmp_path):
    for out in ("a", "b"):
        evaldata.write_sample_set("hellaswag", tmp_path / out, hellaswag_items=20)
    file = evaldata.HELLASWAG_NAME
    assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()
    records = [json.loads(line) for line in (tmp_path / "a" / file).read_text().splitlines()]
    assert len(records) == 20 and all(set(r) == set(REAL_LIKE) for r in records)
    assert all(len(r["endings"]) == 4 and 0 <= r["label"] < 4 for r in records)
    assert all(r["ctx"] == (f"{r['ctx_a']} {r['ctx_b']}" if r["ctx_b"] else r["ctx_a"]) for r in records)
    kinds = {r["source_id"].split("~")[0] for r in records}
    assert kinds == {"activitynet", "wikihow"} and any("[title]" in r["ctx_a"] for r in records)
    assert evaldata.read_hellaswag(tmp_path / "a") == records


@pytest.mark.parametrize("content,message", [
    ("not json\n", r"hellaswag_val\.jsonl:1: not a JSON line"),
    (json.dumps(REAL_LIKE) + "\n" + json.dumps({"text": "a LAMBADA line"}) + "\n",
     r"hellaswag_val\.jsonl:2: a HellaSwag record needs a string \"ctx\""),
    (json.dumps({**REAL_LIKE, "endings": "one"}) + "\n", r"hellaswag_val\.jsonl:1: \"endings\" must be a list"),
    (json.dumps({k: v for k, v in REAL_LIKE.items() if k != "label"}) + "\n", r":1: .*no label \(the test split"),
    (json.dumps({**REAL_LIKE, "label": 4}) + "\n", r":1: \"label\" must be the index of the right ending, 0 to 3"),
    ("\n", r"hellaswag_val\.jsonl: no HellaSwag records"),
])
def test_bad_hellaswag_file_is_a_clear_error_and_writes_nothing(tmp_path, hf_dir, capsys, content, message):
    (tmp_path / "hellaswag_val.jsonl").write_text(content)
    out = tmp_path / "r.json"
    code = cli_main(["evaluate", "hellaswag", "--model-dir", str(hf_dir),
                     "--data", str(tmp_path / "hellaswag_val.jsonl"), "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and re.search(message, err), err
    assert "Traceback" not in err and not out.exists()


def test_a_local_copy_is_fetched_unpinned_with_its_hash_recorded(tmp_path, capsys):
    source = tmp_path / "copy.jsonl"
    evaldata.write_hellaswag_jsonl(source, [REAL_LIKE])
    figures = evaldata.prepare_eval_set("hellaswag", tmp_path / "set", source="download", url=source.as_uri(),
                                        sha256=None)
    assert figures["records"] == 1 and figures["verified"] is False
    assert figures["sha256"] in capsys.readouterr().err
    assert evaldata.DEFAULT_SOURCES["hellaswag"]["sha256"] is None


# ----------------------------------------------------------------------------------------------
# Against lm-eval itself (the optional extra `compare`)

@pytest.mark.slow   # lm-eval starts `git` in a child process; importing and running it takes a while
def test_lm_eval_convention_equals_lm_eval_itself(ours, hf_dir, records):
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    from gpt2ipu.bench import lm_eval_baseline as baseline

    model, tokenizer = ours
    items = records + evaldata.sample_hellaswag_records(12, seed=9)
    theirs = baseline.run_lm_eval(baseline.lm_eval_model(hf_dir), [baseline.hellaswag_task(items)])
    theirs = theirs[baseline.HELLASWAG_TASK]
    samples = []
    result = score_hellaswag(model, tokenizer, items, conventions=["lm_eval"], log_samples=samples)
    for sample, (_, lls, _), metrics in zip(samples, theirs["samples"], theirs["metrics"], strict=True):
        np.testing.assert_allclose(sample["loglikelihoods"], lls, rtol=0, atol=1e-4)
        assert (sample["acc"], sample["acc_norm"]) == (bool(metrics["acc"]), bool(metrics["acc_norm"]))
    assert result["lm_eval"]["acc"] == theirs["results"]["acc"]
    assert result["lm_eval"]["acc_norm"] == theirs["results"]["acc_norm"]
