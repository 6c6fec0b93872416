"""Pipeline parallelism: the original's --layers-per-ipu, one stage per process.

The original split GPT-2's layers over IPUs (`--layers-per-ipu 0 4 4 4`) and fed the pipeline
with the gradient-accumulation micro-batches. Here the same split makes `PipelineStage`s of
`torch.distributed.pipelining`, one per process along the mesh's `pp` dimension, driven by its
GPipe or 1F1B schedule; the micro-batches of one optimizer step are the gradient-accumulation
micro-batches, as the original fed them.

What each stage holds (`StageModule`, parameter names as in the whole GPT, so checkpoints of any
split name the same tensors):
  first stage   the token and position embeddings, then its blocks
  middle        its blocks
  last stage    its blocks, the final LayerNorm, the LM head and the chunked loss: the labels reach
                it as the schedule's keyword argument, so the [tokens, vocab] logits never exist
                and the loss is computed inside the stage's forward (where FSDP has the weights)

The tied embedding: the first stage holds `wte.weight`, the last a copy as `lm_head.weight`,
equal at the start (both initialised as `wte.weight`: gpt2ipu.model.gpt.fill_parameters). After each backward
`sync_tied_grads` sums the two gradients over the group of the first and last stage of each
replica, so both copies get the whole model's gradient and the same update: they stay equal,
bit for bit (Megatron keeps its embedding group the same way).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

from gpt2ipu.model.gpt import GPT, embed, lm_loss, run_block
from gpt2ipu.train.parallel import DistInfo, clip_grad_norm_, local_part


class StageModule(nn.Module):
    """One pipeline stage's share of a GPT (see the module docstring), with the GPT's parameter names."""

    def __init__(self, model: GPT, layers: range, first: bool, last: bool, loss_chunks: dict):
        super().__init__()
        self.config, self.first, self.last, self.loss_chunks = model.config, first, last, loss_chunks
        if first:
            self.wte, self.wpe, self.drop = model.wte, model.wpe, model.drop
        self.h = nn.ModuleDict({str(i): model.h[i] for i in layers})
        if last:
            self.ln_f = model.ln_f
            self.lm_head = model.lm_head
            if not first and model.config.tie_word_embeddings:
                # This stage's own copy of the tied weight (see the module docstring).
                self.lm_head = nn.Linear(model.config.n_embd, model.config.vocab_size, bias=False,
                                         device=model.wte.weight.device, dtype=model.wte.weight.dtype)
                with torch.no_grad():
                    self.lm_head.weight.copy_(model.wte.weight)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        """First stage: input_ids [B, T] -> hidden [B, T, C]; middle: hidden -> hidden; last: (loss, accuracy)."""
        if self.first:
            x = embed(self, x, None)   # [B, T, C], positions 0 .. T-1
        for block in self.h.values():
            x = run_block(block, x, recompute=self.config.recompute)   # [B, T, C]
        if not self.last:
            return x
        result = lm_loss(self.ln_f(x), self.lm_head.weight, labels, **self.loss_chunks)
        return result.loss, result.accuracy


@dataclass
class Pipeline:
    """This process's stage of the pipeline and the schedule that runs it."""

    info: DistInfo
    stage_module: StageModule         # this stage's layers
    module: nn.Module                 # the same, FSDP- or DDP-wrapped over the replicas (what runs)
    schedule: object                  # a torch.distributed.pipelining schedule
    n_microbatches: int
    tied_group: object = None         # the process group of the tied weight's two copies (tied_group)
    accuracies: list = field(default_factory=list)   # the last stage's, per micro-batch of the last step

    def train_step(self, optimizer: torch.optim.Optimizer, micro_batches, *, autocast_dtype: torch.dtype | None,
                   max_grad_norm: float | None) -> dict[str, torch.Tensor | None]:
        """One optimizer step of the whole pipeline: what optim.train_step is without stages.

        The schedule runs forward and backward over the micro-batches (the loss of each divided by
        their number: scale_grads), the tied weight's copies get their summed gradient, the
        gradients are clipped by their norm over every stage and shard, then this stage's
        parameters are updated.
        """
        loss, accuracy = self.run(micro_batches, autocast_dtype, train=True)
        sync_tied_grads(self.stage_module, self.info, self.tied_group)
        grad_norm = None
        if max_grad_norm is not None:
            counted = norm_parameters(self.stage_module, self.info)
            copy = [p for p in self.stage_module.parameters() if not any(p is q for q in counted)]
            grad_norm = clip_grad_norm_(counted, max_grad_norm, self.info, uncounted=copy)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"loss": loss, "accuracy": accuracy, "grad_norm": grad_norm}

    def loss_of(self, output, _target) -> torch.Tensor:
        """The schedule's loss function: the last stage's forward already computed the loss."""
        loss, accuracy = output
        self.accuracies.append(accuracy.detach())
        return loss

    def run(self, micro_batches, autocast_dtype: torch.dtype | None, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward (and with `train`, backward) over the step's micro-batches; (mean loss, mean accuracy)
        on the last stage, zeros elsewhere. Gradients are left in the stage's parameters."""
        inputs = torch.cat([ids for ids, _ in micro_batches])   # [n_micro * B, T]
        labels = torch.cat([lab for _, lab in micro_batches])
        args = (inputs,) if self.info.pp_rank == 0 else ()
        kwargs = {"labels": labels} if self.info.is_last_stage else {}
        target = labels if self.info.is_last_stage else None
        losses: list[torch.Tensor] = []
        self.accuracies = []
        device = inputs.device
        autocast = (contextlib.nullcontext() if autocast_dtype is None
                    else torch.autocast(device.type, dtype=autocast_dtype))
        with autocast:
            if train:
                self.schedule.step(*args, target=target, losses=losses, return_outputs=False, **kwargs)
            else:
                self.schedule.eval(*args, target=target, losses=losses, return_outputs=False, **kwargs)
        if not self.info.is_last_stage:
            zero = torch.zeros((), device=device)
            return zero, zero
        return torch.stack(losses).float().mean(), torch.stack(self.accuracies).float().mean()


def build_pipeline(model: GPT, info: DistInfo, layers: list[range], *, loss_chunks: dict, n_microbatches: int,
                   schedule: str, wrap) -> Pipeline:
    """This process's stage of `model` (split by `layers`), made real by `wrap` (which returns what
    runs: the stage on the device, FSDP- or DDP-wrapped over the replicas or not), with its
    schedule over `n_microbatches` micro-batches per step.

    `model` is normally on the meta device (loop.parallelize): the stage takes its modules without
    storage, and `wrap` materializes only them.
    """
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    first, last = info.pp_rank == 0, info.is_last_stage
    stage_module = StageModule(model, layers[info.pp_rank], first, last, loss_chunks)
    module = wrap(stage_module)
    stage = PipelineStage(module, info.pp_rank, info.pp_size, info.device, group=info.group("pp"))
    pipeline = Pipeline(info=info, stage_module=stage_module, module=module, schedule=None,
                        n_microbatches=n_microbatches, tied_group=tied_group(info))
    kind = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}[schedule]
    pipeline.schedule = kind(stage, n_microbatches=n_microbatches, loss_fn=pipeline.loss_of, scale_grads=True)
    return pipeline


