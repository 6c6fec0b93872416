from gpt2ipu.data.bpe import train_bpe
from gpt2ipu.workflow_adapter import documents_param, run_stage

sources = [documents_param(documents, snakemake.params.fields) for documents in snakemake.params.documents]
run_stage(snakemake, train_bpe, articles_paths=[documents for documents, _ in sources],
          fields=sources[0][1] if sources else None, out_dir=snakemake.output[0],
          vocab_size=snakemake.params.vocab_size, min_frequency=snakemake.params.min_frequency)
