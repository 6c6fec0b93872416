"""Training inside a SLURM allocation: one torchrun agent per node, started with `srun`.

When the pretrain job runs in an allocation (`SLURM_JOB_ID` set, e.g. submitted by
snakemake-executor-plugin-slurm with profiles/slurm) and the layout has more than one process,
`srun` starts one torchrun agent on each node of the allocation (one node included, so a
one-machine cluster runs the same launch as many), and the agents meet at a c10d rendezvous on
the allocation's first host. An allocation too small for the layout is refused before anything
starts, naming the key to change. Outside SLURM nothing changes.

Everything here is a function of the environment (a dict), so it is tested without SLURM; only
`scontrol show hostnames` (expanding "node[01-04]") runs a SLURM command.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from gpt2ipu.errors import UserError
from gpt2ipu.log import package_logger

log = package_logger(__name__)


@dataclass(frozen=True)
class Allocation:
    job_id: str
    nodes: int
    nodelist: str
    cpus_per_node: int  # the fewest CPUs any node of the job holds


def cpus_per_node(value: str) -> list[int]:
    """SLURM_JOB_CPUS_PER_NODE ("72(x2),36") as one count per node ([72, 72, 36])."""
    counts = []
    for part in value.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not match:
            raise ValueError(f"unexpected SLURM_JOB_CPUS_PER_NODE {value!r}")
        counts += [int(match[1])] * int(match[2] or 1)
    return counts


def allocation(env: Mapping[str, str]) -> Allocation | None:
    """The job this process runs in, or None outside SLURM."""
    if not env.get("SLURM_JOB_ID"):
        return None
    nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
    cpus = cpus_per_node(env.get("SLURM_JOB_CPUS_PER_NODE") or env.get("SLURM_CPUS_ON_NODE") or "1")
    return Allocation(job_id=env["SLURM_JOB_ID"], nodes=nodes, nodelist=nodelist, cpus_per_node=min(cpus))


def check_fits(alloc: Allocation, *, nproc_per_node: int, nnodes: int) -> None:
    """Refuse an allocation with fewer nodes or CPUs than the layout's processes need."""
    if alloc.nodes != nnodes:
        raise UserError(f"SLURM job {alloc.job_id} has {alloc.nodes} node(s) but train.nnodes is {nnodes}: the "
                        "pretrain rule asks for train.nnodes nodes, so remove a `nodes` override for pretrain from "
                        "the profile's set-resources, or set train.nnodes to the nodes you allocate")
    if alloc.cpus_per_node < nproc_per_node:
        raise UserError(f"SLURM job {alloc.job_id} holds {alloc.cpus_per_node} CPU(s) per node, fewer than the "
                        f"{nproc_per_node} processes per node of train.nproc_per_node: raise train.threads (the "
                        "job's --cpus-per-task) or the profile's set-resources pretrain: cpus_per_task to at least "
                        f"{nproc_per_node}, or lower train.nproc_per_node")


def hostnames(nodelist: str) -> list[str]:
    """The hosts of a compact SLURM nodelist, as `scontrol show hostnames` expands it."""
    result = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
    if result.returncode != 0 or not result.stdout.split():
        raise UserError(f"`scontrol show hostnames {nodelist}` failed ({result.stderr.strip()}): is this a "
                        "SLURM job (SLURM_JOB_NODELIST)?")
    return result.stdout.split()


def launcher(env: Mapping[str, str], *, nproc_per_node: int, nnodes: int, rdzv_endpoint: str,
             expand: Callable[[str], list[str]] = hostnames) -> tuple[list[str], str]:
    """The command prefix that starts torchrun, and the rendezvous endpoint it should use.

    Outside SLURM, or for one process: no prefix and `rdzv_endpoint` unchanged. In an allocation:
    `srun` with one task (a torchrun agent) per node, and the endpoint moved to the first host,
    keeping the port of `rdzv_endpoint` (train.rdzv_endpoint).
    """
    alloc = allocation(env)
    if alloc is None or nproc_per_node * nnodes == 1:
        return [], rdzv_endpoint
    check_fits(alloc, nproc_per_node=nproc_per_node, nnodes=nnodes)
    port = rdzv_endpoint.rpartition(":")[2] if ":" in rdzv_endpoint else "29500"
    first = expand(alloc.nodelist)[0]
    # --overlap: the step running this job (the plugin's `srun -n1`) already holds the CPUs of the
    # first node; the agents share them. --kill-on-bad-exit: one failed agent ends them all.
    prefix = ["srun", "--overlap", f"--nodes={alloc.nodes}", f"--ntasks={alloc.nodes}", "--ntasks-per-node=1",
              f"--cpus-per-task={alloc.cpus_per_node}", "--kill-on-bad-exit=1", f"--job-name=torchrun-{alloc.job_id}"]
    log.info(f"SLURM job {alloc.job_id}: srun starts {alloc.nodes} torchrun agent(s) x {nproc_per_node} process(es), "
             f"rendezvous at {first}:{port}")
    return prefix, f"{first}:{port}"
