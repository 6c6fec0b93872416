"""Optimizers and the training step that `gpt2ipu bench train` measures and training runs.

`make_optimizer` gives the original's --optimizer choices (AdamW, Adam, LAMB) with weight decay on
matrices only (embeddings and projections; not biases or LayerNorm gains, as in the original and
in GPT-2 practice). AdamW/Adam use PyTorch's fused kernels where the device has them: one pass
over each parameter instead of a dozen elementwise ops, and no full-size temporaries.

`train_step` is one optimizer step over a list of micro-batches (gradient accumulation). When
nothing needs every gradient at once (one micro-batch, no clipping, no loss scaling, one process,
Adam/AdamW), it updates each parameter inside backward, as soon as that parameter's gradient is
complete, and frees the gradient there (`StepInBackward`).
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Sequence

import torch

from gpt2ipu.errors import UserError

OPTIMIZERS = ("adamw", "adam", "lamb")


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (dim >= 2), never vectors (biases, LayerNorm); tied weights counted once."""
    decay, no_decay = [], []
    for param in model.parameters():  # parameters() yields a tied tensor only once
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    kind: str = "adamw",
) -> torch.optim.Optimizer:
    kind = kind.lower()
    groups = parameter_groups(model, weight_decay)
    if kind in ("adamw", "adam"):
        cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
        return cls(groups, lr=lr, betas=betas, eps=eps, **_fastest_kernel(model))
    if kind == "lamb":
        return Lamb(groups, lr=lr, betas=betas, eps=eps)
    raise UserError(f"unknown optimizer {kind!r}: choose one of {', '.join(OPTIMIZERS)}")


def _fastest_kernel(model: torch.nn.Module) -> dict:
    """fused=True where PyTorch has the fused Adam kernel for these tensors (CPU and CUDA floats)."""
    params = list(model.parameters())
    fusable = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return {"fused": True} if fusable else {"foreach": True}


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al., 2019, "Large Batch Optimization for Deep Learning"), with bias correction.

    Written here because PyTorch has no LAMB and the packages that do (apex: CUDA only;
    torch-optimizer: unmaintained) are not worth a dependency for thirty lines. Each tensor's Adam
    update (weight decay included) is scaled by the trust ratio ||w|| / ||update||, taken as 1
    when either norm is zero.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(p.grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                m_hat = exp_avg / (1 - beta1 ** state["step"])
                v_hat = exp_avg_sq / (1 - beta2 ** state["step"])
                update = m_hat.div_(v_hat.sqrt_().add_(group["eps"]))
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                weight_norm, update_norm = p.norm(), update.norm()
                trust = torch.where((weight_norm > 0) & (update_norm > 0), weight_norm / update_norm, 1.0)
                p.sub_(update * (trust * group["lr"]))
        return loss


class StepInBackward:
    """Adam/AdamW's update of each parameter run inside backward, the moment its gradient is complete.

    PyTorch's recipe for this (`Tensor.register_post_accumulate_grad_hook`, as in its "optimizer
    step in backward" tutorial): the hook updates the parameter and drops its gradient, so the
    gradients of the whole model never exist at once. Their sum is what sits on a training step's
    memory peak at the end of backward (GPT-2 small: 497 MB of fp32 gradients). Each update is
    the optimizer's own `step()` over a one-parameter view of the parameter's group: the same
    kernel, hyperparameters (a scheduler's current lr included) and state entries as a full step,
    so checkpoints, schedulers and resume see no difference.

    Only for steps where nothing needs all gradients first: one micro-batch (no accumulation), no
    clipping (it needs the global norm before any update; the norm alone can still be measured
    here, as `grad_norm`), no fp16 loss scaling, no DDP/FSDP (their reducers own the gradients).
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.armed = False
        self.measure_norm = False
        self.sq_norm: torch.Tensor | None = None
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.register_post_accumulate_grad_hook(self._make_hook(group))

    def _make_hook(self, group: dict):
        def hook(param: torch.Tensor) -> None:
            if not self.armed:
                return
            if self.measure_norm:
                sq = param.grad.detach().float().square().sum()
                self.sq_norm = sq if self.sq_norm is None else self.sq_norm + sq
            groups = self.optimizer.param_groups
            self.optimizer.param_groups = [{**group, "params": [param]}]
            try:
                self.optimizer.step()
            finally:
                self.optimizer.param_groups = groups
            param.grad = None
        return hook

    @contextlib.contextmanager
    def during_backward(self, measure_norm: bool):
        self.armed, self.measure_norm, self.sq_norm = True, measure_norm, None
        try:
            yield
        finally:
            self.armed = False


def step_in_backward_for(optimizer: torch.optim.Optimizer) -> StepInBackward:
    """The optimizer's StepInBackward, its hooks registered on the first call."""
    stepper = getattr(optimizer, "_gpt2ipu_step_in_backward", None)
    if stepper is None:
        stepper = StepInBackward(optimizer)
        optimizer._gpt2ipu_step_in_backward = stepper
    return stepper


def can_step_in_backward(model, optimizer, n_micro_batches: int, max_grad_norm: float | None, scaler) -> bool:
    """Whether `train_step` may update parameters inside backward (see StepInBackward)."""
    no_clipping = max_grad_norm is None or max_grad_norm == float("inf")
    no_scaling = scaler is None or not scaler.is_enabled()   # training passes a disabled one unless fp16
    return (n_micro_batches == 1 and no_clipping and no_scaling and not hasattr(model, "no_sync")
            and type(optimizer) in (torch.optim.Adam, torch.optim.AdamW))


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]] | Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    loss_chunks: dict | None = None,
    autocast_dtype: torch.dtype | None = None,
    max_grad_norm: float | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, torch.Tensor | None]:
    """Forward and backward over each (input_ids, labels) micro-batch, then one optimizer step.

    The loss of each micro-batch is divided by their number (the mean over micro-batches, as the
    original's gradient accumulation). Under DDP, gradients are all-reduced on the last micro-batch
    only. With max_grad_norm (inf: measure only) the gradients are clipped to it and their norm
    before clipping is returned; a GradScaler (fp16) scales the loss and unscales before clipping.
    zero_grad(set_to_none=True): the next backward writes fresh gradients instead of adding to
    zeroed buffers, and the memory is free in between. Returns the mean loss and accuracy as
    device tensors (no host sync here) and the gradient norm (None without max_grad_norm).
    """
    micro_batches = list(micro_batches)
    loss_chunks = loss_chunks or {}
    device = next(model.parameters()).device
    stepper = (step_in_backward_for(optimizer)
               if can_step_in_backward(model, optimizer, len(micro_batches), max_grad_norm, scaler) else None)
    loss_sum = torch.zeros((), device=device)
    acc_sum = torch.zeros((), device=device)
    for i, (input_ids, labels) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss, accuracy, _ = model(input_ids, labels, **loss_chunks)
            scaled = loss / len(micro_batches)
            with stepper.during_backward(max_grad_norm is not None) if stepper else contextlib.nullcontext():
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum += loss.detach().float()
        acc_sum += accuracy.detach().float()
    grad_norm = None
    if stepper:
        if max_grad_norm is not None:
            grad_norm = stepper.sq_norm.sqrt() if stepper.sq_norm is not None else torch.zeros((), device=device)
    else:
        if max_grad_norm is not None:
            if scaler is not None:
                scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss_sum / len(micro_batches), "accuracy": acc_sum / len(micro_batches), "grad_norm": grad_norm}
