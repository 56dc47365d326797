"""The module the training step runs (compiled if asked, then DDP or FSDP across ranks), and the collective
helpers every rank calls around it.

Collective means every rank calls it, in the same order: FSDP (`fully_shard`) keeps only a shard of each
parameter on each rank, so whole weights exist only while the ranks gather them together. A step that only
rank 0 takes (writing a file, say) must come after the gathering, never around it, or the other ranks wait
forever. With one process or DDP every helper here is a plain local operation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.tensor import DTensor

from llmkernel import dist
from llmkernel.dist import DistInfo


def wrap_for_training(
    module: torch.nn.Module, strategy: str, rank_info: DistInfo, compile_module: bool = False
) -> torch.nn.Module:
    """`module` as the loop's forward pass runs it: DDP or FSDP across ranks, compiled if asked (eager
    where compiling fails).

    `strategy` is TrainConfig.strategy (ddp or fsdp). One rank: the (compiled) module itself. FSDP shards
    `module` in place (its parameters become DTensor shards, gloo on CPU, nccl on GPUs) as one group: the
    optimizer state and gradients are split over the ranks, the weights gathered whole for each forward.
    """
    if rank_info.world_size > 1 and strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        fully_shard(module)  # before compiling, as the FSDP2 docs ask
        return _compiled(module) if compile_module else module
    if compile_module:
        module = _compiled(module)
    if rank_info.world_size == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [rank_info.local_rank] if rank_info.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def _compiled(module: torch.nn.Module) -> torch.nn.Module:
    torch._dynamo.config.suppress_errors = True  # a compiler failure falls back to eager, with a warning
    return torch.compile(module)


def _sharded_root(module: torch.nn.Module):
    """The FSDP module `module` is (or compiles), or None when nothing is sharded."""
    from torch.distributed.fsdp import FSDPModule

    module = getattr(module, "_orig_mod", module)  # torch.compile's wrapper
    return module if isinstance(module, FSDPModule) else None


@contextlib.contextmanager
def gradient_sync(train_module: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Inside: this micro-batch's backward reduces gradients over ranks only if `enabled` (the step's last
    micro-batch); the others accumulate locally. DDP's `no_sync`, FSDP's `set_requires_gradient_sync`."""
    from torch.nn.parallel import DistributedDataParallel

    sharded = _sharded_root(train_module)
    if sharded is not None:
        sharded.set_requires_gradient_sync(enabled)
        yield
    elif not enabled and isinstance(train_module, DistributedDataParallel):
        with train_module.no_sync():
            yield
    else:
        yield


@contextlib.contextmanager
def gathered(train_module: torch.nn.Module) -> Iterator[None]:
    """Inside: every parameter of `train_module` (and of the model it wraps) whole on every rank, so
    evaluation and generation run plain forward passes with no collectives of their own. Collective: every
    rank enters. Take state dicts outside it (FSDP re-shards for `state_dict()`): see `full_state_dict`."""
    sharded = _sharded_root(train_module)
    if sharded is None:
        yield
        return
    sharded.unshard()
    try:
        yield
    finally:
        sharded.reshard()


def full_state_dict(module: torch.nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The whole state of `module` as CPU tensors on rank 0, {} on the other ranks. Collective.

    `trainable_only`: only the parameters that require gradients (what fine-tuning changes; for LoRA a
    tiny share, so only those are gathered). On one process the full state's tensors are the module's own
    (not copies); the trainable ones are always copies. Tied weights stay one shared tensor, so a saver
    sees the tie (safetensors refuses aliases, Hugging Face drops the copy it re-ties on load).
    """
    if trainable_only:
        state = {}
        for name, parameter in module.named_parameters():
            if parameter.requires_grad:
                value = parameter.detach()
                value = value.full_tensor() if isinstance(value, DTensor) else value
                if dist.is_main():
                    state[name] = value.cpu().clone()
        return state
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(module, options=options)
    first_name: dict[int, str] = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        first = first_name.setdefault(id(parameter), name)
        if name in state and first in state:
            state[name] = state[first]
    return state


def load_full_state_dict(
    module: torch.nn.Module, state: dict[str, torch.Tensor], strict: bool = True
) -> None:
    """Load whole tensors into `module`; FSDP keeps each rank's shard. Collective: every rank passes the
    same full `state` (read from the same file). `strict=False` loads a subset (e.g. the trainable ones)."""
    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, strict=strict))


def gradient_norm(parameters: Iterable[torch.nn.Parameter], clip: float = 0.0) -> float:
    """The global L2 norm of the gradients, which are first clipped to `clip` when it is > 0. Collective
    under FSDP (each rank holds the gradients of its shards; their squared norms are summed)."""
    parameters = [p for p in parameters if p.grad is not None]
    if not parameters:
        return 0.0
    if clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(parameters, clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
