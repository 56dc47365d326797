"""The module the training step runs: compiled if asked, then DDP or FSDP across ranks."""

from __future__ import annotations

import torch

from llmkernel.dist import DistInfo
from llmkernel.errors import ConfigError


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
            raise ConfigError("train.strategy: fsdp needs GPUs; use ddp on CPU")
        from torch.distributed.fsdp import fully_shard

        return fully_shard(module)
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [rank_info.local_rank] if rank_info.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)
