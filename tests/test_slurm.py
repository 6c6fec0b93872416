"""Training under SLURM: the launch inside an allocation, and the workflow run by a real one-machine cluster.

The launch tests are pure (an environment dict in, a command out). The slow test brings up SLURM from
Debian's packages with tools/slurm/cluster-up.sh (as root; skipped elsewhere), runs the data chain and a
tiny pretrain with `snakemake --profile profiles/slurm`, cancels the training job mid-run (Snakemake
resubmits it and it resumes), and compares with the same targets run locally.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_workflow import SNAKEMAKE, jobs_run, make_workdir, tree_bytes

from gpt2ipu.errors import UserError
from gpt2ipu.train.slurm import allocation, cpus_per_node, launcher

REPO = Path(__file__).resolve().parents[1]
CLUSTER_UP = REPO / "tools" / "slurm" / "cluster-up.sh"

TWO_NODES = {"SLURM_JOB_ID": "77", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[03-04]",
             "SLURM_JOB_CPUS_PER_NODE": "8(x2)"}


def expand(nodelist):
    assert nodelist == "gpu[03-04]"
    return ["gpu03", "gpu04"]


def test_cpus_per_node_reads_slurms_compact_form():
    assert cpus_per_node("72(x2),36") == [72, 72, 36]
    assert cpus_per_node("4") == [4]


def test_outside_slurm_or_for_one_process_the_launch_is_unchanged():
    assert launcher({}, nproc_per_node=2, nnodes=1, rdzv_endpoint="localhost:29500") == ([], "localhost:29500")
    one = {**TWO_NODES, "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "gpu03"}
    assert launcher(one, nproc_per_node=1, nnodes=1, rdzv_endpoint="localhost:29500") == ([], "localhost:29500")
    assert allocation({}) is None


def test_two_nodes_start_one_agent_each_with_srun_and_meet_on_the_first_host():
    prefix, endpoint = launcher(TWO_NODES, nproc_per_node=4, nnodes=2, rdzv_endpoint="localhost:29611",
                                expand=expand)
    assert endpoint == "gpu03:29611"  # the port of train.rdzv_endpoint, the host of the allocation
    assert prefix[0] == "srun"
    assert {"--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--cpus-per-task=8", "--overlap"} <= set(prefix)


def test_an_allocation_with_too_few_cpus_names_the_key_to_change():
    small = {**TWO_NODES, "SLURM_JOB_CPUS_PER_NODE": "8,2"}  # the second node holds 2 CPUs
    with pytest.raises(UserError, match=r"2 CPU\(s\) per node.*4 processes.*cpus_per_task"):
        launcher(small, nproc_per_node=4, nnodes=2, rdzv_endpoint="localhost:29611", expand=expand)


def test_an_allocation_with_other_nodes_than_train_nnodes_is_refused():
    with pytest.raises(UserError, match=r"2 node\(s\) but train.nnodes is 4"):
        launcher(TWO_NODES, nproc_per_node=1, nnodes=4, rdzv_endpoint="localhost:29611", expand=expand)


# ---- a real cluster --------------------------------------------------------------------------------------

# Two CPUs here: one-thread data jobs run two at a time; pretrain: 2 DDP processes, so the srun launch runs,
# checkpointing every 2 of its 8 steps (the cancelled job's successor resumes from one).
STEPS = 8
TINY = {"extract": {"threads": 1}, "tokenize": {"threads": 1},
        "train": {"threads": 2, "nproc_per_node": 2, "sizes": {"tiny": {"model": "gpt2-test"}},
                  "recipes": {"sample": {"max_steps": STEPS, "checkpoint_every": 2}}}}


def workdir(path: Path, rdzv_port: int) -> Path:
    path.mkdir()
    return make_workdir(path, {**TINY, "train": {**TINY["train"], "rdzv_endpoint": f"localhost:{rdzv_port}"}})
TARGETS = ["results/data/sample/shards", "results/models/sample-tiny/final"]
SUBMITTED = re.compile(r"submitted with SLURM jobid (\d+) \(log: \S*/slurm_logs/rule_(\w+)/")


@pytest.fixture(scope="module")
def cluster():
    """tools/slurm/cluster-up.sh, as CI runs it; stopped again afterwards if this test started it."""
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("a SLURM cluster needs root on Linux (tools/slurm/cluster-up.sh starts system daemons)")
    if not Path("/etc/debian_version").is_file() or not (shutil.which("apt-get") or shutil.which("slurmctld")):
        pytest.skip("tools/slurm/cluster-up.sh installs Debian's slurm-wlm: needs Debian with apt-get")
    pytest.importorskip("snakemake_executor_plugin_slurm", reason="pip install -e '.[test]' installs the plugin")
    was_up = subprocess.run(["bash", str(CLUSTER_UP), "status"], capture_output=True).returncode == 0
    up = subprocess.run(["bash", str(CLUSTER_UP)], capture_output=True, text=True, timeout=900)
    assert up.returncode == 0, up.stdout + up.stderr
    yield Path("/var/log/slurm")
    if not was_up:
        subprocess.run(["bash", str(CLUSTER_UP), "down"], capture_output=True)


def losses(workdir: Path) -> list[float]:
    lines = (workdir / "results/models/sample-tiny/metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def submitted_jobs(output: str) -> list[tuple[str, int]]:
    """(rule, SLURM job id) of each job the executor submitted, in order."""
    return [(rule, int(job)) for job, rule in SUBMITTED.findall(output)]


def scancel_pretrain_after_its_first_checkpoint(proc: subprocess.Popen, out: Path, workdir: Path) -> int:
    """The scheduler kills the training job mid-run (a node failure, a preemption): scancel, as an admin would."""
    deadline = time.time() + 480
    while time.time() < deadline and proc.poll() is None:
        jobs = dict(submitted_jobs(out.read_text()))
        if "pretrain" in jobs and list(workdir.glob("results/train_state/*/checkpoints/step-*")):
            subprocess.run(["scancel", str(jobs["pretrain"])], check=True)
            return jobs["pretrain"]
        time.sleep(0.1)
    raise AssertionError("the pretrain job never wrote a checkpoint while running: " + out.read_text()[-3000:])


@pytest.mark.slow
def test_workflow_on_slurm_matches_a_local_run_even_when_the_training_job_is_cancelled(cluster, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    local_dir, slurm_dir = workdir(tmp_path / "local", 29601), workdir(tmp_path / "slurm", 29602)
    # The local run goes alongside: the SLURM run spends most of its time waiting between status checks.
    local = subprocess.Popen([*SNAKEMAKE, "--cores", "2", *TARGETS], cwd=local_dir, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = tmp_path / "slurm.out"
    with out.open("w") as sink:  # profiles/slurm resubmits a failed job once (retries: 1)
        # (ops.build is off here: the build_ops job needs no second CPU to wait for)
        slurm = subprocess.Popen([*SNAKEMAKE, "--profile", "profiles/slurm", "--set-threads", "build_ops=1",
                                  "--jobs", "4", "--latency-wait", "5", "--slurm-keep-successful-logs",
                                  "--slurm-init-seconds-before-status-checks", "1",
                                  "--seconds-between-status-checks", "2", *TARGETS],
                                 cwd=slurm_dir, env=env, stdout=sink, stderr=subprocess.STDOUT)
        cancelled = scancel_pretrain_after_its_first_checkpoint(slurm, out, slurm_dir)
        slurm.wait(timeout=600)
    local_out, _ = local.communicate(timeout=600)
    assert local.returncode == 0, local_out[-3000:]
    output = out.read_text()
    assert slurm.returncode == 0, output[-5000:]

    # Every job went through sbatch (pretrain twice: cancelled, then resubmitted), and SLURM ran it.
    submitted = submitted_jobs(output)
    local_jobs = jobs_run(subprocess.CompletedProcess(local.args, local.returncode, local_out, ""))
    assert sorted(rule for rule, _ in submitted) == sorted([*local_jobs, "pretrain"]) and "pretrain" in local_jobs
    # ... and nothing ran outside SLURM: Snakemake counted no job beyond those (the resubmission is the same job).
    assert re.search(rf"^{len(local_jobs)} of {len(local_jobs)} steps \(100%\) done", output, re.M), output[-3000:]
    completions = (cluster / "jobcomp.log").read_text()
    for rule, job in submitted:
        state = "CANCELLED" if job == cancelled else "COMPLETED"
        assert re.search(rf"^JobId={job} .*JobState={state}", completions, re.M), (rule, job, state)
        assert (slurm_dir / ".snakemake/slurm_logs" / f"rule_{rule}").is_dir()
    # The resubmitted job started its torchrun agent as a step of its own allocation (srun: step 1) and resumed.
    resubmitted = [job for rule, job in submitted if rule == "pretrain"][-1]
    assert f"StepId={resubmitted}.1 " in (cluster / "slurmd.log").read_text()
    log = (slurm_dir / "logs/sample/pretrain-tiny.log").read_text()
    assert "srun starts 1 torchrun agent(s) x 2 process(es)" in log and "resuming from" in log, log[-3000:]

    # Same results as the local run: the shards byte for byte, the loss sequence and the final weights.
    data = "results/data/sample/shards"
    assert tree_bytes(slurm_dir / data) == tree_bytes(local_dir / data)
    assert losses(slurm_dir) == losses(local_dir) and len(losses(local_dir)) == STEPS
    weights = [load_file(d / "results/models/sample-tiny/final/model.safetensors") for d in (local_dir, slurm_dir)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
