import json

from gpt2ipu.data.download import download_part
from gpt2ipu.data.sample_dump import write_sample_part
from gpt2ipu.workflow_adapter import run_stage

out_dir = snakemake.output[0]
with open(snakemake.input.manifest, encoding="utf-8") as f:
    manifest = json.load(f)
entry = next(e for e in manifest["parts"] if e["name"] == snakemake.wildcards.part)
index = [e["name"] for e in manifest["parts"]].index(entry["name"])

if snakemake.wildcards.dataset == "sample":
    sample = snakemake.params.sample
    run_stage(snakemake, write_sample_part, out_dir=out_dir, part=index + 1, parts=len(manifest["parts"]),
              pages=sample["pages"], seed=sample["seed"])
else:
    run_stage(snakemake, download_part, url=entry["url"], out_dir=out_dir, sha1=entry["sha1"],
              retries=snakemake.params.enwiki_retries)
