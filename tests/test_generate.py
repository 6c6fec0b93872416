"""Generation: greedy equals transformers', cache and padding change nothing, sampling settings mean what
they say, same seed same text, batch mode and the interactive loop (in a subprocess, Ctrl-D / Ctrl-C)."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gpt2ipu.cli import main as cli_main
from gpt2ipu.data.tokenizer import load_tokenizer
from gpt2ipu.errors import UserError
from gpt2ipu.generate.batch import stop_token_id
from gpt2ipu.generate.decode import use_decode_layout
from gpt2ipu.generate.sampling import SamplingConfig, apply_repetition_penalty, generate, top_k_top_p_filter
from gpt2ipu.pretrained import load_model

WINDOW = 48
PROMPTS = [[464, 4429, 373, 257], [818, 20015, 11, 262, 7404, 6745, 3066, 284], [40]]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def greedy(n: int, **kwargs) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=n, greedy=True, **kwargs)


def plain_greedy(model, prompt: list[int], n: int) -> list[int]:
    """No cache, no batch: the whole (cropped) sequence through the model at every step."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model.logits(torch.tensor([ids[-model.config.n_positions:]]))[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


# ----------------------------------------------------------------------------------------------
# Greedy decoding: against transformers, the no-cache loop, each prompt alone

def test_greedy_equals_transformers_generate_alone_and_left_padded(model_dir, model):
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel.from_pretrained(model_dir).eval()
    hf.generation_config.eos_token_id = None   # generate all the tokens, as ours does without a stop token
    ours = generate(model, PROMPTS, greedy(12), pad_id=50256)
    for prompt, gen in zip(PROMPTS, ours):
        expected = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                               do_sample=False, max_new_tokens=12, pad_token_id=50256)[0, len(prompt):]
        assert gen.tokens == expected.tolist() and not gen.stopped
    # transformers' own left-padded batch gives the same tokens.
    width = max(len(p) for p in PROMPTS)
    ids = torch.tensor([[50256] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    batch = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12, pad_token_id=50256)
    assert [g.tokens for g in ours] == batch[:, width:].tolist()


def test_cache_and_batching_change_nothing_and_generation_slides_past_the_context(model):
    n = WINDOW + 10   # past the 48-token context: the window slides
    batched = generate(model, PROMPTS, greedy(n))
    for prompt, gen in zip(PROMPTS, batched):
        assert gen.tokens == plain_greedy(model, prompt, n)
        assert generate(model, [prompt], greedy(n))[0].tokens == gen.tokens


def test_decode_layout_keeps_the_results(model_dir):
    plain = load_model(model_dir, "cpu", "fp32")
    relaid = load_model(model_dir, "cpu", "fp32")
    use_decode_layout(relaid)
    assert not relaid.h[0].attn.c_attn.weight.is_contiguous()
    assert relaid.lm_head.weight is relaid.wte.weight
    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, relaid.state_dict()[name]), name
    assert [g.tokens for g in generate(relaid, PROMPTS, greedy(10))] == \
        [g.tokens for g in generate(plain, PROMPTS, greedy(10))]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precisions_generate(model_dir, precision):
    half = load_model(model_dir, "cpu", precision)
    assert half.wte.weight.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    gens = generate(half, PROMPTS, SamplingConfig(max_new_tokens=6, top_k=20, seed=3))
    assert all(len(g.tokens) == 6 and all(0 <= t < 50257 for t in g.tokens) for g in gens)


# ----------------------------------------------------------------------------------------------
# Sampling settings

def test_stop_token_ends_a_row_and_is_not_in_the_output(model):
    free = generate(model, PROMPTS, greedy(10))
    stop = free[1].tokens[4]
    gens = generate(model, PROMPTS, greedy(10, stop_token_id=stop))
    assert gens[1].tokens == free[1].tokens[:free[1].tokens.index(stop)] and gens[1].stopped
    for free_gen, gen in zip(free, gens):
        expected = free_gen.tokens[:free_gen.tokens.index(stop)] if stop in free_gen.tokens else free_gen.tokens
        assert gen.tokens == expected


def test_same_seed_same_text_whatever_the_batch(model):
    config = SamplingConfig(max_new_tokens=15, temperature=1.2, top_k=50, top_p=0.9, seed=7)
    together = generate(model, PROMPTS, config, seeds=[7, 8, 9])
    alone = [generate(model, [p], config, seeds=[s])[0] for p, s in zip(PROMPTS, [7, 8, 9])]
    assert [g.tokens for g in together] == [g.tokens for g in alone]
    assert [g.tokens for g in generate(model, PROMPTS, config, seeds=[7, 8, 9])] == [g.tokens for g in together]
    other = generate(model, PROMPTS, config, seeds=[70, 80, 90])
    assert [g.tokens for g in other] != [g.tokens for g in together]


def test_degenerate_sampling_settings_are_greedy(model):
    expected = [g.tokens for g in generate(model, PROMPTS, greedy(8))]
    for settings in ({"temperature": 0.0}, {"top_k": 1}, {"top_p": 1e-9}, {"temperature": 1e-4}):
        got = generate(model, PROMPTS, SamplingConfig(max_new_tokens=8, seed=1, **settings))
        assert [g.tokens for g in got] == expected, settings


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]]))
    kept = lambda out: torch.isfinite(out[0]).nonzero().flatten().tolist()  # noqa: E731
    assert kept(top_k_top_p_filter(logits, 2, 1.0)) == [1, 3]
    assert kept(top_k_top_p_filter(logits, 0, 0.7)) == [1, 3]          # 0.4 + 0.3 >= 0.7
    assert kept(top_k_top_p_filter(logits, 0, 0.71)) == [1, 3, 4]      # needs the 0.15 too
    assert kept(top_k_top_p_filter(logits, 0, 0.01)) == [1]            # the best always stays
    assert kept(top_k_top_p_filter(logits, 3, 0.5)) == [1, 3]


