"""The Snakemake workflow itself: lint, the data chain, reruns, determinism, restarts, config errors.

Each test copies the workflow (Snakefile, workflow/, config/, profiles/, environment.yml) to a temporary folder
and runs `snakemake` there, with a small sample so the whole chain takes seconds.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]

SMALL = {
    "sample": {"pages": 240, "parts": 2, "seed": 7},
    "ops": {"build": False},  # tests/test_ops.py builds the ops; here the pure paths are enough
    "shards": {"max_len": 32, "valid_fraction": 0.05, "seed": 3, "samples_per_shard": 512},
    "train": {"threads": 1, "recipes": {"sample": {
        "dataset": "tfrecord", "max_len": 32, "batch_size": 2, "gradient_accumulation": 1, "epochs": 1,
        "max_steps": 6, "learning_rate": 0.001, "eval_every": 3, "eval_batches": 2, "checkpoint_every": 2,
        "embedding_serialization_factor": 2}}},
}

pytestmark = pytest.mark.slow


def deep_update(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


def make_workdir(path: Path, overrides: dict | None = None) -> Path:
    for name in ("Snakefile", "workflow", "config", "profiles", "environment.yml"):
        source = REPO / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, path / name)
    config = yaml.safe_load((path / "config" / "config.yaml").read_text())
    deep_update(config, SMALL)
    deep_update(config, overrides or {})
    (path / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def snakemake(workdir: Path, *args, check=True, timeout=600):
    result = subprocess.run([*SNAKEMAKE, "--cores", "2", *args], cwd=workdir, capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def jobs_run(result) -> list[str]:
    """Rule names of the jobs a snakemake run executed (its "rule NAME:" headers)."""
    names = []
    for line in (result.stdout + result.stderr).splitlines():
        words = line.strip().split()
        if len(words) == 2 and words[0] in ("rule", "localrule", "checkpoint", "localcheckpoint") \
                and words[1].endswith(":"):
            names.append(words[1][:-1])
    return names


def planned_jobs(result) -> dict[str, int]:
    """The job-count table snakemake prints ("job  count" ...)."""
    counts, in_table = {}, False
    for line in (result.stdout + result.stderr).splitlines():
        parts = line.split()
        if parts[:2] == ["job", "count"]:
            in_table = True
            continue
        if in_table:
            if len(parts) == 2 and parts[1].isdigit():
                if parts[0] != "total":
                    counts[parts[0]] = int(parts[1])
            elif parts and not set(line.strip()) <= {"-", " "}:
                in_table = False
    return counts


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "provenance.json"}


def test_lint_is_clean():
    result = subprocess.run([*SNAKEMAKE, "--lint"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Lints for" not in result.stdout + result.stderr


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    workdir = make_workdir(tmp_path_factory.mktemp("wf"))
    first = snakemake(workdir, "data")
    return workdir, first


def test_data_chain_builds_everything_and_second_run_has_nothing_to_do(built):
    workdir, _ = built
    shards = workdir / "results" / "data" / "sample" / "shards"
    stats = json.loads((shards / "stats.json").read_text())
    assert stats["articles"] > 100 and stats["train_samples"] > 0 and stats["valid_samples"] > 0
    assert list(shards.glob("train-*.tfrecord")) and (shards / "train_text_document.idx").is_file()
    for stage in ("dump/part1", "extract/part1", "tokens/part2", "shards"):
        assert (workdir / "results" / "data" / "sample" / stage / "provenance.json").is_file()
    for log in ("dump_manifest.log", "extract/part1.log", "tokenize/part1.log", "shards.log"):
        assert (workdir / "logs" / "sample" / log).is_file()
    again = snakemake(workdir, "data")
    assert "Nothing to be done" in again.stdout + again.stderr


def test_same_input_and_config_give_byte_identical_outputs(built, tmp_path):
    workdir, _ = built
    other = make_workdir(tmp_path)
    snakemake(other, "data")
    a = tree_bytes(workdir / "results" / "data")
    b = tree_bytes(other / "results" / "data")
    assert a.keys() == b.keys() and a == b


def test_changing_a_tokenize_parameter_reruns_only_tokenize_and_shards(built, tmp_path):
    workdir, _ = built
    dry = snakemake(workdir, "data", "-n", "--config", "tokenize={include_title: false}")
    planned = planned_jobs(dry)
    assert planned.get("tokenize") == 2 and planned.get("shards") == 1, planned
    assert not {"dump_part", "extract", "dump_manifest"} & set(planned), planned


def test_changing_a_training_hyperparameter_reruns_training_only(built):
    workdir, _ = built
    target = "results/models/sample-gpt2-test/final"
    snakemake(workdir, target)
    model = workdir / target
    assert (model / "config.json").is_file() and (model / "model.safetensors").is_file()
    assert (workdir / "results/models/sample-gpt2-test/loss.png").is_file()
    dry = snakemake(workdir, target, "-n", "--config", "train={recipes: {sample: {learning_rate: 0.002}}}")
    assert planned_jobs(dry) == {"pretrain": 1}, planned_jobs(dry)


def kill_when(proc: subprocess.Popen, condition, sig=signal.SIGKILL, timeout: float = 300) -> None:
    """Send `sig` to the whole snakemake process group once `condition()` holds."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not condition():
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, sig)
    proc.wait(timeout=120)


