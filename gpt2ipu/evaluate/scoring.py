"""Batched teacher-forced scoring: the NLL and greedy correctness of chosen tokens of sequences.

A request is (tokens, first_target): every token from `first_target` on is scored given all
the tokens before it. Requests are sorted by length and run `batch_size` at a time, padded on the
right: under causal attention a real token never sees the padding after it, so no attention mask
is needed and each row computes exactly what it would alone. Only the hidden states of the
positions that predict a target go through the LM head (LAMBADA scores one word per passage,
WikiText windows score their last `stride` tokens), which saves most of the [tokens, vocab]
logits work; those logits are made in chunks so memory stays bounded. The last token of a request
is not fed: it predicts nothing, so a request may hold one token more than the model's context
(lm-eval's requests do). The NLL is exact to float64 rounding where it matters and cheap where it
does not: -log p(target) = logsumexp(logits) - logit[target], with the target's logit taken in
float64 and the log-sum-exp's exponentials summed in float32 blocks whose partial sums are added
in float64 (a float64 log-softmax over the whole vocabulary at every position cost as much as a
third of a WikiText window's time, and a float32 one rounds a NLL near 10 nats by about 1e-6).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from gpt2ipu.model.lowp import LowpLinear

# Rows of logits made at once: 512 x 50304 in float32 is about 100 MB, one buffer reused.
LOGIT_ROWS = 512
# On CPU the fp32 product hidden @ W^T of GPT-2's 50257-row head ran at 0.6-0.7 of the matmul peak,
# and at the peak when the output's row stride and column count were multiples of 64
# (docs/measurements.md). So the logits go into a buffer whose rows are padded to a multiple of
# HEAD_COLUMN_MULTIPLE: the head's first multiple-of-64 rows in one product, the rest in a second,
# small one; only the real columns are read. No padded copy of the weights is made.
HEAD_COLUMN_MULTIPLE = 64
# Vocabulary columns whose exponentials are summed in float32 before the float64 sum: a float32
# sum of 4096 terms in [0, 1] rounds by far less than 1e-6 of it.
LSE_BLOCK = 4096


@dataclass
class Scores:
    nll: np.ndarray       # float64, one per target token
    correct: np.ndarray   # bool: the target is the model's argmax


def batches_by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Request indices, longest first, in groups of `batch_size`: little padding per batch."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.inference_mode()
def score_requests(model, requests: Sequence[tuple[Sequence[int], int]], *, batch_size: int = 8,
                   desc: str | None = None) -> list[Scores]:
    """Scores of `tokens[first_target:]` for each (tokens, first_target) request, in request order."""
    for tokens, first in requests:
        if not 1 <= first <= len(tokens):
            raise ValueError(f"first_target {first} out of range for a sequence of {len(tokens)} tokens")
    device = model.wte.weight.device
    results: list[Scores | None] = [None] * len(requests)
    groups = batches_by_length([len(t) for t, _ in requests], max(1, batch_size))
    with tqdm(total=len(requests), desc=desc, unit="seq", file=sys.stderr, disable=desc is None,
              mininterval=1.0) as bar:
        for group in groups:
            for index, scores in zip(group, _score_batch(model, [requests[i] for i in group], device)):
                results[index] = scores
            bar.update(len(group))
    return results


def target_nll_(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[target] per row, float64 (see the module doc for the precision).

    Works in place on float32 `logits` (they are scratch by then): a fresh [rows, vocab] tensor
    per step costs more in page faults than the arithmetic does."""
    logits = logits.float()
    target_logits = logits.gather(-1, targets[:, None]).squeeze(-1).double()
    return log_sum_exp_(logits) - target_logits


