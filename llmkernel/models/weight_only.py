"""Weight-only int8 and int4 linear layers for decoders, stored in the layout our C++ kernel reads.

Decoding at batch 1 is bound by the bytes of weight read per token, so smaller weights decode faster, and
the weights alone are quantized ahead of time (fbgemm's dynamic int8, one activation scale per call,
drifts on SmolLM2's activation outliers: see serve/quantize.py).

* int4 (`bits=4`): one group of `group_size` weights along the input shares an fp16 scale and minimum,
  w ~= q * scale + minimum with q in 0..15 (min/max per group, llama.cpp's Q4_1 grid). `packed_weight`
  [out, in / 2] uint8 holds, per 32 weights, 16 bytes with q[j] in the low nibble of byte j and q[j + 16]
  in its high nibble (Q4_1's order); `scales` [out, in / group_size, 2] fp16 (scale, minimum).
* int8 (`bits=8`): [out, in] int8 and one bf16 scale per output row (symmetric, max|w| / 127).

`weight_only_kernels.cpp` (built once per machine like models/attention.py's kernel, ~30 s; `load_kernel`)
multiplies in llama.cpp's style: fp32 activations are rounded to int8 per block of 32 (one scale each),
each block's dot product is one or two AVX-512 VNNI `vpdpbusd` (unsigned weights x signed activations;
AVX2's maddubs where there is no VNNI), scaled in fp32 per block, 4 weight rows x up to 4 activation rows
per tile, rows split over threads. It takes fp32 in and gives fp32 out, so no bf16 conversions remain.
Without it (no ninja/compiler, not x86-64, no AVX2) the product is x times the dequantized fp32 weight.
Loading a saved model is a read: the state dict holds exactly the kernel's tensors (`prepare_weight_only`
builds empty shells, `load_state_dict` fills them). Folders quantized before this layout (int4 only: the
int4pack layout of `aten._weight_int4pack_mm_for_cpu`) fail to load with a shape error: requantize them.

Measured (PyTorch 2.13, this 2-core AVX-512 Zen 4 machine, shared with other jobs; 1 thread): all the
matrix products of one SmolLM2-135M decode step (30 layers + the int8 vocab projection, weights not
cache-resident; median of 6 rounds, `bench/weight_only_kernels.py`'s shapes), against the aten kernels
this module used before (bf16 activations):

    kernel                      batch 1              batch 4    batch 16
    int4 g32, ours              4.9 ms (4.6-5.6)     8.4 ms     33 ms
    int8, ours                  5.2 ms (5.2-5.5)     8.5 ms     34 ms
    int4 g32, int4pack (aten)   7.9 ms               16 ms      50 ms
    int8, int8pack (aten)       14.6 ms              20 ms      68 ms

Ours streams ~21 GB/s (int4) and ~26-34 GB/s (int8; the int4 unpacking makes int4 compute-bound); a
512-bit int4 variant (4 blocks per step) took twice as long and was dropped. A whole decode step of
`LlamaDecoder` (its layers in one C++ call, serve/decoder.py) takes 6.1 ms int4 (164 steps/s, was 89.7)
and 7.7 ms int8 (129, was 64.8). Beside llama-cpp-python 0.3.36 (bench/decoders.py `race`, same process,
1 thread, 32 new tokens after a ~40-token chat prompt, alternating rounds, on a busy machine where
llama.cpp ran at about 60% of its quiet speed): int4 g32 86 tok/s (76-106) against Q4_0's 95 (85-106),
per-round ratio 0.92 (0.80-1.05), and in a second run 75 (65-104) against 96 (84-121), 0.81 (0.64-1.09);
int8 81 (73-89) against Q8_0's 64 (59-73), ratio 1.22 (1.08-1.50), then 84 against 62, 1.38 (1.11-1.51).
So int8 beats llama.cpp; int4 is at 0.8-0.9 of it, the prompt's prefill being part of the gap (our
kernel at 40 rows costs ~2 ms a row, llama.cpp's batched GEMM much less).

Perplexity (`llmk quantize --measure.eval` on the last 20,000 characters of Tiny Shakespeare, SmolLM2-135M
converted from the shipped Q4_1 GGUF, so its weights lie on a 4-bit grid of 32-groups, which flatters g32):
fp32 32.34; int4 g32 with the int8 head 32.49 (+0.45%, greedy agreement 0.94); int8 32.56 (+0.69%,
agreement 0.5). Before (aten kernels, bf16 activations, a different windowing: fp32 36.87): int8 +0.7%,
int4 g32 with the int8 head +0.3% (int4 head +5.0%), int4 g64 with the int8 head +30%.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from llmkernel.models.attention import build_cpu_extension

BITS = (4, 8)
INT4_GROUP_SIZES = (32, 64, 128, 256)  # multiples of the kernel's 32-weight blocks
BLOCK = 32  # activations per int8 scale in the kernel; int4 weights per 16 packed bytes
HEAD_BITS = 8  # the LM head of an int4 model, as llama.cpp's Q4_0 keeps its output tensor at 8 bits
KERNEL_SOURCE = Path(__file__).with_name("weight_only_kernels.cpp")
_kernel: ModuleType | str | None = None  # the built extension, or why it did not build; None: not tried
log = logging.getLogger(__name__)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"avx2", "fma"} if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else set()


def load_kernel() -> str | None:
    """Build (once per machine, ~30 s) or reuse the CPU kernel; None when loaded, else one line saying why not.

    Without it (no ninja or compiler, no AVX2, not x86-64) `WeightOnlyLinear` multiplies by the dequantized
    weight in fp32 (correct, about as fast as fp32 weights)."""
    global _kernel
    if _kernel is None:
        flags = _cpu_flags()
        if platform.machine().lower() in ("x86_64", "amd64") and not {"avx2", "fma"} <= flags:
            _kernel = "the weight-only kernel needs AVX2 and FMA"
        elif {"avx512_vnni", "avx512vl", "avx512bw", "avx512f"} <= flags:
            vnni = [
                "-DLLMK_VNNI",
                "-mavx512f",
                "-mavx512bw",
                "-mavx512vl",
                "-mavx512vnni",
                "-mavx2",
                "-mfma",
                "-mf16c",
            ]
            _kernel = build_cpu_extension("llmk_weight_only_vnni", KERNEL_SOURCE, vnni)
        else:
            _kernel = build_cpu_extension(
                "llmk_weight_only_avx2", KERNEL_SOURCE, ["-mavx2", "-mfma", "-mf16c"]
            )
        if isinstance(_kernel, str):
            log.info("weight-only kernel not built (%s): dequantized fp32 products instead", _kernel)
    return _kernel if isinstance(_kernel, str) else None


def kernel() -> ModuleType | None:
    """The built extension, or None where it does not build."""
    return None if load_kernel() else _kernel


def check_weight_only(
    name: str, in_features: int, out_features: int, bits: int, group_size: int | None
) -> None:
    """Raise a ValueError naming the layer and the setting when `bits`/`group_size` cannot pack this layer."""
    if bits not in BITS:
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if bits == 8:  # one scale per output row, group_size is unused
        return
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size!r}")
    if in_features % group_size:
        raise ValueError(
            f"{name}: group_size {group_size} does not divide in_features {in_features}; pick a group size "
            f"among {[g for g in INT4_GROUP_SIZES if in_features % g == 0] or 'none'} or skip this layer"
        )


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (packed [out, in / 2] uint8, scales and minima [out, in / group_size, 2] fp16).

    w ~= q * scale + minimum with q in 0..15 (min/max per group, llama.cpp's Q4_1 grid). Per 32 weights,
    16 bytes: byte j holds q[j] in its low nibble and q[j + 16] in its high nibble (Q4_1's order)."""
    out_features, in_features = weight.shape
    groups = weight.detach().float().reshape(out_features, in_features // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # [out, groups]
    # Scale and minimum are rounded to fp16 first and q is computed against the rounded values, so the
    # kernel's dequantization reproduces exactly the grid q was rounded to.
    scale = ((high - low) / 15).clamp(min=2**-24).half()
    minimum = low.half()
    q = ((groups - minimum.float()[..., None]) / scale.float()[..., None]).round().clamp(0, 15)
    q = q.to(torch.uint8).reshape(out_features, in_features // BLOCK, 2, BLOCK // 2)
    packed = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(out_features, in_features // 2)
    return packed.contiguous(), torch.stack([scale, minimum], dim=-1).contiguous()


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """`quantize_int4`'s output back to [out, in] fp32 (the grid the kernel multiplies by)."""
    out_features, in_features = packed.shape[0], packed.shape[1] * 2
    blocks = packed.reshape(out_features, in_features // BLOCK, BLOCK // 2)
    q = torch.cat([blocks & 15, blocks >> 4], dim=-1).float()  # [out, blocks, 32]
    groups = q.reshape(out_features, scales.shape[1], -1)
    scales = scales.float()
    return (groups * scales[..., :1] + scales[..., 1:]).reshape(out_features, in_features)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (int8 [out, in], one bf16 scale per output row [out])."""
    weight = weight.detach().float()
    scale = (weight.abs().amax(dim=1) / 127).clamp(min=1e-8).bfloat16()
    q = (weight / scale.float()[:, None]).round().clamp(-128, 127).to(torch.int8)
    return q.contiguous(), scale


def weight_only_mm(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """x [n, in] (fp32 on CPU for the kernel) times the packed weight -> [n, out] fp32.

    The kernel where it is built and applies (CPU, in_features a multiple of 32), else x times the
    dequantized weight in fp32. Int8 `scales` may be given in fp32 already (the serving wrapper does)."""
    ext = kernel() if x.device.type == "cpu" and x.shape[-1] % BLOCK == 0 else None
    if ext is not None:
        x = x.float()
        if bits == 4:
            return ext.int4_mm(x, packed, scales, group_size, bias)
        return ext.int8_mm(x, packed, scales, bias)
    return F.linear(x.float(), dequantize(packed, scales, bits), bias)


def dequantize(packed: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """The [out, in] fp32 weight a packed weight stands for."""
    if bits == 4:
        return dequantize_int4(packed, scales)
    return packed.float() * scales.float()[:, None]


class WeightOnlyLinear(nn.Module):
    """y ~= x W^T + b with W in int8 (per output row) or int4 (per group), fp32 in and out.

    Buffers (the state dict): `packed_weight` (int4: [out, in / 2] uint8, `quantize_int4`'s layout; int8:
    [out, in] int8), `scales` (int4: [out, in / group_size, 2] fp16 scales and minima; int8: [out] bf16) and
    `bias` (fp32 [out]) when the layer has one. A new module is an empty shell of the right shapes.
    """

    def __init__(
        self, in_features: int, out_features: int, *, bits: int, group_size: int | None, bias: bool = False
    ) -> None:
        super().__init__()
        check_weight_only("layer", in_features, out_features, bits, group_size)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size if bits == 4 else None
        if bits == 4:
            packed = torch.zeros(out_features, in_features // 2, dtype=torch.uint8)
            scales = torch.zeros(out_features, in_features // group_size, 2, dtype=torch.float16)
        else:
            packed = torch.zeros(out_features, in_features, dtype=torch.int8)
            scales = torch.zeros(out_features, dtype=torch.bfloat16)
        self.register_buffer("packed_weight", packed)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def shell_for(cls, linear: nn.Linear, *, bits: int, group_size: int | None, name: str = "layer"):
        """An empty module of `linear`'s shape (checked for `bits` and `group_size`), to be filled."""
        check_weight_only(name, linear.in_features, linear.out_features, bits, group_size)
        return cls(
            linear.in_features,
            linear.out_features,
            bits=bits,
            group_size=group_size,
            bias=linear.bias is not None,
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, bits: int, group_size: int | None, name: str = "layer"):
        """The quantized copy of `linear` (its weight is read, not kept)."""
        module = cls.shell_for(linear, bits=bits, group_size=group_size, name=name)
        weight = linear.weight.detach().to("cpu")
        packed, scales = quantize_int4(weight, group_size) if bits == 4 else quantize_int8(weight)
        module.packed_weight, module.scales = packed, scales
        if linear.bias is not None:
            module.bias = linear.bias.detach().float().to("cpu").clone()
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.in_features)
        y = weight_only_mm(x, self.packed_weight, self.scales, self.bits, self.group_size, self.bias)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        grouping = f"group_size={self.group_size}" if self.bits == 4 else "per output row"
        return f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}, {grouping}"

    @staticmethod
    def concatenate(parts: list[WeightOnlyLinear]) -> WeightOnlyLinear | None:
        """One module whose outputs are the parts' outputs side by side, or None where the parts differ in
        settings or inputs. Exact: packed rows and their scales are independent per output row."""
        first = parts[0]
        settings = {(p.in_features, p.bits, p.group_size, p.bias is None) for p in parts}
        if len(settings) != 1:
            return None
        out_features = sum(p.out_features for p in parts)
        fused = WeightOnlyLinear(
            first.in_features,
            out_features,
            bits=first.bits,
            group_size=first.group_size,
            bias=first.bias is not None,
        )
        fused.packed_weight = torch.cat([p.packed_weight for p in parts])
        fused.scales = torch.cat([p.scales for p in parts])
        if first.bias is not None:
            fused.bias = torch.cat([p.bias for p in parts])
        return fused


def _untie_output_embeddings(model: nn.Module) -> None:
    """A quantized head is its own copy: stop HF from tying (overwriting) it to the input embedding.

    With `tie_word_embeddings` false, `tie_weights()` and `from_pretrained` leave the head alone and
    `save_pretrained` writes both the fp32 input embedding and the head's packed buffers."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False
        if hasattr(model, "all_tied_weights_keys"):  # transformers 5 caches the mapping at init
            model.all_tied_weights_keys = {}


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantize_weight_only(
    model: nn.Module,
    *,
    bits: int,
    group_size: int | None,
    skip: Callable[[str, nn.Linear], bool] | None = None,
) -> list[str]:
    """Replace every `nn.Linear` of `model` (the LM head included) by a `WeightOnlyLinear`, in place.

    A head tied to the input embedding gets its own quantized copy; the embedding stays fp32 and the
    config's `tie_word_embeddings` becomes false, so the head survives `tie_weights` and saving. With
    `bits=4` the LM head (`get_output_embeddings()`) is int8 per row (HEAD_BITS): on SmolLM2 that took the
    perplexity increase of int4 g32 from 5.0% to 0.3% for 12 MB more per step (`prepare_weight_only`
    applies the same rule, so a saved model's names and settings are all it needs).

    Args:
        bits: 4 or 8.
        group_size: int4: input weights per scale (32, 64, 128 or 256, dividing every layer's input);
            int8: not used (one scale per output row).
        skip: `skip(name, linear)` true keeps that layer in floating point.

    Returns:
        The names of the replaced modules (what `prepare_weight_only` takes).

    Raises:
        ValueError: a setting that cannot pack some layer, naming the layer (nothing is replaced then).
    """
    chosen = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not (skip and skip(name, module))
    ]
    head = _output_head(model)
    for name, linear in chosen:  # validate everything before changing anything
        layer_bits, layer_group = _bits_for(linear, head, bits, group_size)
        check_weight_only(name, linear.in_features, linear.out_features, layer_bits, layer_group)
    _untie_output_embeddings(model)
    for name, linear in chosen:
        layer_bits, layer_group = _bits_for(linear, head, bits, group_size)
        module = WeightOnlyLinear.from_linear(linear, bits=layer_bits, group_size=layer_group, name=name)
        _replace(model, name, module)
    return [name for name, _ in chosen]


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def _bits_for(
    linear: nn.Module, head: nn.Module | None, bits: int, group_size: int | None
) -> tuple[int, int | None]:
    """(bits, group_size) of one layer: int4 models keep their LM head in int8 (HEAD_BITS)."""
    return (HEAD_BITS, None) if bits == 4 and linear is head else (bits, group_size)


def prepare_weight_only(model: nn.Module, names: list[str], *, bits: int, group_size: int | None) -> None:
    """Turn the `nn.Linear` modules `names` into empty `WeightOnlyLinear` shells, so that
    `model.load_state_dict(saved)` of a model quantized with the same settings fills them as they are."""
    head = _output_head(model)
    _untie_output_embeddings(model)
    for name in names:
        linear = model.get_submodule(name)
        layer_bits, layer_group = _bits_for(linear, head, bits, group_size)
        _replace(
            model,
            name,
            WeightOnlyLinear.shell_for(linear, bits=layer_bits, group_size=layer_group, name=name),
        )
