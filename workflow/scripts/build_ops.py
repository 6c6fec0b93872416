from gpt2ipu.ops import build_ops
from gpt2ipu.workflow_adapter import run_stage

run_stage(snakemake, build_ops, source_dir=snakemake.params.source_dir or None, build_dir=snakemake.output[0],
          jobs=snakemake.threads, enabled=snakemake.params.enabled)
