"""WikiText perplexity: `gpt2ipu evaluate wiki`, target `evaluate_wiki`.

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
from pathlib import Path
from typing import Any

from gpt2ipu.evaluate.data import WIKITEXT_NAME, data_file, read_wikitext
from gpt2ipu.evaluate.scoring import score_requests
from gpt2ipu.errors import UserError


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


def perplexities(nll: float, num_tokens: int, num_words: int) -> dict[str, float]:
    scored = num_tokens - 1
    token_ratio = scored / (num_words - 1)
    return {
        "token_perplexity": math.exp(nll / scored),
        "word_perplexity": math.exp(nll / num_words),
        "adjusted_perplexity": math.exp(nll / scored * token_ratio),
        "token_ratio": token_ratio,
    }


def score_wikitext(model, tokenizer, word_level_text: str, *, window: int | None = None,
                   stride: int | None = None, batch_size: int = 8) -> dict[str, Any]:
    """The perplexities of `model` on a WikiText word-level text (see the module doc).

    window: tokens per window (default: the model's context); stride: new tokens scored per
    window (default: half the window).
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


def evaluate_wiki(model_dir: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *,
                  stride: int | None = None, window: int | None = None, batch_size: int = 8, device: str = "auto",
                  precision: str = "fp32", vocab_dir: str | None = None, bpe_tokenizer: str | None = None,
                  dataset_name: str | None = None) -> dict[str, Any]:
    """Evaluate `model_dir` on the WikiText file `data`; write the results JSON `out` atomically."""
    from gpt2ipu.evaluate.results import write_results
    from gpt2ipu.pretrained import load_pretrained

    start = time.perf_counter()
    data_path = data_file(data, WIKITEXT_NAME)
    text = read_wikitext(data_path)
    model, tokenizer, device_used = load_pretrained(model_dir, device, precision, vocab_dir, bpe_tokenizer)
    figures = score_wikitext(model, tokenizer, text, window=window, stride=stride, batch_size=batch_size)
    params = {"stride": figures["stride"], "window": figures["window"], "batch_size": batch_size, "device": str(device_used),
              "precision": precision, "tokenizer": tokenizer.name}
    result = {"task": "wikitext", "dataset": dataset_name or Path(data_path).parent.name,
              "model_dir": str(model_dir), "data": str(data_path), **figures,
              "seconds": round(time.perf_counter() - start, 3)}
    write_results(out, result, stage="evaluate_wiki", params=params, inputs=[model_dir, data_path])
    return result
