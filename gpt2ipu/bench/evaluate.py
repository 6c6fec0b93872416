"""`gpt2ipu bench evaluate`: LAMBADA passages/s and WikiText tokens/s, ours against baselines.

One random-weight model (GPT-2 small architecture by default: speed does not depend on the
weights' values) scores the same passages (a subset of the real LAMBADA test file when
../shared/data has it, else the generated sample), three or four ways:

- ours: `score_lambada` in all its conventions, the scoring `gpt2ipu evaluate lambada` runs
  (length-sorted batches, LM head on the target positions only, one forward pass for all
  conventions when their token sequences agree);
- one_at_a_time: the plain loop: per passage and convention (last_word, last_token), one forward
  pass with full logits and a log-softmax over them (how the original evaluated);
- ours_batch_1: ours with batch size 1, which isolates what batching alone gives;
- lm_eval (when lm-evaluation-harness is installed: `pip install -e .[compare]`): its
  `lambada_openai` task on the same passages, offline (gpt2ipu.bench.lm_eval_baseline), on the
  same weights saved as a Hugging Face folder. Its section `lm_eval` compares like with like:
  our `lambada_openai` convention alone against it (passages/s), and our WikiText `lm_eval`
  convention against its `wikitext` task on the first `--wiki-articles` articles of the
  WikiText-2 test file (tokens/s, the same windows), with the largest per-sample difference, and
  our HellaSwag `lm_eval` convention against its `hellaswag` task on `--hellaswag-items` items
  (items/s; the generated sample unless `--hellaswag-data` names a hellaswag_val.jsonl), with the
  largest per-ending loglikelihood difference and whether every item's acc / acc_norm agree.

Ours and the baselines must agree (correct counts, loglikelihoods). Medians over `--repeats` runs
taken in turns.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from gpt2ipu.bench.common import interleaved_median_seconds, report
from gpt2ipu.bench.lm_eval_baseline import lm_eval_available
from gpt2ipu.evaluate.conventions import HELLASWAG as HELLASWAG_CONVENTIONS
from gpt2ipu.evaluate.conventions import LAMBADA as LAMBADA_CONVENTIONS
from gpt2ipu.log import package_logger
from gpt2ipu.model.lowp import WEIGHT_FORMATS

log = package_logger(__name__)

REPO = Path(__file__).resolve().parents[2]
REAL_LAMBADA = REPO.parent / "shared" / "data" / "lambada_test.jsonl"
REAL_WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2-wiki.test.tokens"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="gpt2", help="model architecture (gpt2 = GPT-2 small)")
    parser.add_argument("--data", type=Path, default=None,
                        help=f"LAMBADA jsonl (default: {REAL_LAMBADA} if present, else the generated sample)")
    parser.add_argument("--samples", type=int, default=64, help="passages in the subset (the first N)")
    parser.add_argument("--batch-size", type=int, default=16, help="passages scored together by ours")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method; medians are reported")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's)")
    parser.add_argument("--baselines", default="one_at_a_time,ours_batch_1,lm_eval",
                        help="comma-separated baselines to time: one_at_a_time, ours_batch_1, lm_eval "
                             "(lm_eval only when it is installed)")
    parser.add_argument("--wiki-data", type=Path, default=None,
                        help=f"WikiText test file for the lm_eval comparison (default: {REAL_WIKITEXT} if "
                             "present, else the generated sample)")
    parser.add_argument("--wiki-articles", type=int, default=2, help="articles scored in the lm_eval comparison")
    parser.add_argument("--hellaswag-data", type=Path, default=None,
                        help="HellaSwag jsonl for the lm_eval comparison (default: the generated sample)")
    parser.add_argument("--hellaswag-items", type=int, default=16, help="HellaSwag items in the lm_eval comparison")
    parser.add_argument("--lm-eval-tasks", default="lambada,wikitext,hellaswag",
                        help="comma-separated tasks of the lm_eval comparison: lambada, wikitext, hellaswag")
    parser.add_argument("--weights", default="fp32", choices=WEIGHT_FORMATS,
                        help="ours' matrices: fp32, bf16, or int8 with a scale per row (gpt2ipu/model/lowp.py); "
                             "not fp32: no lm_eval baseline (it would score the fp32 weights)")
    parser.add_argument("--compute-limit", action="store_true",
                        help="also ours' LAMBADA passages and --wiki-articles WikiText articles (lm_eval convention) "
                             "as a fraction of the compute limit: the FLOPs their forward passes execute per second "
                             "/ the measured matmul peak")
    parser.add_argument("--lm-eval-batch-size", type=int, default=1,
                        help="lm-eval's batch size (1, its default; its rolling windows are batched the same way)")


def plain_lambada(model, tokenizer, texts, window: int) -> dict[str, int]:
    """Correct counts, one passage and one convention per forward pass, full logits."""
    correct = {"last_word": 0, "last_token": 0}
    nll = {"last_word": 0.0, "last_token": 0.0}
    device = model.wte.weight.device
    with torch.inference_mode():
        for text in texts:
            passage = text.strip()
            word = passage.split()[-1]
            full = tokenizer.encode(passage)
            splits = {"last_word": (tokenizer.encode(passage[:len(passage) - len(word)].strip()),
                                    tokenizer.encode(" " + word)),
                      "last_token": (full[:-1], full[-1:])}
            for convention, (context, target) in splits.items():
                ids = (context + target)[-window:]
                logits = model.logits(torch.tensor([ids], device=device))[0, :-1]
                log_probs = torch.log_softmax(logits.double(), dim=-1)
                targets = torch.tensor(ids[1:], device=device)
                picked = log_probs[torch.arange(len(ids) - 1, device=device), targets][-len(target):]
                nll[convention] -= float(picked.sum())
                correct[convention] += bool((logits.argmax(-1) == targets)[-len(target):].all())
    return {"correct": correct, "nll": nll}


def run(args: argparse.Namespace) -> dict:
    from gpt2ipu.allocator import keep_freed_memory
    from gpt2ipu.data.tokenizer import load_tokenizer
    from gpt2ipu.devices import resolve_device
    from gpt2ipu.evaluate.data import read_lambada, sample_lambada_texts
    from gpt2ipu.evaluate.lambada import score_lambada
    from gpt2ipu.model import GPT, config_for

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    data = args.data or (REAL_LAMBADA if REAL_LAMBADA.is_file() else None)
    texts = (read_lambada(data) if data else sample_lambada_texts(args.samples))[:args.samples]
    torch.manual_seed(0)
    model = GPT(config_for(args.preset, 1024)).to(device).eval().requires_grad_(False)
    n_params = model.num_parameters()   # of the fp32 model (low-precision matrices are buffers)
    if args.weights != "fp32":
        from gpt2ipu.model.lowp import to_lowp

        model = to_lowp(model, args.weights)
    keep_freed_memory()   # as `gpt2ipu evaluate` does (evaluate/results.py); lm_eval's scoring runs under it too
    tokenizer = load_tokenizer()
    window = model.config.n_positions

    chosen = set(args.baselines.split(","))
    ours = score_lambada(model, tokenizer, texts, batch_size=args.batch_size)
    plain = plain_lambada(model, tokenizer, texts, window) if "one_at_a_time" in chosen else None
    batch_1 = score_lambada(model, tokenizer, texts, batch_size=1) if "ours_batch_1" in chosen else ours
    identical = all(ours[c]["correct"] == batch_1[c]["correct"]
                    and (plain is None or (ours[c]["correct"] == plain["correct"][c]
                                           and math.isclose(ours[c]["nll"], plain["nll"][c], rel_tol=1e-6)))
                    for c in ("last_word", "last_token"))
    log.info(f"bench evaluate: {len(texts)} passages from {data or 'the generated sample'}, {args.preset}, "
             f"batch {args.batch_size}, {device}, {torch.get_num_threads()} threads, results identical: {identical}")

    def sync(result):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return result

    timed = {
        "ours": lambda: sync(score_lambada(model, tokenizer, texts, batch_size=args.batch_size)),
        "one_at_a_time": lambda: sync(plain_lambada(model, tokenizer, texts, window)),
        "ours_batch_1": lambda: sync(score_lambada(model, tokenizer, texts, batch_size=1)),
    }
    seconds = interleaved_median_seconds({k: f for k, f in timed.items() if k == "ours" or k in chosen}, args.repeats)
    n = len(texts)
    baselines = {name: n / seconds[name] for name in seconds if name != "ours"}
    extra = {}
    if "lm_eval" in chosen:
        if args.weights != "fp32":
            extra["lm_eval_note"] = f"no lm_eval baseline with --weights {args.weights}: it would score fp32 weights"
        elif device.type != "cpu":
            extra["lm_eval_note"] = "the lm_eval comparison runs on the CPU only"
        elif not lm_eval_available():
            extra["lm_eval_note"] = ("lm-evaluation-harness is not installed (pip install -e '.[compare]'): "
                                     "no lm_eval baseline")
        else:
            extra["lm_eval"] = compare_with_lm_eval(model, tokenizer, texts, args)
            if "lambada" in extra["lm_eval"]:
                baselines["lm_eval"] = extra["lm_eval"]["lambada"]["baselines"]["lm_eval"]
    if "lm_eval_note" in extra:
        log.info(f"bench evaluate: {extra['lm_eval_note']}")
    if args.compute_limit:
        extra["compute_limit"] = compute_limit(model, n_params, tokenizer, texts, args)
    return report(
        n / seconds["ours"],
        "passages/s (all conventions; lm_eval: lambada_openai only)",
        baselines,
        preset=args.preset, samples=n, data=str(data) if data else "generated sample",
        batch_size=args.batch_size, device=str(device), precision="fp32", weights=args.weights,
        threads=torch.get_num_threads(),
        repeats=args.repeats, results_identical=identical, forward_sequences=ours["forward_sequences"],
        accuracy={c: ours[c]["accuracy"] for c in LAMBADA_CONVENTIONS}, **extra,
    )


def compute_limit(model, n_params: int, tokenizer, texts, args: argparse.Namespace) -> dict:
    """Ours on the LAMBADA passages and the WikiText articles (lm_eval convention) against the compute
    limit: the FLOPs each task's forward passes execute (train/throughput.py's `scoring_flops`:
    every fed position through the body, with T each sequence's own length, and the LM head on the
    positions whose logits are computed) per second / this machine's measured matmul peak.

    Fed positions, not task tokens: a WikiText window of 1024 feeds 1023 positions of which the
    last window of an article scores only its new tokens, and a LAMBADA passage of n tokens feeds
    n - 1 and runs the head on its last word's few. Padding in a batch is not counted (wasted work
    is not work). Low-precision weights are reported against the fp32 peak (the limit they are
    meant to pass) and the bf16 one.
    """
    from gpt2ipu.evaluate.lambada import lambada_requests, score_lambada
    from gpt2ipu.evaluate.wiki import document_requests, score_wikitext_lm_eval
    from gpt2ipu.train.throughput import measured_matmul_flops, scoring_flops

    config = model.config
    _, pages = wiki_pages(args)
    _, lambada_firsts = lambada_requests(tokenizer, texts, LAMBADA_CONVENTIONS, config.n_positions)
    wiki_tokens, wiki_windows, _ = document_requests(tokenizer, pages, config.n_positions)
    requests = {"lambada": list(lambada_firsts.items()), "wikitext": wiki_windows}
    task_tokens = {"lambada": sum(min(len(tokenizer.encode(t)), config.n_positions) for t in texts),
                   "wikitext": sum(map(len, wiki_tokens))}
    runs = {"lambada": lambda: score_lambada(model, tokenizer, texts, batch_size=args.batch_size),
            "wikitext": lambda: score_wikitext_lm_eval(model, tokenizer, "\n".join(pages), batch_size=args.batch_size)}
    seconds = interleaved_median_seconds(runs, args.repeats)
    peaks = {"fp32": measured_matmul_flops("cpu", torch.float32)}
    if args.weights != "fp32":
        peaks["bf16"] = measured_matmul_flops("cpu", torch.bfloat16)
    figures = {"matmul_peak_gflops": {name: peak / 1e9 for name, peak in peaks.items()},
               "peak_from": "best of 5 2048x2048 matmuls in this process (train/throughput.py)",
               "flops_from": "train/throughput.py scoring_flops: fed positions through the body, the LM head on "
                             "the scored positions; padding not counted"}
    for task, task_requests in requests.items():
        fed = [len(tokens) - 1 for tokens, _ in task_requests]   # the last token predicts nothing
        head_rows = sum(len(tokens) - first for tokens, first in task_requests)
        flops = scoring_flops(fed, head_rows, n_params=n_params, n_layer=config.n_layer, n_embd=config.n_embd,
                              vocab_size=config.vocab_size)
        figures[task] = {"tokens": task_tokens[task], "tokens_per_s": task_tokens[task] / seconds[task],
                         "forward_sequences": len(fed), "forward_positions": sum(fed),
                         "forward_positions_per_s": sum(fed) / seconds[task], "head_rows": head_rows,
                         "mean_forward_length": sum(fed) / len(fed), "forward_gflops": flops / 1e9,
                         "seconds": seconds[task],
                         **{f"fraction_of_{name}_peak": flops / seconds[task] / peak for name, peak in peaks.items()}}
    figures["wikitext"].update(articles=len(pages), tokens_are="scored tokens (every token of every article)")
    figures["lambada"].update(passages=len(texts), tokens_are="passage tokens (as fed to the model)")
    return figures


def wiki_pages(args: argparse.Namespace) -> tuple[str, list[str]]:
    from gpt2ipu.evaluate.data import read_wikitext, sample_wikitext
    from gpt2ipu.evaluate.wiki import split_articles

    path = args.wiki_data or (REAL_WIKITEXT if REAL_WIKITEXT.is_file() else None)
    text = read_wikitext(path) if path else sample_wikitext(args.wiki_articles)
    return str(path or "generated sample"), split_articles(text)[:args.wiki_articles]


def hellaswag_items(args: argparse.Namespace) -> tuple[str, list[dict]]:
    from gpt2ipu.evaluate.data import read_hellaswag, sample_hellaswag_records

    path = args.hellaswag_data
    records = read_hellaswag(path) if path else sample_hellaswag_records(args.hellaswag_items)
    return str(path or "generated sample"), records[:args.hellaswag_items]


def compare_with_lm_eval(model, tokenizer, texts, args: argparse.Namespace) -> dict:
    """Ours against lm-eval in the same conventions (lambada_openai; wikitext's and hellaswag's
    lm_eval), same weights; the tasks of `--lm-eval-tasks`."""
    import tempfile

    from gpt2ipu.bench import lm_eval_baseline as baseline
    from gpt2ipu.data.tokenizer import hf_gpt2_tokenizer_fast
    from gpt2ipu.evaluate.hellaswag import score_hellaswag
    from gpt2ipu.evaluate.lambada import score_lambada
    from gpt2ipu.evaluate.wiki import score_wikitext_lm_eval
    from gpt2ipu.model.hf import save_hf_dir

    tasks = set(args.lm_eval_tasks.split(","))
    wiki_source, pages = wiki_pages(args)
    hellaswag_source, records = hellaswag_items(args)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_hf_dir(model, Path(tmp) / "model")
        hf_gpt2_tokenizer_fast().save_pretrained(folder)
        lm = baseline.lm_eval_model(folder, batch_size=args.lm_eval_batch_size)

    def ours_lambada(samples=None):
        return score_lambada(model, tokenizer, texts, conventions=["lambada_openai"], batch_size=args.batch_size,
                             log_samples=samples)

    def ours_wiki(samples=None):
        return score_wikitext_lm_eval(model, tokenizer, "\n".join(pages), batch_size=args.batch_size,
                                      log_samples=samples)

    def ours_hellaswag(samples=None, conventions=("lm_eval",)):
        return score_hellaswag(model, tokenizer, records, conventions=conventions, batch_size=args.batch_size,
                               log_samples=samples)

    lambada_samples, wiki_samples, hellaswag_samples = [], [], []
    agreement, timed, results = {}, {}, {}
    theirs = baseline.run_lm_eval(lm, [make() for name, make in (
        ("lambada", lambda: baseline.lambada_task(texts)), ("wikitext", lambda: baseline.wikitext_task(pages)),
        ("hellaswag", lambda: baseline.hellaswag_task(records))) if name in tasks])
    if "lambada" in tasks:
        ours_lambada(lambada_samples)
        agreement["lambada_max_abs_loglikelihood_diff"] = max(
            abs(s["loglikelihood"] - ll)
            for s, (_, ll, _) in zip(lambada_samples, theirs[baseline.LAMBADA_TASK]["samples"]))
        agreement["lambada_greedy_identical"] = [s["greedy"] for s in lambada_samples] == \
            [g for _, _, g in theirs[baseline.LAMBADA_TASK]["samples"]]
        timed.update(ours_lambada=ours_lambada,
                     lm_eval_lambada=lambda: baseline.run_lm_eval(lm, [baseline.lambada_task(texts)]))
    if "wikitext" in tasks:
        wiki = ours_wiki(wiki_samples)
        agreement["wikitext_max_rel_loglikelihood_diff"] = max(
            abs(s["loglikelihood"] - ll) / abs(ll)
            for s, (_, ll, _) in zip(wiki_samples, theirs[baseline.WIKITEXT_TASK]["samples"]))
        timed.update(ours_wiki=ours_wiki,
                     lm_eval_wiki=lambda: baseline.run_lm_eval(lm, [baseline.wikitext_task(pages)]))
    if "hellaswag" in tasks:
        ours_hellaswag(hellaswag_samples)
        hellaswag_theirs = theirs[baseline.HELLASWAG_TASK]
        agreement["hellaswag_max_abs_loglikelihood_diff"] = max(
            abs(a - b) for s, (_, lls, _) in zip(hellaswag_samples, hellaswag_theirs["samples"], strict=True)
            for a, b in zip(s["loglikelihoods"], lls, strict=True))
        agreement["hellaswag_acc_acc_norm_identical"] = [(s["acc"], s["acc_norm"]) for s in hellaswag_samples] == \
            [(bool(m["acc"]), bool(m["acc_norm"])) for m in hellaswag_theirs["metrics"]]
        timed.update(ours_hellaswag=ours_hellaswag,
                     ours_hellaswag_all=lambda: ours_hellaswag(conventions=HELLASWAG_CONVENTIONS),
                     lm_eval_hellaswag=lambda: baseline.run_lm_eval(lm, [baseline.hellaswag_task(records)]))
    log.info(f"bench evaluate: lm_eval agreement {agreement}")
    seconds = interleaved_median_seconds(timed, args.repeats)
    if "lambada" in tasks:
        results["lambada"] = report(len(texts) / seconds["ours_lambada"], "passages/s (lambada_openai)",
                                    {"lm_eval": len(texts) / seconds["lm_eval_lambada"]})
    if "wikitext" in tasks:
        tokens = wiki["tokens"]
        results["wikitext"] = report(tokens / seconds["ours_wiki"], "tokens/s (lm_eval convention, the same windows)",
                                     {"lm_eval": tokens / seconds["lm_eval_wiki"]},
                                     data=wiki_source, articles=len(pages), tokens=tokens, windows=wiki["windows"])
    if "hellaswag" in tasks:
        n = len(records)
        results["hellaswag"] = report(n / seconds["ours_hellaswag"], "items/s (lm_eval convention)",
                                      {"lm_eval": n / seconds["lm_eval_hellaswag"]}, data=hellaswag_source, items=n,
                                      ours_all_conventions=n / seconds["ours_hellaswag_all"])
    return {**results, "lm_eval_batch_size": args.lm_eval_batch_size, "agreement": agreement}
