"""The training stage: exact resume after SIGKILL, data parallelism, errors, the original's flags
(translated once by `resolve`, each with a help line), IPU-only flags."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from safetensors.numpy import load_file

from gpt2ipu.errors import UserError

TINY = ["--model", "gpt2-test", "--max-len", "32", "--batch-size", "4", "--gradient-accumulation", "2",
        "--generated-samples", "256", "--progress", "false", "--lr-schedule", "cosine", "--lr-warmup", "0.2",
        "--learning-rate", "0.001", "--dropout", "0.1", "--keep-checkpoints", "20", "--device", "cpu"]


def train_command(*args):
    return [sys.executable, "-m", "gpt2ipu", "train", *TINY, *map(str, args)]


def run_train(*args, env=None):
    result = subprocess.run(train_command(*args), capture_output=True, text=True, env=env, timeout=300)
    return result


def single_thread_env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_exact(tmp_path):
    common = ["--max-steps", 12, "--checkpoint-every", 2]
    straight = run_train(*common, "--state-dir", tmp_path / "a", "--save-model-path", tmp_path / "a_final",
                         env=single_thread_env())
    assert straight.returncode == 0, straight.stderr

    # Kill the second run with SIGKILL once it has written a checkpoint but before it finished.
    state = tmp_path / "b" / "checkpoints"
    proc = subprocess.Popen(train_command(*common, "--state-dir", tmp_path / "b", "--save-model-path",
                                          tmp_path / "b_final"), env=single_thread_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (state.is_dir() and any(state.glob("step-*/training_state.pt"))):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = sorted(p.name for p in state.glob("step-*"))
    assert killed_at and not (tmp_path / "b_final").exists(), "the run finished before it could be killed"

    resumed = run_train(*common, "--state-dir", tmp_path / "b", "--save-model-path", tmp_path / "b_final",
                        env=single_thread_env())
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    a = load_file(str(tmp_path / "a_final" / "model.safetensors"))
    b = load_file(str(tmp_path / "b_final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] == b[name]).all(), f"{name} differs after resume"
    # The metrics file continues without duplicate or missing steps.
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    # One process: micro-batch 4 x accumulation 2 = global 8. Two processes: 2 x 2 x 2 = 8.
    common = ["--max-steps", 4, "--checkpoint-every", 0, "--dropout", "0.0", "--log-every", 1]
    one = run_train(*common, "--state-dir", tmp_path / "one", env=single_thread_env())
    assert one.returncode == 0, one.stderr
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           "-m", "gpt2ipu", "train", *TINY, *map(str, common), "--batch-size", "2", "--replication-factor", "2",
           "--state-dir", str(tmp_path / "two")]
    two = subprocess.run(cmd, capture_output=True, text=True, env=single_thread_env(), timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    def losses(p):
        return [json.loads(line)["loss"] for line in (p / "metrics.jsonl").read_text().splitlines()]
    one_losses, two_losses = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one_losses) == len(two_losses) == 4
    assert one_losses == pytest.approx(two_losses, rel=1e-5)


@pytest.mark.slow
def test_replication_factor_without_torchrun_says_how_to_launch(tmp_path):
    result = run_train("--max-steps", 1, "--replication-factor", 2, "--state-dir", tmp_path / "s")
    assert result.returncode == 2
    assert "torchrun --nproc_per_node 2" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    # Step 1's loss comes from the initial weights (finite); its update at a learning rate of 1e30
    # makes step 2's loss non-finite. A checkpoint every step, so one exists before the NaN.
    result = run_train("--max-steps", 20, "--checkpoint-every", 1, "--learning-rate", "1e30",
                       "--lr-schedule", "constant", "--grad-clip", "0", "--state-dir", tmp_path / "s")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    stopped = re.search(r"the training loss became (nan|inf|-inf) at step (\d+)", result.stderr)
    assert stopped, result.stderr
    nan_step = int(stopped.group(2))
    from gpt2ipu.train.state import checkpoint_dirs

    checkpoints = checkpoint_dirs(tmp_path / "s")   # the resumable ones
    assert checkpoints, "the NaN came before any checkpoint: the test would check nothing"
    last_good = checkpoints[-1]
    assert f"is {last_good};" in result.stderr and "last good checkpoint" in result.stderr
    # Step N runs on the weights saved at step N - 1: that checkpoint's next step was not finite,
    # so the last good one is N - 2, and N - 1 is set aside where resuming does not pick it up.
    assert last_good.name == f"step-{nan_step - 2:08d}"
    assert (tmp_path / "s" / "checkpoints" / f"step-{nan_step - 1:08d}.next-step-non-finite").is_dir()

    from gpt2ipu.model.hf import load_hf_dir
    from gpt2ipu.train.state import load_training_state

    assert load_training_state(last_good)["step"] == nan_step - 2
    model = load_hf_dir(last_good)
    assert all(bool(p.isfinite().all()) for p in model.parameters())
    for checkpoint in checkpoints:  # none of the kept checkpoints holds non-finite weights
        weights = load_file(str(checkpoint / "model.safetensors"))
        assert all(abs(w).max() < float("inf") for w in weights.values())


@pytest.mark.slow
def test_ipu_only_flags_are_explained_not_ignored(tmp_path):
    result = run_train("--max-steps", 1, "--checkpoint-every", 0,
                       "--device-iterations", "8", "--matmul-proportion", "0.2", "--remap-logit", "true",
                       "--state-dir", tmp_path / "s")
    assert result.returncode == 0, result.stderr
    for flag in ("--device-iterations", "--matmul-proportion", "--remap-logit"):
        assert flag in result.stderr and "no effect here" in result.stderr


@pytest.mark.slow
def test_outputs_metrics_tensorboard_and_plot(tmp_path):
    result = run_train("--max-steps", 3, "--eval-every", 2, "--state-dir", tmp_path / "s", "--save-model-path",
                       tmp_path / "final")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "accuracy", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "mfu"):
        assert key in records[0]
    assert "valid_loss" in records[1] and "valid_ppl" in records[-1]
    assert (tmp_path / "s" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((tmp_path / "s" / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "final" / "config.json").is_file() and (tmp_path / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_unknown_config_key_names_the_file(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("max_len: 32\nlearning_rat: 0.1\n")
    result = subprocess.run([sys.executable, "-m", "gpt2ipu", "train", "--config", str(config)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "learning_rat" in result.stderr and str(config) in result.stderr


def resolved_flags(*flags):
    """The command line `gpt2ipu train FLAGS`, read and resolved as the command does."""
    from gpt2ipu.cli import build_parser
    from gpt2ipu.train.config import config_from_args, resolve

    return resolve(config_from_args(build_parser("train").parse_args(["train", *map(str, flags)])))


def test_original_loss_flags_become_loss_chunks():
    assert resolved_flags().loss_chunks.for_tokens(4 * 128) == {"vocab_chunks": 1, "token_chunks": 1}
    vocab = resolved_flags("--embedding-serialization-factor", 4).loss_chunks
    assert vocab.for_tokens(4 * 128) == {"vocab_chunks": 4, "token_chunks": 1}
    # Sequence serialization: chunks of --serialized-seq-len tokens, so the count follows the batch
    # (rounded up), and the embedding factor is not used.
    tokens = resolved_flags("--embedding-serialization-factor", 4, "--enable-sequence-serialized", "true",
                            "--serialized-seq-len", 16).loss_chunks
    assert tokens.for_tokens(64) == {"vocab_chunks": 1, "token_chunks": 4}
    assert tokens.for_tokens(65) == {"vocab_chunks": 1, "token_chunks": 5}
    assert tokens.for_tokens(10) == {"vocab_chunks": 1, "token_chunks": 1}
    assert resolved_flags("--enable-sequence-serialized").loss_chunks.for_tokens(4 * 128)["token_chunks"] == 4


def test_half_partials_become_fp16_once_without_changing_the_given_config():
    from gpt2ipu.train.config import TrainConfig, resolve

    given = TrainConfig(enable_half_partials=True)
    resolved = resolve(given)
    assert resolved.config.precision == "fp16" and given.precision == "fp32"
    assert any("--enable-half-partials" in note for note in resolved.notes)
    kept = resolved_flags("--enable-half-partials", "--precision", "bf16")
    assert kept.config.precision == "bf16" and not kept.notes
    ipu = resolved_flags("--device-iterations", 8, "--matmul-proportion", 0.2).notes
    assert [note.split()[0] for note in ipu] == ["--matmul-proportion", "--device-iterations"]
    assert all("no effect here" in note for note in ipu)
    with pytest.raises(UserError, match="serialized_seq_len"):
        resolved_flags("--enable-sequence-serialized", "--serialized-seq-len", 0)


def test_every_train_flag_says_what_it_does():
    import argparse

    from gpt2ipu.train.config import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    bare = [action.option_strings[0] for action in parser._actions
            if action.option_strings and (not action.help or action.help.startswith("(default"))]
    assert not bare, f"flags without a help line: {bare}"


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.slow
def test_trains_on_cuda(tmp_path, precision):
    command = [arg if arg != "cpu" else "cuda" for arg in train_command(
        "--max-steps", 4, "--precision", precision, "--state-dir", tmp_path / "s",
        "--save-model-path", tmp_path / "final")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses and all(0 < loss < 20 for loss in losses)   # NaN fails both comparisons
    assert (tmp_path / "final" / "model.safetensors").is_file()


MALLOC_PROBE = """
import ctypes, sys, torch
from gpt2ipu.allocator import keep_freed_memory, return_freed_memory
class MallInfo(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo
applied = {"keep": keep_freed_memory, "return": return_freed_memory}.get(sys.argv[1], lambda: False)()
if sys.argv[2] == "mid":
    freed = torch.ones(4 * 2**20); del freed   # 16 MB mapped and freed: glibc then raises its mmap threshold
    big = torch.ones(2**20)   # 4 MB
else:
    big = torch.ones(16 * 2**20)   # 64 MB: glibc would mmap it
print(applied, libc.mallinfo2().hblkhd)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                    reason="glibc only")
@pytest.mark.slow
def test_keep_freed_memory_serves_large_tensors_from_the_heap():
    def probe(mode, size="big"):
        out = subprocess.run([sys.executable, "-c", MALLOC_PROBE, mode, size], capture_output=True, text=True,
                             check=True)
        applied, mmapped = out.stdout.split()
        return applied == "True", int(mmapped)

    applied, mmapped = probe("default")
    assert not applied and mmapped >= 64 * 2**20
    applied, mmapped = probe("keep")
    assert applied and mmapped < 64 * 2**20
    # FSDP's setting: a 4 MB tensor gets its own mapping (returned when freed) even after larger
    # ones were freed, when glibc's default serves it from the heap.
    applied, mmapped = probe("default", "mid")
    assert not applied and mmapped < 4 * 2**20
    applied, mmapped = probe("return", "mid")
    assert applied and mmapped >= 4 * 2**20


