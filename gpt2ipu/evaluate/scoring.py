"""Batched teacher-forced scoring: the NLL and greedy correctness of chosen tokens of sequences.

A request is (tokens, first_target): every token from `first_target` on is scored given all
the tokens before it. Requests are sorted by length and run `batch_size` at a time, padded on the
right: under causal attention a real token never sees the padding after it, so no attention mask
is needed and each row computes exactly what it would alone. Only the hidden states of the
positions that predict a target go through the LM head (LAMBADA scores one word per passage,
WikiText windows score their last `stride` tokens), which saves most of the [tokens, vocab]
logits work; those logits are made in chunks so memory stays bounded. The log-softmax runs in
float64: in float32 a NLL near 10 nats carries rounding of about 1e-6, as large as the
differences worth reporting between runs, and the cost is small next to the forward pass.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

# Rows of logits made at once: 256 x 50257 in float64 is about 100 MB.
LOGIT_ROWS = 256


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


def _score_batch(model, requests, device) -> list[Scores]:
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
    hidden = model.hidden_states(ids)
    # The hidden state at t - 1 predicts the token at t.
    predictors = hidden[rows_t, cols_t - 1]
    targets = ids[rows_t, cols_t]
    nll_parts, correct_parts = [], []
    for start in range(0, len(targets), LOGIT_ROWS):
        logits = model.lm_head(predictors[start:start + LOGIT_ROWS])
        wanted = targets[start:start + LOGIT_ROWS]
        nll_parts.append(F.cross_entropy(logits.double(), wanted, reduction="none"))
        correct_parts.append(logits.argmax(-1) == wanted)
    nll = torch.cat(nll_parts).cpu().numpy()
    correct = torch.cat(correct_parts).cpu().numpy()
    bounds = np.cumsum([0, *counts])
    return [Scores(nll[a:b], correct[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
