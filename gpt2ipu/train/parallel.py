"""Data parallelism, applied as functions over a model (torchtitan style).

Launch is torchrun's job (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...): no home-made
launcher here. What the original IPU flags become:
  --replication-factor N          -> N data-parallel processes, DDP (gloo on CPU, NCCL on CUDA)
  --replicated-tensor-sharding    -> optimizer state sharded over the replicas
                                     (torch.distributed.optim.ZeroRedundancyOptimizer, ZeRO-1),
                                     which is what the IPU feature sharded
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from gpt2ipu.devices import resolve_device
from gpt2ipu.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(requested_device: str, replication_factor: int) -> DistInfo:
    """Join the process group torchrun set up (or run alone), and check --replication-factor."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if replication_factor != world_size:
        raise UserError(
            f"--replication-factor {replication_factor} but {world_size} process(es) were launched: start "
            f"the run with `torchrun --nproc_per_node {replication_factor} -m gpt2ipu train ...` "
            "(the Snakemake rule does this from train.nproc_per_node / train.nnodes)"
        )
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(requested_device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def apply_data_parallel(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    if info.world_size == 1:
        return model
    return DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)


def shard_optimizer(param_groups, optimizer_class, **defaults) -> torch.optim.Optimizer:
    """ZeRO-1: each replica keeps the optimizer state of its share of the parameters."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return ZeroRedundancyOptimizer(param_groups, optimizer_class=optimizer_class, **defaults)


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world_size > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= info.world_size
    return value


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