# ---- the training step, its figures and its stops, in process (fast) ------------------------


def tiny_config(tmp_path, **values):
    from gpt2ipu.train.config import TrainConfig

    base = {"model": "gpt2-test", "max_len": 16, "batch_size": 2, "gradient_accumulation": 2, "dataset": "generated",
            "generated_samples": 64, "device": "cpu", "progress": False, "state_dir": str(tmp_path / "s"),
            "resume_training_from_checkpoint": "none", "checkpoint_every": 0, "final_checkpoint": False}
    return TrainConfig(**{**base, **values})


def tiny_run(tmp_path, said=None, **values):
    from gpt2ipu.train import parallel
    from gpt2ipu.train.config import resolve
    from gpt2ipu.train.loop import build_run, model_config_of

    resolved = resolve(tiny_config(tmp_path, **values))
    say = said.append if said is not None else (lambda message: None)
    return build_run(resolved.config, model_config_of(resolved.config), None, resolved.loss_chunks,
                     parallel.init_distributed("cpu", 1), say)


def test_validation_too_small_for_one_pipeline_step_logs_no_made_up_loss(tmp_path):
    """Pipeline stages score whole steps of --gradient-accumulation micro-batches; validation data
    that cannot fill one gave `valid_loss 0.0` (a perfect model). Now: nothing, said once."""
    from types import SimpleNamespace

    import torch

    from gpt2ipu.train import loop

    said = []
    run = tiny_run(tmp_path, said, eval_batches=8)
    run.pipeline = SimpleNamespace(n_microbatches=16, run=lambda micro_batches, dtype, train: (torch.tensor(2.0),
                                                                                                torch.tensor(0.0)))
    assert len(run.valid_data) < 16 * run.cfg.batch_size
    score = getattr(loop, "validation_loss", None) or (lambda run, say: loop.evaluate(run))
    assert score(run, said.append) == {}
    assert score(run, said.append) == {}
    notes = [m for m in said if "no validation loss" in m]
    assert len(notes) == 1 and "fewer than one evaluation step" in notes[0]


