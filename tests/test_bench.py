"""The benchmarks' arithmetic and plumbing, without timing anything real: the JSON shape and its
ratios, medians taken in turns (on a fake clock), the machine record, and the `gpt2ipu bench`
command's argument handling."""

import json
import math

import pytest

from gpt2ipu.bench import common, extract, loss


class FakeClock:
    """time.perf_counter that advances only when a timed function says how long it "took"."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def spend(self, seconds):
        self.now += seconds


def test_report_gives_ours_over_each_baseline_and_keeps_the_extra_keys():
    result = common.report(12.0, "MB/s", {"slow": 4.0, "fast": 24.0, "broken": 0.0}, repeats=3, note="n")
    assert result["ours"] == 12.0 and result["unit"] == "MB/s"
    assert result["baselines"] == {"slow": 4.0, "fast": 24.0, "broken": 0.0}
    assert result["speedup"] == {"slow": 3.0, "fast": 0.5, "broken": math.inf}
    assert result["repeats"] == 3 and result["note"] == "n"
    json.dumps(result)   # the benchmark's stdout and the suite's file: plain JSON


def test_median_seconds_skips_the_warmup_and_takes_the_median(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(common.time, "perf_counter", clock)
    durations = iter([100.0, 3.0, 1.0, 2.0])   # the first is the warm-up
    assert common.median_seconds(lambda: clock.spend(next(durations)), repeats=3) == 2.0


def test_interleaved_medians_take_turns_after_one_warmup_each(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(common.time, "perf_counter", clock)
    calls = []
    # Round r costs "a" 1 + r and "b" 10 * (1 + r): warm-up is round 0, timed rounds 1..3.
    rounds = {"a": 0, "b": 0}

    def timed(name, scale):
        def fn():
            calls.append(name)
            clock.spend(scale * (1 + rounds[name]))
            rounds[name] += 1
        return fn

    seconds = common.interleaved_median_seconds({"a": timed("a", 1), "b": timed("b", 10)}, repeats=3)
    assert calls == ["a", "b"] * 4
    assert seconds == {"a": 3.0, "b": 30.0}   # medians of 2, 3, 4 and 20, 30, 40


def test_machine_says_where_it_ran():
    machine = common.machine()
    assert {"cpu", "cores", "usable_cores", "torch_threads", "torch", "gpu", "python", "system"} <= machine.keys()
    assert machine["cores"] >= machine["usable_cores"] >= 1 and machine["cpu"]


def test_extract_figures_pick_the_fastest_wikiextractor_by_wall_and_by_cpu_time():
    counts = {"ours": 100, "ours_cli": 100, "wikiextractor_p1": 100, "wikiextractor_p2": 100}
    seconds = {"ours": 2.0, "ours_cli": 4.0, "wikiextractor_p1": 10.0, "wikiextractor_p2": 5.0}
    cpu = {"ours": 4.0, "ours_cli": 5.0, "wikiextractor_p1": 10.0, "wikiextractor_p2": 20.0}
    figures = extract.speed_figures(counts, seconds, cpu)
    assert figures["ours"] == 50.0 and figures["best_baseline"] == "wikiextractor_p2"
    assert figures["baselines"] == {"wikiextractor_p1": 10.0, "wikiextractor_p2": 20.0, "wikiextractor_best": 20.0}
    assert figures["ours_cli_speedup_vs_best"] == 25.0 / 20.0
    # By CPU time the single-process run is the better baseline: 100 / 10 = 10 articles per CPU second.
    assert figures["cpu_speedup_vs_best"] == (100 / 4.0) / 10.0


def test_extract_medians_refuse_a_contender_whose_count_changes(monkeypatch):
    monkeypatch.setattr(extract, "cpu_seconds", lambda: 0.0)
    counts = iter([5, 5, 6])
    with pytest.raises(RuntimeError, match="gave 6 articles, then 5"):
        extract.interleaved_medians({"flaky": lambda: next(counts)}, repeats=2)


def test_loss_benchmark_refuses_variants_that_disagree():
    agreeing = {"loss": 1.0, "grad_hidden_norm": 2.0, "grad_weight_norm": 3.0}
    loss._check_agreement({"torch_linear_cross_entropy": agreeing, "ours": dict(agreeing, loss=1.00001)})
    with pytest.raises(AssertionError, match="ours gives grad_weight_norm"):
        loss._check_agreement({"torch_linear_cross_entropy": agreeing, "ours": dict(agreeing, grad_weight_norm=3.1)})


def test_bench_command_parses_the_argv_it_is_given_not_sys_argv(monkeypatch, capsys):
    from gpt2ipu.cli import main

    monkeypatch.setattr("sys.argv", ["pytest", "something", "else"])
    assert main(["bench", "shards", "--samples", "4", "--max-len", "8", "--repeats", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"ours", "unit", "baselines", "speedup", "machine", "samples"} <= result.keys()
    assert result["samples"] == 4 and result["unit"] == "MB/s"
    ratio = result["ours"] / result["baselines"]["tfrecord_writer"]
    assert result["speedup"]["tfrecord_writer"] == pytest.approx(ratio)
    with pytest.raises(SystemExit):
        main(["bench", "shards", "--help"])
    assert "--max-len" in capsys.readouterr().out


def test_the_benchmark_names_are_one_list():
    from gpt2ipu.bench import cli, suite

    assert cli.STAGES is common.STAGES and suite.STAGES is common.STAGES
