"""Training across two machines: two network namespaces on this one, joined by a veth pair
(10.77.0.1 and 10.77.0.2), one torchrun agent in each, the c10d rendezvous on the first's address,
started as a user starts them: the same `gpt2ipu train --nproc-per-node 1 --nnodes 2
--rdzv-endpoint 10.77.0.1:PORT ...` on each machine. FSDP over the two machines and two pipeline
stages (one per machine) reproduce one process's losses, as issue 11's layouts do on one host
(tests/test_parallel.py); a machine whose rendezvous endpoint never answers says so.

Needs root and `ip netns` (skipped, with the reason, otherwise); the namespaces and the veth pair
are made by the fixture and removed after, whatever happened; nothing outside them is reached.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gpt2ipu.errors import UserError
from gpt2ipu.model import GPT
from gpt2ipu.train.elastic import CLI_FLAGS, wait_for_endpoint
from tests.test_parallel import COMMON, tiny_config

STEPS = 6
FIRST, SECOND = "10.77.0.1", "10.77.0.2"
LAYOUTS = {   # name: (flags of the two processes, port); one process has --gradient-accumulation 4
    "fsdp": (["--fsdp", "--replication-factor", 2, "--batch-size", 2, "--gradient-accumulation", 2], 29720),
    "stages": (["--pipeline-stages", 2, "--batch-size", 2, "--gradient-accumulation", 4], 29722),
}


def sh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True)


@pytest.fixture(scope="module")
def machines():
    """Two namespaces, each with one end of a veth pair: [(namespace, interface, address)] x 2."""
    if os.geteuid() != 0:
        pytest.skip("needs root to make network namespaces")
    tag = os.getpid() % 100000
    nodes = [(f"g2i-el-a{tag}", f"g2iela{tag}", FIRST), (f"g2i-el-b{tag}", f"g2ielb{tag}", SECOND)]
    try:
        for ns, _, _ in nodes:
            made = sh("ip", "netns", "add", ns)
            if made.returncode != 0:
                pytest.skip(f"`ip netns add` is not available here: {made.stderr.strip()}")
        steps = [("ip", "link", "add", nodes[0][1], "type", "veth", "peer", "name", nodes[1][1])]
        for ns, dev, addr in nodes:
            steps += [("ip", "link", "set", dev, "netns", ns),
                      ("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev),
                      ("ip", "-n", ns, "link", "set", dev, "up"), ("ip", "-n", ns, "link", "set", "lo", "up")]
        for step in steps:
            done = sh(*step)
            if done.returncode != 0:
                pytest.skip(f"`{' '.join(step)}` failed: {done.stderr.strip()}")
        yield nodes
    finally:
        for ns, _, _ in nodes:   # deleting a namespace deletes its end of the veth pair, and so the pair
            sh("ip", "netns", "del", ns)


def train_in(node, *flags) -> subprocess.Popen:
    """`gpt2ipu train` on one "machine": its namespace, and the two settings a machine whose hostname
    does not resolve to the address the others reach needs (README "Many devices")."""
    ns, dev, addr = node
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": dev, "PET_LOCAL_ADDR": addr}
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "gpt2ipu", "train",
                             *map(str, flags)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def losses(state: Path) -> list[float]:
    records = [json.loads(line) for line in (state / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    return [r["loss"] for r in records]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    from gpt2ipu.model.hf import save_hf_dir

    root = tmp_path_factory.mktemp("nodes")
    torch.manual_seed(0)
    save_hf_dir(GPT(tiny_config()), root / "init")
    flags = ["--checkpoint-input-dir", root / "init", *COMMON, "--max-steps", STEPS]
    done = subprocess.run([sys.executable, "-m", "gpt2ipu", "train", *map(str, flags), "--state-dir", root / "one",
                           "--batch-size", "2", "--gradient-accumulation", "4"],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return flags, losses(root / "one"), root


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_machines_reproduce_one_process(machines, one_process, layout):
    flags, expected, root = one_process
    layout_flags, port = LAYOUTS[layout]
    state = root / layout   # one shared folder, as a cluster's shared file system is
    launch = ["--nproc-per-node", 1, "--nnodes", 2, "--rdzv-endpoint", f"{FIRST}:{port}", "--rdzv-timeout", 120]
    procs = [train_in(node, *launch, *flags, "--state-dir", state, *layout_flags) for node in machines]
    outputs = [proc.communicate(timeout=400) for proc in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    got = losses(state)
    print(f"{layout} on two machines: max |loss diff| vs one process "
          f"{max(abs(a - b) for a, b in zip(got, expected)):.3g}")
    assert got == pytest.approx(expected, rel=1e-5)
    assert json.loads(outputs[0][0].strip().splitlines()[-1])["step"] == STEPS   # rank 0 (first machine) reports


@pytest.mark.slow
def test_a_rendezvous_nobody_hosts_is_named_after_a_bounded_wait(machines, tmp_path):
    """The second machine started alone: the first's address answers, but nothing listens on the port."""
    start = time.monotonic()
    proc = train_in(machines[1], "--nproc-per-node", 1, "--nnodes", 2, "--rdzv-endpoint", f"{FIRST}:29730",
                    "--rdzv-timeout", 2, "--state-dir", tmp_path, *COMMON, "--max-steps", 1)
    _, err = proc.communicate(timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, err[-2000:]
    message = err.strip().splitlines()[-1]
    assert message.startswith("gpt2ipu train: error: --rdzv-endpoint 10.77.0.1:29730: nothing answered"), message
    assert "for 2 s" in message and "--nnodes" in message and "first machine" in message
    assert elapsed < 60, elapsed


def test_an_endpoint_that_never_answers_is_named_after_its_timeout():
    """The bounded wait itself, on this machine's loopback (a port of this test's range nothing listens on)."""
    port = 29731
    start = time.monotonic()
    with pytest.raises(UserError, match=rf"--rdzv-endpoint 127.0.0.1:{port}: nothing answered .* for 1 s"):
        wait_for_endpoint(f"127.0.0.1:{port}", 1, CLI_FLAGS)
    assert 1 <= time.monotonic() - start < 10
