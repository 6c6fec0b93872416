# The report: `snakemake --report report.html` (or .zip) shows the pages of rule report_pages, one
# report category per section. A report runs no jobs, so the pages are written by the last job of
# every named target (see the Snakefile): report_pages gathers what exists so far for the
# configured dataset (results/, benchmarks/) into HTML tables and PNG figures. Its sections and the
# targets it follows are in common.smk (REPORT_SECTIONS, REPORTED_TARGETS).

from pathlib import Path


rule report_pages:
    """The report's tables and figures of everything the configured dataset's runs have produced."""
    input:
        requested_outputs,
    output:
        **{section: section_pages(section) for section in REPORT_SECTIONS},
    params:
        dataset=DATASET,
        results_dir=lambda wildcards, output: str(Path(output.data).parents[2]),  # results/report/<ds>/data
        benchmarks_dir="benchmarks",
    log:
        f"logs/{DATASET}/report_pages.log",
    benchmark:
        f"benchmarks/report_pages/{DATASET}.tsv"
    conda:
        "../../environment.yml"
    script:
        "../scripts/report_pages.py"
