"""Seeing a run through the workflow: `snakemake --report`, the profile target, the benchmark suite.

One small run per module (tests/test_workflow.py's sample and recipe, the tiny gpt2-test model):
train, evaluate and generate by file target, then `snakemake profile benchmarks`, whose report
pages then gather all of it.
"""

import gzip
import json
import zipfile

import pytest
import yaml
from test_workflow import make_workdir, snakemake

pytestmark = pytest.mark.slow

RUN = "sample-gpt2-test"
RUN_OUTPUTS = [f"results/models/{RUN}/final", f"results/eval/{RUN}/lambada.json", f"results/eval/{RUN}/wikitext.json",
               f"results/generate/{RUN}/continuations.jsonl"]
# Two short entries of one benchmark: enough to see one result per entry, and one job at a time.
SUITE = {"shards": {"bench": "shards", "args": ["--samples", "40", "--max-len", "32", "--repeats", "1"]},
         "shards_long": {"bench": "shards", "args": ["--samples", "80", "--max-len", "32", "--repeats", "1"]}}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = make_workdir(tmp_path_factory.mktemp("see"), {"profile": {"model": "gpt2-test", "threads": 1, "top": 8}})
    config_path = workdir / "config" / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["benchmarks"] = {"threads": 1, "suite": SUITE}   # replaces the default suite, not merged into it
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    snakemake(workdir, *RUN_OUTPUTS)
    targets = snakemake(workdir, "profile", "benchmarks")
    return workdir, targets


def test_report_zip_holds_the_curves_the_evaluation_table_and_the_rule_benchmarks(run, tmp_path):
    workdir, _ = run
    snakemake(workdir, "--report", str(tmp_path / "report.zip"))
    with zipfile.ZipFile(tmp_path / "report.zip") as archive:
        files = {name.rsplit("/", 1)[-1]: name for name in archive.namelist()}
        for name in ("report.html", "stages.html", "loss.png", "lr.png", "throughput.png", "config.html",
                     "evaluation.html", "continuations.html", "summary.html", "speedups.png", "top_ops.html",
                     "rules.html", "rules.png"):
            assert name in files, sorted(files)
        assert archive.read(files["loss.png"])[:4] == b"\x89PNG"
        evaluation = archive.read(files["evaluation.html"]).decode()
        for text in ("LAMBADA", "last_word", "last_token", "WikiText", "adjusted", RUN):
            assert text in evaluation
        rules = archive.read(files["rules.html"]).decode()
        for rule in ("pretrain", "extract", "evaluate_lambada_any", "generate_any", "profile_any", "bench"):
            assert f"<td>{rule}</td>" in rules, rule
        page = archive.read(files["report.html"]).decode()
        for category in ("Data", "Training", "Evaluation", "Generation", "Benchmarks", "Profile", "Rule resources"):
            assert category in page


def test_report_html_builds_without_a_target(run, tmp_path):
    workdir, _ = run
    snakemake(workdir, "--report", str(tmp_path / "report.html"))
    page = (tmp_path / "report.html").read_text()
    assert "Rule resources" in page and "evaluation.html" in page


def test_profile_target_writes_a_trace_and_the_top_operators(run):
    workdir, _ = run
    folder = workdir / "results" / "profile" / RUN
    with gzip.open(folder / "trace.json.gz", "rt") as f:
        events = json.load(f)["traceEvents"]
    assert any(e.get("cat") == "cpu_op" and e.get("name") == "aten::mm" for e in events)
    assert list((folder / "tensorboard" / RUN).glob("*.pt.trace.json.gz"))
    top = (folder / "top_ops.md").read_text()
    assert "## by self CPU time" in top and "aten::mm" in top
    assert json.loads((folder / "provenance.json").read_text())["stage"] == "profile"


def test_benchmarks_target_writes_one_result_per_entry_one_job_at_a_time(run):
    workdir, targets = run
    for name in SUITE:
        result = json.loads((workdir / "results" / "bench" / f"{name}.json").read_text())
        assert {"ours", "unit", "baselines", "speedup", "machine"} <= result.keys()
        assert result["ours"] > 0 and result["speedup"] and result["name"] == name
    # With 2 cores and 1 thread each, only the benchmark_slots resource keeps them apart.
    events = [line.split()[0] for line in (targets.stdout + targets.stderr).splitlines()
              if line.strip() in ("localrule bench:", "rule bench:") or "(Rule: bench)" in line]
    assert events == ["localrule", "Finished", "localrule", "Finished"] or \
        events == ["rule", "Finished", "rule", "Finished"], events


def test_every_job_of_the_run_left_its_benchmark_file(run):
    workdir, _ = run
    rules = {p.name for p in (workdir / "benchmarks").iterdir()}
    assert {"dump_manifest", "dump_part", "extract", "tokenize", "shards", "build_ops", "pretrain",
            "prepare_eval_set", "evaluate_lambada_any", "evaluate_wiki_any", "generate_any", "profile_any",
            "bench", "report_pages"} <= rules


def test_a_second_run_of_the_targets_has_nothing_to_do(run):
    workdir, _ = run
    again = snakemake(workdir, "profile", "benchmarks", "-n")
    assert "Nothing to be done" in again.stdout + again.stderr
