# The benchmark suite (target benchmarks): each entry of benchmarks.suite is one job running one
# `gpt2ipu bench` benchmark -> results/bench/<name>.json. Every job takes the one
# `benchmark_slots` unit there is (unless --resources says more), so they run one at a time:
# a benchmark that shares the machine with another measures both.

workflow.global_resources.setdefault("benchmark_slots", 1)
BENCH_SUITE = config["benchmarks"]["suite"]


rule bench:
    """One benchmark of the suite: ours against its baselines in the same run, with the machine it ran on."""
    input:
        ops=OPS_DIR,  # the compiled ops the benchmarks of generation, the loss and the sample index use
    output:
        "results/bench/{name}.json",
    wildcard_constraints:
        name="|".join(BENCH_SUITE) or "no-benchmark-configured",
    params:
        bench=lambda wc: BENCH_SUITE[wc.name]["bench"],
        args=lambda wc: [str(a) for a in BENCH_SUITE[wc.name]["args"]],
    threads: config["benchmarks"]["threads"]
    resources:
        benchmark_slots=1,
    log:
        "logs/bench/{name}.log",
    benchmark:
        "benchmarks/bench/{name}.tsv"
    conda:
        "../../environment.yml"
    script:
        "../scripts/bench.py"
