"""Training that survives a dead process: torchrun's elastic agent restarts the group and every
process resumes from the last complete checkpoint; a checkpoint whose writing was cut short is
never resumed; restarts used up end with one message naming the rank.

The runs are issue 11's tiny layouts (tests/test_parallel.py: a 4-layer GPT-2 of the test preset's
width, fp32, global batch 8) started as a user would, `gpt2ipu train --nproc-per-node 2
--max-restarts 1 ...`, and compared with the same command left alone.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpt2ipu.model import GPT
from gpt2ipu.train.state import checkpoint_dirs, latest_checkpoint
from tests.test_parallel import COMMON, tiny_config

STEPS = 6
LAYOUTS = {   # name: flags of 2 processes, each with the global batch 8
    "ddp": ["--replication-factor", 2, "--batch-size", 2, "--gradient-accumulation", 2],
    "fsdp": ["--fsdp", "--replication-factor", 2, "--batch-size", 2, "--gradient-accumulation", 2],
    "stages": ["--pipeline-stages", 2, "--batch-size", 2, "--gradient-accumulation", 4],
}
PORTS = {"ddp": 29710, "fsdp": 29712, "stages": 29714}


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory) -> Path:
    from gpt2ipu.model.hf import save_hf_dir

    torch.manual_seed(0)
    return save_hf_dir(GPT(tiny_config()), tmp_path_factory.mktemp("elastic") / "init")


def command(init: Path, run: Path, layout: str, *launch) -> list[str]:
    return [sys.executable, "-m", "gpt2ipu", "train", "--nproc-per-node", "2",
            "--rdzv-endpoint", f"127.0.0.1:{PORTS[layout]}", *map(str, launch),
            "--checkpoint-input-dir", str(init), *COMMON, "--checkpoint-every", "2", "--max-steps", str(STEPS),
            "--state-dir", str(run / "state"), "--save-model-path", str(run / "final"), *map(str, LAYOUTS[layout])]


def losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "state" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    return [r["loss"] for r in records]


def descendants(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    found = [int(c) for c in children.read_text().split()] if children.exists() else []
    return found + [d for c in found for d in descendants(c)]


def worker_of_rank(root: int, rank: int) -> int | None:
    for pid in descendants(root):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"TORCHELASTIC_RUN_ID=none" in environ:
            return pid
    return None


def run_killing_rank_1(cmd: list[str], run: Path) -> tuple[int, str]:
    """Start `cmd`; once its first checkpoint is complete, SIGKILL the worker of rank 1."""
    run.mkdir(parents=True)
    with open(run / "stderr.txt", "w") as err:
        proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + 300
        while time.time() < deadline and latest_checkpoint(run / "state") is None:
            time.sleep(0.02)
        victim = worker_of_rank(proc.pid, 1)
        assert victim is not None and proc.poll() is None, "the run ended before it could be killed"
        os.kill(victim, signal.SIGKILL)
        killed_after = [p.name for p in checkpoint_dirs(run / "state")]
        proc.wait(timeout=400)
    return proc.returncode, f"killed after {killed_after}\n" + (run / "stderr.txt").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_killed_rank_is_restarted_and_the_run_ends_as_if_never_killed(init_dir, tmp_path, layout):
    killed_code, stderr = run_killing_rank_1(command(init_dir, tmp_path / "killed", layout, "--max-restarts", 1),
                                             tmp_path / "killed")
    assert killed_code == 0, stderr[-3000:]
    assert "resuming from" in stderr and "exitcode: -9" in stderr, stderr[-3000:]
    assert "step-00000006" not in stderr.splitlines()[0], "the kill came after the last checkpoint"
    plain = subprocess.run(command(init_dir, tmp_path / "plain", layout), env=env(), capture_output=True, text=True)
    assert plain.returncode == 0, plain.stderr[-3000:]

    killed, expected = losses(tmp_path / "killed"), losses(tmp_path / "plain")
    print(f"{layout}: max |loss diff| {max(abs(a - b) for a, b in zip(killed, expected)):.3g}")
    assert killed == expected   # bit for bit: the same layout resumed exactly
    want = load_file(tmp_path / "plain" / "final" / "model.safetensors")
    got = load_file(tmp_path / "killed" / "final" / "model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.slow
def test_restarts_used_up_end_with_one_message_naming_the_rank(init_dir, tmp_path):
    """A fault every round meets (no starting weights where it says): two rounds, then one message."""
    cmd = command(tmp_path / "missing", tmp_path, "ddp", "--max-restarts", 1)
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 2
    message = done.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"gpt2ipu train: error: rank [01] exited with status 2 after 1 restart\(s\) "
                        r"\(--max-restarts 1\); its last message: \"gpt2ipu train: error: .*missing/config.json.*\"\. "
                        r"Rerun the same command once its cause is fixed: it resumes from the last checkpoint",
                        message), message
    assert sorted(p.name for p in (tmp_path / "state" / "torchrun").glob("*/attempt_*")) == ["attempt_0", "attempt_1"]


def test_the_processes_get_the_command_less_its_launch_options():
    from gpt2ipu.train.cli import train_arguments

    argv = ["train", "--nproc-per-node", "2", "--max-steps", "3", "--max-restarts=1", "--rdzv-endpoint", "h:1",
            "--fsdp", "--nnodes", "1", "--rdzv-timeout", "5"]
    assert train_arguments(argv) == ["--max-steps", "3", "--fsdp"]


def test_launch_options_without_a_launch_are_refused(capsys):
    from gpt2ipu.cli import main

    assert main(["train", "--max-restarts", "1", "--max-steps", "1"]) == 2
    assert "--max-restarts start torchrun and need --nproc-per-node" in capsys.readouterr().err


def test_the_failure_message_names_the_first_failed_rank_and_its_last_line(tmp_path):
    from gpt2ipu.train.elastic import CLI_FLAGS, Torchrun

    for attempt, line in ((0, "step 3"), (1, "[rank1]: loading shard 7")):
        log = tmp_path / "none_abc" / f"attempt_{attempt}" / "1" / "stderr.log"
        log.parent.mkdir(parents=True)
        log.write_text(f"{line}\n\n")
        time.sleep(0.01)   # the newest attempt is the newest file
    agent = ("Failures:\n[0]:\n  rank      : 0 (local_rank: 0)\n  exitcode  : -15 (pid: 5)\n"
             "Root Cause (first observed failure):\n[0]:\n  time      : 2026-12-04_01:00:00\n  host      : h\n"
             "  rank      : 3 (local_rank: 1)\n  exitcode  : -9 (pid: 7)\n  error_file: <N/A>\n")
    launcher = Torchrun(nproc_per_node=2, nnodes=2, rdzv_endpoint="h:1", max_restarts=2, rdzv_timeout=5,
                        log_dir=tmp_path, flag_names=CLI_FLAGS)
    assert launcher.failure(agent).startswith('rank 3 was killed by SIGKILL after 2 restart(s) (--max-restarts 2); '
                                              'its last message: "[rank1]: loading shard 7". Rerun')


def test_a_torchrun_whose_restarts_could_not_rejoin_is_refused_before_it_starts(monkeypatch):
    from gpt2ipu.errors import UserError
    from gpt2ipu.train.parallel import check_restartable

    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "2")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")   # torchrun's default store, shared by the rounds
    with pytest.raises(UserError, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        check_restartable()
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # what that variable makes torchrun give
    check_restartable()
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")         # no restart, nothing to rejoin
    check_restartable()


# --- a kill while a checkpoint is written ---------------------------------------------------------

KILL_MID_SAVE = r"""
import os, signal, sys
from tests.test_elastic import save

