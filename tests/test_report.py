"""The report's table builders, the benchmark suite's runner and the profiler, without Snakemake
(tests/test_see_run.py runs them through the workflow)."""

import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2ipu.errors import UserError
from gpt2ipu.report import bench, data, evaluation, resources
from gpt2ipu.report.pages import SECTIONS, report_pages
from gpt2ipu.tables import html_table, markdown_table

REPO = Path(__file__).resolve().parents[1]


def write_json(path: Path, value) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value), encoding="utf-8")
    return path


def test_tables_format_numbers_and_escape_text():
    rows = [["a|b", 1234.5678, None], ["<i>x</i>", 3, 0.000012345]]
    md = markdown_table(["name", "value", "other"], rows)
    assert md.splitlines()[2] == "| a\\|b | 1235 | - |"
    html = html_table(["name", "value", "other"], rows)
    assert "&lt;i&gt;x&lt;/i&gt;" in html and "<i>" not in html
    assert '<td class="num">1.234e-05</td>' in html


def fake_data_dir(root: Path) -> Path:
    """A data folder laid out as the data stages write it, with their figures."""
    for part in ("part1", "part2"):
        write_json(root / "dump" / part / "provenance.json", {"figures": {"pages": 120, "bz2_bytes": 1000}})
        write_json(root / "extract" / part / "provenance.json", {"figures": {"articles": 87, "output_bytes": 5000}})
        write_json(root / "tokens" / part / "provenance.json", {"figures": {"articles": 87, "tokens": 6000}})
        (root / "tokens" / part / "tokens.bin").write_bytes(b"\0" * 12000)
    write_json(root / "shards" / "stats.json", {
        "train_documents": 165, "train_tokens": 11000, "train_samples": 300, "valid_documents": 9,
        "valid_tokens": 1000, "valid_samples": 20, "bytes": {"tfrecord": 50000, "mmap": 24000}})
    return root


def test_data_table_has_every_stage_and_part(tmp_path):
    headers, rows = data.data_table(fake_data_dir(tmp_path / "sample"))
    assert headers[:2] == ["stage", "part"]
    assert [row[:2] for row in rows] == [
        ["dump", "part1"], ["dump", "part2"], ["extract", "part1"], ["extract", "part2"],
        ["tokenize", "part1"], ["tokenize", "part2"], ["shards", "train"], ["shards", "valid"],
        ["shards", "all (tfrecord)"], ["shards", "all (mmap)"]]
    assert rows[4] == ["tokenize", "part1", 87, 6000, None, 12000]
    assert rows[6] == ["shards", "train", 165, 11000, 300, None]
    assert rows[9][-1] == 24000


