# Shared helpers for the workflow files: config validation, the active dataset, the part list, and the
# optional BPE tokenizer input.
#
# Naming: a rule, its script (workflow/scripts/<rule>.py) and the library function the script runs
# share one name. The user-facing targets in the Snakefile (data, pretrain_small, evaluate_lambada,
# evaluate_wiki, generate, ...) pick the outputs of one dataset and model size; a wildcard rule cannot
# be a named target, so where a target's name is also its script's and function's, the rule that does
# the work for any {dataset}-{model} is <target>_any.

import json

from snakemake.exceptions import WorkflowError

from gpt2ipu.config import shard_max_len, validate_config
from gpt2ipu.errors import UserError
from gpt2ipu.train.config import check_recipes

try:
    validate_config(config, workflow.source_path("../../config/schema.yaml"))
    # Recipes are checked as the training job reads them, now: a typo must not wait for that job.
    check_recipes(config["train"]["recipes"], config["train"])
    SHARD_MAX_LEN = shard_max_len(config)
except UserError as err:
    raise WorkflowError(str(err)) from None

DATASET = config["dataset"]
DATA = "results/data/{dataset}"


def manifest_parts(dataset):
    """Part entries of the dump manifest (a checkpoint: known only once it has run)."""
    manifest = checkpoints.dump_manifest.get(dataset=dataset).output[0]
    with open(manifest, encoding="utf-8") as f:
        return json.load(f)["parts"]


def part_entry(dataset, part):
    for entry in manifest_parts(dataset):
        if entry["name"] == part:
            return entry
    raise WorkflowError(f"part {part!r} is not in the {dataset} dump manifest")


def part_names(dataset):
    return [entry["name"] for entry in manifest_parts(dataset)]


def dump_file(wc):
    entry = part_entry(wc.dataset, wc.part)
    if wc.dataset == "local":
        return entry["path"]
    return f"results/data/{wc.dataset}/dump/{wc.part}"


def all_extract_dirs(wc):
    return expand(f"{DATA}/extract/{{part}}", dataset=wc.dataset, part=part_names(wc.dataset))


def bpe_input(wc):
    """{"bpe": the dataset's trained BPE folder} with tokenize.tokenizer: bpe, else {} (for unpack).

    The scripts pass it on with gpt2ipu.workflow_adapter.bpe_tokenizer(snakemake)."""
    if config["tokenize"]["tokenizer"] == "bpe":
        return {"bpe": f"results/data/{wc.dataset}/bpe"}
    return {}


def all_token_dirs(wc):
    return expand(f"{DATA}/tokens/{{part}}", dataset=wc.dataset, part=part_names(wc.dataset))


def train_recipe(wc):
    """The active recipe with the target's model size: what the training job is run with."""
    from gpt2ipu.config import active_recipe_name

    recipe = dict(config["train"]["recipes"][active_recipe_name(config)])
    recipe["model"] = wc.model
    return recipe


# The report's pages (rule report_pages, workflow/rules/report.smk).

REPORT_DIR = f"results/report/{DATASET}"
REPORT_SECTIONS = {  # section -> the report's category name
    "data": "Data",
    "training": "Training",
    "evaluation": "Evaluation",
    "generation": "Generation",
    "benchmarks": "Benchmarks",
    "profile": "Profile",
    "resources": "Rule resources",
}
REPORT_PAGES = [f"{REPORT_DIR}/{section}" for section in REPORT_SECTIONS]
# The named targets that end with report_pages (each lists REPORT_PAGES among its inputs).
REPORTED_TARGETS = ("data", "pretrain_small", "pretrain_medium", "pretrain_large", "pretrain_xl",
                    "evaluate_lambada", "evaluate_wiki", "evaluate_hellaswag", "generate", "profile", "benchmarks")


def section_pages(section):
    """A section folder as a report item: each <group>/<name>.html or .png in it is one result."""
    return report(
        directory(f"{REPORT_DIR}/{section}"),
        patterns=["{group}/{name}.html", "{group}/{name}.png"],
        category=REPORT_SECTIONS[section],
        subcategory="{group}",
        caption=f"../report/{section}.rst",
    )


def requested_outputs(wildcards):
    """What the named targets of this invocation build, so that report_pages runs after them.

    Only those: an older result that exists is read by the job without being an input, so asking
    for `data` never reruns a training whose recipe changed since. `snakemake --report` (no
    target) asks for the default target, `data`.
    """
    targets = set(workflow.dag_settings.targets) or {workflow.default_target}
    wanted = {str(f) for name in targets & set(REPORTED_TARGETS) for f in getattr(rules, name).input}
    return sorted(wanted - set(REPORT_PAGES))
