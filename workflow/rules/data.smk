# Data stages: dump -> extract -> tokenize -> shards, one job per dump part until shards gathers.
# Datasets text and hf are not MediaWiki: their parts go from the manifest (hf: a download) to tokenize.

from gpt2ipu.data.corpus import file_stamps
from gpt2ipu.data.dump import local_stamps


checkpoint dump_manifest:
    """The list of dump parts: generated (sample), the mirror's checksum list (enwiki), local.paths, the
    corpus files cut into parts (text), or the Hub dataset's files at a pinned commit (hf)."""
    output:
        f"{DATA}/dump/manifest.json",
    params:
        kwargs=lambda wc: dict(
            dataset=wc.dataset,
            sample_parts=config["sample"]["parts"],
            local_paths=config["local"]["paths"],
            enwiki_mirror=config["enwiki"]["mirror"],
            enwiki_date=config["enwiki"]["date"],
            enwiki_max_parts=config["enwiki"]["max_parts"],
            # local and text: each file's path, size and mtime, so a replaced file (even with an older
            # mtime) changes the params and reruns the manifest, which records its sha256 (absent for
            # the other datasets, so their params stay as they were).
            **({"local_stamps": local_stamps(config["local"]["paths"])} if wc.dataset == "local" else {}),
            **({"text": config["text"], "local_stamps": file_stamps(config["text"]["paths"])}
               if wc.dataset == "text" else {}),
            **({"hf": config["hf"]} if wc.dataset == "hf" else {}),
        ),
    log:
        "logs/{dataset}/dump_manifest.log",
    benchmark:
        "benchmarks/dump_manifest/{dataset}.tsv"
    conda:
        "../../environment.yml"
    script:
        "../scripts/dump_manifest.py"


rule dump_part:
    """One dump part: generated offline (sample), downloaded with resume and sha1 check (enwiki), or
    fetched into the Hugging Face cache and linked (hf)."""
    input:
        manifest=f"{DATA}/dump/manifest.json",
    output:
        directory(f"{DATA}/dump/{{part}}"),
    params:
        sample=lambda wc: config["sample"] if wc.dataset == "sample" else None,
        enwiki_retries=config["enwiki"]["retries"],
    log:
        "logs/{dataset}/dump/{part}.log",
    benchmark:
        "benchmarks/dump_part/{dataset}-{part}.tsv"
    conda:
        "../../environment.yml"
    script:
        "../scripts/dump_part.py"


rule extract:
    """wikiextractor over one dump part -> clean JSON-lines articles."""
    input:
        dump_file,
        # local (parts used in place): the manifest too, so a rewritten manifest (a local dump
        # replaced) reruns the part
        unpack(lambda wc: {"manifest": f"results/data/{wc.dataset}/dump/manifest.json"} if wc.dataset == "local" else {}),
    output:
        directory(f"{DATA}/extract/{{part}}"),
    params:
        expand_templates=config["extract"]["expand_templates"],
        min_chars=config["extract"]["min_chars"],
    threads: config["extract"]["threads"]
    log:
        "logs/{dataset}/extract/{part}.log",
    benchmark:
        "benchmarks/extract/{dataset}-{part}.tsv"
    conda:
        "../../environment.yml"
    script:
        "../scripts/extract.py"


rule train_bpe:
    """A fresh byte-level BPE trained on the whole corpus (tokenize.tokenizer: bpe)."""
    input:
        all_document_inputs,
    output:
        directory(f"{DATA}/bpe"),
    params:
        documents=lambda wc: [documents_of(wc.dataset, part) for part in part_names(wc.dataset)],
        fields=text_fields,
        vocab_size=config["tokenize"]["bpe_vocab_size"],
        min_frequency=config["tokenize"]["bpe_min_frequency"],
    log:
        "logs/{dataset}/train_bpe.log",
    benchmark:
        "benchmarks/train_bpe/{dataset}.tsv"
    conda:
        "../../environment.yml"
    script:
        "../scripts/train_bpe.py"


rule tokenize:
    """Articles, or a text corpus's part -> token ids (Megatron .bin/.idx, one EOS after each document)."""
    input:
        unpack(bpe_input),
        unpack(tokenize_input),
    output:
        directory(f"{DATA}/tokens/{{part}}"),
    params:
        # text: the part's pieces and its files' sha256, so a replaced file reruns its own parts only
        documents=part_documents,
        fields=text_fields,
        tokenizer=config["tokenize"]["tokenizer"],
        vocab_dir=config["tokenize"]["vocab_dir"],
        include_title=config["tokenize"]["include_title"],
    threads: config["tokenize"]["threads"]
    log:
        "logs/{dataset}/tokenize/{part}.log",
    benchmark:
        "benchmarks/tokenize/{dataset}-{part}.tsv"
    conda:
        "../../environment.yml"
    script:
        "../scripts/tokenize.py"


rule shards:
    """Train/valid split by document -> TFRecord shards + index, Megatron mmap, stats.json."""
    input:
        all_token_dirs,
    output:
        directory(f"{DATA}/shards"),
    params:
        max_len=SHARD_MAX_LEN,
        valid_fraction=config["shards"]["valid_fraction"],
        seed=config["shards"]["seed"],
        samples_per_shard=config["shards"]["samples_per_shard"],
        max_tokens=lambda wc: config[wc.dataset]["max_tokens"] if wc.dataset in CORPUS_DATASETS else None,
    log:
        "logs/{dataset}/shards.log",
    benchmark:
        "benchmarks/shards/{dataset}.tsv"
    conda:
        "../../environment.yml"
    script:
        "../scripts/shards.py"
