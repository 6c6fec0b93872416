from pathlib import Path

from gpt2ipu.data.extract import extract
from gpt2ipu.workflow_adapter import run_stage

dump = Path(snakemake.input[0])
if dump.is_dir():  # sample and enwiki parts are folders holding pages.xml.bz2 + provenance.json
    dump = dump / "pages.xml.bz2"
run_stage(snakemake, extract, dump_path=dump, out_dir=snakemake.output[0], processes=snakemake.threads,
          expand_templates=snakemake.params.expand_templates, min_chars=snakemake.params.min_chars)
