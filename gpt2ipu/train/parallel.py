"""Data parallelism and the process layout, applied as functions over a model (torchtitan style).

Launch is torchrun's job (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...): no home-made
launcher or collective layer here. The processes form a DeviceMesh with two dimensions, `pp`
(pipeline stages, gpt2ipu/train/pipeline.py) and `dp` (replicas), world = pp x dp; rank =
pp_rank * dp + dp_rank. What the original IPU flags become:

  --replication-factor N          -> dp = N replicas: DDP, or FSDP2 with --fsdp
  --replicated-tensor-sharding    -> optimizer state sharded over the replicas
                                     (torch.distributed.optim.ZeroRedundancyOptimizer, ZeRO-1),
                                     which is what the IPU feature sharded
  --fsdp                          -> parameters, gradients and optimizer state sharded over the
                                     replicas (`fully_shard` per block and on the root)
  --layers-per-ipu / --ipus-per-replica / --pipeline-stages
                                  -> pp stages, one per process (pipeline.py)
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from gpt2ipu.devices import resolve_device
from gpt2ipu.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run: its rank, device, and coordinates on the (pp, dp) mesh."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    dp_size: int = 1
    dp_rank: int = 0
    pp_size: int = 1
    pp_rank: int = 0
    mesh: object | None = None   # torch.distributed.device_mesh.DeviceMesh ("pp", "dp"); None for one process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_last_stage(self) -> bool:
        """Whether this process computes the loss (every process does without pipeline stages)."""
        return self.pp_rank == self.pp_size - 1

    def group(self, dim: str):
        """The process group of the mesh dimension `dim` ("pp" or "dp") this process is in."""
        return self.mesh[dim].get_group()


def world_size_launched() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(requested_device: str, dp: int, pp: int = 1, *, mesh_of_one: bool = False) -> DistInfo:
    """Join the process group torchrun set up (or run alone) and build the (pp, dp) mesh.

    The caller has checked that dp x pp processes were launched (train.config.check_layout).
    `mesh_of_one`: one process still gets a group and a 1 x 1 mesh (FSDP over one process: the
    same code and checkpoints as over many, e.g. the one-GPU smoke form of tools/gpu-check.sh).
    """
    world_size = world_size_launched()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(requested_device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size == 1 and not mesh_of_one:
        return DistInfo(rank=0, world_size=1, local_rank=local_rank, device=device)
    if world_size == 1 and not dist.is_initialized():   # no rendezvous to join: an in-memory store
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1, device_id=device if device.type == "cuda" else None)
    if not dist.is_initialized():
        check_restartable()
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (pp, dp), mesh_dim_names=("pp", "dp"))
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device, dp_size=dp,
                    dp_rank=mesh.get_local_rank("dp"), pp_size=pp, pp_rank=mesh.get_local_rank("pp"), mesh=mesh)


def check_restartable() -> None:
    """Refuse, before anything runs, a torchrun whose restarts could not rejoin.

    With the agent's store shared across restart rounds (torchrun's default, and always so with
    the static rendezvous), a restarted group finds the dead round's keys in it: gloo connects to
    the dead processes' addresses ("Connection refused" in connectFullMesh) or init_process_group
    waits for good (gpt2ipu/train/elastic.py, FRESH_STORE_ENV, has the whole story)."""
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if restarts > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise UserError(f"torchrun --max-restarts {restarts} needs a fresh store each restart: run torchrun "
                        "with --rdzv-backend c10d and the environment variable TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
                        "(or let `gpt2ipu train --nproc-per-node N --max-restarts K` start torchrun)")


def apply_data_parallel(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """DDP over the replicas (the `dp` dimension); the model as it is with one replica."""
    if info.dp_size == 1:
        return model
    return DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
                                   process_group=info.group("dp"))


def apply_fsdp(model: torch.nn.Module, blocks: Iterable[torch.nn.Module], info: DistInfo,
               param_dtype: torch.dtype | None) -> torch.nn.Module:
    """FSDP2 over the replicas: `fully_shard` on each transformer block, then on the root.

    Each block is its own unit so that only one block's full parameters exist at a time (gathered
    before its forward and backward, freed after); the root takes what is left (embeddings,
    final LayerNorm, LM head). param_dtype (bf16/fp16) is FSDP's mixed precision: the gathered
    parameters are cast for compute while the sharded fp32 ones are what the optimizer updates,
    and gradients are reduced in fp32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    mesh = info.mesh["dp"]
    if hasattr(model, "sparse_embedding_grad"):
        model.sparse_embedding_grad = False   # FSDP reduce-scatters dense gradients
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    return fully_shard(model, mesh=mesh, mp_policy=policy)


