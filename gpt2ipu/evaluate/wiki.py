"""WikiText perplexity: `gpt2ipu evaluate wiki`, target `evaluate_wiki`.

Two conventions, each selected by name (`--conventions`), both in one results file:

`lm_eval` (lm-evaluation-harness's `wikitext` task, the default):
1. Documents: each article (it starts at its ` = Title = ` line; lines split and joined on "\n"
   as the EleutherAI/wikitext_document_level loader does), or the whole file as one (`documents`
   `whole`).
2. Each document is detokenized (below) and tokenized; `<|endoftext|>` goes in front, so every
   token is scored, in disjoint windows of the model's context: the first window predicts its
   first `window` tokens from the prefix on, each next one the next `window` tokens from one
   token of context (the last window from whatever context fills it): lm-eval's
   `get_rolling_token_windows(context_len=1)` + `make_disjoint_window`.
3. Figures over all documents, with W = len(re.split(r"\\s+", document)) and B = UTF-8 bytes, both
   of the original (word-level) documents: word_perplexity = exp(NLL / W), byte_perplexity =
   exp(NLL / B), bits_per_byte = NLL / B / ln 2; also token_perplexity = exp(NLL / tokens).
   These figures are under the `lm_eval` key of the results.

`megatron` (Megatron-LM's, the sliding windows; its figures at the top level of the results, where
earlier results files had them):
1. The word-level test file is detokenized with Megatron-LM's WikiText detokenizer (below), so
   the model sees normal text ("1,000", "well-known", "it's", "(a)") as in pretraining.
2. The text is tokenized with the model's tokenizer: N tokens. Token 0 has no context and is not
   scored (as in Megatron-LM), so N - 1 tokens are.
3. Sliding windows of `window` tokens (the model's context by default): the first window scores
   its tokens 1..window-1, each next window moves its end forward by `stride` and scores only
   those new tokens, ending exactly there, so every token is scored once with the most left
   context the window allows (at least window - stride tokens, once past the first window).
4. Figures, with NLL the summed negative log-likelihood in nats and W the number of words of the
   original word-level text (whitespace-separated tokens plus one end-of-line per line: 245,569
   for the WikiText-2/-103 test set):
     token_perplexity    = exp(NLL / (N - 1))
     word_perplexity     = exp(NLL / W)
     adjusted_perplexity = exp(NLL / (N - 1) * (N - 1) / (W - 1))   (Megatron-LM's, = exp(NLL / (W - 1)))
   See docs/evaluation.md for how they relate.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpt2ipu.errors import UserError
from gpt2ipu.evaluate import conventions
from gpt2ipu.evaluate.data import WIKITEXT_NAME, data_file, read_wikitext
from gpt2ipu.evaluate.scoring import score_requests

CONVENTIONS = conventions.WIKITEXT
DOCUMENTS = conventions.WIKITEXT_DOCUMENTS


def check_conventions(conventions: Sequence[str], documents: str) -> None:
    for convention in conventions:
        if convention not in CONVENTIONS:
            raise UserError(f"WikiText convention {convention!r}: choose from {', '.join(CONVENTIONS)}")
    if documents not in DOCUMENTS:
        raise UserError(f"WikiText documents {documents!r}: choose from {', '.join(DOCUMENTS)}")


def wikitext_detokenize(string: str) -> str:
    """Megatron-LM's WikiText detokenizer (tasks/zeroshot_gpt/detokenizer.py), rule for rule.

    Kept verbatim, quirks included (the contraction regex with its literal slashes never
    matches), so perplexities are comparable with Megatron-LM's and with lm-evaluation-harness's,
    which uses the same function.
    """
    # contractions
    string = string.replace("s '", "s'")
    string = re.sub(r"/' [0-9]/", r"/'[0-9]/", string)
    # number separators
    string = string.replace(" @-@ ", "-")
    string = string.replace(" @,@ ", ",")
    string = string.replace(" @.@ ", ".")
    # punctuation
    string = string.replace(" : ", ": ")
    string = string.replace(" ; ", "; ")
    string = string.replace(" . ", ". ")
    string = string.replace(" ! ", "! ")
    string = string.replace(" ? ", "? ")
    string = string.replace(" , ", ", ")
    # double brackets
    string = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", string)
    string = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", string)
    string = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", string)
    string = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', string)
    string = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", string)
    # miscellaneous
    string = string.replace("= = = =", "====")
    string = string.replace("= = =", "===")
    string = string.replace("= =", "==")
    string = string.replace(" " + chr(176) + " ", chr(176))
    string = string.replace(" \n", "\n")
    string = string.replace("\n ", "\n")
    string = string.replace(" N ", " 1 ")
    string = string.replace(" 's", "'s")
    return string


def count_words(word_level_text: str) -> int:
    """Words of the original text as WikiText counts them: tokens plus one end-of-line per line."""
    return sum(len(line.split()) + 1 for line in word_level_text.splitlines())


def sliding_windows(num_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first_scored) per window: tokens[start:end] are fed, tokens[first_scored:end] scored."""
    if window < 2:
        raise UserError(f"window {window}: must be at least 2 tokens")
    if not 1 <= stride <= window - 1:
        raise UserError(f"stride {stride}: must be between 1 and window - 1 ({window - 1}); it is the "
                        "number of new tokens each window scores")
    end = min(window, num_tokens)
    windows = [(0, end, 1)]
    while end < num_tokens:
        new_end = min(end + stride, num_tokens)
        windows.append((max(0, new_end - window), new_end, end))
        end = new_end
    return windows


