from gpt2ipu.evaluate.wiki import evaluate_wiki
from gpt2ipu.workflow_adapter import bpe_tokenizer, run_stage

run_stage(snakemake, evaluate_wiki, model_dir=snakemake.input.model, data=snakemake.input.data,
          out=snakemake.output.results, log_samples=snakemake.output.samples,
          conventions=snakemake.params.conventions, documents=snakemake.params.documents,
          stride=snakemake.params.stride, window=snakemake.params.window,
          batch_size=snakemake.params.batch_size, device=snakemake.params.device,
          precision=snakemake.params.precision, weights=snakemake.params.weights,
          vocab_dir=snakemake.params.vocab_dir,
          bpe_tokenizer=bpe_tokenizer(snakemake), torch_threads=True)
