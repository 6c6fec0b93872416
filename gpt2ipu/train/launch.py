"""How the Snakemake training rule (and `gpt2ipu train --nproc-per-node`) runs training: in process,
or under torchrun's elastic agent.

The training state folder is `<state_root>/<run>-<key>`, where the key hashes the recipe and the
shards' stats: the same job rerun after a crash finds its checkpoints and resumes, while a
changed hyperparameter or changed data starts a fresh run instead of resuming a different one.

Under torchrun, `max_restarts` lets the agent restart the whole group when a process dies; every
process then resumes from the last complete checkpoint. When the restarts are used up, the run
ends with one message naming the rank that failed first and its last line of output.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gpt2ipu.errors import UserError
from gpt2ipu.fsutil import atomic_file
from gpt2ipu.log import package_logger
from gpt2ipu.train.config import workflow_replicas, workflow_run_config

log = package_logger(__name__)

# torchrun's elastic agent normally shares one TCPStore across restart rounds (the rendezvous's own,
# its server started once by the first agent) and hands it to the workers as MASTER_ADDR/PORT. The
# keys the processes of a round write there outlive them: gloo's full-mesh connect (each rank
# publishes its listening address under the process group's prefix) then finds the dead round's
# addresses already set, so the restarted ranks connect to ports nobody listens on any more
# ("Connection refused" in connectFullMesh), and the static rendezvous's counters make
# init_process_group wait for arrivals that were already counted (a hang). The restart count in
# TORCHELASTIC_RESTART_COUNT cannot prefix the keys instead: an agent whose own workers were
# healthy restarts without counting, so the count differs between machines. With the store not
# shared, the first agent picks a fresh port each round and rank 0 starts a new, empty store on it.
FRESH_STORE_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def state_key(recipe: dict[str, Any], shards_dir: str) -> str:
    stats = Path(shards_dir) / "stats.json"
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode())
    if stats.is_file():
        digest.update(stats.read_bytes())
    return digest.hexdigest()[:10]


def pretrain(*, recipe: dict[str, Any], shards_dir: str, state_root: str, run_name: str, model_dir: str,
             metrics_path: str, plot_path: str, threads: int, nproc_per_node: int, nnodes: int,
             rdzv_endpoint: str, parallel: dict[str, Any] | None = None, ops_dir: str | None = None,
             max_restarts: int = 0, rdzv_timeout: float = 600) -> dict[str, Any]:
    parallel = parallel or {"fsdp": False, "pipeline_stages": 1, "layers_per_stage": None, "schedule": "1f1b"}
    world = nproc_per_node * nnodes
    replicas = workflow_replicas(nproc_per_node, nnodes, parallel)
    # A sharded layout is part of the key (the process count is not): its checkpoints resume on any
    # number of processes, but not in a single-file layout's run, nor with another pipeline split.
    sharded = parallel["fsdp"] or replicas != world
    keyed = {**recipe, "parallel": parallel} if sharded else recipe
    state_dir = Path(state_root) / f"{run_name}-{state_key(keyed, shards_dir)}"
    state_dir.mkdir(parents=True, exist_ok=True)
    config = workflow_run_config(recipe, shards_dir=shards_dir, state_dir=str(state_dir), save_model_path=model_dir,
                                 replication_factor=replicas, parallel=parallel)
    config_path = state_dir / "train_config.json"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    log.info(f"training state (checkpoints, metrics): {state_dir}")

    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // nproc_per_node))}
    if ops_dir:  # every rank loads the ops the build_ops rule made (none builds or waits for a build)
        from gpt2ipu.ops import OPS_DIR_ENV

        env[OPS_DIR_ENV] = str(Path(ops_dir).resolve())
    train_args = ["--config", str(config_path)]
    if world > 1:
        launcher = Torchrun(nproc_per_node=nproc_per_node, nnodes=nnodes, rdzv_endpoint=rdzv_endpoint,
                            max_restarts=max_restarts, rdzv_timeout=rdzv_timeout, log_dir=state_dir / "torchrun",
                            flag_names=WORKFLOW_FLAGS)
        stdout = launcher.run(train_args, env)
    else:
        # A child process (not an in-process call) so torchrun and the single-process path are the
        # same program, and the thread count is fixed before torch starts.
        result = subprocess.run([sys.executable, "-m", "gpt2ipu", "train", *train_args], env=env, stderr=sys.stderr,
                                stdout=subprocess.PIPE, text=True)
        if result.returncode != 0:
            raise UserError(f"training exited with status {result.returncode}; its messages are above. Once "
                            "their cause is fixed (or if it was a crash), rerun the same command: it resumes from "
                            f"the last checkpoint in {state_dir}, if any")
        stdout = result.stdout
    for source, target in ((state_dir / "metrics.jsonl", metrics_path), (state_dir / "loss.png", plot_path)):
        with atomic_file(target) as tmp:
            shutil.copyfile(source, tmp)
    return json.loads(stdout.strip().splitlines()[-1]) if stdout.strip() else {}


WORKFLOW_FLAGS = {"nnodes": "train.nnodes", "rdzv_endpoint": "train.rdzv_endpoint",
                  "max_restarts": "train.max_restarts", "rdzv_timeout": "train.rdzv_timeout"}
CLI_FLAGS = {"nnodes": "--nnodes", "rdzv_endpoint": "--rdzv-endpoint", "max_restarts": "--max-restarts",
             "rdzv_timeout": "--rdzv-timeout"}


class Torchrun:
    """`torchrun` (torch.distributed.run) over `gpt2ipu train`, with c10d rendezvous: one agent per
    machine, `nproc_per_node` processes each, restarted together up to `max_restarts` times."""

    def __init__(self, *, nproc_per_node: int, nnodes: int, rdzv_endpoint: str, max_restarts: int,
                 rdzv_timeout: float, log_dir: Path, flag_names: dict[str, str]):
        self.nproc_per_node, self.nnodes, self.endpoint = nproc_per_node, nnodes, rdzv_endpoint
        self.max_restarts, self.rdzv_timeout, self.log_dir, self.names = max_restarts, rdzv_timeout, log_dir, flag_names

    def command(self, train_args: list[str], hosts_store: bool) -> list[str]:
        # is_host: torchrun guesses whether it hosts the rendezvous store by comparing the endpoint with
        # the hostname's addresses, which misses an address of a second interface; binding to it does not.
        rdzv_conf = f"join_timeout={max(1, round(self.rdzv_timeout))},is_host={int(hosts_store)}"
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={self.nproc_per_node}",
                f"--nnodes={self.nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={self.endpoint}",
                f"--rdzv_conf={rdzv_conf}", f"--max_restarts={self.max_restarts}",
                # Each process's stderr also goes to <log_dir>/<run>/attempt_<n>/<local rank>/stderr.log,
                # where `failure` finds the last message of the rank that failed.
                f"--log_dir={self.log_dir}", "--tee=2",
                "-m", "gpt2ipu", "train", *train_args]

    def run(self, train_args: list[str], env: dict[str, str]) -> str:
        """Run to the end; returns the processes' stdout (rank 0's summary line), raises UserError on failure."""
        hosts_store = endpoint_is_local(self.endpoint, self.names)
        if not hosts_store:
            wait_for_endpoint(self.endpoint, self.rdzv_timeout, self.names)
        proc = subprocess.Popen(self.command(train_args, hosts_store), env={**env, **FRESH_STORE_ENV},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        tail: collections.deque[str] = collections.deque(maxlen=200)
        stdout = _pump(proc, tail)
        if proc.returncode != 0:
            raise UserError(self.failure("".join(tail)))
        return stdout

    def failure(self, agent_output: str) -> str:
        """One message for a run that ended in failure: which rank, how, and its last message."""
        if "RendezvousTimeoutError" in agent_output:
            return (f"the {self.nnodes} machines did not all join the rendezvous at {self.endpoint} within "
                    f"{self.rdzv_timeout:g} s ({self.names['rdzv_timeout']}); start the same job on every machine, "
                    f"with {self.names['nnodes']} {self.nnodes} and {self.names['rdzv_endpoint']} the first "
                    "machine's host:port as the others reach it")
        cause = re.search(r"Root Cause.*?rank\s*:\s*(\d+) \(local_rank: (\d+)\)\s*exitcode\s*:\s*(-?\d+)",
                          agent_output, re.S)
        restarts = f"after {self.max_restarts} restart(s) ({self.names['max_restarts']} {self.max_restarts})"
        if not cause:
            return (f"torchrun ended with a failure {restarts}; its messages are above. Rerun the same command "
                    "once their cause is fixed: it resumes from the last checkpoint")
        rank, local_rank, code = int(cause[1]), int(cause[2]), int(cause[3])
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        return (f"rank {rank} {how} {restarts}; its last message: {last_message(self.log_dir, local_rank)!r}. "
                "Rerun the same command once its cause is fixed: it resumes from the last checkpoint")


def _pump(proc: subprocess.Popen, tail: collections.deque) -> str:
    """Pass the agent's stderr through (keeping its tail) while collecting stdout."""
    import threading

    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    for line in proc.stderr:
        sys.stderr.write(line)
        tail.append(line)
    reader.join()
    proc.wait()
    return "".join(out)