def split_articles(text: str) -> list[str]:
    """The articles of a WikiText file as lm-eval's `wikitext` task gets them (the
    EleutherAI/wikitext_document_level loader): a line that is ` = Title = ` (not a section's
    ` = = ... = = `) starts a new document; text before the first title that is only whitespace
    is dropped; the last document keeps the file's final end of line."""
    documents, lines = [], []
    for line in text.split("\n"):
        heading = line.replace("= = =", "===").replace("= =", "==").strip()
        if heading.startswith("= ") and heading.endswith(" ="):
            document = "\n".join(lines)
            if document.strip():
                documents.append(document)
            lines = []
        lines.append(line)
    documents.append("\n".join(lines))
    return documents


def lm_eval_words(document: str) -> int:
    """lm-eval's word count of a WikiText document (of the original text, not the detokenized)."""
    return len(re.split(r"\s+", document))


def disjoint_windows(num_tokens: int, window: int) -> list[tuple[int, int, int]]:
    """lm-eval's rolling windows over [EOT] + tokens (tokens at 1..num_tokens): (start, stop, first_scored),
    each window's request is sequence[start:stop] (at most window + 1 tokens, the last not fed) and
    it scores sequence[first_scored:stop]; every token is scored once, the first from the EOT."""
    if num_tokens == 0:
        return []
    stop = min(window, num_tokens) + 1
    windows = [(0, stop, 1)]
    while stop - 1 < num_tokens:
        new = min(num_tokens - (stop - 1), window)
        stop += new
        windows.append((stop - window - 1, stop, stop - new))
    return windows


def perplexities(nll: float, num_tokens: int, num_words: int) -> dict[str, float]:
    scored = num_tokens - 1
    token_ratio = scored / (num_words - 1)
    return {
        "token_perplexity": math.exp(nll / scored),
        "word_perplexity": math.exp(nll / num_words),
        "adjusted_perplexity": math.exp(nll / scored * token_ratio),
        "token_ratio": token_ratio,
    }


def score_wikitext_megatron(model, tokenizer, word_level_text: str, *, window: int | None = None,
                            stride: int | None = None, batch_size: int = 8,
                            log_samples: list | None = None) -> dict[str, Any]:
    """The `megatron` convention's perplexities of `model` on a WikiText word-level text (sliding
    windows over the whole text; see the module doc).

    window: tokens per window (default: the model's context); stride: new tokens scored per
    window (default: half the window); log_samples, when given, gets one record per window.
    """
    window = window or model.config.n_positions
    if window > model.config.n_positions:
        raise UserError(f"window {window}: longer than the model's context ({model.config.n_positions} tokens)")
    stride = stride or window // 2
    tokens = tokenizer.encode(wikitext_detokenize(word_level_text))
    if len(tokens) < 2:
        raise UserError("the WikiText text is shorter than two tokens; nothing to score")
    windows = sliding_windows(len(tokens), window, stride)
    requests = [(tokens[start:end], first - start) for start, end, first in windows]
    scores = score_requests(model, requests, batch_size=batch_size, desc="wikitext windows")
    nll = math.fsum(float(s.nll.sum()) for s in scores)
    if log_samples is not None:
        log_samples.extend(
            {"task": "wikitext", "convention": "megatron", "window_id": number, "start": start, "end": end,
             "first_scored": first, "target_ids": tokens[first:end], "loglikelihood": -float(scored.nll.sum()),
             "greedy": bool(scored.correct.all()), "tokens_scored": end - first}
            for number, ((start, end, first), scored) in enumerate(zip(windows, scores)))
    words = count_words(word_level_text)
    return {
        "tokens": len(tokens),
        "scored_tokens": len(tokens) - 1,
        "words": words,
        "window": window,
        "stride": stride,
        "windows": len(windows),
        "nll": nll,
        **perplexities(nll, len(tokens), words),
        "token_accuracy": float(sum(int(s.correct.sum()) for s in scores) / (len(tokens) - 1)),
    }


