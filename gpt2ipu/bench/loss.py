"""`gpt2ipu bench loss`: forward + backward of the LM-head loss, the fused C++ op vs PyTorch.

ours: `gpt2ipu.model.loss.fused_lm_loss` (the compiled op, vocabulary chunks of `--chunk-size`).
torch_linear_cross_entropy: `F.cross_entropy(F.linear(hidden, weight), labels)`, the whole [N, V] logits.
chunked_lm_loss: `gpt2ipu.model.loss.chunked_lm_loss(vocab_chunks=ceil(V / chunk_size))`, pure PyTorch, what
`--embedding-serialization-factor` falls back to without the compiled op (it recomputes the logits in
backward).
chunked_lm_loss_tokens: `chunked_lm_loss(token_chunks=...)` with the op's token blocks (the
`--enable-sequence-serialized` path: gradients taken in forward, as the op does).

Throughput: tokens (N) per second of one forward + backward (both gradients), medians.

Peak memory: each variant lives in its own worker process, which creates the inputs (hidden,
weight, labels) without temporaries and notes its resident set size (RSS, /proc/self/statm); peak
= the process's ru_maxrss after its runs minus that RSS, i.e. everything the loss allocates on top
of its inputs, its outputs (the two gradients) included. Timing: the workers take turns (one run
of each, then again), so a machine shared with other jobs slows them alike.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from gpt2ipu.bench.common import report
from gpt2ipu.errors import UserError
from gpt2ipu.log import package_logger

log = package_logger(__name__)

VARIANTS = ("ours", "torch_linear_cross_entropy", "chunked_lm_loss", "chunked_lm_loss_tokens")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=4096, help="N, rows of hidden")
    parser.add_argument("--vocab", type=int, default=50257, help="V, rows of weight")
    parser.add_argument("--dim", type=int, default=768, help="d")
    parser.add_argument("--chunk-size", type=int, default=None, help="vocabulary rows per chunk (default: the op's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each variant (median), after one warm-up")
    parser.add_argument("--ops-dir", default=None,
                        help="build folder of the ops (default $GPT2IPU_OPS_DIR, else build into a temporary folder)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random problem")


def run(args: argparse.Namespace) -> dict:
    from gpt2ipu import ops
    from gpt2ipu.model.loss import FUSED_CHUNK_SIZE

    chunk_size = args.chunk_size or FUSED_CHUNK_SIZE
    shape = {"tokens": args.tokens, "vocab": args.vocab, "dim": args.dim, "chunk_size": chunk_size, "seed": args.seed}
    with tempfile.TemporaryDirectory(prefix="gpt2ipu-bench-ops-") as scratch:
        ops_dir = ops.ready_ops_dir(args.ops_dir, scratch)
        workers = {name: _Worker(name, shape, ops_dir) for name in VARIANTS}
        try:
            log.info(f"bench loss: N={args.tokens} V={args.vocab} d={args.dim} fp32, chunk {chunk_size}, "
                     f"1 warm-up + {args.repeats} runs of each variant, in turn")
            runs = {name: [] for name in VARIANTS}
            for round_index in range(args.repeats + 1):
                for name, worker in workers.items():
                    result = worker.step()
                    if round_index:
                        runs[name].append(result)
                    log.info(f"  {name}: {result['seconds']:.2f} s")
        finally:
            for worker in workers.values():
                worker.close()
    seconds = {name: statistics.median(r["seconds"] for r in runs[name]) for name in VARIANTS}
    peak = {name: max(r["maxrss_mb"] for r in runs[name]) - workers[name].rss_mb for name in VARIANTS}
    _check_agreement({name: runs[name][-1] for name in VARIANTS})
    throughput = {name: args.tokens / seconds[name] for name in VARIANTS}
    baselines = {name: throughput[name] for name in VARIANTS[1:]}
    return report(
        throughput["ours"], "tokens/s", baselines,
        seconds=seconds,
        peak_mem_mb={name: round(value, 1) for name, value in peak.items()},
        peak_mem_ratio={name: peak["ours"] / peak[name] for name in VARIANTS[1:]},
        time_ratio={name: seconds["ours"] / seconds[name] for name in VARIANTS[1:]},
        shape=shape,
        repeats=args.repeats,
        threads=_threads(),
        note=("forward + backward (loss, accuracy, grad of hidden and weight), fp32; peak_mem_mb = worker "
              "ru_maxrss minus its RSS once the inputs exist (what the loss adds, gradients included); "
              "each variant in its own process, runs interleaved; medians"),
    )


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _check_agreement(last: dict[str, dict]) -> None:
    reference = last["torch_linear_cross_entropy"]
    for name, result in last.items():
        for key in ("loss", "grad_hidden_norm", "grad_weight_norm"):
            if not math.isclose(result[key], reference[key], rel_tol=1e-4):
                raise AssertionError(f"bench loss: {name} gives {key} {result[key]}, PyTorch {reference[key]}")


class _Worker:
    """One variant in a child process, run on request: `step()` -> its timing and peak RSS so far."""

    def __init__(self, variant: str, shape: dict, ops_dir: str):
        request = json.dumps({"variant": variant, **shape})
        self.process = subprocess.Popen(
            [sys.executable, "-c", "import sys; from gpt2ipu.bench.loss import worker_main; worker_main(sys.argv[1])",
             request],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_worker_env(variant, ops_dir))
        self.rss_mb = self._read()["rss_mb"]

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise UserError(f"bench loss: a worker process died (exit {self.process.wait()}); see the messages above")
        return json.loads(line)

    def step(self) -> dict:
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait()


def _worker_env(variant: str, ops_dir: str) -> dict[str, str]:
    """Only `ours` sees the ops: chunked_lm_loss itself dispatches to them when they load."""
    from gpt2ipu.ops import OPS_DIR_ENV

    env = {key: value for key, value in os.environ.items() if key != OPS_DIR_ENV}
    return {**env, OPS_DIR_ENV: ops_dir} if variant == "ours" else env


def worker_main(request_json: str) -> None:
    request = json.loads(request_json)
    import torch

    loss_fn = _loss_function(request["variant"], request["tokens"], request["vocab"], request["chunk_size"])
    generator = torch.Generator().manual_seed(request["seed"])
    n, v, d = request["tokens"], request["vocab"], request["dim"]
    # Made in place, so that creating them leaves no freed temporary in the RSS baseline.
    hidden = torch.randn(n, d, generator=generator).requires_grad_()
    weight = torch.randn(v, d, generator=generator).mul_(0.02).requires_grad_()  # GPT-2's init scale
    labels = torch.randint(0, v, (n,), generator=generator)
    print(json.dumps({"rss_mb": _rss_mb()}), flush=True)
    for _ in sys.stdin:
        hidden.grad = weight.grad = None
        start = time.perf_counter()
        loss = loss_fn(hidden, weight, labels)
        loss.backward()
        seconds = time.perf_counter() - start
        print(json.dumps({"seconds": seconds, "maxrss_mb": _maxrss_mb(), "loss": loss.item(),
                          "grad_hidden_norm": hidden.grad.norm().item(),
                          "grad_weight_norm": weight.grad.norm().item()}), flush=True)


def _loss_function(variant: str, tokens: int, vocab: int, chunk_size: int):
    import torch.nn.functional as F

    if variant == "ours":
        from gpt2ipu.model.loss import fused_lm_loss
        from gpt2ipu.ops import load_ops, ops_reason

        if load_ops(quiet=True) is None:
            raise SystemExit(f"bench loss: the compiled ops do not load: {ops_reason()}")
        return lambda h, w, y: fused_lm_loss(h, w, y, chunk_size=chunk_size)[0]
    if variant == "torch_linear_cross_entropy":
        return lambda h, w, y: F.cross_entropy(F.linear(h, w), y)
    from gpt2ipu.model.loss import FUSED_BLOCK_ELEMENTS as BLOCK_ELEMENTS
    from gpt2ipu.model.loss import chunked_lm_loss

    if variant == "chunked_lm_loss_tokens":
        token_chunks = math.ceil(tokens / max(1, BLOCK_ELEMENTS // vocab))
        return lambda h, w, y: chunked_lm_loss(h, w, y, token_chunks=token_chunks)[0]
    return lambda h, w, y: chunked_lm_loss(h, w, y, vocab_chunks=math.ceil(vocab / chunk_size))[0]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
