# gpt2ipu: GPT-2 pretraining, from a Wikipedia dump to an evaluated model.
# Every stage is a rule whose outputs are files; see README.md for the stage graph. A rule, its script
# and its library function share one name (see workflow/rules/common.smk); the rules below are targets.
#
#   snakemake --cores 2 data                            # shards of the embedded sample
#   snakemake --cores 8 data --config dataset=enwiki    # the real English Wikipedia dump
#   snakemake --report report.html                      # see the runs: workflow/rules/report.smk

from snakemake.utils import min_version

min_version("8.20")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


wildcard_constraints:
    dataset="sample|enwiki|local|text|hf",
    model="gpt2|gpt2-medium|gpt2-large|gpt2-xl|gpt2-test",
    part="[A-Za-z0-9._-]+",


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/ops.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/eval.smk"
include: "workflow/rules/profile.smk"
include: "workflow/rules/bench.smk"
include: "workflow/rules/report.smk"


rule data:
    """All train/valid shards (TFRecord + Megatron mmap) of the configured dataset."""
    input:
        f"results/data/{DATASET}/shards",
        REPORT_PAGES,
    default_target: True


rule pretrain_small:
    """GPT-2 small (12 layers, 768) trained with the active recipe; the README's main job."""
    input:
        f"results/models/{DATASET}-gpt2/final",
        REPORT_PAGES,


rule pretrain_medium:
    input:
        f"results/models/{DATASET}-gpt2-medium/final",
        REPORT_PAGES,


rule pretrain_large:
    input:
        f"results/models/{DATASET}-gpt2-large/final",
        REPORT_PAGES,


rule pretrain_xl:
    input:
        f"results/models/{DATASET}-gpt2-xl/final",
        REPORT_PAGES,


# pretrain_<name>: each named size of config key train.sizes, trained with the active recipe.
for size in SIZES:

    rule:
        name:
            f"pretrain_{size}"
        input:
            f"results/models/{DATASET}-{size}/final",
            REPORT_PAGES,


rule evaluate_lambada:
    """LAMBADA accuracy and target perplexity (lambada_openai, last_word, last_token) of GPT-2 small, and the
    per-passage log (rule evaluate_lambada_any)."""
    input:
        f"results/eval/{DATASET}-gpt2/lambada.json",
        f"results/eval/{DATASET}-gpt2/lambada.samples.jsonl",
        REPORT_PAGES,


rule evaluate_wiki:
    """WikiText perplexities of GPT-2 small (lm-eval's and Megatron-LM's conventions), and the per-document log
    (rule evaluate_wiki_any)."""
    input:
        f"results/eval/{DATASET}-gpt2/wikitext.json",
        f"results/eval/{DATASET}-gpt2/wikitext.samples.jsonl",
        REPORT_PAGES,


rule evaluate_hellaswag:
    """HellaSwag accuracy of GPT-2 small (lm-eval's and llm.c's conventions), and the per-item log
    (rule evaluate_hellaswag_any)."""
    input:
        f"results/eval/{DATASET}-gpt2/hellaswag.json",
        f"results/eval/{DATASET}-gpt2/hellaswag.samples.jsonl",
        REPORT_PAGES,


rule generate:
    """Continuations of the configured prompts file by GPT-2 small (rule generate_any)."""
    input:
        f"results/generate/{DATASET}-gpt2/continuations.jsonl",
        REPORT_PAGES,


rule profile:
    """A few training steps of the profiled model (profile.model) under torch.profiler (rule profile_any)."""
    input:
        f"results/profile/{DATASET}-{config['profile']['model']}",
        REPORT_PAGES,


rule benchmarks:
    """The benchmark suite of the config (benchmarks.suite), one benchmark at a time (rule bench)."""
    input:
        expand("results/bench/{name}.json", name=config["benchmarks"]["suite"]),
        REPORT_PAGES,


rule ops:
    """The compiled custom ops (fused LM-head loss, sample-index builder) for this machine."""
    input:
        OPS_DIR,
