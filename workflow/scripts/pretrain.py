from gpt2ipu.train.launch import pretrain
from gpt2ipu.workflow_adapter import run_stage

run_stage(snakemake, pretrain, recipe=snakemake.params.recipe, shards_dir=snakemake.input.shards,
          state_root=snakemake.params.state_root, run_name=f"{snakemake.wildcards.dataset}-{snakemake.wildcards.model}",
          model_dir=snakemake.output.model, metrics_path=snakemake.output.metrics, plot_path=snakemake.output.plot,
          threads=snakemake.threads, nproc_per_node=snakemake.params.nproc_per_node,
          nnodes=snakemake.params.nnodes, rdzv_endpoint=snakemake.params.rdzv_endpoint,
          rdzv_timeout=snakemake.params.rdzv_timeout, max_restarts=snakemake.params.max_restarts,
          parallel=snakemake.params.parallel, ops_dir=snakemake.input.ops)
