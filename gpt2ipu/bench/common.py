"""Shared benchmark plumbing: the benchmarks by name, timing by medians, the one JSON shape every
benchmark prints and the machine it ran on.

Output keys: `ours` (our throughput), `unit`, `baselines` ({name: throughput}), `speedup`
({name: ours / baseline}), plus whatever else a benchmark adds (`peak_mem_mb`, `repeats`, notes).
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

# `gpt2ipu bench <stage>` and the suite's `bench:` names -> the module that runs it.
STAGES = {
    "tokenize": "gpt2ipu.bench.tokenize",
    "tokenize_text": "gpt2ipu.bench.tokenize_text",
    "shards": "gpt2ipu.bench.shards",
    "extract": "gpt2ipu.bench.extract",
    "train": "gpt2ipu.bench.train",
    "evaluate": "gpt2ipu.bench.evaluate",
    "generate": "gpt2ipu.bench.generate",
    "loss": "gpt2ipu.bench.loss",
    "sample_index": "gpt2ipu.bench.sample_index",
    "weights_quality": "gpt2ipu.bench.weights_quality",
}


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn()` over `repeats` runs, after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_median_seconds(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, timed in turns (one run of each per round) so that load from
    other processes on a shared machine falls on all of them alike, not on whichever ran last."""
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def report(ours: float, unit: str, baselines: Mapping[str, float], **extra: Any) -> dict[str, Any]:
    """Throughput figures (higher is better) -> the benchmark JSON object."""
    return {
        "ours": ours,
        "unit": unit,
        "baselines": dict(baselines),
        "speedup": {name: (ours / value if value else float("inf")) for name, value in baselines.items()},
        **extra,
    }


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what the platform module says."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """Where a benchmark ran: CPU model, cores (all, and those this process may use), torch, GPU."""
    import torch

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()}",
    }
