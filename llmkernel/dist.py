"""Distributed basics: a single process is the one-rank case, not a separate code path.

Under `torchrun --nproc-per-node N` the environment holds RANK/WORLD_SIZE/LOCAL_RANK; `init()` then starts
a process group (gloo on CPU, nccl on GPUs). Without them, everything here works for rank 0 of 1.

The collectives (`all_reduce_sum`, `all_reduce_max`, `all_gather_object`, `broadcast_object`, `barrier`)
must be called by every rank in the same order; one rank skipping one leaves the others waiting forever.
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


def rank() -> int:
    """This process's rank (0 without torchrun)."""
    return torch_dist.get_rank() if is_distributed() else int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Whether this is rank 0, the one that writes files and prints."""
    return rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place (a no-op on one rank) and return it."""
    if is_distributed():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise maximum of `tensor` over ranks, in place (a no-op on one rank); returns it."""
    if is_distributed():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
    return tensor


def all_gather_object(obj) -> list:
    """Every rank's value of a picklable object, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    values = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(values, obj)
    return values


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
    if is_main():
        print(*args, **kwargs, flush=True)


def cleanup() -> None:
    """Leave the process group together: a rank that tears its gloo pairs down while another still
    talks on them aborts ("terminate called without an active exception"), so all wait first."""
    if is_distributed():
        torch_dist.barrier()
        torch_dist.destroy_process_group()
