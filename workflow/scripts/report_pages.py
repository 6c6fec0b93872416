from gpt2ipu.report.pages import report_pages
from gpt2ipu.workflow_adapter import run_stage

run_stage(snakemake, report_pages, results_dir=snakemake.params.results_dir,
          benchmarks_dir=snakemake.params.benchmarks_dir, dataset=snakemake.params.dataset,
          out_dirs={section: snakemake.output[section] for section in snakemake.output.keys()})
