from gpt2ipu.data.bpe import train_bpe
from gpt2ipu.workflow_adapter import run_stage

run_stage(snakemake, train_bpe, articles_paths=[f"{d}/articles.jsonl" for d in snakemake.input],
          out_dir=snakemake.output[0], vocab_size=snakemake.params.vocab_size,
          min_frequency=snakemake.params.min_frequency)
