from gpt2ipu.evaluate.hellaswag import evaluate_hellaswag
from gpt2ipu.workflow_adapter import bpe_tokenizer, run_stage

run_stage(snakemake, evaluate_hellaswag, model_dir=snakemake.input.model, data=snakemake.input.data,
          out=snakemake.output.results, log_samples=snakemake.output.samples,
          conventions=snakemake.params.conventions, batch_size=snakemake.params.batch_size,
          device=snakemake.params.device,
          precision=snakemake.params.precision, weights=snakemake.params.weights,
          vocab_dir=snakemake.params.vocab_dir,
          bpe_tokenizer=bpe_tokenizer(snakemake), torch_threads=True)
