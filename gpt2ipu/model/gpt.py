"""GPT-2, nanoGPT style: the whole model reads top to bottom.

The architecture is exactly GPT-2's (pre-LayerNorm blocks, GELU with the tanh approximation that
Hugging Face calls "gelu_new", learned positions, LM head tied to the token embedding), so our
checkpoints load in `transformers.GPT2LMHeadModel` and the reverse (see gpt2ipu/model/hf.py).
Linear layers keep PyTorch's [out, in] layout; the checkpoint code transposes to and from
Hugging Face's Conv1D [in, out] layout.

Training-specific pieces (the original's IPU flags, translated):
  * `GPTConfig.recompute` -> activation checkpointing per block (`--recompute-checkpoint-every-layer`).
  * `forward(..., labels, vocab_chunks=, token_chunks=)` -> the loss is computed in chunks, so the
    [tokens, vocab] logits tensor never exists (`--embedding-serialization-factor`,
    `--enable-sequence-serialized`); see gpt2ipu/model/loss.py.

Entry points: `forward` (the training loss, an `LMLoss`), `logits`, `hidden_states` and
`new_cache` (evaluation and decoding). Shapes: B batch, T positions of this call, C = n_embd,
H = n_head, D = C // H, V = vocab_size.
"""

from __future__ import annotations

import hashlib
import math
import sys
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gpt2ipu.errors import UserError
from gpt2ipu.model import fused
from gpt2ipu.model.loss import IGNORE_INDEX, chunked_lm_loss
from gpt2ipu.model.memory import FeatureMajorMLP, TiedEmbedding, TiedGrad, recast_linear
from gpt2ipu.sizes import model_size


class LMLoss(NamedTuple):
    """What `GPT.forward` returns: the mean loss over the labels that count, their argmax accuracy, and their number."""

    loss: torch.Tensor
    accuracy: torch.Tensor
    tokens: torch.Tensor