def log_sum_exp_(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp of each row of float32 `logits`, float64; overwrites them (see `target_nll_`)."""
    top = logits.amax(-1, keepdim=True)
    exps = logits.sub_(top).exp_()
    block_sums = [exps[:, i:i + LSE_BLOCK].sum(-1) for i in range(0, exps.shape[-1], LSE_BLOCK)]
    return top.squeeze(-1).double() + torch.stack(block_sums, -1).double().sum(-1).log()


class HeadLogits:
    """The LM head over blocks of rows (see HEAD_COLUMN_MULTIPLE). On CPU a call's logits live in
    one reused buffer: they are valid until the next call."""

    def __init__(self, model):
        self.head = model.lm_head
        self.weight = self.head.fp32_weight() if isinstance(self.head, LowpLinear) else self.head.weight
        self.buffer: torch.Tensor | None = None

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:   # rows [N, C] -> logits [N, V]
        plain = rows.device.type != "cpu" or rows.dtype != self.weight.dtype or self.head.bias is not None
        if plain or (torch.is_grad_enabled() and self.weight.requires_grad):   # out= has no autograd
            return self.head(rows)
        vocab = self.weight.shape[0]
        whole = vocab // HEAD_COLUMN_MULTIPLE * HEAD_COLUMN_MULTIPLE
        if self.buffer is None or len(self.buffer) < len(rows):
            self.buffer = torch.empty(len(rows), whole + (HEAD_COLUMN_MULTIPLE if whole < vocab else 0))
        logits = self.buffer[:len(rows), :vocab]
        if whole:
            torch.mm(rows, self.weight[:whole].t(), out=logits[:, :whole])
        if whole < vocab:
            torch.mm(rows, self.weight[whole:].t(), out=logits[:, whole:])
        return logits


def _score_batch(model, requests, device) -> list[Scores]:
    # Every token but the last is fed (the last predicts nothing); the targets are all the tokens.
    width = max(len(tokens) for tokens, _ in requests)
    ids = torch.zeros((len(requests), width), dtype=torch.long)
    rows, cols, counts = [], [], []
    for row, (tokens, first) in enumerate(requests):
        ids[row, :len(tokens)] = torch.as_tensor(tokens, dtype=torch.long)
        positions = range(first, len(tokens))
        rows.extend([row] * len(positions))
        cols.extend(positions)
        counts.append(len(positions))
    ids = ids.to(device)
    rows_t = torch.as_tensor(rows, device=device)
    cols_t = torch.as_tensor(cols, device=device)
    hidden = model.hidden_states(ids[:, :-1])
    # The hidden state at t - 1 predicts the token at t.
    predictors = hidden[rows_t, cols_t - 1]
    targets = ids[rows_t, cols_t]
    nll_parts, correct_parts = [], []
    head = HeadLogits(model)
    for start in range(0, len(targets), LOGIT_ROWS):
        logits = head(predictors[start:start + LOGIT_ROWS])
        wanted = targets[start:start + LOGIT_ROWS]
        correct_parts.append(logits.argmax(-1) == wanted)
        nll_parts.append(target_nll_(logits, wanted))   # overwrites the logits
    nll = torch.cat(nll_parts).cpu().numpy()
    correct = torch.cat(correct_parts).cpu().numpy()
    bounds = np.cumsum([0, *counts])
    return [Scores(nll[a:b], correct[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


# ----------------------------------------------------------------------------------------------
# Continuations of one shared prefix (multiple choice: HellaSwag's four endings of one context)

@torch.inference_mode()
def score_continuations(model, groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]], *,
                        batch_size: int = 8, desc: str | None = None) -> list[list[Scores]]:
    """Scores of every continuation of each (prefix, [continuation, ...]) group, each continuation
    scored given the prefix, as if `prefix + continuation` were one request; in group order.

    The prefix is computed once per group: a group is one packed row, the prefix followed by each
    continuation but its last token (which predicts nothing), with the positions each token
    would have alone and an attention mask that lets a continuation see the prefix and itself
    only. Rows are sorted by length and run `batch_size` at a time (right padding, which no real
    token sees). The hidden state of the prefix's last position, which predicts every
    continuation's first token, goes through the LM head once.
    """
    for prefix, continuations in groups:
        if not prefix or not continuations or not all(continuations):
            raise ValueError("a group needs a prefix and non-empty continuations")
    device = model.wte.weight.device
    results: list[list[Scores] | None] = [None] * len(groups)
    lengths = [len(p) + sum(len(c) - 1 for c in cs) for p, cs in groups]
    with tqdm(total=len(groups), desc=desc, unit="item", file=sys.stderr, disable=desc is None,
              mininterval=1.0) as bar:
        for batch in batches_by_length(lengths, max(1, batch_size)):
            for index, scores in zip(batch, _score_packed(model, [groups[i] for i in batch], device)):
                results[index] = scores
            bar.update(len(batch))
    return results


def _score_packed(model, groups, device) -> list[list[Scores]]:
    from gpt2ipu.model.gpt import embed, run_block

    width = max(len(p) + sum(len(c) - 1 for c in cs) for p, cs in groups)
    ids = torch.zeros((len(groups), width), dtype=torch.long)
    positions = torch.zeros((len(groups), width), dtype=torch.long)
    segments = torch.full((len(groups), width), -2, dtype=torch.long)   # -1 prefix, k continuation k, -2 padding
    rows, cols = [], []          # the positions whose hidden state predicts a target
    predictor, targets = [], []  # per target: index into (rows, cols), token
    counts = []                  # targets per continuation
    for row, (prefix, continuations) in enumerate(groups):
        p = len(prefix)
        ids[row, :p] = torch.as_tensor(prefix)
        positions[row, :p] = torch.arange(p)
        segments[row, :p] = -1
        rows.append(row)
        cols.append(p - 1)
        last_of_prefix = len(rows) - 1
        offset = p
        for k, continuation in enumerate(continuations):
            fed = len(continuation) - 1
            ids[row, offset:offset + fed] = torch.as_tensor(continuation[:-1])
            positions[row, offset:offset + fed] = torch.arange(p, p + fed)
            segments[row, offset:offset + fed] = k
            predictor.append(last_of_prefix)
            predictor.extend(range(len(rows), len(rows) + fed))
            rows.extend([row] * fed)
            cols.extend(range(offset, offset + fed))
            targets.extend(continuation)
            counts.append(len(continuation))
            offset += fed
    # A query sees the keys at or before it that are in the prefix or in its own continuation.
    # Padding sees the prefix and the padding before it (at least itself), and no real token sees it.
    keys, queries = segments[:, None, :], segments[:, :, None]
    causal = torch.ones((width, width), dtype=torch.bool).tril_()
    mask = (((keys == -1) | (keys == queries)) & causal)[:, None].to(device)   # [B, 1, T, T]
    x = embed(model, ids.to(device), positions.to(device))
    for block in model.h:
        x = run_block(block, x, mask)
    hidden = model.ln_f(x)
    predictors = hidden[torch.as_tensor(rows, device=device), torch.as_tensor(cols, device=device)]
    predictor_t = torch.as_tensor(predictor, device=device)
    targets_t = torch.as_tensor(targets, device=device)
    nll = torch.empty(len(targets), dtype=torch.float64, device=device)
    correct = torch.empty(len(targets), dtype=torch.bool, device=device)
    head = HeadLogits(model)
    for start in range(0, len(rows), LOGIT_ROWS):
        logits = head(predictors[start:start + LOGIT_ROWS])
        wanted = ((predictor_t >= start) & (predictor_t < start + LOGIT_ROWS)).nonzero().squeeze(-1)
        local = predictor_t[wanted] - start
        correct[wanted] = logits.argmax(-1)[local] == targets_t[wanted]
        logits = logits.float()
        target_logits = logits[local, targets_t[wanted]].double()
        nll[wanted] = log_sum_exp_(logits)[local] - target_logits   # overwrites the logits
    nll_np, correct_np = nll.cpu().numpy(), correct.cpu().numpy()
    bounds = np.cumsum([0, *counts])
    scores = [Scores(nll_np[a:b], correct_np[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    out, at = [], 0
    for _, continuations in groups:
        out.append(scores[at:at + len(continuations)])
        at += len(continuations)
    return out
