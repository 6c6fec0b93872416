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

from gpt2ipu.workflow_config import active_recipe_name, shard_max_len, validate_config
from gpt2ipu.errors import UserError
from gpt2ipu.data.dump import CORPUS_DATASETS
from gpt2ipu.sizes import PRESETS
from gpt2ipu.train.config import check_recipes, check_sizes, check_stage_split, recipe_for_model

try:
    validate_config(config, workflow.source_path("../../config/schema.yaml"))
    # Recipes are checked as the training job reads them, now: a typo must not wait for that job.
    check_recipes(config["train"]["recipes"], config["train"])
    # Named sizes (each a pretrain_<name> target), as their jobs train them: with the active recipe.
    SIZES = config["train"]["sizes"]
    ACTIVE_RECIPE = active_recipe_name(config)
    check_sizes(SIZES, ACTIVE_RECIPE, config["train"]["recipes"][ACTIVE_RECIPE], config["train"])
    SHARD_MAX_LEN = shard_max_len(config)
except UserError as err:
    raise WorkflowError(str(err)) from None


# The model wildcard: the Snakefile's presets and the named sizes, known only now the config is checked.
wildcard_constraints:
    model="|".join([*PRESETS, *SIZES]),

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
    if wc.dataset in CORPUS_DATASETS:
        raise WorkflowError(f"dataset {wc.dataset} has no MediaWiki dump to extract: its parts go to tokenize")
    entry = part_entry(wc.dataset, wc.part)
    if wc.dataset == "local":
        return entry["path"]
    return f"results/data/{wc.dataset}/dump/{wc.part}"


def documents_input(dataset, part):
    """What a part's tokenize job reads: the extract stage's folder (MediaWiki datasets), the part's
    own corpus files (text, used in place), or its downloaded folder (hf)."""
    if dataset == "text":
        return [f["path"] for f in part_entry(dataset, part)["files"]]
    if dataset == "hf":
        return [f"results/data/{dataset}/dump/{part}"]
    return [f"results/data/{dataset}/extract/{part}"]


def tokenize_input(wc):
    return {"documents": documents_input(wc.dataset, wc.part)}


def all_document_inputs(wc):
    return [path for part in part_names(wc.dataset) for path in documents_input(wc.dataset, part)]


def documents_of(dataset, part):
    """The `documents` a tokenize (or train-bpe) job passes to the library: an articles.jsonl path,
    or the part's pieces (gpt2ipu.data.corpus) with its files' sha256, so that a replaced file
    changes the params of its own parts only."""
    if dataset == "text":
        entry = part_entry(dataset, part)
        return {"pieces": entry["pieces"], "sha256": [f.get("sha256") for f in entry["files"]]}
    if dataset == "hf":
        from gpt2ipu.data.hub import hub_part_file

        entry = part_entry(dataset, part)
        path = hub_part_file(f"results/data/{dataset}/dump/{part}", entry)
        return {"pieces": [{"path": str(path), "format": entry["format"]}], "sha256": [entry.get("sha256")]}
    return f"results/data/{dataset}/extract/{part}/articles.jsonl"


def part_documents(wc):
    return documents_of(wc.dataset, wc.part)


def text_fields(wc):
    """The record fields of dataset text / hf (gpt2ipu.data.corpus.TextFields); None for articles."""
    if wc.dataset not in CORPUS_DATASETS:
        return None
    section = config[wc.dataset]
    return {"text": section["text_field"], "title": section["title_field"], "id": section["id_field"],
            "txt_unit": config["text"]["txt_unit"]}


def bpe_input(wc):
    """{"bpe": the dataset's trained BPE folder} with tokenize.tokenizer: bpe, else {} (for unpack).

    The scripts pass it on with gpt2ipu.workflow_adapter.bpe_tokenizer(snakemake)."""
    if config["tokenize"]["tokenizer"] == "bpe":
        return {"bpe": f"results/data/{wc.dataset}/bpe"}
    return {}


def all_token_dirs(wc):
    return expand(f"{DATA}/tokens/{{part}}", dataset=wc.dataset, part=part_names(wc.dataset))


def train_recipe(wc):
    """The active recipe with the target's model size (a preset, or a named size's keys): what the
    training job is run with."""
    return recipe_for_model(config["train"]["recipes"][ACTIVE_RECIPE], wc.model, SIZES)


def pretrain_recipe(wc):
    """train_recipe, with config key train.parallel's pipeline split checked against this job's
    model as the job is planned (a split fits one model's layers, not another's)."""
    recipe = train_recipe(wc)
    try:
        check_stage_split(recipe, wc.model, config["train"])
    except UserError as err:
        raise WorkflowError(str(err)) from None
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
                    "evaluate_lambada", "evaluate_wiki", "evaluate_hellaswag", "generate", "profile", "benchmarks",
                    *(f"pretrain_{size}" for size in SIZES))


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
