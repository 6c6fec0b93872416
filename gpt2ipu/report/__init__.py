"""The pages a Snakemake report shows: tables and figures built from a run's files.

Each module turns one kind of result into rows or figures (data stages, training curves,
evaluation results, benchmark results and the rules' own resource use); `pages.report_pages`
writes them all, one folder per report category, for the workflow's `report_pages` rule.
"""