def test_data_table_names_an_unreadable_stats_file(tmp_path):
    root = fake_data_dir(tmp_path / "sample")
    (root / "shards" / "stats.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match=r"stats\.json: not a readable stats file"):
        data.data_table(root)


def test_evaluation_table_lists_every_task_and_convention(tmp_path):
    convention = {"accuracy": 0.25, "perplexity": 80.0, "token_perplexity": 20.0, "samples": 4, "correct": 1}
    write_json(tmp_path / "sample-gpt2" / "lambada.json",
               {"last_word": convention, "last_token": {**convention, "accuracy": 0.5}, "samples": 4,
                "provenance": {"stage": "evaluate_lambada"}})
    write_json(tmp_path / "sample-gpt2" / "wikitext.json",
               {"token_perplexity": 30.0, "word_perplexity": 90.0, "adjusted_perplexity": 95.0, "token_accuracy": 0.3,
                "scored_tokens": 999, "words": 500,
                "lm_eval": {"word_perplexity": 70.0, "byte_perplexity": 2.5, "token_perplexity": 25.0, "words": 480,
                            "bytes": 2600}})
    write_json(tmp_path / "sample-gpt2" / "hellaswag.json",
               {"lm_eval": {"acc": 0.3, "acc_norm": 0.35, "acc_bytes": 0.34, "samples": 20,
                            "gold_token_perplexity": 60.0},
                "llm_c": {"acc": 0.28, "acc_norm": 0.31, "samples": 20, "gold_token_perplexity": 61.0}})
    headers, rows = evaluation.evaluation_table(tmp_path, ["sample-gpt2", "sample-gpt2-medium"])
    assert [(r[1], r[2]) for r in rows] == [("LAMBADA", "last_token"), ("LAMBADA", "last_word"),
                                            ("WikiText", "lm_eval word"), ("WikiText", "lm_eval byte"),
                                            ("WikiText", "megatron token"), ("WikiText", "megatron word"),
                                            ("WikiText", "megatron adjusted"),
                                            ("HellaSwag", "lm_eval acc"), ("HellaSwag", "lm_eval acc_norm"),
                                            ("HellaSwag", "llm_c acc"), ("HellaSwag", "llm_c acc_norm")]
    assert rows[8][3:] == [0.35, None, 60.0, 20] and rows[10][3] == 0.31
    assert rows[1][3:] == [0.25, 80.0, 20.0, 4]
    assert rows[2][4:] == [70.0, 25.0, 480] and rows[3][6] == 2600
    assert rows[5][4] == 90.0 and rows[4][3] == 0.3 and rows[4][6] == 999


def bench_result(ours, baselines):
    return {"ours": ours, "unit": "MB/s", "baselines": baselines,
            "speedup": {name: ours / value for name, value in baselines.items()},
            "machine": {"cpu": "Test CPU", "cores": 2, "torch": "2.x", "gpu": None}}


def test_bench_summary_has_a_row_per_baseline_and_a_chart(tmp_path):
    write_json(tmp_path / "bench" / "shards.json", bench_result(10.0, {"tfrecord": 2.0}))
    write_json(tmp_path / "bench" / "tokenize.json", bench_result(4.0, {"hf": 1.0, "tiktoken": 8.0}))
    results = bench.read_bench_results(tmp_path / "bench")
    assert bench.summary_rows(results) == [["shards", 10.0, "MB/s", "tfrecord", 2.0, 5.0],
                                           ["tokenize", 4.0, "MB/s", "hf", 1.0, 4.0],
                                           ["tokenize", 4.0, "MB/s", "tiktoken", 8.0, 0.5]]
    assert bench.machine_rows(results)[0] == ["shards", "Test CPU", 2, "2.x", None]
    bench.plot_speedups(results, tmp_path / "speedups.png")
    assert (tmp_path / "speedups.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_file_that_is_not_a_benchmark_result_is_named(tmp_path):
    write_json(tmp_path / "odd.json", {"ours": 1.0})
    with pytest.raises(UserError, match=r"odd\.json: not a benchmark result"):
        bench.read_bench_results(tmp_path)


def test_resource_rows_read_snakemake_benchmark_files(tmp_path):
    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    (tmp_path / "pretrain").mkdir()
    (tmp_path / "pretrain" / "sample-gpt2.tsv").write_text(
        header + "120.5\t0:02:00\t2600.1\t3000\t2500\t2550\t10\t500\t190\t230\n")
    (tmp_path / "extract").mkdir()
    # A job too short for Snakemake to sample memory writes NA.
    (tmp_path / "extract" / "sample-part1.tsv").write_text(header + "0.4\t0:00:00\tNA\tNA\tNA\tNA\tNA\tNA\t0\t0\n")
    rows = resources.resource_rows(tmp_path)
    assert rows == [["pretrain", "sample-gpt2", 120.5, 2600.1, 10.0, 500.0, 190.0, 230.0],
                    ["extract", "sample-part1", 0.4, None, None, None, 0.0, 0.0]]


def test_the_run_config_is_the_runs_own_not_a_larger_models(tmp_path):
    from gpt2ipu.report.training import latest_train_config

    write_json(tmp_path / "sample-gpt2-0123456789" / "train_config.json", {"model": "gpt2"})
    write_json(tmp_path / "sample-gpt2-medium-abcdef0123" / "train_config.json", {"model": "gpt2-medium"})
    path, config = latest_train_config(tmp_path, "sample-gpt2")
    assert config == {"model": "gpt2"} and path.parent.name == "sample-gpt2-0123456789"


def test_report_pages_fill_every_section_or_say_how_to(tmp_path):
    results = tmp_path / "results"
    fake_data_dir(results / "data" / "sample")
    out_dirs = {section: tmp_path / "report" / section for section in SECTIONS}
    counts = report_pages(results_dir=results, benchmarks_dir=tmp_path / "benchmarks", dataset="sample",
                          out_dirs=out_dirs)
    assert set(counts) == set(SECTIONS) and all(counts.values())
    assert "| tokenize | part2 | 87 | 6000 |" in (out_dirs["data"] / "sample" / "stages.md").read_text()
    empty = (out_dirs["benchmarks"] / "none" / "empty.html").read_text()
    assert "snakemake --cores 2 benchmarks" in empty


def test_a_suite_entry_with_bad_arguments_names_its_config_key():
    from gpt2ipu.bench.suite import parse_bench_args

    with pytest.raises(UserError, match=r"benchmarks\.suite\.quick\.args"):
        parse_bench_args("quick", "shards", ["--no-such-flag"])
    assert parse_bench_args("quick", "shards", ["--samples", 10]).samples == 10


def test_a_suite_entry_writes_its_result_with_the_machine(tmp_path):
    from gpt2ipu.bench.suite import bench as run_bench

    out = tmp_path / "shards.json"
    run_bench(name="shards", bench="shards", args=["--samples", "20", "--max-len", "16", "--repeats", "1"], out=out)
    result = json.loads(out.read_text())
    assert {"ours", "unit", "baselines", "speedup", "machine"} <= result.keys()
    assert result["ours"] > 0 and set(result["speedup"]) == set(result["baselines"])
    assert result["machine"]["cores"] >= 1 and result["machine"]["torch"]


@pytest.mark.slow   # about 10 s: the profiler's trace export
def test_profile_writes_a_trace_of_operator_events_and_the_top_operators(tmp_path):
    from gpt2ipu.profile.steps import profile_steps
    from gpt2ipu.train.config import TrainConfig

    cfg = TrainConfig(model="gpt2-test", max_len=16, batch_size=1, dataset="generated", generated_samples=64,
                      vocab_size=512, device="cpu")
    figures = profile_steps(cfg=cfg, out_dir=tmp_path / "prof", wait_steps=1, active_steps=1, top=5)
    with gzip.open(tmp_path / "prof" / "trace.json.gz", "rt") as f:
        events = json.load(f)["traceEvents"]
    operators = {e["name"] for e in events if e.get("cat") == "cpu_op"}
    assert {"aten::mm", "aten::addmm"} & operators, sorted(operators)[:20]
    by_time = next(iter(figures["tables"].values()))
    assert len(by_time["rows"]) == 5 and by_time["rows"][0][2] >= by_time["rows"][-1][2]
    assert "aten::" in (tmp_path / "prof" / "top_ops.md").read_text()
    assert list((tmp_path / "prof" / "tensorboard").rglob("*.pt.trace.json.gz"))
    assert not (tmp_path / "prof" / "memory_snapshot.pickle").exists()   # CUDA only


def test_profile_refuses_more_steps_than_the_data_gives(tmp_path):
    from gpt2ipu.profile.steps import profile_steps
    from gpt2ipu.train.config import TrainConfig

    cfg = TrainConfig(model="gpt2-test", max_len=16, batch_size=4, dataset="generated", generated_samples=8,
                      vocab_size=512, device="cpu")
    with pytest.raises(UserError, match="gives only 2 steps"):
        profile_steps(cfg=cfg, out_dir=tmp_path / "prof", wait_steps=1, active_steps=2)
    assert not (tmp_path / "prof").exists()


@pytest.mark.slow
def test_training_does_not_import_the_profiler_module():
    """`gpt2ipu train` and the training loop never load gpt2ipu.profile (the profiler costs an
    unprofiled run nothing: no import, so no hooks)."""
    code = ("import sys, gpt2ipu.cli, gpt2ipu.train.loop, gpt2ipu.train.launch, gpt2ipu.train.cli; "
            "gpt2ipu.cli.build_parser('train'); "
            "print(sorted(m for m in sys.modules if m.startswith('gpt2ipu.profile')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"


def test_every_rule_that_makes_files_has_a_benchmark_file():
    """Each rule (or checkpoint) with an `output:` also has `benchmark: benchmarks/<rule>/...`."""
    missing = []
    for smk in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        for match in re.finditer(r"^(?:rule|checkpoint) (\w+):\n(.*?)(?=^\S|\Z)", smk.read_text(), re.M | re.S):
            name, body = match.groups()
            if "    output:" in body and not re.search(rf"    benchmark:\n\s+f?\"benchmarks/{name}/", body):
                missing.append(f"{smk.name}: {name}")
    assert missing == []
