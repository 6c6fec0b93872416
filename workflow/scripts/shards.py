from gpt2ipu.data.shards import shards
from gpt2ipu.workflow_adapter import run_stage

run_stage(snakemake, shards, token_dirs=list(snakemake.input), out_dir=snakemake.output[0],
          max_len=snakemake.params.max_len, valid_fraction=snakemake.params.valid_fraction,
          seed=snakemake.params.seed, samples_per_shard=snakemake.params.samples_per_shard,
          max_tokens=snakemake.params.max_tokens)