def tied_group(info: DistInfo):
    """The process group of this replica's first and last stage (where the tied weight's copies are);
    created on every process (new_group is collective), None on the processes outside it."""
    mine = None
    for dp_rank in range(info.dp_size):
        ranks = [dp_rank, (info.pp_size - 1) * info.dp_size + dp_rank]   # rank = pp_rank * dp + dp_rank
        group = dist.new_group(ranks)
        if info.rank in ranks:
            mine = group
    return mine


def tied_weight(module: nn.Module, info: DistInfo) -> torch.Tensor | None:
    """This stage's copy of the tied embedding weight, if it holds one."""
    if not module.config.tie_word_embeddings:
        return None
    if info.pp_rank == 0:
        return module.wte.weight
    return module.lm_head.weight if info.is_last_stage else None


def sync_tied_grads(module: nn.Module, info: DistInfo, group) -> None:
    """Sum the tied weight's gradients of the first and last stage (see the module docstring)."""
    weight = tied_weight(module, info)
    if weight is None or group is None or weight.grad is None:
        return
    grad = local_part(weight.grad)
    dist.all_reduce(grad, group=group)


def norm_parameters(module: nn.Module, info: DistInfo) -> list[torch.Tensor]:
    """The stage's parameters counted in the global gradient norm: the tied weight's copy on the
    last stage is left out (the first stage counts it), so every weight counts once."""
    skip = module.lm_head.weight if info.is_last_stage and info.pp_size > 1 and module.config.tie_word_embeddings \
        else None
    return [p for p in module.parameters() if p is not skip]