def compile_blocks(blocks: Iterable[torch.nn.Module]) -> None:
    """torch.compile each transformer block's forward, in place, before FSDP or a pipeline stage wraps it.

    As torchtitan does: the blocks are what is compiled (one graph each, the same code for all), while
    FSDP's all-gathers and the pipeline schedule's sends stay outside the graphs, in eager hooks.
    Compiling the forward rather than wrapping the module keeps the parameter names (checkpoints).
    """
    for block in blocks:
        block.forward = torch.compile(block.forward)


def materialize(module: torch.nn.Module, device: torch.device, value_of) -> None:
    """Give a module built on the meta device (and perhaps sharded: FSDP) real storage on `device`,
    then its values: `value_of(name, full_shape)` per parameter (gpt2ipu.model.gpt.fill_parameters),
    each process filling only what it holds."""
    from gpt2ipu.model.gpt import fill_parameters

    tied = getattr(module, "wte", None) is not None and getattr(module, "lm_head", None) is not None \
        and module.lm_head.weight is module.wte.weight
    module.to_empty(device=device)
    if tied and module.lm_head.weight is not module.wte.weight:
        module.lm_head.weight = module.wte.weight   # to_empty gave the tied weight's two users two tensors
    fill_parameters(module, value_of)


def apply_replicate(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """DDP's arithmetic (full copies, gradients averaged over the replicas) for a pipeline stage.

    DistributedDataParallel's reducer expects autograd's own backward and breaks under the
    pipeline schedule's per-micro-batch backward; PyTorch's `replicate` (DDP built on FSDP2's
    machinery, which the pipeline stages drive) is what its pipelining supports.
    """
    from torch.distributed._composable.replicate_with_fsdp import replicate

    return replicate(model, mesh=info.mesh["dp"])


def shard_optimizer(param_groups, optimizer_class, **defaults) -> torch.optim.Optimizer:
    """ZeRO-1: each replica keeps the optimizer state of its share of the parameters."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return ZeroRedundancyOptimizer(param_groups, optimizer_class=optimizer_class, **defaults)


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: a DTensor's local shard (FSDP), any other tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float, info: DistInfo,
                    uncounted: Iterable[torch.Tensor] = ()) -> torch.Tensor:
    """Clip the gradients of the whole model (all stages, all shards) to `max_norm`; their norm before.

    torch.nn.utils.clip_grad_norm_ sees only the tensors it is given: under pipeline stages each
    process holds some layers, and under FSDP a shard of each, so the squared norms are summed over
    the mesh first. `params` must hold each parameter once over the pipeline (a tied weight's
    second copy left out: pipeline.norm_parameters); `uncounted` (that copy) is scaled with them
    without counting, so both copies take the same update. The same arithmetic as PyTorch's: the
    gradients are scaled by min(1, max_norm / (norm + 1e-6)).
    """
    grads = [p.grad for p in params if p.grad is not None]
    local = [local_part(g) for g in grads]
    sq = torch.zeros((), device=info.device, dtype=torch.float32)
    for g in local:
        sq += g.detach().float().square().sum()
    local += [local_part(p.grad) for p in uncounted if p.grad is not None]
    if info.world_size > 1:
        sharded = any(p.is_shard() for g in grads for p in getattr(g, "placements", ()))
        if sharded and info.dp_size > 1:
            dist.all_reduce(sq, group=info.group("dp"))
        if info.pp_size > 1:
            dist.all_reduce(sq, group=info.group("pp"))
    norm = sq.sqrt()
    if max_norm != float("inf"):
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(local, scale)
    return norm


def mean_over_replicas(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean over the replicas of values the last pipeline stage holds (every process, without stages).

    Every process gets it: the others contribute zeros to a sum over the world.
    """
    if info.world_size == 1:
        return values
    values = values if info.is_last_stage else torch.zeros_like(values)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / info.dp_size


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
