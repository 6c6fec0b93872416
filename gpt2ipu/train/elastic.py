"""torchrun's elastic agent over `gpt2ipu train`: the command line, the wait for a rendezvous
endpoint on another machine, and one message when the run fails.

Used by the Snakemake rule (gpt2ipu/train/launch.py, settings `train.*`) and by `gpt2ipu train
--nproc-per-node N` (gpt2ipu/train/cli.py, flags `--*`): `flag_names` says which names a message
gives. With `max_restarts`, the agent restarts every process when one dies; each then resumes
from the last complete checkpoint. When the restarts are used up, the run ends with one message
naming the rank that failed first and its last line of output.
"""

from __future__ import annotations

import collections
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from gpt2ipu.errors import UserError

# torchrun's elastic agent normally shares one TCPStore across restart rounds (the rendezvous's own,
# its server started once by the first agent) and hands it to the workers as MASTER_ADDR/PORT. The
# keys the processes of a round write there outlive them: gloo's full-mesh connect (each rank
# publishes its listening address under the process group's prefix) then finds the dead round's
# addresses already set, so the restarted ranks connect to ports nobody listens on any more
# ("Connection refused" in connectFullMesh; with the static rendezvous, whose store is always
# shared, the restarted processes were seen to wait in init_process_group instead). The restart count in
# TORCHELASTIC_RESTART_COUNT cannot prefix the keys instead: an agent whose own workers were
# healthy restarts without counting, so the count differs between machines. With the store not
# shared, the first agent picks a fresh port each round and rank 0 starts a new, empty store on it.
FRESH_STORE_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


WORKFLOW_FLAGS = {"nnodes": "train.nnodes", "rdzv_endpoint": "train.rdzv_endpoint",
                  "max_restarts": "train.max_restarts", "rdzv_timeout": "train.rdzv_timeout"}
CLI_FLAGS = {"nnodes": "--nnodes", "rdzv_endpoint": "--rdzv-endpoint", "max_restarts": "--max-restarts",
             "rdzv_timeout": "--rdzv-timeout"}


class Torchrun:
    """`torchrun` (torch.distributed.run) over `gpt2ipu train`, with c10d rendezvous: one agent per
    machine, `nproc_per_node` processes each, restarted together up to `max_restarts` times."""

    def __init__(self, *, nproc_per_node: int, nnodes: int, rdzv_endpoint: str, max_restarts: int,
                 rdzv_timeout: float, log_dir: Path, flag_names: dict[str, str], prefix: list[str] | None = None):
        self.nproc_per_node, self.nnodes, self.endpoint = nproc_per_node, nnodes, rdzv_endpoint
        # `srun ...` (gpt2ipu/train/slurm.py): one agent per node of a SLURM allocation, started from here.
        self.prefix = prefix or []
        self.max_restarts, self.rdzv_timeout, self.log_dir, self.names = max_restarts, rdzv_timeout, log_dir, flag_names

    def command(self, train_args: list[str], hosts_store: bool | None) -> list[str]:
        # is_host: torchrun guesses whether it hosts the rendezvous store by comparing the endpoint with
        # the hostname's addresses, which misses an address of a second interface; binding to it does not.
        # None (agents that srun starts on other nodes): each agent's own guess, the endpoint being the
        # allocation's first host by name.
        rdzv_conf = f"join_timeout={max(1, round(self.rdzv_timeout))}"
        if hosts_store is not None:
            rdzv_conf += f",is_host={int(hosts_store)}"
        return [*self.prefix, sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={self.nproc_per_node}",
                f"--nnodes={self.nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={self.endpoint}",
                f"--rdzv_conf={rdzv_conf}", f"--max_restarts={self.max_restarts}",
                # Each process's stderr also goes to <log_dir>/<run>/attempt_<n>/<local rank>/stderr.log,
                # where `failure` finds the last message of the rank that failed.
                f"--log_dir={self.log_dir}", "--tee=2",
                "-m", "gpt2ipu", "train", *train_args]

    def run(self, train_args: list[str], env: dict[str, str]) -> str:
        """Run to the end; returns the processes' stdout (rank 0's summary line), raises UserError on failure."""
        hosts_store = None if self.prefix else endpoint_is_local(self.endpoint, self.names)
        if hosts_store is False:
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
        how = f"was killed by {_signal_name(-code)}" if code < 0 else f"exited with status {code}"
        last = last_message(self.log_dir, local_rank)
        said = f"its last message: \"{last}\"" if last else "it wrote no message"
        return (f"rank {rank} {how} {restarts}; {said}. "
                "Rerun the same command once its cause is fixed: it resumes from the last checkpoint")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _pump(proc: subprocess.Popen, tail: collections.deque) -> str:
    """Pass the agent's stderr through (keeping its tail) while collecting stdout."""
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
