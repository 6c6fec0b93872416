from gpt2ipu.data.tokenize import tokenize
from gpt2ipu.workflow_adapter import bpe_tokenizer, documents_param, run_stage

documents, fields = documents_param(snakemake.params.documents, snakemake.params.fields)
run_stage(snakemake, tokenize, documents=documents, fields=fields, out_dir=snakemake.output[0],
          workers=snakemake.threads, vocab_dir=snakemake.params.vocab_dir, bpe_tokenizer=bpe_tokenizer(snakemake),
          include_title=snakemake.params.include_title)
