"""Shared benchmark plumbing: timing by medians, and the one JSON shape every benchmark prints.

Output keys: `ours` (our throughput), `unit`, `baselines` ({name: throughput}), `speedup`
({name: ours / baseline}), plus whatever else a benchmark adds (`peak_mem_mb`, `repeats`, notes).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Mapping


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
