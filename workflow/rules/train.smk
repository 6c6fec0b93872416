# Training: shards -> a Hugging Face GPT-2 directory, metrics and a loss curve.


rule pretrain:
    """Pretrain one GPT-2 size; rerunning after a crash resumes from the last checkpoint."""
    input:
        shards=f"{DATA}/shards",
        ops=OPS_DIR,
    output:
        model=directory("results/models/{dataset}-{model}/final"),
        metrics="results/models/{dataset}-{model}/metrics.jsonl",
        plot="results/models/{dataset}-{model}/loss.png",
    params:
        recipe=pretrain_recipe,
        nproc_per_node=config["train"]["nproc_per_node"],
        nnodes=config["train"]["nnodes"],
        rdzv_endpoint=config["train"]["rdzv_endpoint"],
        rdzv_timeout=config["train"]["rdzv_timeout"],
        max_restarts=config["train"]["max_restarts"],
        parallel=config["train"]["parallel"],
        # Checkpoints live outside the declared outputs (which Snakemake deletes before a rerun),
        # in a folder keyed on the recipe and the data, so a rerun of the same job resumes.
        state_root="results/train_state",
    threads: config["train"]["threads"]
    resources:
        # Under a SLURM executor (profiles/slurm): train.nnodes nodes, one task (a torchrun agent) on
        # each, with the rule's threads as its CPUs (gpt2ipu/train/slurm.py checks they fit the layout).
        nodes=config["train"]["nnodes"],
        tasks=config["train"]["nnodes"],
    log:
        "logs/{dataset}/pretrain-{model}.log",
    benchmark:
        "benchmarks/pretrain/{dataset}-{model}.tsv"
    conda:
        "../../environment.yml"
    script:
        "../scripts/pretrain.py"