def test_repetition_penalty_follows_ctrl_and_stops_repeats(model):
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0]]
    tokens = generate(model, [PROMPTS[0]], greedy(30, repetition_penalty=1e6))[0].tokens
    assert len(set(tokens)) == len(tokens) and not set(tokens) & set(PROMPTS[0])
    plain = generate(model, [PROMPTS[0]], greedy(30))[0].tokens
    assert len(set(plain)) < len(plain)   # so the penalty is what made the difference


def test_stop_token_must_be_one_token():
    tokenizer = load_tokenizer()
    assert stop_token_id(tokenizer, "<|endoftext|>") == 50256
    assert stop_token_id(tokenizer, "\\n") == 198 and stop_token_id(tokenizer, "none") is None
    with pytest.raises(UserError, match="is 3 tokens"):
        stop_token_id(tokenizer, "antidisestablishment")


# ----------------------------------------------------------------------------------------------
# Command line: batch mode, interactive loop

def test_batch_mode_writes_ordered_records_independent_of_batch_size(model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The river rises in\n\nIn 1850, the village council decided to\nA\n")
    common = ["generate", "--model-dir", str(model_dir), "--prompts", str(prompts), "--device", "cpu",
              "--max-new-tokens", "60", "--temperature", "0.9", "--top-k", "40", "--seed", "11"]
    assert cli_main([*common, "--out", str(tmp_path / "a.jsonl"), "--batch-size", "3"]) == 0
    assert cli_main([*common, "--out", str(tmp_path / "b.jsonl"), "--batch-size", "1"]) == 0
    records = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["The river rises in", "In 1850, the village council decided to", "A"]
    assert [r["index"] for r in records] == [0, 1, 2]
    assert all(r["new_tokens"] == len(r["token_ids"]) > 0 for r in records)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    provenance = json.loads((tmp_path / "a.provenance.json").read_text())
    assert provenance["stage"] == "generate" and provenance["params"]["top_k"] == 40


def test_bad_prompts_file_is_a_clear_error(model_dir, tmp_path, capsys):
    (tmp_path / "p.jsonl").write_text('{"prompt": "fine"}\n{"text": "wrong key"}\n')
    out = tmp_path / "out.jsonl"
    assert cli_main(["generate", "--model-dir", str(model_dir), "--prompts", str(tmp_path / "p.jsonl"),
                     "--out", str(out), "--device", "cpu"]) == 2
    assert 'p.jsonl:2: a prompt record needs a string "prompt" field' in capsys.readouterr().err
    assert not out.exists()


def start_interactive(model_dir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "gpt2ipu", "generate", "--model-dir", str(model_dir), "--device", "cpu",
         "--max-new-tokens", "5", "--greedy", "--stop-token", "none"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_interactive_loop_answers_each_prompt_and_ends_on_ctrl_d(model_dir, model):
    proc = start_interactive(model_dir)
    out, err = proc.communicate("The river\n\nOn the map\n", timeout=120)
    assert proc.returncode == 0, err
    assert out.count("Input: ") == 4 and "Traceback" not in err
    stats = [line for line in out.splitlines() if "tokens/s" in line]
    assert len(stats) == 3 and all("5 tokens" in s and "ms/token" in s for s in stats)
    tokenizer = load_tokenizer()
    expected = tokenizer.decode(plain_greedy(model, tokenizer.encode("The river"), 5))
    assert out.split("Input: ")[1].startswith(expected + "\n[")


@pytest.mark.slow
def test_interactive_loop_ends_cleanly_on_ctrl_c(model_dir):
    proc = start_interactive(model_dir)
    seen, deadline = b"", time.monotonic() + 120
    while b"Input: " not in seen and time.monotonic() < deadline and proc.poll() is None:
        if select.select([proc.stdout], [], [], 0.1)[0]:
            seen += os.read(proc.stdout.fileno(), 4096)
    assert b"Input: " in seen
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in err and "KeyboardInterrupt" not in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_generation_on_cuda(model_dir, model, precision):
    on_gpu = load_model(model_dir, "cuda", precision)
    use_decode_layout(on_gpu)   # leaves a CUDA model as it is
    assert on_gpu.wte.weight.device.type == "cuda"
    gens = generate(on_gpu, PROMPTS, greedy(8))
    assert all(len(g.tokens) == 8 and all(0 <= t < 50257 for t in g.tokens) for g in gens)
    if precision == "fp32":   # the same greedy tokens as on CPU (a random model has no near-ties here)
        assert [g.tokens for g in gens] == [g.tokens for g in generate(model, PROMPTS, greedy(8))]
    sampled = SamplingConfig(max_new_tokens=6, top_k=20, top_p=0.9, seed=5)
    assert [g.tokens for g in generate(on_gpu, PROMPTS, sampled)] == \
        [g.tokens for g in generate(on_gpu, PROMPTS, sampled)]
