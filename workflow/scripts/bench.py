import os

from gpt2ipu.bench.suite import bench
from gpt2ipu.ops import OPS_DIR_ENV
from gpt2ipu.workflow_adapter import run_stage

os.environ[OPS_DIR_ENV] = os.path.abspath(snakemake.input.ops)  # the benchmarks' default ops folder
run_stage(snakemake, bench, name=snakemake.wildcards.name, bench=snakemake.params.bench,
          args=snakemake.params.args, out=snakemake.output[0], torch_threads=True)
