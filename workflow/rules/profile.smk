# Profiling (target profile): a few training steps of the active recipe under torch.profiler,
# built as the pretrain job builds them -> results/profile/<dataset>-<model>/ (trace.json.gz,
# tensorboard/, top_ops.md/.html, profile.json; on CUDA a memory snapshot).


rule profile_any:
    """A few training steps of one model under torch.profiler: trace, TensorBoard files, top operators."""
    input:
        shards=f"{DATA}/shards",
        ops=OPS_DIR,
    output:
        directory("results/profile/{dataset}-{model}"),
    params:
        recipe=train_recipe,
        wait_steps=config["profile"]["wait_steps"],
        active_steps=config["profile"]["active_steps"],
        top=config["profile"]["top"],
    threads: config["profile"]["threads"]
    resources:
        benchmark_slots=1,  # measured alone, like the benchmarks (workflow/rules/bench.smk)
    log:
        "logs/{dataset}/profile-{model}.log",
    benchmark:
        "benchmarks/profile_any/{dataset}-{model}.tsv"
    conda:
        "../../environment.yml"
    script:
        "../scripts/profile.py"