class KVCache:
    """The keys and values of every layer's past positions, for decoding one token at a time.

    What: per layer, keys and values [B, H, length, D], updated in place. `GPT.new_cache()`
    makes one; each `GPT.logits(..., cache=)` / `hidden_states(..., cache=)` call appends its
    positions in place, so an old cache is not a snapshot.
    Why this way: a step writes its keys and values into spare room at the end (doubling the
    room when it is full) instead of concatenating them to the whole past, which copied every
    layer's cache at every generated token (measured: docs/design-measurements.md).
    """

    def __init__(self, n_layer: int, capacity: int = 0):
        """capacity: positions to make room for at the first append (a decoder that knows its
        prompt and output lengths allocates once, instead of doubling)."""
        self.keys: list[torch.Tensor | None] = [None] * n_layer
        self.values: list[torch.Tensor | None] = [None] * n_layer
        self.lengths = [0] * n_layer
        self.capacity = capacity

    @property
    def length(self) -> int:
        """Positions held (the past of the next step)."""
        return self.lengths[-1]

    def room(self, extra: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Every layer's key and value storage [B, H, capacity, D], grown so `extra` more positions fit.

        For a fused decode step that writes its keys and values itself; `advance` then counts them.
        """
        for layer in range(len(self.keys)):
            if self.keys[layer] is None:
                raise ValueError("KVCache.room: the cache is empty; run the prompt through the model first")
            self._grow(layer, self.lengths[layer] + extra)
        return list(self.keys), list(self.values)

    def advance(self, positions: int) -> None:
        """Count `positions` new positions written into `room()`'s storage in every layer."""
        self.lengths = [length + positions for length in self.lengths]

    def _grow(self, layer: int, needed: int) -> None:
        start, room = self.lengths[layer], self.keys[layer]
        if needed <= room.shape[2]:
            return
        capacity = max(needed, 2 * start)
        for store in (self.keys, self.values):
            grown = room.new_empty((*room.shape[:2], capacity, room.shape[3]))
            if start:
                grown[:, :, :start] = store[layer][:, :, :start]
            store[layer] = grown

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add this step's k, v [B, H, T, D] to `layer`; returns all its keys and values so far, [B, H, past + T, D]."""
        start, T = self.lengths[layer], k.shape[2]
        if self.keys[layer] is None:
            room = (*k.shape[:2], max(T, self.capacity), k.shape[3])
            self.keys[layer], self.values[layer] = k.new_empty(room), v.new_empty(room)
        self._grow(layer, start + T)
        self.keys[layer][:, :, start:start + T] = k
        self.values[layer][:, :, start:start + T] = v
        self.lengths[layer] = start + T
        return self.keys[layer][:, :, :start + T], self.values[layer][:, :, :start + T]


@dataclass
class GPTConfig:
    """A GPT-2 model's sizes and options: Hugging Face's GPT2Config fields (the names match, so
    config.json maps over; see gpt2ipu/model/hf.py) plus our two memory options for training."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    layer_norm_epsilon: float = 1e-5
    embd_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    recompute: bool = False  # activation checkpointing per block (--recompute-checkpoint-every-layer)
    # Recompute GELU in backward instead of keeping its output (memory.FeatureMajorMLP): the same
    # step time in fp32 and under bf16 autocast, and less memory (measured: docs/design-measurements.md).
    recompute_gelu: bool = True


def config_for(preset: str, max_len: int, vocab_size: int = 50257, *, n_layer: int | None = None,
               n_embd: int | None = None, n_head: int | None = None, n_positions: int | None = None,
               **overrides) -> GPTConfig:
    """The GPTConfig of a named preset (gpt2ipu.sizes.PRESETS), with room for `max_len` positions;
    n_layer, n_embd, n_head, n_positions replace the preset's (checked by gpt2ipu.sizes.model_size),
    `overrides` set the other fields."""
    size = model_size(preset, max_len, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions)
    return GPTConfig(vocab_size=vocab_size, **asdict(size), **overrides)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: each position attends to itself and the positions before it.

    One [C, 3C] projection for queries, keys and values together, PyTorch's
    scaled_dot_product_attention (which picks the best kernel it has for the device), then the
    output projection. Under autocast the projections keep no low-precision weight copy for
    backward (memory.recast_linear). When decoding, the keys and values of earlier positions
    come from a KVCache.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_pdrop = config.attn_pdrop
        self.resid_dropout = nn.Dropout(config.resid_pdrop) if config.resid_pdrop else nn.Identity()

    def forward(self, x, mask=None, cache: tuple[KVCache, int] | None = None):
        """cache: (the KV cache, this block's layer index) when decoding; it is updated in place."""
        B, T, C = x.shape   # [B, T, C]
        qkv = recast_linear(x, self.c_attn)   # [B, T, 3C]
        q, k, v = qkv.view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)   # each [B, H, T, D]
        if cache is not None:
            k, v = cache[0].append(cache[1], k, v)   # [B, H, past + T, D]
        y = F.scaled_dot_product_attention(   # [B, H, T, D]
            q, k, v,
            attn_mask=mask,
            dropout_p=self.attn_pdrop if self.training else 0.0,
            # Without an explicit mask the only case is plain causal attention over this window.
            is_causal=mask is None and k.shape[2] == T and T > 1,
        )
        y = y.transpose(1, 2).reshape(B, T, C)   # heads side by side again: [B, T, C]
        return self.resid_dropout(recast_linear(y, self.c_proj))   # [B, T, C]


class MLP(nn.Module):
    """The feed-forward half of a block: c_proj(gelu(c_fc(x))), widening to 4 * n_embd and back.

    Training (gradients on) with `recompute_gelu` goes through memory.FeatureMajorMLP, the same
    math in one autograd Function that keeps the hidden layer once instead of twice (GELU is
    recomputed in backward); otherwise the plain layers.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.resid_pdrop) if config.resid_pdrop else nn.Identity()
        self.recompute_gelu = config.recompute_gelu

    def forward(self, x):   # x [B, T, C]
        if self.recompute_gelu and torch.is_grad_enabled():
            y = FeatureMajorMLP.apply(x, self.c_fc.weight, self.c_fc.bias, self.c_proj.weight, self.c_proj.bias)
        else:
            y = fused.linear(fused.linear(x, self.c_fc, gelu=True), self.c_proj)   # [B, T, 4C] -> [B, T, C]
        return self.dropout(y)   # [B, T, C]


class Block(nn.Module):
    """One transformer layer, GPT-2's pre-LayerNorm form: x + attn(ln_1(x)), then x + mlp(ln_2(x)).

    The residual stream x keeps its shape [B, T, C] through every block.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, mask=None, cache=None):   # x [B, T, C]
        x = x + self.attn(self.ln_1(x), mask, cache)   # [B, T, C]
        x = x + self.mlp(self.ln_2(x))   # [B, T, C]
        return x