def document_requests(tokenizer, pages: Sequence[str], window: int) -> tuple[list[list[int]], list[tuple], list[int]]:
    """(each document's tokens, the scoring requests of all windows, the document of each request)."""
    token_lists, requests, owners = [], [], []
    for number, page in enumerate(pages):
        sequence = [tokenizer.eos_id] + tokenizer.encode(wikitext_detokenize(page))
        token_lists.append(sequence[1:])
        for start, stop, first in disjoint_windows(len(sequence) - 1, window):
            requests.append((sequence[start:stop], first - start))
            owners.append(number)
    return token_lists, requests, owners


def document_record(number: int, page: str, tokens: list[int], nll: float, greedy: bool) -> dict[str, Any]:
    """One --log-samples line of the lm_eval convention: a document, as lm-eval logs it, and its counts."""
    return {"task": "wikitext", "convention": "lm_eval", "doc_id": number, "title": page.strip().split("\n")[0].strip(),
            "target_ids": tokens, "loglikelihood": -nll, "greedy": greedy, "tokens_scored": len(tokens),
            "words": lm_eval_words(page), "bytes": len(page.encode("utf-8"))}


def score_wikitext_lm_eval(model, tokenizer, word_level_text: str, *, documents: str = "articles",
                           batch_size: int = 8, log_samples: list | None = None) -> dict[str, Any]:
    """lm-eval's `wikitext` figures of `model` (see the module doc); `log_samples`, when given, gets
    one record per document."""
    check_conventions(["lm_eval"], documents)
    pages = split_articles(word_level_text) if documents == "articles" else [word_level_text]
    token_lists, requests, owners = document_requests(tokenizer, pages, model.config.n_positions)
    scores = score_requests(model, requests, batch_size=batch_size, desc="wikitext documents")
    nll, greedy = [0.0] * len(pages), [True] * len(pages)
    for number, scored in zip(owners, scores):
        nll[number] += float(scored.nll.sum())
        greedy[number] &= bool(scored.correct.all())
    if log_samples is not None:
        log_samples.extend(map(document_record, range(len(pages)), pages, token_lists, nll, greedy))
    total_nll, tokens = math.fsum(nll), sum(map(len, token_lists))
    words, num_bytes = sum(map(lm_eval_words, pages)), sum(len(page.encode("utf-8")) for page in pages)
    return {
        "documents": documents, "document_count": len(pages), "tokens": tokens, "words": words,
        "bytes": num_bytes, "window": model.config.n_positions, "windows": len(requests), "nll": total_nll,
        "word_perplexity": math.exp(total_nll / words),
        "byte_perplexity": math.exp(total_nll / num_bytes),
        "bits_per_byte": total_nll / num_bytes / math.log(2),
        "token_perplexity": math.exp(total_nll / tokens),
    }


def evaluate_wiki(model_dir: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *,
                  conventions: Sequence[str] = CONVENTIONS, documents: str = "articles",
                  stride: int | None = None, window: int | None = None, batch_size: int = 8, device: str = "auto",
                  precision: str = "fp32", vocab_dir: str | None = None, bpe_tokenizer: str | None = None,
                  dataset_name: str | None = None, log_samples: str | os.PathLike | None = None,
                  weights: str = "fp32") -> dict[str, Any]:
    """Evaluate `model_dir` (a folder or a hub id) on the WikiText file `data` in each convention;
    write the results JSON `out` (and the per-document JSON lines `log_samples`) atomically."""
    from gpt2ipu.evaluate.results import load_for_scoring, write_results, write_samples
    from gpt2ipu.pretrained import resolve_model_dir

    start = time.perf_counter()
    check_conventions(conventions, documents)
    data_path = data_file(data, WIKITEXT_NAME)
    text = read_wikitext(data_path)
    model_path = resolve_model_dir(model_dir)
    model, tokenizer, device_used = load_for_scoring(model_path, device, precision, vocab_dir, bpe_tokenizer, weights)
    samples = [] if log_samples else None
    figures = {}
    if "lm_eval" in conventions:
        figures["lm_eval"] = score_wikitext_lm_eval(model, tokenizer, text, documents=documents,
                                                    batch_size=batch_size, log_samples=samples)
    if "megatron" in conventions:  # at the top level, where results files have always had them
        figures.update(score_wikitext_megatron(model, tokenizer, text, window=window, stride=stride,
                                               batch_size=batch_size, log_samples=samples))
    params = {"conventions": list(conventions), "documents": documents, "stride": figures.get("stride", stride),
              "window": figures.get("window", window), "batch_size": batch_size, "device": str(device_used),
              "precision": precision, "weights": weights, "tokenizer": tokenizer.name}
    result = {"task": "wikitext", "dataset": dataset_name or Path(data_path).parent.name,
              "model_dir": str(model_dir), "data": str(data_path), "conventions": list(conventions), **figures,
              "seconds": round(time.perf_counter() - start, 3)}
    if log_samples:
        write_samples(log_samples, samples)
    write_results(out, result, stage="evaluate_wiki", params=params, inputs=[model_path, data_path])
    return result
