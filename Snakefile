# gpt2ipu: GPT-2 pretraining, from a Wikipedia dump to an evaluated model.
# Every stage is a rule whose outputs are files; see README.md for the stage graph.
#
#   snakemake --cores 2 data                            # shards of the embedded sample
#   snakemake --cores 8 data --config dataset=enwiki    # the real English Wikipedia dump

from snakemake.utils import min_version

min_version("8.20")


configfile: "config/config.yaml"


wildcard_constraints:
    dataset="sample|enwiki|local",
    part="[A-Za-z0-9._-]+",


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"


rule data:
    """All train/valid shards (TFRecord + Megatron mmap) of the configured dataset."""
    input:
        f"results/data/{DATASET}/shards",
    default_target: True
