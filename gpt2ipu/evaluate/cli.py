"""`gpt2ipu evaluate {wiki,lambada,hellaswag,data}`: the evaluation commands the Snakemake rules also run."""

from __future__ import annotations

import argparse
import json

from gpt2ipu.devices import PRECISIONS
from gpt2ipu.evaluate import conventions
from gpt2ipu.evaluate.data import DEFAULT_SOURCES, EVAL_SETS, SAMPLE_SEED
from gpt2ipu.model.lowp import WEIGHT_FORMATS


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", required=True,
                        help="Hugging Face GPT-2 folder (config.json + model.safetensors): ours or any other; "
                             "or a hub id (gpt2, openai-community/gpt2) from the local hub cache or the network")
    parser.add_argument("--data", required=True, help="the eval file, or the folder `gpt2ipu evaluate data` made")
    parser.add_argument("--out", required=True, help="results JSON, written when the evaluation is complete")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS, help="weights' dtype")
    parser.add_argument("--weights", default="fp32", choices=WEIGHT_FORMATS,
                                help="CPU: the matrices stored fp32, bf16, or int8 with a scale per row "
                             "(gpt2ipu/model/lowp.py); bf16 products where the CPU has AVX512-BF16 or AMX")
    parser.add_argument("--vocab-dir", default=None,
                        help="GPT-2 vocab folder, for a model folder without its own vocab.json + merges.txt")
    parser.add_argument("--bpe-tokenizer", default=None,
                        help="tokenizer.json from `gpt2ipu train-bpe`, for a model trained with it")
    parser.add_argument("--log-samples", default=None, metavar="FILE.jsonl",
                        help="also write one JSON line per passage/document (or window) and convention: "
                             "target token ids, loglikelihood, greedy flag, tokens scored")


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    tasks = parser.add_subparsers(dest="task", metavar="TASK", required=True)

    wiki = tasks.add_parser("wiki", help="WikiText perplexity (lm-eval's and Megatron-LM's conventions)",
                            description="WikiText perplexity: lm-eval's rolling windows per document, "
                                        "Megatron-LM's sliding windows; see docs/evaluation.md")
    _model_arguments(wiki)
    wiki.add_argument("--conventions", default=",".join(conventions.WIKITEXT),
                      help="comma-separated: lm_eval (lm-evaluation-harness's wikitext: word and byte "
                           "perplexity, bits per byte), megatron (sliding windows: token, word, adjusted)")
    wiki.add_argument("--documents", default="articles", choices=conventions.WIKITEXT_DOCUMENTS,
                      help="lm_eval convention: each article a document (lm-eval's), or the whole file as one")
    wiki.add_argument("--stride", type=int, default=None,
                      help="megatron convention: new tokens scored per window (default: half the window)")
    wiki.add_argument("--window", type=int, default=None,
                      help="megatron convention: tokens per window (default: the model's context)")

    lambada = tasks.add_parser("lambada", help="LAMBADA accuracy and target perplexity",
                               description="LAMBADA in lm-eval's lambada_openai, last_word (strict) and "
                                           "last_token conventions; see docs/evaluation.md")
    _model_arguments(lambada)
    lambada.add_argument("--conventions", default=",".join(conventions.LAMBADA),
                         help="comma-separated: lambada_openai (lm-evaluation-harness's), last_word "
                              "(Megatron-LM's strict), last_token (the GPT-2 paper's)")
    lambada.add_argument("--limit", type=int, default=None, help="only the first N passages")

    hellaswag = tasks.add_parser("hellaswag", help="HellaSwag accuracy (lm-eval's and llm.c's conventions)",
                                 description="HellaSwag (the validation set's JSON lines) in lm-eval's hellaswag "
                                             "(acc, acc_norm) and llm.c's / nanoGPT's (ending's summed and mean "
                                             "loss) conventions; see docs/evaluation.md")
    _model_arguments(hellaswag)
    hellaswag.add_argument("--conventions", default=",".join(conventions.HELLASWAG),
                           help="comma-separated: lm_eval (lm-evaluation-harness's hellaswag), llm_c "
                                "(llm.c's and build-nanogpt's)")
    hellaswag.add_argument("--limit", type=int, default=None, help="only the first N items")

    data = tasks.add_parser("data", help="download (sha256-checked) or generate an evaluation set",
                            description="Write <out-dir>/<file> + provenance.json for one evaluation set")
    data.add_argument("--set", dest="eval_set", required=True, choices=sorted(EVAL_SETS), help="which evaluation set")
    data.add_argument("--source", default="download", choices=["download", "sample"],
                      help="download the real set, or generate a small one in its format (offline)")
    data.add_argument("--out-dir", required=True, help="folder to write the set and its provenance.json into")
    data.add_argument("--url", default=None,
                      help="where to download from (http(s):// or file://); default: the set's known source "
                           "with its pinned sha256: "
                           + ", ".join(f"{k}: {v['url']}" for k, v in DEFAULT_SOURCES.items()))
    data.add_argument("--sha256", default=None, help="expected sha256 of the data file (with --url)")
    data.add_argument("--member", default=None, help="path of the data file inside a zip archive (with --url)")
    data.add_argument("--retries", type=int, default=5, help="download attempts, with backoff (default 5)")
    data.add_argument("--lambada-records", type=int, default=200, help="sample size (with --source sample)")
    data.add_argument("--wikitext-articles", type=int, default=12, help="sample size (with --source sample)")
    data.add_argument("--hellaswag-items", type=int, default=100, help="sample size (with --source sample)")
    data.add_argument("--seed", type=int, default=SAMPLE_SEED, help="sample seed (with --source sample)")


def run(args: argparse.Namespace) -> int:
    if args.task == "data":
        from gpt2ipu.evaluate.data import prepare_eval_set

        result = prepare_eval_set(args.eval_set, args.out_dir, source=args.source, url=args.url,
                                  sha256=args.sha256, member=args.member, retries=args.retries,
                                  lambada_records=args.lambada_records,
                                  wikitext_articles=args.wikitext_articles,
                                  hellaswag_items=args.hellaswag_items, seed=args.seed)
    elif args.task == "wiki":
        from gpt2ipu.evaluate.wiki import evaluate_wiki

        result = evaluate_wiki(args.model_dir, args.data, args.out, conventions=_names(args.conventions),
                               documents=args.documents, stride=args.stride, window=args.window,
                               batch_size=args.batch_size, device=args.device, precision=args.precision,
                               weights=args.weights,
                               vocab_dir=args.vocab_dir, bpe_tokenizer=args.bpe_tokenizer,
                               log_samples=args.log_samples)
    elif args.task == "hellaswag":
        from gpt2ipu.evaluate.hellaswag import evaluate_hellaswag

        result = evaluate_hellaswag(args.model_dir, args.data, args.out, batch_size=args.batch_size,
                                    device=args.device, precision=args.precision, weights=args.weights,
                                    conventions=_names(args.conventions), limit=args.limit,
                                    vocab_dir=args.vocab_dir, bpe_tokenizer=args.bpe_tokenizer,
                                    log_samples=args.log_samples)
    else:
        from gpt2ipu.evaluate.lambada import evaluate_lambada

        result = evaluate_lambada(args.model_dir, args.data, args.out, batch_size=args.batch_size,
                                  device=args.device, precision=args.precision, weights=args.weights,
                                  conventions=_names(args.conventions), limit=args.limit,
                                  vocab_dir=args.vocab_dir, bpe_tokenizer=args.bpe_tokenizer,
                                  log_samples=args.log_samples)
    print(json.dumps(result, indent=2, sort_keys=True, default=str))
    return 0
