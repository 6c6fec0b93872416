from gpt2ipu.data.dump import dump_part
from gpt2ipu.workflow_adapter import run_stage

run_stage(snakemake, dump_part, manifest_path=snakemake.input.manifest, part=snakemake.wildcards.part,
          out_dir=snakemake.output[0], dataset=snakemake.wildcards.dataset, sample=snakemake.params.sample,
          retries=snakemake.params.enwiki_retries)