def test_generated_validation_data_fills_a_pipeline_step():
    from gpt2ipu.train.config import TrainConfig
    from gpt2ipu.train.loop import validation_samples

    cfg = TrainConfig(layers_per_ipu=[1, 1], gradient_accumulation=16, eval_batches=8, batch_size=2)
    assert validation_samples(cfg, 1) == 16 * 2
    assert validation_samples(TrainConfig(eval_batches=8, batch_size=2, gradient_accumulation=16), 2) == 8 * 2 * 2


def test_stated_peaks_match_the_gpu_name_exactly(monkeypatch):
    """"L4" is in "NVIDIA L40S": a substring match gave the L40S the L4's peak (MFU 3x too high)."""
    import torch

    try:
        from gpt2ipu.train.throughput import peak_flops
    except ImportError:
        from gpt2ipu.train.loop import peak_flops
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L40S")
    peak, source = peak_flops(torch.device("cuda"), "bf16")
    assert peak == 362e12 and "L40S" in source
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L4")
    assert peak_flops(torch.device("cuda"), "bf16")[0] == 121e12


def test_training_counts_flops_as_palm_and_nanogpt_do(tmp_path):
    """One count: 6 N + 12 L C T a token, N without the position embeddings (GPT.num_parameters),
    as bench train counted them; training counted the position embeddings too."""
    from gpt2ipu.model import GPT

    run = tiny_run(tmp_path)
    speed = run.throughput() if hasattr(run, "throughput") else __import__(
        "gpt2ipu.train.loop", fromlist=["Throughput"]).Throughput.measure(run)
    config = run.model_config
    n = GPT(config).num_parameters()
    assert n == sum(p.numel() for p in run.raw_model.parameters()) - config.n_positions * config.n_embd
    assert speed.flops_per_token == 6 * n + 12 * config.n_layer * config.n_embd * run.cfg.max_len
    rates = speed.rates(2.0)
    assert rates["mfu"] == pytest.approx(speed.flops_per_token * rates["tokens_per_s"] / speed.peak)


