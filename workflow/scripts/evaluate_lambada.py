import torch

from gpt2ipu.evaluate.lambada import run_lambada
from gpt2ipu.workflow_adapter import run_stage

torch.set_num_threads(snakemake.threads)
bpe = f"{snakemake.input.bpe}/tokenizer.json" if "bpe" in snakemake.input.keys() else None
run_stage(snakemake, run_lambada, model_dir=snakemake.input.model, data=snakemake.input.data,
          out=snakemake.output[0], batch_size=snakemake.params.batch_size, device=snakemake.params.device,
          precision=snakemake.params.precision, vocab_dir=snakemake.params.vocab_dir, bpe_tokenizer=bpe)
