"""tools/gpu-check.sh: its dry run lists a plan within its time budget whose commands all parse, and on a
machine without CUDA it fails at once, loudly, without running anything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tools" / "gpu-check.sh"
sys.path.insert(0, str(REPO / "tools"))

import gpu_check  # noqa: E402


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          env={"GPT2IPU_PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})


@pytest.mark.slow
def test_dry_run_lists_every_step_and_checks_their_flags(tmp_path):
    result = run_script("--dry-run", "--out", str(tmp_path / "check.json"))
    assert result.returncode == 0, result.stderr
    for name in ("cuda_tests", "bench_train_bf16", "fsdp_smoke", "bench_train_layouts", "profile_memory_snapshot",
                 "bench_generate", "bench_evaluate"):
        assert name in result.stdout
    assert not (tmp_path / "check.json").exists()   # a dry run writes nothing


@pytest.mark.parametrize("n_gpus", [1, 2])
def test_each_plan_fits_the_budget_and_its_commands_parse(tmp_path, n_gpus):
    plan = gpu_check.steps(tmp_path, n_gpus)
    assert sum(step.timeout_s for step in plan) <= gpu_check.STEP_BUDGET_S <= 8 * 60
    assert [gpu_check.check_flags(step) for step in plan] == [None] * len(plan)
    assert all(step.min_gpus <= n_gpus for step in plan)


def test_a_flag_that_no_longer_exists_is_caught(tmp_path):
    step = gpu_check.Step("bad", "a renamed flag", [], 10, gpt2ipu_args=["bench", "train", "--no-such-flag", "1"])
    assert "does not parse" in gpu_check.check_flags(step)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run")
def test_without_cuda_it_fails_loudly_and_writes_nothing(tmp_path):
    result = run_script("--out", str(tmp_path / "check.json"))
    assert result.returncode == 2
    assert "FAILED: no CUDA device" in result.stderr
    assert not (tmp_path / "check.json").exists()
