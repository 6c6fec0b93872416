"""Batch generation: a prompts file (text, or JSON lines) in, one JSON line per prompt out.

`generate` is what the target, rule and script `generate` run; `sampling.generate` is the
token-level loop it calls.
"""

from __future__ import annotations

import codecs
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from gpt2ipu.errors import UserError
from gpt2ipu.fsutil import parse_json_record
from gpt2ipu.generate import sampling
from gpt2ipu.generate.decode import use_decode_layout
from gpt2ipu.generate.sampling import SamplingConfig
from gpt2ipu.log import package_logger
from gpt2ipu.model.lowp import kernel_report
from gpt2ipu.pretrained import load_pretrained

log = package_logger(__name__)


def load_for_generation(model_dir, device: str = "auto", precision: str = "fp32", vocab_dir=None,
                        bpe_tokenizer=None, weights: str = "fp32"):
    """(model, tokenizer, device) ready for decoding; `weights` bf16 / int8: see gpt2ipu/model/lowp.py."""
    model, tokenizer, device_used = load_pretrained(model_dir, device, precision, vocab_dir, bpe_tokenizer, weights)
    use_decode_layout(model)
    if device_used.type == "cpu":
        log.info(f"generate: {weights} weights, {kernel_report(weights)}")
    return model, tokenizer, device_used


def stop_token_id(tokenizer, stop_token: str | None) -> int | None:
    """The id of `stop_token` (a single token, Python escapes allowed, e.g. "\\n"); None/"" = no stop token."""
    if stop_token is None or stop_token == "" or stop_token.lower() == "none":
        return None
    from gpt2ipu.data.tokenizer import EOT

    if stop_token == EOT:
        return tokenizer.eos_id
    text = codecs.decode(stop_token, "unicode_escape") if "\\" in stop_token else stop_token
    ids = tokenizer.encode(text)
    if len(ids) != 1:
        raise UserError(f"stop token {stop_token!r} is {len(ids)} tokens, not one; give a single token "
                        f"such as {EOT!r}, '\\n' or '.', or 'none'")
    return ids[0]


def prompt_ids(tokenizer, text: str, max_prompt_tokens: int) -> tuple[list[int], bool]:
    """(ids, truncated): an empty prompt is the EOS token (unconditional text); a long one keeps its end."""
    ids = tokenizer.encode(text) if text else [tokenizer.eos_id]
    if len(ids) > max_prompt_tokens:
        return ids[-max_prompt_tokens:], True
    return ids, False


def max_prompt_tokens(model, config: SamplingConfig) -> int:
    """Prompt tokens kept: the model's context less the new tokens, but at least half the context
    (beyond the context, generation slides its window; see `generate`)."""
    window = model.config.n_positions
    return max(window - config.max_new_tokens, window // 2, 1)


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts, one per line of a text file, or `{"prompt": ...}` per line of a .jsonl file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: prompts file not found")
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise UserError(f"{path}: not UTF-8 text (byte offset {err.start}, line {line}: {err.reason}); "
                        "save the prompts file as UTF-8") from None
    prompts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                prompts.append(parse_json_record(line, path, number, "prompt", "a prompt record")["prompt"])
            else:
                prompts.append(line.rstrip("\n"))
    if not prompts:
        raise UserError(f"{path}: no prompts (the file is empty)")
    return prompts


def generate_texts(model, tokenizer, prompts: Sequence[str], config: SamplingConfig, *,
                   batch_size: int = 8) -> list[dict[str, Any]]:
    """One record per prompt, in order; prompts of similar length are batched together."""
    limit = max_prompt_tokens(model, config)
    encoded = [prompt_ids(tokenizer, p, limit) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (len(encoded[i][0]), i))
    records: list[dict[str, Any] | None] = [None] * len(prompts)
    with tqdm(total=len(prompts), desc="generate", unit="prompt", file=sys.stderr, mininterval=1.0) as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            # Each prompt samples with seed + its index in the file, whatever batch it lands in.
            generations = sampling.generate(model, [encoded[i][0] for i in rows], config, pad_id=tokenizer.eos_id,
                                   seeds=[config.seed + i for i in rows], vocab_limit=tokenizer.vocab_size)
            for index, gen in zip(rows, generations):
                records[index] = {
                    "index": index, "prompt": prompts[index], "continuation": tokenizer.decode(gen.tokens),
                    "prompt_tokens": len(encoded[index][0]), "prompt_truncated": encoded[index][1],
                    "new_tokens": len(gen.tokens), "stopped_by": "stop_token" if gen.stopped else "max_new_tokens",
                    "token_ids": gen.tokens,
                }
            bar.update(len(rows))
    return records


def generate(model_dir: str | os.PathLike, prompts_path: str | os.PathLike, out: str | os.PathLike,
             config: SamplingConfig, *, stop_token: str | None = "<|endoftext|>", batch_size: int = 8,
             device: str = "auto", precision: str = "fp32", vocab_dir: str | None = None,
             bpe_tokenizer: str | None = None, provenance_path: str | os.PathLike | None = None,
             ops_dir: str | os.PathLike | None = None, weights: str = "fp32") -> dict[str, Any]:
    """Continue every prompt of `prompts_path`; write the JSON lines `out` (and provenance) atomically.

    ops_dir: build folder of the compiled ops, whose decode op speeds up CPU decoding
    (default: $GPT2IPU_OPS_DIR). weights: fp32, or bf16 / int8 matrices (gpt2ipu/model/lowp.py).
    """
    from gpt2ipu.fsutil import atomic_file
    from gpt2ipu.ops import OPS_DIR_ENV
    from gpt2ipu.provenance import write_provenance

    if ops_dir:
        os.environ[OPS_DIR_ENV] = str(ops_dir)
    started = time.perf_counter()
    prompts = read_prompts(prompts_path)
    config.check()
    model, tokenizer, device_used = load_for_generation(model_dir, device, precision, vocab_dir, bpe_tokenizer,
                                                        weights)
    config.stop_token_id = stop_token_id(tokenizer, stop_token)
    records = generate_texts(model, tokenizer, prompts, config, batch_size=batch_size)
    seconds = time.perf_counter() - started
    new_tokens = sum(r["new_tokens"] for r in records)
    figures = {"prompts": len(records), "new_tokens": new_tokens, "seconds": round(seconds, 3),
               "truncated_prompts": sum(r["prompt_truncated"] for r in records)}
    with atomic_file(out) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    params = {**asdict(config), "stop_token": stop_token, "batch_size": batch_size, "device": str(device_used),
              "precision": precision, "weights": weights, "tokenizer": tokenizer.name}
    out = Path(out)
    provenance_path = Path(provenance_path) if provenance_path else out.with_name(out.stem + ".provenance.json")
    write_provenance(provenance_path.parent, "generate", params, [model_dir, prompts_path], figures,
                     name=provenance_path.name)
    return figures