def count_steps(monkeypatch):
    """Count the calls of Run.step, the one training step."""
    from gpt2ipu.train.loop import Run

    calls = []
    real = Run.step

    def step(self, batch):
        calls.append(len(batch.micro_batches))
        return real(self, batch)

    monkeypatch.setattr(Run, "step", step)
    return calls


def test_bench_train_runs_the_recipes_step(monkeypatch):
    """`bench train` measured one micro-batch, token chunks and no clipping, its own step; it now
    runs Run.step on the sample recipe's shape (accumulation 2, clipping, vocabulary chunks)."""
    from gpt2ipu.bench import train as bench

    calls = count_steps(monkeypatch)
    spec = {"preset": "gpt2-test", "size": {}, "max_len": 16, "batch_size": 2, "steps": 2, "warmup": 1,
            "precision": "fp32", "device": "cpu", "variant": "ours",
            "knobs": {**bench.DEFAULT_KNOBS, "keep_freed_memory": False}}
    result = bench._child(spec)
    assert calls == [2, 2, 2]   # warmup + steps, each of the recipe's two micro-batches
    assert result["samples_per_step"] == 4
    assert bench.DEFAULT_KNOBS["grad_clip"] == 1.0 and bench.DEFAULT_KNOBS["vocab_chunks"] == 4


def test_training_runs_the_one_step(monkeypatch, tmp_path):
    from gpt2ipu.train.loop import train

    calls = count_steps(monkeypatch)
    result = train(tiny_config(tmp_path, max_steps=2))
    assert result["steps"] == 2 and calls == [2, 2]


def test_a_non_finite_gradient_with_a_finite_loss_stops_at_the_last_good_checkpoint(monkeypatch, tmp_path):
    """Step 3's loss is finite and its gradient is not: the weights saved at step 2 made it, so
    the last good checkpoint is step 1, kept even with --keep-checkpoints 1."""
    import torch

    from gpt2ipu.train import loop
    from gpt2ipu.train.state import latest_checkpoint

    real = loop.train_step
    calls = []

    def train_step(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            result["grad_norm"] = torch.tensor(float("nan"))
        return result

    monkeypatch.setattr(loop, "train_step", train_step)
    cfg = tiny_config(tmp_path, max_steps=6, checkpoint_every=1, keep_checkpoints=1)
    with pytest.raises(UserError, match="at step 3") as stopped:
        loop.train(cfg)
    good = latest_checkpoint(cfg.state_dir)
    assert good is not None and good.name == "step-00000001"
    assert str(good) in str(stopped.value) and "gradient norm" in str(stopped.value)


def test_a_training_backward_writes_its_gradient_buffers_rather_than_zeroing_them():
    """The vocabulary-chunked loss zero-filled its [tokens, C] hidden gradient and the position
    lookup its [n_positions, C] one, then added into them; both are written now. (What remains
    zeroed is inside PyTorch's kernels: the CPU flash-attention backward's q/k/v gradients.)"""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from gpt2ipu.model import GPT, config_for

    torch.manual_seed(0)
    config = config_for("gpt2-test", 32)
    model = GPT(config)
    ids = torch.randint(0, config.vocab_size, (2, 33))
    loss = model(ids[:, :-1], ids[:, 1:], vocab_chunks=4).loss
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        loss.backward()
    zeroed = [tuple(e.input_shapes[0]) for e in prof.events()
              if e.name in ("aten::fill_", "aten::zero_") and e.input_shapes and e.input_shapes[0]]
    tokens = 2 * 32
    assert (tokens, config.n_embd) not in zeroed and (config.n_positions, config.n_embd) not in zeroed, zeroed
