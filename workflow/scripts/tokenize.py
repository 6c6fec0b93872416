from gpt2ipu.data.tokenize import tokenize
from gpt2ipu.workflow_adapter import bpe_tokenizer, run_stage

run_stage(snakemake, tokenize, articles_path=f"{snakemake.input.articles}/articles.jsonl",
          out_dir=snakemake.output[0], workers=snakemake.threads, vocab_dir=snakemake.params.vocab_dir,
          bpe_tokenizer=bpe_tokenizer(snakemake), include_title=snakemake.params.include_title)