def start(workdir: Path, *args) -> subprocess.Popen:
    # SIGINT back to its default in the child: a shell that starts the test run in the background
    # (`.ci/run &`, nohup) ignores SIGINT, the ignoring is inherited, and snakemake would then sleep
    # through the Ctrl-C that test_killed_in_the_middle_of_a_stage... sends.
    return subprocess.Popen([*SNAKEMAKE, "--cores", "2", *args], cwd=workdir, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_killed_in_the_middle_of_a_stage_rerun_redoes_only_that_stage_onwards(tmp_path):
    workdir = make_workdir(tmp_path, {"sample": {"pages": 1500}})
    snakemake(workdir, "results/data/sample/dump/part1", "results/data/sample/dump/part2")
    data = workdir / "results" / "data" / "sample"
    dumps_before = {p: p.stat().st_mtime_ns for p in data.glob("dump/part*/pages.xml.bz2")}
    proc = start(workdir, "data")
    # Ctrl-C (SIGINT to the process group, as a terminal sends it): a plain rerun must just work.
    kill_when(proc, lambda: any((data / "extract").glob(".part*.tmp")) if (data / "extract").is_dir() else False,
              sig=signal.SIGINT)
    assert not (data / "shards").exists()
    rerun = snakemake(workdir, "data")
    ran = set(jobs_run(rerun))
    assert "extract" in ran and "shards" in ran and "dump_part" not in ran, ran
    assert {p: p.stat().st_mtime_ns for p in data.glob("dump/part*/pages.xml.bz2")} == dumps_before
    assert (data / "shards" / "stats.json").is_file()
    assert not list(data.rglob(".*.tmp")), "a temporary of the killed job was left behind"


def test_training_killed_then_rerun_resumes_from_its_checkpoint(built):
    workdir, _ = built
    overrides = ["--config", "train={recipes: {sample: {max_steps: 30, seed: 5}}}"]
    state_root = workdir / "results" / "train_state"
    before = set(state_root.glob("*")) if state_root.is_dir() else set()
    proc = start(workdir, "results/models/sample-gpt2-test/final", *overrides)
    def new_checkpoints():
        return [p for p in state_root.glob("*/checkpoints/step-*/training_state.pt") if p.parents[2] not in before]

    kill_when(proc, lambda: bool(new_checkpoints()))  # SIGKILL: a crash, an OOM kill, a lost node
    # After a hard kill Snakemake's lock is stale; `--unlock` is its documented remedy.
    snakemake(workdir, "--unlock")
    snakemake(workdir, "results/models/sample-gpt2-test/final", *overrides)
    log = (workdir / "logs" / "sample" / "pretrain-gpt2-test.log").read_text()
    assert "resuming from" in log, log[-2000:]
    metrics = (workdir / "results/models/sample-gpt2-test/metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in metrics]
    assert steps == list(range(1, 31))


@pytest.mark.parametrize("override, key", [
    ("dataset=wikipedia", "dataset"),
    ("sample={pages: many}", "sample.pages"),
    ("shards={max_len: -4}", "shards.max_len"),
])
def test_bad_config_fails_with_the_key_named(tmp_path, override, key):
    workdir = make_workdir(tmp_path)
    result = snakemake(workdir, "data", "-n", "--config", override, check=False)
    assert result.returncode != 0
    assert f"config key '{key}'" in result.stdout + result.stderr


def test_bad_dump_file_fails_clearly_and_leaves_no_output(tmp_path):
    bad = tmp_path / "broken.xml.bz2"
    bad.write_bytes(b"BZh91AY&SY" + os.urandom(300))
    (tmp_path / "wf").mkdir()
    workdir = make_workdir(tmp_path / "wf", {"dataset": "local", "local": {"paths": [str(bad)]}})
    result = snakemake(workdir, "data", check=False)
    assert result.returncode != 0
    text = result.stdout + result.stderr
    assert "broken.xml.bz2" in text and "Traceback" not in text
    assert not (workdir / "results" / "data" / "local" / "extract" / "broken").exists()


def test_evaluation_and_generation_targets_run_on_the_trained_model(built):
    workdir, _ = built
    snakemake(workdir, "results/models/sample-gpt2-test/final")
    outputs = ["results/eval/sample-gpt2-test/lambada.json", "results/eval/sample-gpt2-test/wikitext.json",
               "results/generate/sample-gpt2-test/continuations.jsonl", "results/eval/sample-gpt2-test/hellaswag.json"]
    snakemake(workdir, *outputs)
    config = json.loads((workdir / "results/models/sample-gpt2-test/final/config.json").read_text())
    vocab_size = config["vocab_size"]
    lambada = json.loads((workdir / outputs[0]).read_text())
    assert lambada["provenance"]["stage"] == "evaluate_lambada"
    for convention in ("last_word", "last_token"):
        figures = lambada[convention]
        assert figures["samples"] == lambada["samples"] > 0 and 0 <= figures["correct"] <= figures["samples"]
        assert 0.0 <= figures["accuracy"] <= 1.0 and figures["accuracy"] == figures["correct"] / figures["samples"]
        # Per target token. Six training steps leave the model near the uniform guess, whose perplexity is
        # the vocabulary size (measured: 0.8-1.02x of it), so that is the scale, within a factor of 2.
        assert 1.0 < figures["token_perplexity"] < 2 * vocab_size, (convention, figures)
        # Per passage (a target word may be several tokens), so at least the per-token figure.
        assert math.isfinite(figures["perplexity"])
        assert figures["perplexity"] >= figures["token_perplexity"] * (1 - 1e-12)
    assert math.isclose(lambada["last_token"]["perplexity"], lambada["last_token"]["token_perplexity"])
    wikitext = json.loads((workdir / outputs[1]).read_text())
    assert wikitext["provenance"]["stage"] == "evaluate_wiki"
    assert wikitext["scored_tokens"] == wikitext["tokens"] - 1 > 0 and wikitext["words"] > 0
    assert 1.0 < wikitext["token_perplexity"] < 2 * vocab_size, wikitext
    assert 0.0 <= wikitext["token_accuracy"] <= 1.0
    # Per word and adjusted (Megatron's): the same NLL over the words, and over the words less one.
    assert math.isclose(math.log(wikitext["word_perplexity"]), wikitext["nll"] / wikitext["words"])
    assert math.isclose(math.log(wikitext["adjusted_perplexity"]), wikitext["nll"] / (wikitext["words"] - 1))
    for key in ("word_perplexity", "adjusted_perplexity"):
        assert math.isfinite(wikitext[key]) and wikitext[key] > 1.0, (key, wikitext)
    lines = (workdir / outputs[2]).read_text().splitlines()
    assert lines and all("continuation" in json.loads(line) for line in lines)
    hellaswag = json.loads((workdir / outputs[3]).read_text())
    assert hellaswag["provenance"]["stage"] == "evaluate_hellaswag" and hellaswag["samples"] > 0
    for convention in ("lm_eval", "llm_c"):
        assert 0.0 <= hellaswag[convention]["acc_norm"] <= 1.0
        assert hellaswag[convention]["samples"] == hellaswag["samples"]


@pytest.mark.slow
def test_a_stage_split_is_checked_against_the_model_its_target_trains(tmp_path):
    """[12, 12] fits GPT-2 medium's 24 layers and not small's 12: pretrain_medium is planned, pretrain_small
    refused as Snakemake plans it, naming the key and the target's layer count."""
    workdir = make_workdir(tmp_path, {"train": {"nproc_per_node": 2, "parallel": {"layers_per_stage": [12, 12]}}})
    medium = snakemake(workdir, "pretrain_medium", "-n")
    assert planned_jobs(medium)["pretrain"] == 1
    small = snakemake(workdir, "pretrain_small", "-n", check=False)
    assert small.returncode != 0
    assert ("config key 'train.parallel.layers_per_stage': [12, 12] places 24 layers, but pretrain_small trains "
            "gpt2 with 12 layers") in small.stdout + small.stderr