class GPT(nn.Module):
    """GPT-2: token and position embeddings, n_layer Blocks, a final LayerNorm, and an LM head
    (tied to the token embedding unless the config says otherwise).

    Four entry points, one kind of value each: `forward(input_ids, labels)` the training loss (an
    `LMLoss`; the module's forward so that DDP and other wrappers see the training computation),
    `logits` the next-token logits, `hidden_states` the final-LayerNorm outputs, `new_cache` an
    empty KVCache for decoding. Parameter names and initialisation are GPT-2's, so Hugging Face
    checkpoints map onto it name for name (gpt2ipu/model/hf.py).
    """

    def __init__(self, config: GPTConfig, seed: int | None = None):
        """seed: of the initial weights (`init_weights`); None draws one from torch's global RNG, so
        torch.manual_seed still decides them. Built under `torch.device("meta")` nothing is
        initialised: the caller materializes the share it holds (gpt2ipu/train/parallel.py)."""
        super().__init__()
        if config.n_embd % config.n_head:
            raise UserError(f"n_embd ({config.n_embd}) must be a multiple of n_head ({config.n_head})")
        self.config = config
        # The embeddings come uninitialised (`_weight`): init_weights or a checkpoint fills them.
        # nn.Embedding's own normal_ init would be wasted work, and on the meta device it imports
        # torch._dynamo and sympy (about 70 MB resident, 0.35 s) for nothing.
        self.wte = nn.Embedding(config.vocab_size, config.n_embd, _weight=torch.empty(config.vocab_size, config.n_embd))
        self.wpe = nn.Embedding(config.n_positions, config.n_embd,
                                _weight=torch.empty(config.n_positions, config.n_embd))
        self.drop = nn.Dropout(config.embd_pdrop) if config.embd_pdrop else nn.Identity()
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.wte.weight
        # Training's tied-weight gradient from the embedding: sparse (see hidden_states) unless a
        # wrapper that reduces gradients needs them dense (FSDP: gpt2ipu/train/parallel.py).
        self.sparse_embedding_grad = True
        if self.wte.weight.device.type != "meta":   # a meta model is filled later, share by share
            init_weights(self, int(torch.randint(0, 2**62, ()).item()) if seed is None else seed)

    def num_parameters(self, exclude_positions: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if exclude_positions else n

    def new_cache(self, capacity: int = 0) -> KVCache:
        """An empty key/value cache for `hidden_states`/`logits(..., cache=)` (decoding), with room
        for `capacity` positions once the first call fills it (it grows past that as needed)."""
        return KVCache(len(self.h), capacity)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        *,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        tied: TiedGrad | None = None,
    ) -> torch.Tensor:
        """Final-LayerNorm outputs [B, T, n_embd] of input_ids [B, T].

        cache: keys and values of the positions before input_ids (see `new_cache`); this call
        appends its own in place, so the next call passes the same cache with the next tokens.
        attention_mask ([B, past + T], 1 = real token, 0 = padding) supports left-padded batches;
        positions then count real tokens only, as in Hugging Face's generate().
        tied: the chunked loss's gradient buffer for the tied embedding (see `forward`).
        """
        B, T = input_ids.shape   # [B, T]
        past_len = 0 if cache is None else cache.length
        plain = position_ids is None and attention_mask is None and past_len == 0   # 0 .. T-1: `embed` takes None
        if position_ids is None:
            position_ids = _positions(attention_mask, past_len, T, input_ids.device)
        if past_len + T > self.config.n_positions and position_ids.max() >= self.config.n_positions:
            raise UserError(
                f"sequence of {past_len + T} tokens is longer than the model's n_positions "
                f"({self.config.n_positions})"
            )
        # A sparse gradient for a tied weight (this batch's rows only) rather than a second dense
        # [V, d] one for the LM head's to meet; not when sharded (FSDP reduces dense gradients).
        sparse = self.config.tie_word_embeddings and self.sparse_embedding_grad
        x = embed(self, input_ids, None if plain else position_ids, tied=tied, sparse=sparse)   # [B, T, C]
        mask = _attention_mask(attention_mask, past_len, T, input_ids.device)   # [B or 1, 1, T, past + T] or None
        for i, block in enumerate(self.h):
            x = run_block(block, x, mask, None if cache is None else (cache, i), self.config.recompute)   # [B, T, C]
        return self.ln_f(x)   # [B, T, C]

    def logits(
        self,
        input_ids: torch.Tensor,
        *,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Next-token logits [B, T, vocab] of input_ids [B, T] (arguments as in `hidden_states`)."""
        hidden = self.hidden_states(input_ids, cache=cache, attention_mask=attention_mask, position_ids=position_ids)
        return self.lm_head(hidden)   # [B, T, C] -> [B, T, V]

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, *, vocab_chunks: int = 1,
                token_chunks: int = 1) -> LMLoss:
        """The training loss of input_ids [B, T] against labels [B, T], as an `LMLoss`.

        Labels are already shifted (labels[t] follows input_ids[t]); -100 marks a label to ignore.
        With vocab_chunks or token_chunks > 1 the [B*T, vocab] logits never exist whole (see
        gpt2ipu/model/loss.py). This is the module's forward so that DDP and other wrappers,
        which hook forward, see the training computation.
        """
        chunked = max(vocab_chunks, token_chunks) > 1
        tied = TiedGrad() if chunked and self.config.tie_word_embeddings and self.wte.weight.requires_grad \
            and torch.is_grad_enabled() and not torch.compiler.is_compiling() else None
        hidden = self.hidden_states(input_ids, tied=tied)   # [B, T, C]
        return lm_loss(hidden, self.lm_head.weight, labels, vocab_chunks=vocab_chunks, token_chunks=token_chunks,
                       tied=tied)


# Initialisation: each parameter's initial value is a pure function of (seed, its name), so a
# process that holds only some parameters, or only a shard of one (FSDP, pipeline stages), makes
# exactly the values one process would, without building the rest of the model.

def init_weights(module: nn.Module, seed: int) -> None:
    """Fill every parameter of `module` (a GPT, or a share of one with the GPT's parameter names)
    with its initial value (`initial_value`); an FSDP-sharded parameter (DTensor) gets its shard."""
    config = module.config
    fill_parameters(module, lambda name, shape: initial_value(name, shape, config, seed))


def initial_value(name: str, shape: tuple[int, ...], config: GPTConfig, seed: int) -> torch.Tensor:
    """GPT-2's init of parameter `name` (a GPT's name): N(0, initializer_range) for Linear and
    Embedding weights, with the residual projections (c_proj) scaled by 1/sqrt(2 * n_layer) as
    they add up over depth; biases 0; LayerNorm weights 1. Drawn on the CPU from a generator seeded
    by (seed, name), so the value does not depend on the device, the layout or the order of building."""
    leaf = name.rsplit(".", 2)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    if leaf[-2].startswith("ln_"):
        return torch.ones(shape)
    std = config.initializer_range
    if name.endswith("c_proj.weight"):
        std /= math.sqrt(2 * config.n_layer)
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.empty(shape).normal_(0.0, std, generator=generator)


def fill_parameters(module: nn.Module, value_of) -> None:
    """Copy `value_of(name, full_shape)` (a full CPU tensor) into each parameter of `module`, one at a
    time: a DTensor gets only its local shard. A tied weight is filled once; the last pipeline
    stage's own copy of it (`lm_head.weight`, not tied there) is filled as `wte.weight`."""
    # Not imported here (seconds at every start): a parameter is a DTensor only once FSDP imported it.
    dtensor = sys.modules.get("torch.distributed.tensor")
    tied = module.config.tie_word_embeddings
    with torch.no_grad():
        for name, param in module.named_parameters():
            full = value_of("wte.weight" if tied and name == "lm_head.weight" else name, tuple(param.shape))
            if dtensor is not None and isinstance(param, dtensor.DTensor):
                # src_data_rank=None: every process has the full value; each keeps its shard, no communication.
                share = dtensor.distribute_tensor(full.to(param.device, param.dtype), param.device_mesh,
                                                  param.placements, src_data_rank=None)
                param.to_local().copy_(share.to_local())
            else:
                param.copy_(full)


# The pieces of a forward pass that a pipeline stage (gpt2ipu/train/pipeline.py) also runs on its
# share of the model: the embedding, one block, the LM-head loss.

def embed(model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor | None, *,
          tied: TiedGrad | None = None, sparse: bool = False) -> torch.Tensor:
    """Token plus position embeddings of input_ids [B, T] (model's `wte`, `wpe`, `drop`), [B, T, C].

    position_ids [B or 1, T], or None for 0 .. T-1 (training): then the first T rows of the
    position table are added as they are, and their gradient is the batch's sum, written; a
    lookup's backward zero-fills an [n_positions, C] gradient and adds every row into it.
    tied: the chunked loss's gradient buffer for a tied weight (the lookup's backward completes it);
    sparse: a sparse weight gradient otherwise (not under torch.compile, which has no sparse tensors).
    """
    if tied is not None:
        tokens = TiedEmbedding.apply(input_ids, model.wte.weight, tied)   # [B, T, C]
    elif not isinstance(model.wte, nn.Embedding):   # low-precision weights (gpt2ipu/model/lowp.py)
        tokens = model.wte(input_ids)
    else:
        tokens = F.embedding(input_ids, model.wte.weight, sparse=sparse and not torch.compiler.is_compiling())
    if position_ids is None:
        table = model.wpe.weight
        positions = table if input_ids.shape[1] == table.shape[0] else table[:input_ids.shape[1]]   # [T, C]
    else:
        positions = model.wpe(position_ids)   # [B or 1, T, C]
    return model.drop(tokens + positions)   # [B, T, C]


def run_block(block: Block, x: torch.Tensor, mask=None, cache=None, recompute: bool = False) -> torch.Tensor:
    """One block on x [B, T, C]; with `recompute`, when training, its activations are recomputed in backward."""
    if recompute and block.training and torch.is_grad_enabled():
        return checkpoint(block, x, mask, cache, use_reentrant=False)
    return block(x, mask, cache)


def lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, vocab_chunks: int = 1,
            token_chunks: int = 1, tied: TiedGrad | None = None) -> LMLoss:
    """The LM-head loss of final hidden states [B, T, C] against labels [B, T] (weight [V, C]), as an `LMLoss`."""
    loss, accuracy = chunked_lm_loss(   # scalars: the mean over counted labels
        hidden.reshape(-1, hidden.shape[-1]),   # [B*T, C]
        weight,   # [V, C]
        labels.reshape(-1),   # [B*T]
        vocab_chunks=vocab_chunks,
        token_chunks=token_chunks,
        tied=tied,
    )
    return LMLoss(loss, accuracy, (labels != IGNORE_INDEX).sum())


def _positions(attention_mask, past_len: int, T: int, device) -> torch.Tensor:
    if attention_mask is None:
        return torch.arange(past_len, past_len + T, device=device).unsqueeze(0)
    # Left padding: a sample's first real token is position 0; padding gets a harmless 0.
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp_(min=0)[:, -T:]


def _attention_mask(attention_mask, past_len: int, T: int, device) -> torch.Tensor | None:
    """Boolean [B or 1, 1, T, past + T] mask for SDPA, or None when plain causal attention will do."""
    if attention_mask is None and (past_len == 0 or T == 1):
        return None
    total = past_len + T
    query_pos = torch.arange(past_len, total, device=device).unsqueeze(1)
    allowed = torch.arange(total, device=device).unsqueeze(0) <= query_pos
    allowed = allowed[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
        # A padding query would see no key at all, and SDPA turns an empty row into NaN, which
        # would then leak through 0 * NaN; let every query see itself.
        allowed = allowed | (torch.arange(total, device=device).unsqueeze(0) == query_pos)[None, None]
    return allowed
