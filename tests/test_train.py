"""The training stage: exact resume after SIGKILL, data parallelism, errors, IPU-only flags."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.numpy import load_file

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
    losses = lambda p: [json.loads(line)["loss"] for line in (p / "metrics.jsonl").read_text().splitlines()]
    one_losses, two_losses = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one_losses) == len(two_losses) == 4
    assert one_losses == pytest.approx(two_losses, rel=1e-5)


def test_replication_factor_without_torchrun_says_how_to_launch(tmp_path):
    result = run_train("--max-steps", 1, "--replication-factor", 2, "--state-dir", tmp_path / "s")
    assert result.returncode == 2
    assert "torchrun --nproc_per_node 2" in result.stderr and "Traceback" not in result.stderr


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    result = run_train("--max-steps", 20, "--checkpoint-every", 2, "--learning-rate", "1e30",
                       "--lr-schedule", "constant", "--grad-clip", "0", "--state-dir", tmp_path / "s")
    assert result.returncode == 2, result.stderr
    assert "became nan" in result.stderr.lower() or "became inf" in result.stderr.lower()
    assert "Traceback" not in result.stderr
    checkpoints = sorted((tmp_path / "s" / "checkpoints").glob("step-*"))
    for checkpoint in checkpoints:  # none of the kept checkpoints holds non-finite weights
        weights = load_file(str(checkpoint / "model.safetensors"))
        assert all(abs(w).max() < float("inf") for w in weights.values())


def test_ipu_only_flags_are_explained_not_ignored(tmp_path):
    result = run_train("--max-steps", 1, "--checkpoint-every", 0, "--layers-per-ipu", "1", "1",
                       "--device-iterations", "8", "--matmul-proportion", "0.2", "--remap-logit", "true",
                       "--ipus-per-replica", "2", "--state-dir", tmp_path / "s")
    assert result.returncode == 0, result.stderr
    for flag in ("--layers-per-ipu", "--device-iterations", "--matmul-proportion", "--remap-logit",
                 "--ipus-per-replica"):
        assert flag in result.stderr and "no effect here" in result.stderr


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


def test_unknown_config_key_names_the_file(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("max_len: 32\nlearning_rat: 0.1\n")
    result = subprocess.run([sys.executable, "-m", "gpt2ipu", "train", "--config", str(config)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "learning_rat" in result.stderr and str(config) in result.stderr


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_trains_on_cuda(tmp_path, precision):
    command = [arg if arg != "cpu" else "cuda" for arg in train_command(
        "--max-steps", 4, "--precision", precision, "--state-dir", tmp_path / "s", "--save-model-path", tmp_path / "final")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses and all(0 < loss < 20 for loss in losses)   # NaN fails both comparisons
    assert (tmp_path / "final" / "model.safetensors").is_file()


MALLOC_PROBE = """
import ctypes, sys, torch
from gpt2ipu.train.allocator import keep_freed_memory
class MallInfo(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
big = torch.ones(16 * 2**20)   # 64 MB: glibc would mmap it
print(applied, libc.mallinfo2().hblkhd)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                    reason="glibc only")
def test_keep_freed_memory_serves_large_tensors_from_the_heap():
    def probe(mode):
        out = subprocess.run([sys.executable, "-c", MALLOC_PROBE, mode], capture_output=True, text=True, check=True)
        applied, mmapped = out.stdout.split()
        return applied == "True", int(mmapped)

    applied, mmapped = probe("default")
    assert not applied and mmapped >= 64 * 2**20
    applied, mmapped = probe("keep")
    assert applied and mmapped < 64 * 2**20
