from gpt2ipu.evaluate.data import prepare_eval_set
from gpt2ipu.workflow_adapter import run_stage

run_stage(snakemake, prepare_eval_set, name=snakemake.wildcards.evalset, out_dir=snakemake.output[0],
          **snakemake.params.kwargs)
