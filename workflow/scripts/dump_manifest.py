from gpt2ipu.data.dump import write_manifest
from gpt2ipu.workflow_adapter import run_stage

run_stage(snakemake, write_manifest, out_path=snakemake.output[0], **snakemake.params.kwargs)
