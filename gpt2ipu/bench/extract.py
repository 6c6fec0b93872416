"""`gpt2ipu bench extract`: articles/s of `extract` against wikiextractor's own command line.

Baselines: `python -m wikiextractor.WikiExtractor --json --no-templates -o TMP --processes P DUMP`
in a subprocess for each P in --baseline-processes, reported as `wikiextractor_p<P>`, and the
fastest of them again as `wikiextractor_best`. Ours is `extract` called in-process; the same
run through our own command line (a subprocess, so it pays interpreter start-up like the
baselines) is reported beside it as `ours_cli`.

Articles are counted the same way for both: wikiextractor's output documents, and ours before the
length filter (articles written with min_chars=0, plus those that came out empty, which
wikiextractor writes as empty documents). Runs are interleaved round by round, so that load from
other processes on a shared machine hits every contender alike; medians of --repeats rounds.
Wall time on a loaded machine favours whoever runs more processes (wikiextractor adds a reducer),
so median CPU seconds and articles per CPU second are reported too, with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from gpt2ipu.bench.common import report
from gpt2ipu.data.extract import extract
from gpt2ipu.errors import UserError
from gpt2ipu.log import package_logger

log = package_logger(__name__)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DUMP = REPO.parent / "shared" / "data" / "enwiki-sample-206-pages.xml.bz2"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dump", type=Path, default=DEFAULT_DUMP, help=f"MediaWiki XML dump (default {DEFAULT_DUMP})")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds; medians are reported (default 3)")
    parser.add_argument("--processes", type=int, default=2, help="worker processes for ours (default 2)")
    parser.add_argument("--baseline-processes", default="1,2,3",
                        help="comma-separated --processes values for wikiextractor (default 1,2,3)")


def wikiextractor_run(dump: Path, processes: int, scratch: Path) -> Callable[[], int]:
    def run_once() -> int:
        with tempfile.TemporaryDirectory(dir=scratch) as out:
            command = [sys.executable, "-m", "wikiextractor.WikiExtractor", "--json", "--no-templates",
                       "-o", out, "--processes", str(processes), str(dump)]
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            return sum(sum(1 for _ in f.open(encoding="utf-8")) for f in Path(out).rglob("wiki_*"))

    return run_once


def converted_articles(figures: dict) -> int:
    skipped = figures["skipped"]
    return figures["articles"] + skipped.get("empty", 0) + skipped.get("too_short", 0)


def ours_run(dump: Path, processes: int, scratch: Path) -> Callable[[], int]:
    def run_once() -> int:
        with tempfile.TemporaryDirectory(dir=scratch) as out:
            return converted_articles(extract(dump, Path(out) / "x", processes=processes, min_chars=0))

    return run_once


def ours_cli_run(dump: Path, processes: int, scratch: Path) -> Callable[[], int]:
    def run_once() -> int:
        with tempfile.TemporaryDirectory(dir=scratch) as out:
            command = [sys.executable, "-m", "gpt2ipu", "extract", "--dump", str(dump), "--out-dir",
                       f"{out}/x", "--processes", str(processes), "--min-chars", "0"]
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            figures = json.loads((Path(out) / "x" / "provenance.json").read_text())["figures"]
            return converted_articles(figures)

    return run_once


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (worker pools, subprocesses)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def interleaved_medians(contenders: dict[str, Callable[[], int]], repeats: int) -> tuple[dict, dict, dict]:
    """One untimed warm-up each, then `repeats` rounds that run every contender once.

    Returns article counts, median wall seconds and median CPU seconds (the latter is less
    sensitive to other load on a shared machine).
    """
    counts = {name: fn() for name, fn in contenders.items()}
    wall: dict[str, list[float]] = {name: [] for name in contenders}
    cpu: dict[str, list[float]] = {name: [] for name in contenders}
    for round_index in range(repeats):
        for name, fn in contenders.items():
            cpu_start, start = cpu_seconds(), time.perf_counter()
            count = fn()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(cpu_seconds() - cpu_start)
            if count != counts[name]:
                raise RuntimeError(f"{name} gave {count} articles, then {counts[name]}")
        log.info(f"bench extract: round {round_index + 1}/{repeats} done")
    median = {name: statistics.median(t) for name, t in wall.items()}
    median_cpu = {name: statistics.median(t) for name, t in cpu.items()}
    return counts, median, median_cpu


def speed_figures(counts: dict[str, int], seconds: dict[str, float], cpu: dict[str, float]) -> dict:
    """Articles/s of every contender (`ours`, `ours_cli`, `wikiextractor_p<P>`), the baselines with the
    fastest wikiextractor again as `wikiextractor_best`, and the ratios against it, by wall time and
    by CPU time."""
    rates = {name: counts[name] / seconds[name] for name in counts}
    baselines = {name: rate for name, rate in rates.items() if name.startswith("wikiextractor_")}
    best = max(baselines, key=baselines.get)
    baselines["wikiextractor_best"] = baselines[best]
    per_cpu_second = {name: counts[name] / cpu[name] for name in counts}
    best_per_cpu_second = max(v for name, v in per_cpu_second.items() if name.startswith("wikiextractor_"))
    return {
        "ours": rates["ours"],
        "baselines": baselines,
        "best_baseline": best,
        "ours_cli": rates["ours_cli"],
        "ours_cli_speedup_vs_best": rates["ours_cli"] / baselines[best],
        "articles_per_cpu_second": per_cpu_second,
        "cpu_speedup_vs_best": per_cpu_second["ours"] / best_per_cpu_second,
    }


def run(args: argparse.Namespace) -> dict:
    dump = args.dump
    if not dump.is_file():
        raise UserError(f"benchmark dump {dump} is absent; give one with --dump PATH (a MediaWiki .xml or .xml.bz2)")
    baseline_processes = [int(p) for p in args.baseline_processes.split(",") if p.strip()]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-extract-") as scratch_name:
        scratch = Path(scratch_name)
        contenders = {"ours": ours_run(dump, args.processes, scratch),
                      "ours_cli": ours_cli_run(dump, args.processes, scratch)}
        for p in baseline_processes:
            contenders[f"wikiextractor_p{p}"] = wikiextractor_run(dump, p, scratch)
        counts, seconds, cpu = interleaved_medians(contenders, args.repeats)
    figures = speed_figures(counts, seconds, cpu)
    return report(
        figures.pop("ours"),
        "articles/s",
        figures.pop("baselines"),
        **figures,
        articles=counts,
        median_seconds=seconds,
        median_cpu_seconds=cpu,
        load_average={"before": load_before, "after": os.getloadavg()[0], "cpus": os.cpu_count()},
        repeats=args.repeats,
        processes=args.processes,
        dump=str(dump),
        note=("ours = extract in-process with min_chars=0, counting articles written plus those that came "
              "out empty (wikiextractor writes those as empty docs); ours_cli and the wikiextractor baselines "
              "are subprocesses and include interpreter start-up"),
    )
