"""Distributed basics: a single process is the one-rank case, not a separate code path.

Under `torchrun --nproc-per-node N` the environment holds RANK/WORLD_SIZE/LOCAL_RANK; `init()` then starts
a process group (gloo on CPU, nccl on GPUs). Without them, everything here works for rank 0 of 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init() -> DistInfo:
    """Join the process group torchrun set up (if any) and pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world_size, local_rank, device)


def is_distributed() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place (a no-op on one rank) and return it."""
    if is_distributed():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s value of a picklable object, on every rank."""
    if not is_distributed():
        return obj
    holder = [obj]
    torch_dist.broadcast_object_list(holder, src=src)
    return holder[0]


def barrier() -> None:
    if is_distributed():
        torch_dist.barrier()


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)


def cleanup() -> None:
    if is_distributed():
        torch_dist.destroy_process_group()


def wrap_for_training(
    module: torch.nn.Module, strategy: str, rank_info: DistInfo, compile_module: bool = False
) -> torch.nn.Module:
    """`module` as the loop's forward pass runs it: compiled if asked (eager where compiling fails), then
    DDP or FSDP across ranks.

    `strategy` is TrainConfig.strategy (ddp or fsdp). One rank: the (compiled) module itself.
    """
    if compile_module:
        torch._dynamo.config.suppress_errors = True  # a compiler failure falls back to eager, with a warning
        module = torch.compile(module)
    if rank_info.world_size == 1:
        return module
    if strategy == "fsdp":
        if rank_info.device.type != "cuda":
            from llmkernel.errors import ConfigError

            raise ConfigError("train.strategy: fsdp needs GPUs; use ddp on CPU")
        from torch.distributed.fsdp import fully_shard

        return fully_shard(module)
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [rank_info.local_rank] if rank_info.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)
