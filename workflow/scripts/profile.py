from gpt2ipu.allocator import keep_freed_memory
from gpt2ipu.profile.steps import profile
from gpt2ipu.workflow_adapter import run_stage

keep_freed_memory()  # the training process's malloc setting (gpt2ipu train sets it too)
run_stage(snakemake, profile, recipe=snakemake.params.recipe, shards_dir=snakemake.input.shards,
          out_dir=snakemake.output[0], run_name=f"{snakemake.wildcards.dataset}-{snakemake.wildcards.model}",
          ops_dir=snakemake.input.ops, wait_steps=snakemake.params.wait_steps,
          active_steps=snakemake.params.active_steps, top=snakemake.params.top, torch_threads=True)
