"""GPT-2 model sizes: the presets (the original's --model), and any size made from a preset by
replacing its n_layer, n_embd, n_head or n_positions, checked in one place (`model_size`).

Torch-free on purpose: the workflow checks every recipe and named size (config keys
`train.recipes`, `train.sizes`) when it starts, and importing torch there would cost every
`snakemake` call seconds. gpt2ipu.model builds the model from what `model_size` returns.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpt2ipu.errors import UserError

# (n_layer, n_embd, n_head): the original's --model choices.
PRESETS: dict[str, tuple[int, int, int]] = {
    "gpt2-test": (2, 64, 2),
    "gpt2": (12, 768, 12),
    "gpt2-medium": (24, 1024, 16),
    "gpt2-large": (36, 1280, 20),
    "gpt2-xl": (48, 1600, 25),
}
# The keys (training flags, recipe keys, config.json fields) that replace a preset's size.
SIZE_KEYS = ("n_layer", "n_embd", "n_head", "n_positions")


@dataclass(frozen=True)
class ModelSize:
    """The shape of one GPT-2: GPTConfig's (and config.json's) fields of the same names."""

    n_layer: int
    n_embd: int
    n_head: int
    n_positions: int


def model_size(preset: str, max_len: int, *, n_layer: int | None = None, n_embd: int | None = None,
               n_head: int | None = None, n_positions: int | None = None) -> ModelSize:
    """The size of preset `preset` with the given values in place of its own (None: the preset's;
    n_positions: `max_len`, the longest sample training feeds it).

    Every problem is found before one UserError lists them all, so a user fixes a size in one go.
    Each problem names the key and its flag, since the values come from flags, recipe keys and
    named sizes alike (callers add where they came from).
    """
    if preset not in PRESETS:
        raise UserError(f"unknown model preset {preset!r}: choose one of {', '.join(PRESETS)}")
    base_layer, base_embd, base_head = PRESETS[preset]
    given = {"n_layer": n_layer, "n_embd": n_embd, "n_head": n_head, "n_positions": n_positions}
    size = ModelSize(n_layer=base_layer if n_layer is None else n_layer,
                     n_embd=base_embd if n_embd is None else n_embd,
                     n_head=base_head if n_head is None else n_head,
                     n_positions=max_len if n_positions is None else n_positions)

    def named(key: str) -> str:   # "n_embd 100 (--n-embd)", or "n_embd 768 (preset gpt2's)"
        source = f"--{key.replace('_', '-')}" if given[key] is not None else (
            "--max-len" if key == "n_positions" else f"preset {preset}'s")
        return f"{key} {getattr(size, key)} ({source})"

    problems = [f"{named(key)} must be at least 1" for key in SIZE_KEYS if getattr(size, key) < 1]
    if size.n_embd >= 1 and size.n_head >= 1 and size.n_embd % size.n_head:
        # Attention splits the n_embd features evenly over the heads.
        lower = size.n_embd - size.n_embd % size.n_head
        upper = lower + size.n_head
        nearest = f"{lower} or {upper}" if lower else f"{upper}"
        problems.append(f"{named('n_embd')} is not a multiple of {named('n_head')}: each head takes n_embd / "
                        f"n_head features; use an n_embd of {nearest}, or an n_head that divides {size.n_embd}")
    if max_len >= 1 and 1 <= size.n_positions < max_len:
        problems.append(f"{named('n_positions')} is less than max_len {max_len} (--max-len): a sample's later "
                        f"tokens would have no position embedding; use n_positions >= {max_len}, or leave it out "
                        "(it is max_len then)")
    if problems:
        raise UserError("model size: " + "; ".join(problems))
    return size
