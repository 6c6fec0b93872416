# Evaluation and generation: a trained model -> LAMBADA, WikiText and HellaSwag results, continuations.
# The eval sets are generated offline (evaluate.data: sample) or downloaded and sha256-checked.

EVAL = config["evaluate"]
EVAL_SOURCE = {"auto": "sample" if DATASET == "sample" else "download"}.get(EVAL["data"], EVAL["data"])
EVAL_DOWNLOADS = {
    "lambada": EVAL["lambada"],
    "wikitext-103": EVAL["wikitext"]["sources"]["wikitext-103"],
    "wikitext-2": EVAL["wikitext"]["sources"]["wikitext-2"],
    "hellaswag": EVAL["hellaswag"],
}
# The sample-size setting of each generated set (so that resizing one set does not rerun the others).
EVAL_SAMPLE_SIZE = {"lambada": "lambada_records", "hellaswag": "hellaswag_items"}


MODEL_DIR = "results/models/{dataset}-{model}/final"


rule prepare_eval_set:
    """One evaluation set: generated in the real file's format (sample) or downloaded (download)."""
    output:
        directory("results/eval_data/{evalsource}/{evalset}"),
    wildcard_constraints:
        evalsource="sample|download",
        evalset="lambada|wikitext-103|wikitext-2|hellaswag",
    params:
        # Only the settings of the chosen source, so editing the other's does not rerun this.
        kwargs=lambda wc: (
            dict(source="sample", seed=EVAL["sample"]["seed"],
                 **{k: EVAL["sample"][k] for k in [EVAL_SAMPLE_SIZE.get(wc.evalset, "wikitext_articles")]})
            if wc.evalsource == "sample"
            else dict(source="download", retries=EVAL["retries"], **EVAL_DOWNLOADS[wc.evalset])
        ),
    log:
        "logs/eval_data/{evalsource}-{evalset}.log",
    benchmark:
        "benchmarks/prepare_eval_set/{evalsource}-{evalset}.tsv"
    conda:
        "../../environment.yml"
    script:
        "../scripts/prepare_eval_set.py"


rule evaluate_lambada_any:
    """LAMBADA accuracy and target perplexity (lambada_openai, last_word strict, last_token) of a trained
    model, and its per-passage log."""
    input:
        unpack(bpe_input),
        model=MODEL_DIR,
        data=f"results/eval_data/{EVAL_SOURCE}/lambada",
    output:
        results="results/eval/{dataset}-{model}/lambada.json",
        samples="results/eval/{dataset}-{model}/lambada.samples.jsonl",
    params:
        conventions=EVAL["conventions"]["lambada"],
        batch_size=EVAL["batch_size"],
        device=EVAL["device"],
        precision=EVAL["precision"],
        weights=EVAL["weights"],
        vocab_dir=config["tokenize"]["vocab_dir"],
    threads: EVAL["threads"]
    log:
        "logs/{dataset}/eval-lambada-{model}.log",
    benchmark:
        "benchmarks/evaluate_lambada_any/{dataset}-{model}.tsv"
    conda:
        "../../environment.yml"
    script:
        "../scripts/evaluate_lambada.py"


rule evaluate_wiki_any:
    """WikiText perplexities of a trained model (lm-eval's per document, Megatron-LM's sliding windows),
    and its per-document log."""
    input:
        unpack(bpe_input),
        model=MODEL_DIR,
        data=f"results/eval_data/{EVAL_SOURCE}/{EVAL['wikitext']['variant']}",
    output:
        results="results/eval/{dataset}-{model}/wikitext.json",
        samples="results/eval/{dataset}-{model}/wikitext.samples.jsonl",
    params:
        conventions=EVAL["conventions"]["wikitext"],
        documents=EVAL["wikitext"]["documents"],
        stride=EVAL["wikitext"]["stride"],
        window=EVAL["wikitext"]["window"],
        batch_size=EVAL["batch_size"],
        device=EVAL["device"],
        precision=EVAL["precision"],
        weights=EVAL["weights"],
        vocab_dir=config["tokenize"]["vocab_dir"],
    threads: EVAL["threads"]
    log:
        "logs/{dataset}/eval-wikitext-{model}.log",
    benchmark:
        "benchmarks/evaluate_wiki_any/{dataset}-{model}.tsv"
    conda:
        "../../environment.yml"
    script:
        "../scripts/evaluate_wiki.py"


rule evaluate_hellaswag_any:
    """HellaSwag accuracy of a trained model (lm-eval's hellaswag: acc, acc_norm; llm.c's: summed and mean
    ending loss), and its per-item log."""
    input:
        unpack(bpe_input),
        model=MODEL_DIR,
        data=f"results/eval_data/{EVAL_SOURCE}/hellaswag",
    output:
        results="results/eval/{dataset}-{model}/hellaswag.json",
        samples="results/eval/{dataset}-{model}/hellaswag.samples.jsonl",
    params:
        conventions=EVAL["conventions"]["hellaswag"],
        batch_size=EVAL["batch_size"],
        device=EVAL["device"],
        precision=EVAL["precision"],
        weights=EVAL["weights"],
        vocab_dir=config["tokenize"]["vocab_dir"],
    threads: EVAL["threads"]
    log:
        "logs/{dataset}/eval-hellaswag-{model}.log",
    benchmark:
        "benchmarks/evaluate_hellaswag_any/{dataset}-{model}.tsv"
    conda:
        "../../environment.yml"
    script:
        "../scripts/evaluate_hellaswag.py"


rule generate_any:
    """Continuations of every prompt in generate.prompts, sampled from a trained model."""
    input:
        unpack(bpe_input),
        model=MODEL_DIR,
        prompts=config["generate"]["prompts"],
        ops=OPS_DIR,  # the compiled decode op (a failed build falls back to PyTorch)
    output:
        continuations="results/generate/{dataset}-{model}/continuations.jsonl",
        provenance="results/generate/{dataset}-{model}/provenance.json",
    params:
        settings={k: v for k, v in config["generate"].items() if k not in ("prompts", "threads")},
        vocab_dir=config["tokenize"]["vocab_dir"],
    threads: config["generate"]["threads"]
    log:
        "logs/{dataset}/generate-{model}.log",
    benchmark:
        "benchmarks/generate_any/{dataset}-{model}.tsv"
    conda:
        "../../environment.yml"
    script:
        "../scripts/generate.py"