def die():
    os.kill(os.getpid(), signal.SIGKILL)

save(sys.argv[1], sys.argv[2], 2, die)
"""


def save(state_dir, kind: str, step: int, die=lambda: None) -> None:
    """One checkpoint of the tiny model, single-file or sharded; `die` is called once the weights
    (single-file) or every shard (sharded: the barrier after them, where a peer can die) are on disk."""
    from gpt2ipu.model.hf import write_hf_files
    from gpt2ipu.train.optim import make_optimizer
    from gpt2ipu.train.sharded_state import save_sharded_checkpoint
    from gpt2ipu.train.state import save_training_checkpoint

    torch.manual_seed(0)
    model = GPT(tiny_config())
    if kind == "single":
        def weights_then_die(folder):
            write_hf_files(model, folder)
            die()
        save_training_checkpoint(state_dir, step, weights_then_die, {"step": step}, {}, keep=5)
        return
    barriers = []

    def barrier():
        barriers.append(1)
        if len(barriers) == 2:
            die()
    save_sharded_checkpoint(state_dir, step, model, make_optimizer(model, lr=1e-3), {"step": step}, {}, keep=5,
                            is_main=True, barrier=barrier, model_config=model.config)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["single", "sharded"])
def test_a_checkpoint_cut_short_by_a_kill_is_never_resumed(tmp_path, kind):
    save(tmp_path, kind, 1)
    killed = subprocess.run([sys.executable, "-c", KILL_MID_SAVE, str(tmp_path), kind], env=env(),
                            cwd=Path(__file__).parent.parent, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    leftovers = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert len(leftovers) == 2 and leftovers[-1] == "step-00000001", leftovers   # and what the kill left
    assert latest_checkpoint(tmp_path).name == "step-00000001"
    save(tmp_path, kind, 3)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-00000001", "step-00000003"]
