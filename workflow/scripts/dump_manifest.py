from gpt2ipu.data.dump import dump_manifest
from gpt2ipu.workflow_adapter import run_stage

run_stage(snakemake, dump_manifest, out_path=snakemake.output[0], **snakemake.params.kwargs)
