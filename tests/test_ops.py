"""The compiled custom ops: correctness against plain PyTorch / numpy, and every fallback path.

The ops are compiled once per test session into pytest's cache folder (.pytest_cache, keyed on the
sources, so an unchanged checkout reuses the build across sessions; about 20 s on two cores).
Tests that need them skip, saying why, when the build fails (no compiler); the fallback tests run
regardless. The tests that use the build (the `built_ops_dir` fixture, directly or through
`compiled`) are marked `slow` by tests/conftest.py, as are those that start a child process.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import plain_loss

from gpt2ipu import ops
from gpt2ipu.cli import main as gpt2ipu_main
from gpt2ipu.generate import decode
from gpt2ipu.model import loss as model_loss
from gpt2ipu.model.loss import chunked_lm_loss
from gpt2ipu.ops import build as ops_build
from gpt2ipu.ops import load as ops_load
from gpt2ipu.ops import selfcheck
from gpt2ipu.train import sample_index
from gpt2ipu.train.data import build_doc_idx
from gpt2ipu.train.sample_index import build_sample_idx, build_sample_idx_loop, build_sample_idx_numpy

REPO = Path(__file__).resolve().parents[1]
SOURCES = REPO / "custom_ops"


@pytest.fixture
def fresh_outcomes(monkeypatch):
    """Forget which folders load_ops has answered for, so each test sees its own first call."""
    monkeypatch.setattr(ops_load, "_outcomes", {})
    monkeypatch.delenv(ops.OPS_DIR_ENV, raising=False)


# ---------------------------------------------------------------------------------------------
# Fused LM loss


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.double() - reference.double()).norm() / reference.double().norm()).item()


def plain_loss_and_grads(hidden, weight, labels):
    """loss, accuracy and both gradients through PyTorch's own linear + cross_entropy (conftest's plain_loss)."""
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    loss = plain_loss(hidden, weight, labels)
    loss.backward()
    valid = labels != -100
    with torch.no_grad():
        accuracy = ((F.linear(hidden, weight).argmax(-1) == labels) & valid).sum() / valid.sum()
    return loss.detach(), accuracy, hidden.grad, weight.grad


def fused_loss(hidden, weight, labels, chunk_size):
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    loss, accuracy = model_loss.fused_lm_loss(hidden, weight, labels, chunk_size=chunk_size)
    loss.backward()
    return loss.detach(), accuracy, hidden.grad, weight.grad


def random_problem(seed, n, vocab, dim, ignored=0.2, dtype=torch.float32, weight_std=1.0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, dim, generator=generator)
    weight = torch.randn(vocab, dim, generator=generator) * weight_std
    labels = torch.randint(0, vocab, (n,), generator=generator)
    # Some labels are the argmax, so that the accuracy is not just 0.
    hits = torch.rand(n, generator=generator) < 0.4
    labels[hits] = (hidden @ weight.t()).argmax(-1)[hits]
    labels[torch.rand(n, generator=generator) < ignored] = -100
    if (labels == -100).all():
        labels[0] = 0
    return hidden.to(dtype), weight.to(dtype), labels


SHAPES = [  # (N, V, d, chunk_size)
    (1, 37, 16, 8),  # N = 1, V not a multiple of the chunk
    (2, 50, 8, 50),  # one chunk exactly
    (33, 1000, 64, 128),
    (64, 1031, 48, 1024),  # last chunk of 7 rows
    (17, 300, 32, 4096),  # chunk larger than V
    (40, 97, 24, 1),  # one vocabulary row per chunk
]


@pytest.mark.parametrize("n,vocab,dim,chunk", SHAPES)
def test_fused_loss_fp32_matches_pytorch(compiled, n, vocab, dim, chunk):
    hidden, weight, labels = random_problem(n * vocab, n, vocab, dim)
    ours = fused_loss(hidden, weight, labels, chunk)
    reference = plain_loss_and_grads(hidden, weight, labels)
    for name, a, b in zip(("loss", "accuracy", "grad_hidden", "grad_weight"), ours, reference):
        assert a.dtype == b.dtype, name
        assert relative_error(a, b) < 1e-5 or (a == b).all(), (name, relative_error(a, b))
    assert ours[1].item() == reference[1].item()
    assert ours[1].item() > 0 or n < 10  # some labels are the argmax


@pytest.mark.parametrize("n,vocab,dim,chunk", SHAPES[:4])
def test_fused_loss_bf16_matches_pytorch(compiled, n, vocab, dim, chunk):
    # Logits of the size a trained model gives (std about 1): the bf16 rounding of the matmul's
    # output, which plain bf16 PyTorch makes too, grows with their magnitude.
    hidden, weight, labels = random_problem(n + vocab, n, vocab, dim, dtype=torch.bfloat16,
                                            weight_std=1 / math.sqrt(dim))
    ours = fused_loss(hidden, weight, labels, chunk)
    exact = plain_loss_and_grads(hidden.float(), weight.float(), labels)  # fp32 maths on the same bf16 values
    plain_bf16 = plain_loss_and_grads(hidden, weight, labels)
    assert ours[2].dtype == ours[3].dtype == torch.bfloat16 and ours[0].dtype == torch.float32
    for name, a, b, c in zip(("loss", "grad_hidden", "grad_weight"), ours[::2] + ours[3:], exact[::2] + exact[3:],
                             plain_bf16[::2] + plain_bf16[3:]):
        assert relative_error(a, b) < 1e-2, (name, relative_error(a, b))
        # and no worse than PyTorch's own bf16 path, give or take
        assert relative_error(a, b) < 2 * relative_error(c, b) + 1e-3, name
    assert abs(ours[1].item() - exact[1].item()) <= 0.1


def test_fused_loss_all_ignored_and_empty(compiled):
    hidden, weight, _ = random_problem(1, 5, 11, 8)
    for labels in (torch.full((5,), -100), torch.zeros(0, dtype=torch.long)):
        h = hidden[: len(labels)]
        loss, accuracy, grad_hidden, grad_weight = fused_loss(h, weight, labels, 4)
        pure = chunked_lm_loss(h, weight, labels, vocab_chunks=3)
        assert math.isnan(loss.item()) and math.isnan(accuracy.item())
        assert math.isnan(pure[0].item()) and math.isnan(pure[1].item())  # the same contract
        assert grad_hidden.abs().sum() == 0 and grad_weight.abs().sum() == 0


def test_fused_loss_rejects_bad_labels(compiled):
    hidden, weight, _ = random_problem(2, 3, 10, 4)
    with pytest.raises(IndexError, match="label 10 out of range"):
        model_loss.fused_lm_loss(hidden, weight, torch.tensor([0, 10, -100]), chunk_size=4)


def test_fused_loss_under_autocast_matches_chunked(compiled):
    hidden, weight, labels = random_problem(3, 24, 200, 32, weight_std=0.2)
    results = []
    for fn in (lambda h, w: model_loss.fused_lm_loss(h, w, labels, chunk_size=64),
               lambda h, w: chunked_lm_loss(h, w, labels, vocab_chunks=4)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = fn(h, w)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    assert results[0][1].dtype == torch.float32  # gradients in the parameters' dtype
    for a, b in zip(*results):
        assert relative_error(a, b) < 1e-2


def test_dispatch_helper_follows_the_environment(compiled, built_ops_dir, fresh_outcomes, monkeypatch, tmp_path):
    hidden, weight, _ = random_problem(4, 2, 10, 4)
    assert not model_loss.fused_lm_loss_available(hidden, weight)  # $GPT2IPU_OPS_DIR unset
    monkeypatch.setenv(ops.OPS_DIR_ENV, str(built_ops_dir[0]))
    assert model_loss.fused_lm_loss_available(hidden, weight)
    assert not model_loss.fused_lm_loss_available(hidden.half(), weight.half())  # fp16: the pure path
    monkeypatch.setenv(ops.OPS_DIR_ENV, str(tmp_path))
    assert not model_loss.fused_lm_loss_available(hidden, weight)


# ---------------------------------------------------------------------------------------------
# Sample index


def sample_index_cases():
    rng = np.random.default_rng(5)
    for case in range(60):
        docs, epochs, seq_length = int(rng.integers(1, 25)), int(rng.integers(1, 4)), int(rng.integers(1, 17))
        sizes = rng.integers(0, 9, docs).astype(np.int32)  # empty documents included
        sizes[rng.integers(0, docs)] += 1
        if epochs * int(sizes.sum()) >= seq_length + 1:
            yield sizes, build_doc_idx(docs, epochs, case), seq_length, epochs, int(sizes.sum())


def test_sample_index_equals_numpy_and_loop(compiled):
    cases = list(sample_index_cases())
    assert len(cases) > 40
    for sizes, doc_idx, seq_length, epochs, tokens_per_epoch in cases:
        reference = build_sample_idx_numpy(sizes, doc_idx, seq_length, epochs, tokens_per_epoch)
        num_samples = (epochs * tokens_per_epoch - 1) // seq_length
        ours = compiled.build_sample_idx(torch.from_numpy(sizes), torch.from_numpy(doc_idx), seq_length,
                                         num_samples).numpy()
        assert ours.dtype == reference.dtype == np.int32
        np.testing.assert_array_equal(ours, reference)
        np.testing.assert_array_equal(ours, build_sample_idx_loop(sizes, doc_idx, seq_length, epochs, tokens_per_epoch))


def test_train_data_dispatches_to_the_compiled_sample_index(compiled, built_ops_dir, fresh_outcomes, monkeypatch):
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 300, 5000).astype(np.int32)
    doc_idx = build_doc_idx(len(sizes), 3, 0).astype(np.int64)  # int64 positions are accepted too
    args = (sizes, doc_idx, 128, 3, int(sizes.sum()))
    reference = build_sample_idx_numpy(*args)
    loop_reference = build_sample_idx_loop(*args)
    monkeypatch.setenv(ops.OPS_DIR_ENV, str(built_ops_dir[0]))
    # The numpy fallback must not answer: were the ops not loaded, the test fails here, not passes.
    def no_fallback(*a, **k):
        raise AssertionError("build_sample_idx fell back to numpy although the ops are built")
    monkeypatch.setattr(sample_index, "build_sample_idx_numpy", no_fallback)
    op_calls, returned = [], []
    op = compiled.build_sample_idx
    monkeypatch.setattr(compiled, "build_sample_idx", lambda *a: op_calls.append(a) or op(*a))
    original = sample_index.compiled_sample_idx
    monkeypatch.setattr(sample_index, "compiled_sample_idx", lambda *a: returned.append(original(*a)) or returned[-1])
    ours = build_sample_idx(*args)
    assert len(op_calls) == 1, "the compiled op did not run"
    assert len(returned) == 1 and returned[0] is not None, "compiled_sample_idx gave no array"
    assert ours is returned[0]  # what build_sample_idx returned is the op's array
    assert ours.dtype == reference.dtype == loop_reference.dtype == np.int32
    np.testing.assert_array_equal(ours, loop_reference)
    np.testing.assert_array_equal(ours, reference)
    assert ours[-1, 0] > 2 * len(sizes)  # reached the third epoch


def test_sample_index_errors_match_numpy(compiled, built_ops_dir, fresh_outcomes, monkeypatch):
    sizes = np.array([3, 4, 5], dtype=np.int32)
    monkeypatch.setenv(ops.OPS_DIR_ENV, str(built_ops_dir[0]))
    with pytest.raises(ValueError):  # asks for 2 epochs of a 1-epoch doc_idx
        build_sample_idx(sizes, np.array([0, 1, 2], dtype=np.int32), 4, 2, 12)
    with pytest.raises(ValueError):
        build_sample_idx_numpy(sizes, np.array([0, 1, 2], dtype=np.int32), 4, 2, 12)
    with pytest.raises(IndexError):
        build_sample_idx(sizes, np.array([0, 1, 3], dtype=np.int32), 4, 1, 12)


def test_self_check_expectation_is_the_loop_reference():
    """The rows the build's self-check expects, written out in gpt2ipu/ops/selfcheck.py, are Megatron's."""
    sizes = np.array(selfcheck.SAMPLE_SIZES, dtype=np.int32)
    doc_idx = np.array(selfcheck.SAMPLE_DOC_IDX, dtype=np.int32)
    epochs = 2
    assert len(doc_idx) == epochs * len(sizes) and sorted(doc_idx.tolist()) == sorted(list(range(len(sizes))) * epochs)
    reference = build_sample_idx_loop(sizes, doc_idx, selfcheck.SAMPLE_SEQ_LENGTH, epochs, int(sizes.sum()))
    want = np.array(selfcheck.SAMPLE_IDX, dtype=np.int32)
    assert want.dtype == reference.dtype and want.shape == reference.shape
    np.testing.assert_array_equal(want, reference)


# ---------------------------------------------------------------------------------------------
# Fallbacks: no build, failed build, broken library, no compiler


def test_no_ops_dir_uses_the_pure_paths_and_says_so_once(fresh_outcomes, capsys):
    assert ops.load_ops() is None
    assert ops.load_ops() is None
    err = capsys.readouterr().err
    assert err.count("gpt2ipu ops: using the pure PyTorch / numpy paths") == 1
    assert ops.OPS_DIR_ENV in err


def test_unbuilt_and_failed_builds_fall_back(fresh_outcomes, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert ops.load_ops(empty, quiet=True) is None
    assert "not built" in ops.ops_reason(empty)
    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / ops_build.STATUS_NAME).write_text(json.dumps({"built": False, "reason": "no C++ compiler"}))
    assert ops.load_ops(failed, quiet=True) is None
    assert "failed: no C++ compiler" in ops.ops_reason(failed)
    # and everything still works, with the same results, through the pure paths
    monkeypatch.setenv(ops.OPS_DIR_ENV, str(failed))
    hidden, weight, labels = random_problem(6, 9, 40, 8)
    assert not model_loss.fused_lm_loss_available(hidden, weight)
    loss, _ = chunked_lm_loss(hidden, weight, labels, vocab_chunks=3)
    assert relative_error(loss, plain_loss(hidden, weight, labels)) < 1e-5
    for sizes, doc_idx, seq_length, epochs, tokens in list(sample_index_cases())[:10]:
        np.testing.assert_array_equal(build_sample_idx(sizes, doc_idx, seq_length, epochs, tokens),
                                      build_sample_idx_loop(sizes, doc_idx, seq_length, epochs, tokens))


@pytest.mark.slow
def test_broken_library_and_wrong_torch_fall_back(tmp_path):
    # In a fresh process: this one may already hold a good build, which would answer first.
    # Asking fused_lm_loss itself for the op there is an error that names the reason.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "gpt2ipu_ops.so").write_bytes(b"not a shared library")
    status = {"built": True, "library": "gpt2ipu_ops.so", "torch": ops_build._torch_version()}
    (broken / ops_build.STATUS_NAME).write_text(json.dumps(status))
    old = tmp_path / "old"
    old.mkdir()
    (old / ops_build.STATUS_NAME).write_text(json.dumps({**status, "torch": "1.0.0"}))
    script = ("import sys, torch, gpt2ipu.ops as o, gpt2ipu.model.loss as l\n"
              "for d in sys.argv[1:]: print(o.load_ops(d, quiet=True) is None, o.ops_reason(d))\n"
              "try: l.fused_lm_loss(torch.ones(1, 2), torch.ones(3, 2), torch.zeros(1, dtype=torch.long))\n"
              "except RuntimeError as e: print(e)\n")
    result = subprocess.run([sys.executable, "-c", script, str(broken), str(old)], capture_output=True, text=True,
                            timeout=120, check=True)
    first, second, third = result.stdout.splitlines()
    assert first.startswith("True cannot load")
    assert second.startswith("True") and "built for torch 1.0.0" in second
    assert third.startswith("fused_lm_loss needs the compiled ops") and ops.OPS_DIR_ENV in third


@pytest.mark.slow
def test_failed_compilation_writes_status_and_log(tmp_path, capsys):
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler here (test_no_compiler covers that case)")
    source = tmp_path / "src"
    source.mkdir()
    (source / "broken.cpp").write_text('#error "deliberately broken source"\n')
    status = ops.build_ops(source, tmp_path / "out")
    assert status["built"] is False and "compilation failed" in status["reason"]
    assert json.loads((tmp_path / "out" / ops_build.STATUS_NAME).read_text()) == status
    assert "deliberately broken source" in capsys.readouterr().err  # the compiler's words, in the log
    assert ops.load_ops(tmp_path / "out", quiet=True) is None


def test_no_compiler(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CXX", "no-such-compiler-gpt2ipu")
    status = ops.build_ops(SOURCES, tmp_path / "out")
    assert status["built"] is False and status["library"] is None
    assert "no C++ compiler" in status["reason"]
    assert (tmp_path / "out" / "provenance.json").is_file()
    # the CLI: succeeds (training falls back), or fails with --strict
    assert gpt2ipu_main(["ops", "build", "--out", str(tmp_path / "cli"), "--force"]) == 0
    assert json.loads(capsys.readouterr().out)["built"] is False
    assert gpt2ipu_main(["ops", "build", "--out", str(tmp_path / "cli"), "--strict", "--force"]) == 1


def test_build_is_reused_and_the_key_follows_the_sources(built_ops_dir, tmp_path):
    folder, status = built_ops_dir
    if status["built"]:
        again = ops.build_ops(SOURCES, folder)
        assert again == status  # no second compile
    copy = tmp_path / "src"
    copy.mkdir()
    for path in ops_build.source_files(SOURCES):
        (copy / path.name).write_bytes(path.read_bytes())
    assert ops.build_key(copy) == ops.build_key(SOURCES)
    (copy / "lm_loss.cpp").write_text((copy / "lm_loss.cpp").read_text() + "\n// edited\n")
    assert ops.build_key(copy) != ops.build_key(SOURCES)


def test_cli_check(compiled, built_ops_dir, tmp_path, capsys):
    assert gpt2ipu_main(["ops", "check", str(built_ops_dir[0])]) == 0
    assert json.loads(capsys.readouterr().out)["loaded"] is True
    assert gpt2ipu_main(["ops", "check", str(tmp_path)]) == 1
    assert "not built" in json.loads(capsys.readouterr().out)["reason"]


@pytest.mark.slow
def test_snakemake_rule_succeeds_when_the_build_fails(tmp_path):
    for name in ("Snakefile", "workflow", "config", "profiles", "environment.yml"):
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, tmp_path / name)
        else:
            (tmp_path / name).write_bytes(source.read_bytes())
    snakefile = tmp_path / "Snakefile"
    if "rules/ops.smk" not in snakefile.read_text():
        snakefile.write_text(snakefile.read_text() + '\ninclude: "workflow/rules/ops.smk"\n')
    env = {**os.environ, "CXX": "no-such-compiler-gpt2ipu"}
    command = [sys.executable, "-m", "snakemake", "--cores", "1", "build_ops"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (out,) = (tmp_path / "results" / "ops").iterdir()
    assert out.name == ops.build_key(SOURCES)
    assert json.loads((out / ops_build.STATUS_NAME).read_text())["built"] is False
    (log,) = (tmp_path / "logs" / "ops").iterdir()
    assert "no C++ compiler" in log.read_text()


# ---------------------------------------------------------------------------------------------
# Decoding matrix-vector product


@pytest.mark.parametrize("rows, out, inner, bias", [
    (1, 37, 24, True),      # out not a multiple of the 4-row blocks
    (4, 768, 64, False),
    (16, 130, 200, True),   # the most rows the op takes; inner not a multiple of the vector width
    (1, 3, 5, False),       # fewer output rows than one block
])
def test_decode_linear_matches_linear(compiled, rows, out, inner, bias):
    generator = torch.Generator().manual_seed(rows * out)
    x, weight = torch.randn(rows, inner, generator=generator), torch.randn(out, inner, generator=generator)
    b = torch.randn(out, generator=generator) if bias else None
    got = compiled.decode_linear(x, weight, b)
    want = F.linear(x.double(), weight.double(), None if b is None else b.double())
    assert got.shape == (rows, out) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_decode_linear_refuses_what_it_cannot_do(compiled):
    with pytest.raises(RuntimeError, match="at most 16 rows"):
        compiled.decode_linear(torch.randn(17, 8), torch.randn(4, 8), None)
    with pytest.raises(RuntimeError, match="float32 only"):
        compiled.decode_linear(torch.randn(1, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64), None)
    with pytest.raises(RuntimeError, match="need x"):
        compiled.decode_linear(torch.randn(1, 8), torch.randn(4, 9), None)


def test_decode_linear_dispatch_rules(compiled, built_ops_dir, fresh_outcomes, monkeypatch):
    monkeypatch.setenv(ops.OPS_DIR_ENV, str(built_ops_dir[0]))
    weight = torch.randn(12, 8)
    assert decode.decode_linear_available(torch.randn(1, 3, 8), weight)          # [B, T, in] with B * T <= 16
    assert not decode.decode_linear_available(torch.randn(2, 9, 8), weight)      # 18 rows: F.linear's job
    assert not decode.decode_linear_available(torch.randn(1, 8).bfloat16(), weight.bfloat16())
    assert not decode.decode_linear_available(torch.randn(1, 8), weight.t().contiguous().t())
    assert not decode.decode_linear_available(torch.randn(1, 8, requires_grad=True), weight)  # no autograd
    with torch.no_grad():
        assert decode.decode_linear_available(torch.randn(1, 8, requires_grad=True), weight)
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(decode.decode_linear(x, weight, None), F.linear(x, weight), rtol=1e-5, atol=1e-5)


def test_generation_through_the_decode_op_equals_the_pure_path(compiled, built_ops_dir, fresh_outcomes, monkeypatch):
    from gpt2ipu.generate.decode import DecodeLinear, use_decode_layout
    from gpt2ipu.generate.sampling import SamplingConfig, generate
    from gpt2ipu.model import GPT, config_for

    torch.manual_seed(0)
    plain = GPT(config_for("gpt2-test", 64)).eval()
    fast = GPT(config_for("gpt2-test", 64)).eval()
    fast.load_state_dict(plain.state_dict())
    monkeypatch.setenv(ops.OPS_DIR_ENV, str(built_ops_dir[0]))
    use_decode_layout(fast)
    assert isinstance(fast.h[0].mlp.c_fc, DecodeLinear) and isinstance(fast.lm_head, DecodeLinear)
    assert fast.lm_head.weight is fast.wte.weight
    calls = []
    original = decode.FusedDecoder.step
    monkeypatch.setattr(decode.FusedDecoder, "step", lambda *a: calls.append(1) or original(*a))
    prompts = [[5, 9, 200, 7], [11, 3]]   # a left-padded batch of two rows
    config = SamplingConfig(max_new_tokens=12, greedy=True)
    tokens = [g.tokens for g in generate(fast, prompts, config)]
    assert len(calls) == 11   # every decode step after the prompt, through the compiled decode_step
    monkeypatch.setattr(decode.FusedDecoder, "for_model", classmethod(lambda cls, model: None))
    assert tokens == [g.tokens for g in generate(plain, prompts, config)]   # PyTorch's modules, no compiled op
    ids = torch.tensor([prompts[0]])
    with torch.inference_mode():
        torch.testing.assert_close(fast.logits(ids[:, -1:]), plain.logits(ids[:, -1:]), rtol=1e-5, atol=1e-5)


def test_model_gradients_through_the_fused_loss_equal_the_plain_loss(compiled, built_ops_dir, fresh_outcomes,
                                                                      monkeypatch):
    """The tied embedding's gradient assembled in the loss's buffer (TiedGrad) with the compiled op."""
    from gpt2ipu.model import GPT, config_for

    monkeypatch.setenv(ops.OPS_DIR_ENV, str(built_ops_dir[0]))
    torch.manual_seed(0)
    plain, fused = GPT(config_for("gpt2-test", 32)), GPT(config_for("gpt2-test", 32))
    fused.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 50257, (3, 17), generator=torch.Generator().manual_seed(1))
    calls = []
    original = model_loss.fused_lm_loss
    monkeypatch.setattr(model_loss, "fused_lm_loss", lambda *a, **k: calls.append(k["tied"]) or original(*a, **k))
    for _ in range(2):   # two micro-batches: the second adds into the first's gradients
        plain(ids[:, :-1], ids[:, 1:])[0].backward()
        fused(ids[:, :-1], ids[:, 1:], vocab_chunks=4)[0].backward()
    assert len(calls) == 2 and all(tied is not None for tied in calls)
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=name)
