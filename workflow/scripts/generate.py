import os

import torch

from gpt2ipu.generate.batch import run_batch
from gpt2ipu.generate.sampling import SamplingConfig
from gpt2ipu.ops import OPS_DIR_ENV
from gpt2ipu.workflow_adapter import run_stage

torch.set_num_threads(snakemake.threads)
os.environ[OPS_DIR_ENV] = str(snakemake.input.ops)
settings = dict(snakemake.params.settings)
run_options = {key: settings.pop(key) for key in ("stop_token", "batch_size", "device", "precision")}
bpe = f"{snakemake.input.bpe}/tokenizer.json" if "bpe" in snakemake.input.keys() else None
run_stage(snakemake, run_batch, model_dir=snakemake.input.model, prompts_path=snakemake.input.prompts,
          out=snakemake.output.continuations, provenance_path=snakemake.output.provenance,
          config=SamplingConfig(**settings), vocab_dir=snakemake.params.vocab_dir, bpe_tokenizer=bpe,
          **run_options)