def last_message(log_dir: Path, local_rank: int) -> str:
    """The last non-blank line a local rank wrote to stderr in the agent's newest attempt (or '')."""
    logs = sorted(Path(log_dir).glob(f"*/attempt_*/{local_rank}/stderr.log"), key=lambda p: p.stat().st_mtime)
    if not logs:
        return ""
    lines = [line for line in logs[-1].read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip()[:400] if lines else ""


def endpoint_is_local(endpoint: str, names: dict[str, str]) -> bool:
    """Whether the rendezvous endpoint is an address of this machine (whose agent then hosts the store)."""
    host, _, port = endpoint.rpartition(":")
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (socket.gaierror, ValueError) as err:
        raise UserError(f"{names['rdzv_endpoint']} {endpoint}: {host!r} is not a host name or address here "
                        f"({err}); set it to the first machine's host:port") from err
    return any(_is_local(info[4][0]) for info in infos)


def wait_for_endpoint(endpoint: str, timeout: float, names: dict[str, str]) -> None:
    """On a machine that does not host the rendezvous: wait (at most `timeout` s) until it answers.

    torchrun would otherwise retry for its own while and end with a stack of socket errors that
    never name the setting to fix."""
    host, _, port = endpoint.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=min(5.0, max(0.1, timeout))):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise UserError(f"{names['rdzv_endpoint']} {endpoint}: nothing answered at {host}:{port} for "
                                f"{timeout:g} s ({err.strerror or err}); with {names['nnodes']} above 1 it must "
                                "be the host:port of the first machine (whose job hosts the rendezvous), "
                                "reachable from here: start that machine's job, or fix the address (or "
                                f"wait longer: {names['rdzv_timeout']})") from err
            time.sleep(0.5)


def _is_local(address: str) -> bool:
    """Whether an address belongs to this machine (it can be bound to)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((address, 0))
        except OSError:
            return False
    return True
