"""Causal self-attention for training decoders on full, unpadded windows.

`use_causal_attention(model, cpu_kernel)` switches a transformers decoder (on `sdpa`) to attention that
does two things the stock path leaves on the table:

* No materialised mask. Eager transformers passes no mask for unpadded causal windows, but under
  torch.compile (torch < 2.14, see transformers' `_ignore_causal_mask_sdpa`) it builds a
  (batch, 1, seq, seq) mask, so the attention kernel reads it and cannot skip the masked blocks.
  Our windows are never padded, so the mask function returns none for them (and transformers' own
  mask otherwise). Same losses; +3% tokens/s compiled on bench/pretrain.py's model.
* On CPU in fp32, our own kernel (`causal_attention.cpp`): one (batch, head) per task with its scores in
  L2 cache, instead of PyTorch's flash-attention tiles. bench/attention.py times whole compiled training
  steps with it and with the SDPA path above, in separate processes (alternating two models in one
  process hides the difference), on 2 cores: the `small` preset at batch 8 x window 512, 603 against
  674 ms and 701 against 776 ms per step in two runs (+10% over 7 rounds, every round faster);
  recipes/shakespeare-gpt.yaml's model at 16 x 256, +8% and +5% in two runs of 4 and 5 rounds, -6% in
  one of 3 (+6.5% over the 12 rounds, 8 faster). Attention forward and backward alone at that shape:
  64 against 88 ms per step. It is built with the C++ compiler torch.compile already needs and the
  `ninja` of the `kernel` extra (`pip install 'llmkernel[kernel]'`), once per machine (about 30 s,
  cached by torch under ~/.cache/torch_extensions), on x86-64 only. Without ninja, a compiler or an
  x86-64 CPU, or if the build fails, SDPA runs and the run's log says why in one line.

Anything else (padding masks, decoding with a KV cache, dropout, GPUs, bf16) goes to SDPA as before.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from types import ModuleType

import torch

from llmkernel.errors import first_line

CAUSAL_SDPA = "llmk_causal_sdpa"  # SDPA with is_causal, never a materialised mask for full windows
CAUSAL_CPU = "llmk_causal_cpu"  # our CPU kernel where it applies, CAUSAL_SDPA's path elsewhere
KERNEL_SOURCE = Path(__file__).with_name("causal_attention.cpp")
_kernel: ModuleType | None = None  # the built extension, once load_cpu_kernel succeeded
KERNEL_MACHINES = ("x86_64", "amd64")  # platform.machine() of the CPUs the kernel is built for
KERNEL_EXTRA = "pip install 'llmkernel[kernel]'"  # what brings ninja, torch's extension builder


def build_cpu_extension(name: str, source: Path, vector_flags: list[str] | None = None) -> ModuleType | str:
    """Build (or reuse torch's cached build of) one C++ CPU extension: the module, or one line saying why not.

    `vector_flags` default to the flags of PyTorch's own CPU capability (AVX-512 or AVX2). Shared by this
    kernel and models/weight_only_kernels.cpp.
    """
    machine = platform.machine()
    if machine.lower() not in KERNEL_MACHINES:  # the vector flags (and MKL's sgemm_) are x86-64's
        return f"it is for x86-64 CPUs, this one is {machine or 'unknown'}"
    try:
        import ninja  # torch's extension builder runs the `ninja` program; the package ships it
    except ImportError:
        return f"ninja is not installed ({KERNEL_EXTRA})"
    try:
        if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
        from torch.utils.cpp_extension import load

        if vector_flags is None:
            capability = torch.backends.cpu.get_cpu_capability()
            vector_flags = {
                "AVX512": [
                    "-DCPU_CAPABILITY_AVX512",
                    "-mavx512f",
                    "-mavx512bw",
                    "-mavx512vl",
                    "-mavx512dq",
                    "-mfma",
                ],
                "AVX2": ["-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma"],
            }.get(capability, [])
        return load(
            name, [str(source)], extra_cflags=["-O3", "-fopenmp", *vector_flags], extra_ldflags=["-fopenmp"]
        )
    except Exception as error:  # no compiler, no OpenMP, a BLAS without sgemm_: the caller falls back
        return f"{type(error).__name__}: {first_line(error)[:200]}"


def load_cpu_kernel() -> str | None:
    """Build (or reuse the cached build of) the CPU kernel. Returns None when loaded, else why not."""
    global _kernel
    if _kernel is not None:
        return None
    built = build_cpu_extension("llmk_causal_attention", KERNEL_SOURCE)
    if isinstance(built, str):
        return built
    _kernel = built
    return None


KEEP_PROBABILITIES_LIMIT = 4  # keep the forward's probabilities when they take at most 4x the queries' memory
BLOCK = 64  # query rows per block, kBlock in causal_attention.cpp


def probabilities_per_head(seq: int) -> int:
    """Floats one head's kept probabilities take: each block of query rows times the keys they see.

    Plain Python, so torch.compile traces it (the kernel computes the same to allocate them).
    """
    return sum(min(BLOCK, seq - first) * (first + min(BLOCK, seq - first)) for first in range(0, seq, BLOCK))


def keep_probabilities(seq: int, head_dim: int) -> bool:
    """Whether the backward should reuse the forward's probabilities rather than recompute them.

    Reusing saves one of the backward's five matrix products and its exponentials (attention 72 against
    85 ms per step on bench/pretrain.py's model) at the price of ~T^2 / 2 floats per head, so only short
    windows keep them: T=256 with head_dim 64 does (2.5x the queries' memory), T=512 does not.
    """
    return probabilities_per_head(seq) <= KEEP_PROBABILITIES_LIMIT * seq * head_dim


@torch.library.custom_op("llmk::causal_attention", mutates_args=())
def causal_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, keep_probabilities: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal attention of query (B, H, T, D) over key, value (B, KVH, T, D) in fp32 on CPU.

    Returns the output (B, H, T, D), laid out as (B, T, H, D), and for the backward the log-sum-exp of
    each score row (B, H, T) and, when keep_probabilities, the probabilities (an empty tensor if not).
    Opaque to torch.compile, which calls it as an external kernel.
    """
    assert _kernel is not None, "load_cpu_kernel() first"
    out, lse, kept = _kernel.forward(query, key, value, scale, keep_probabilities)
    return out, lse, kept


@causal_attention.register_fake
def _(query, key, value, scale, keep_probabilities):
    batch, heads, seq, dim = query.shape
    kept = (batch * heads if keep_probabilities else 0, probabilities_per_head(seq))
    return (
        query.new_empty(batch, seq, heads, dim).transpose(1, 2),
        query.new_empty(batch, heads, seq),
        query.new_empty(kept),
    )


@torch.library.custom_op("llmk::causal_attention_backward", mutates_args=())
def causal_attention_backward(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kept: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `causal_attention` for query, key and value, laid out (B, T, heads, D)."""
    assert _kernel is not None, "load_cpu_kernel() first"
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    grad_query, grad_key, grad_value = _kernel.backward(grad_out, query, key, value, out, lse, kept, scale)
    return grad_query, grad_key, grad_value


@causal_attention_backward.register_fake
def _(grad_out, query, key, value, out, lse, kept, scale):
    def like(tensor):
        batch, heads, seq, dim = tensor.shape
        return tensor.new_empty(batch, seq, heads, dim).transpose(1, 2)

    return like(query), like(key), like(value)


def _setup_context(ctx, inputs, output) -> None:
    query, key, value, scale, _ = inputs
    ctx.save_for_backward(query, key, value, *output)
    ctx.scale = scale


def _backward(ctx, grad_out, grad_lse, grad_kept):
    query, key, value, out, lse, kept = ctx.saved_tensors
    return *causal_attention_backward(grad_out, query, key, value, out, lse, kept, ctx.scale), None, None


causal_attention.register_autograd(_backward, setup_context=_setup_context)


def attention_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
):
    """transformers' attention signature: query (B, H, T, D), key/value (B, KVH, S, D) -> (B, T, H, D)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    if (
        _kernel is None
        or not causal
        or attention_mask is not None
        or query.device.type != "cpu"
        or query.dtype != torch.float32
        or query.shape[2] != key.shape[2]  # decoding with a KV cache
        or (dropout and module.training)
        or kwargs.get("sliding_window") is not None
        or kwargs.get("softcap") is not None
    ):
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    keep = torch.is_grad_enabled() and keep_probabilities(query.shape[2], query.shape[3])
    out, _, _ = causal_attention(query, key, value, scale, keep)
    return out.transpose(1, 2), None


def use_causal_attention(model: torch.nn.Module, cpu_kernel: bool) -> str:
    """Switch a decoder on `sdpa` to causal attention without a mask, on our CPU kernel when `cpu_kernel`.

    Returns a line for the run's log saying which attention runs. Models on another implementation
    (eager, flash_attention_2) are left as they are. If the kernel does not build, SDPA runs and the line
    says why.
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current not in ("sdpa", CAUSAL_SDPA, CAUSAL_CPU):
        return f"{current or 'the model'}'s own (not switched)"

    def mask(*args, **kwargs):
        unpadded_window = kwargs.get("attention_mask") is None and kwargs.get("q_length") == kwargs.get(
            "kv_length"
        )
        return None if unpadded_window and not args else sdpa_mask(*args, **kwargs)

    for name, function in ((CAUSAL_SDPA, sdpa_attention_forward), (CAUSAL_CPU, attention_forward)):
        AttentionInterface.register(name, function)
        AttentionMaskInterface.register(name, mask)
    name, note = CAUSAL_SDPA, "SDPA, causal without a mask"
    if cpu_kernel:
        problem = load_cpu_kernel()
        if problem:
            note += f" (the CPU attention kernel did not build: {problem})"
        else:
            name, note = CAUSAL_CPU, "llmk's fp32 CPU causal kernel (SDPA for masks and decoding)"
    model.set_attn_implementation(name)
    return note
