"""`report_pages`: every page the Snakemake report shows, one folder per report category.

The report (`snakemake --report report.html`) runs no jobs: it shows files that exist. So the
workflow's `report_pages` rule, which every named target ends with, gathers what the runs of the
configured dataset have produced so far (whatever exists under results/ and benchmarks/) into
HTML tables and PNG figures, laid out as `<section>/<group>/<name>.<ext>` for the report's
file patterns. A section with nothing to show yet gets a page that says how to fill it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpt2ipu.errors import UserError
from gpt2ipu.fsutil import atomic_dir
from gpt2ipu.log import package_logger
from gpt2ipu.report import bench, data, evaluation, resources, training
from gpt2ipu.tables import html_page, html_table, markdown_table, paragraph

log = package_logger(__name__)

SECTIONS = ("data", "training", "evaluation", "generation", "benchmarks", "profile", "resources")
# What to run when a section is empty (shown on its page).
FILL_WITH = {
    "data": "snakemake --cores 2 data",
    "training": "snakemake --cores 2 pretrain_small",
    "evaluation": "snakemake --cores 2 evaluate_lambada evaluate_wiki evaluate_hellaswag",
    "generation": "snakemake --cores 2 generate",
    "benchmarks": "snakemake --cores 2 benchmarks",
    "profile": "snakemake --cores 2 profile",
    "resources": "any target (every rule writes a benchmark file)",
}


def report_pages(*, results_dir: str | Path, benchmarks_dir: str | Path, dataset: str,
                 out_dirs: dict[str, str | Path]) -> dict[str, int]:
    """Write each section's folder (`out_dirs[section]`, replaced atomically); returns files per section."""
    results_dir = Path(results_dir)
    builders: dict[str, Callable[[Path], None]] = {
        "data": lambda out: data_section(results_dir / "data" / dataset, out),
        "training": lambda out: training_section(results_dir, dataset, out),
        "evaluation": lambda out: evaluation_section(results_dir, dataset, out),
        "generation": lambda out: generation_section(results_dir / "generate", dataset, out),
        "benchmarks": lambda out: benchmarks_section(results_dir / "bench", out),
        "profile": lambda out: profile_section(results_dir / "profile", dataset, out),
        "resources": lambda out: resources_section(Path(benchmarks_dir), out),
    }
    counts = {}
    for section in SECTIONS:
        with atomic_dir(out_dirs[section]) as tmp:
            builders[section](tmp)
            if not any(tmp.rglob("*.*")):
                write(tmp / "none" / "empty.html",
                      html_page(f"{section}: nothing yet",
                                paragraph(f"Nothing of this kind exists yet for dataset {dataset!r}. "
                                          f"Run: {FILL_WITH[section]}")))
            counts[section] = sum(1 for p in tmp.rglob("*") if p.is_file())
    log.info(f"report pages: {counts}")
    return counts


def write(path: Path, text: str) -> None:
    """A page inside a section's temporary folder (atomic_dir publishes the whole folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def table_page(path: Path, title: str, headers: list[str], rows: list[list[Any]], note: str = "") -> None:
    """The table as an HTML page (what the report shows) and as Markdown beside it (.md)."""
    write(path, html_page(title, *([paragraph(note)] if note else []), html_table(headers, rows)))
    lead = f"{note}\n\n" if note else ""
    write(path.with_suffix(".md"), f"# {title}\n\n{lead}{markdown_table(headers, rows)}")


def runs_of(folder: Path, dataset: str) -> list[str]:
    """The `<dataset>-<model>` run folders in `folder`, by name."""
    return sorted(p.name for p in folder.glob(f"{dataset}-*") if p.is_dir()) if folder.is_dir() else []


def data_section(data_dir: Path, out: Path) -> None:
    if not (data_dir / "shards").is_dir():
        return
    headers, rows = data.data_table(data_dir)
    table_page(out / data_dir.name / "stages.html", f"Data of {data_dir.name}: per stage and part", headers, rows,
               "pages/articles: dump pages, extracted articles, tokenized documents, documents per split; "
               "bytes: compressed dump, articles JSON lines, token ids, the shards' files.")


def training_section(results_dir: Path, dataset: str, out: Path) -> None:
    for run in runs_of(results_dir / "models", dataset):
        metrics_path = results_dir / "models" / run / "metrics.jsonl"
        if not metrics_path.is_file():
            continue
        training.training_figures(metrics_path, out / run)
        records = training.read_run_metrics(metrics_path)
        parts = [html_table(["figure", "value"], training.summary_rows(records), caption="last figures")]
        saved = training.latest_train_config(results_dir / "train_state", run)
        if saved is not None:
            path, config = saved
            parts.append(html_table(["key", "value"], training.config_rows(config), caption=f"config ({path})"))
        write(out / run / "config.html", html_page(f"Training run {run}", *parts))


def evaluation_section(results_dir: Path, dataset: str, out: Path) -> None:
    headers, rows = evaluation.evaluation_table(results_dir / "eval", runs_of(results_dir / "eval", dataset))
    if rows:
        table_page(out / dataset / "evaluation.html", f"Evaluation of the {dataset} models", headers, rows,
                   "LAMBADA: accuracy of the target word (last_word: the whole word, greedy; last_token: its "
                   "last token, as in the GPT-2 paper). WikiText: perplexity per token, per word, and per "
                   "word less one (Megatron's adjusted); scored = passages or tokens/words counted.")


def generation_section(generate_dir: Path, dataset: str, out: Path) -> None:
    for run in runs_of(generate_dir, dataset):
        path = generate_dir / run / "continuations.jsonl"
        if not path.is_file():
            continue
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError:
                    raise UserError(f"{path}: line {number} is not JSON; rerun the generate job") from None
                rows.append([record.get("prompt"), record.get("continuation")])
        table_page(out / run / "continuations.html", f"Continuations by {run}", ["prompt", "continuation"], rows)


def benchmarks_section(bench_dir: Path, out: Path) -> None:
    results = bench.read_bench_results(bench_dir) if bench_dir.is_dir() else {}
    if not results:
        return
    table_page(out / "suite" / "summary.html", "Benchmark suite: ours against each baseline, same run",
               bench.HEADERS, bench.summary_rows(results),
               "Throughputs (higher is better); speedup = ours / baseline, medians of repeats.")
    table_page(out / "suite" / "machines.html", "Where each benchmark ran", bench.MACHINE_HEADERS,
               bench.machine_rows(results))
    bench.plot_speedups(results, out / "suite" / "speedups.png")


def profile_section(profile_dir: Path, dataset: str, out: Path) -> None:
    for run in runs_of(profile_dir, dataset):
        page = profile_dir / run / "top_ops.html"
        if page.is_file():
            (out / run).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(page, out / run / "top_ops.html")


def resources_section(benchmarks_dir: Path, out: Path) -> None:
    rows = resources.resource_rows(benchmarks_dir) if benchmarks_dir.is_dir() else []
    if rows:
        table_page(out / "jobs" / "rules.html", "Resources of every job (Snakemake benchmark files)",
                   resources.HEADERS, rows, "Longest first; the last run of each job. Memory is the peak "
                   "resident set of the job's processes; read/written are its I/O.")
        resources.plot_resources(rows, out / "jobs" / "rules.png")
