"""Optimizers and the one-process optimizer step (`train_step`), which `Run.step`
(gpt2ipu/train/loop.py) runs for training, `gpt2ipu profile` and `gpt2ipu bench train`.

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
import weakref
from collections.abc import Callable, Iterable, Sequence

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
    """The training optimizer named by `kind` (the original's --optimizer: adamw, adam, lamb) over `model`.

    Two parameter groups (`parameter_groups`): weight decay on matrices only, as in the original
    and GPT-2 practice. AdamW and Adam are PyTorch's, with the fused kernel where the device has
    one (`_fastest_kernel`): one pass over each parameter, no full-size temporaries; LAMB is
    `Lamb` below. A plain torch.optim.Optimizer either way, so schedulers and checkpoints
    (state_dict) take it as it is. An unknown kind is a UserError.
    """
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

    Why: the gradients of the whole model then never exist at once. Their sum is what sits on a
    training step's memory peak at the end of backward (GPT-2 small: 124 M fp32 gradients, 497 MB),
    so updating each parameter and dropping its gradient as soon as it is complete lowers the peak.

    How, on PyTorch's public API, as in its "optimizer step in backward" tutorial: a
    `Tensor.register_post_accumulate_grad_hook` per parameter, and one optimizer per parameter,
    of the training optimizer's class, built with that parameter's group options (so the same
    kernel: fused or foreach, the same betas, eps, weight decay). What the training optimizer's
    users see stays the training optimizer's, so checkpoints, schedulers and resume see no
    difference:

      * hyperparameters: before each update the parameter's group options are read again from
        `optimizer.param_groups` (a scheduler's current lr included; looked up by index, so a
        `load_state_dict`, which replaces the group dicts, is followed too);
      * state: the per-parameter optimizer updates the training optimizer's own
        `optimizer.state[param]` entry, lent to it for the one step and taken back
        (`_step_with_state_of`, the one place that relies on how `torch.optim` keeps state; the
        entry is passed by reference, never copied). `optimizer.state_dict()` is thus exactly
        the ordinary step's, in the same format;
      * `train_step` still calls `optimizer.step()` once after backward: every gradient is gone
        by then, so it updates nothing (PyTorch skips parameters whose grad is None), but an LR
        scheduler's "optimizer.step() before scheduler.step()" check and any step hooks see the
        one step per training step they expect.

    Bitwise equal to the ordinary step after backward (tests/test_optim.py): parameters,
    optimizer state and lr. Only for steps where nothing needs all gradients first: one
    micro-batch (no accumulation), no clipping (it needs the global norm before any update; the
    norm alone can still be measured here, as `grad_norm`), no fp16 loss scaling, no DDP/FSDP
    (their reducers own the gradients); `can_step_in_backward` checks that.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        # Weakly: the registry below maps the optimizer to this object, which must not keep it alive.
        self._optimizer = weakref.ref(optimizer)
        self.armed = False
        self.measure_norm = False
        self.sq_norm: torch.Tensor | None = None
        for index, group in enumerate(optimizer.param_groups):
            for param in group["params"]:
                single = type(optimizer)([{**_options(group), "params": [param]}])
                param.register_post_accumulate_grad_hook(self._make_hook(index, single))

    def _make_hook(self, index: int, single: torch.optim.Optimizer):
        def hook(param: torch.Tensor) -> None:
            optimizer = self._optimizer()
            if not self.armed or optimizer is None:
                return
            if self.measure_norm:
                sq = param.grad.detach().float().square().sum()
                self.sq_norm = sq if self.sq_norm is None else self.sq_norm + sq
            single.param_groups[0].update(_options(optimizer.param_groups[index]))
            _step_with_state_of(optimizer, single, param)
            param.grad = None
        return hook

    @contextlib.contextmanager
    def during_backward(self, measure_norm: bool):
        self.armed, self.measure_norm, self.sq_norm = True, measure_norm, None
        try:
            yield
        finally:
            self.armed = False


def _options(group: dict) -> dict:
    """A param group's options (lr, betas, eps, weight_decay, fused, ...): everything but its params."""
    return {key: value for key, value in group.items() if key != "params"}


def _step_with_state_of(optimizer: torch.optim.Optimizer, single: torch.optim.Optimizer,
                        param: torch.Tensor) -> None:
    """`single.step()` (an optimizer over `param` alone) on `optimizer`'s state entry for `param`.

    The seam with `torch.optim`'s internals: it relies on an optimizer keeping a parameter's
    state in `self.state[param]` (the mapping `state_dict()` saves and `load_state_dict()`
    replaces) and reading it there at each step. The entry is lent by reference and taken back
    after the step, whether the step filled it in place (PyTorch's Adam does) or stored a new
    dict; `single` keeps nothing between steps. tests/test_optim.py checks this against the
    installed PyTorch.
    """
    single.state[param] = optimizer.state[param]
    try:
        single.step()
    finally:
        optimizer.state[param] = single.state.pop(param)


# Each optimizer's StepInBackward, made on its first step in backward. Weak keys: an optimizer
# that is gone takes its entry with it.
_STEPPERS: weakref.WeakKeyDictionary[torch.optim.Optimizer, StepInBackward] = weakref.WeakKeyDictionary()


def step_in_backward_for(optimizer: torch.optim.Optimizer) -> StepInBackward:
    """The optimizer's StepInBackward, its hooks registered on the first call."""
    stepper = _STEPPERS.get(optimizer)
    if stepper is None:
        stepper = _STEPPERS[optimizer] = StepInBackward(optimizer)
    return stepper


def has_stepped_in_backward(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `train_step` has updated this optimizer's parameters inside backward (see StepInBackward)."""
    return optimizer in _STEPPERS


def can_step_in_backward(model, optimizer, n_micro_batches: int, max_grad_norm: float | None, scaler) -> bool:
    """Whether `train_step` may update parameters inside backward (see StepInBackward)."""
    no_clipping = max_grad_norm is None or max_grad_norm == float("inf")
    no_scaling = scaler is None or not scaler.is_enabled()   # training passes a disabled one unless fp16
    return (n_micro_batches == 1 and no_clipping and no_scaling and not reduces_gradients(model)
            and type(optimizer) in (torch.optim.Adam, torch.optim.AdamW))


def reduces_gradients(model: torch.nn.Module) -> bool:
    """Whether `model` is wrapped for data parallelism: DDP (`no_sync`) or FSDP2 (`set_requires_gradient_sync`)."""
    return hasattr(model, "no_sync") or hasattr(model, "set_requires_gradient_sync")


def gradient_sync(model: torch.nn.Module, enabled: bool):
    """A context in which DDP's backward all-reduces gradients only if `enabled` (the last micro-batch
    of a step: `no_sync` before). FSDP reduce-scatters every micro-batch: skipping it would keep
    the whole model's unsharded gradients between micro-batches, DDP's memory, which is what FSDP
    is there to avoid (measured: docs/parallel.md)."""
    return model.no_sync() if not enabled and hasattr(model, "no_sync") else contextlib.nullcontext()


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]] | Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    loss_chunks: dict | None = None,
    autocast_dtype: torch.dtype | None = None,
    max_grad_norm: float | None = None,
    scaler: torch.amp.GradScaler | None = None,
    clip_grad_norm: Callable[[Iterable[torch.Tensor], float], torch.Tensor] = torch.nn.utils.clip_grad_norm_,
) -> dict[str, torch.Tensor | None]:
    """Forward and backward over each (input_ids, labels) micro-batch, then one optimizer step.

    The loss of each micro-batch is divided by their number (the mean over micro-batches, as the
    original's gradient accumulation). Under DDP, gradients are all-reduced on the last micro-batch
    only; FSDP reduce-scatters each micro-batch's (`gradient_sync`). With max_grad_norm (inf:
    measure only) the gradients are clipped to it (by `clip_grad_norm`, PyTorch's unless the
    parameters are sharded: parallel.clip_grad_norm_) and their norm before clipping is returned; a
    GradScaler (fp16) scales the loss and unscales before clipping.
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
        with gradient_sync(model, last):
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
        optimizer.step()   # no gradient is left: updates nothing, but schedulers and step hooks see the step
    else:
        if max_grad_norm is not None:
            if scaler is not None:
                scaler.unscale_(optimizer)
            grad_norm = clip_grad_norm(model.parameters(), max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss_sum / len(micro_batches), "accuracy": acc_sum / len(micro_batches), "grad_norm": grad_norm}
