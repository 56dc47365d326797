"""The matrix products of the serving forward: fp32 `Linear`, `Fp16Linear` (the default), weight-only int8/int4.

Decoding on a CPU is bound by how fast the weights stream from memory: every step reads every weight once
(0.54 GB for SmolLM2-135M in fp32). What we measured with PyTorch 2.13 on this 2-core AVX-512 machine
(1 thread, weights not cache-resident, batch 1 unless said):

* fp32 `F.linear` streams ~11 GB/s; the same product with W stored transposed ([in, out], `x @ W_t`)
  streams ~19 GB/s when out > in (qkv, gate/up, the vocab projection) and is no faster otherwise or at
  batch 16, so `Linear` picks the layout per weight;
* fbgemm's fp16 weights (`quantized.linear_dynamic_fp16`, fp32 compute) stream ~21 GB/s of half the
  bytes: a whole decode step of SmolLM2 is 2.0x faster than fp32 at batch 1 (18 vs 37 ms) and 1.9x at
  batch 16 (64 vs 121 ms), and greedy output stays close to fp32 (6 of 8 chat answers identical over
  64 tokens, the other two from token 12 and 38);
* weight-only int8/int4 (`quantize="int8"`: int8 per output row; `"int4"`: group 32, the LM head int8)
  run on our C++ kernel (models/weight_only.py has the layout, the kernel and its figures): fp32 in and
  out, activations rounded to int8 per block of 32 inside the kernel, VNNI dot products. All the products
  of a batch-1 step of SmolLM2 take 4.9 ms int4 and 5.2 ms int8 against fp16's 17 (the aten int4pack /
  int8pack kernels used before: 7.9 and 14.6). A folder quantized by `llmk quantize` (its
  `WeightOnlyLinear` modules) is served as stored, whatever `quantize` says; the mode then applies to
  layers left in fp32;
* fbgemm's dynamic int8 (`quantized.linear_dynamic`: int8 weights with per-channel scales, activations
  quantized per call with one scale, VNNI int32 accumulation) was the fastest (a step 2.6x fp32 at batch
  1, 3.8x at batch 16), but SmolLM2's activation outliers made its greedy output drift early (0 of 8
  chat answers identical, first difference within 0-9 tokens; first-token logits off by 38% relative;
  SmoothQuant-style smoothing, alpha 0.5, cut that to 15% without fixing greedy agreement), so weight-only
  int8 replaced it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmkernel.models.weight_only import WeightOnlyLinear, check_weight_only, dequantize, kernel

QUANTIZE_MODES = ("none", "fp16", "int8", "int4")
INT4_GROUP_SIZE = 32  # for `quantize="int4"` on an fp32 folder: divides every hidden size a multiple of 32


class Linear:
    """y = x W^T + b with fp32 weights [out, in].

    Wide weights (out > in) are kept transposed, [in, out] contiguous, where the batch-1 product streams
    ~1.7x faster (see above); others are used as given (shared, not copied).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.out_features = weight.shape[0]
        self.transposed = weight.shape[0] > weight.shape[1]
        self.weight = weight.t().contiguous() if self.transposed else weight
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.transposed:
            return F.linear(x, self.weight, self.bias)
        return x @ self.weight if self.bias is None else torch.addmm(self.bias, x, self.weight)


class WeightOnly:
    """A `WeightOnlyLinear`'s product called directly on [N, in] fp32 rows, fp32 out: no nn.Module hooks, no
    reshapes, no dtype conversions. Our int4/int8 CPU kernel (models/weight_only_kernels.cpp) where it
    builds; else the weight is dequantized once to fp32 and multiplied as `Linear` does."""

    def __init__(self, module: WeightOnlyLinear) -> None:
        self.out_features = module.out_features
        self.module = module
        self.bits, self.group_size, self.bias = module.bits, module.group_size, module.bias
        self.packed = module.packed_weight
        self.scales = module.scales.float() if module.bits == 8 else module.scales  # the kernel reads fp32
        ext = kernel() if self.packed.device.type == "cpu" and module.in_features % 32 == 0 else None
        self.mm = None if ext is None else ext.int4_mm if self.bits == 4 else ext.int8_mm
        if self.mm is None:
            self.fallback = Linear(dequantize(self.packed, module.scales, self.bits), self.bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x if x.dtype == torch.float32 else x.float()
        if self.mm is None:
            return self.fallback(x)
        if self.bits == 4:
            return self.mm(x, self.packed, self.scales, self.group_size, self.bias)
        return self.mm(x, self.packed, self.scales, self.bias)


class Concatenated:
    """Products over the same input whose weights cannot be fused into one matrix: outputs side by side."""

    def __init__(self, parts: list) -> None:
        self.parts = parts
        self.out_features = sum(part.out_features for part in parts)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)


class Fp16Linear:
    """y ~= x W^T + b with W stored as fp16: half the bytes of fp32, outputs in fp32.

    On CPU fbgemm keeps W packed in fp16 and computes in fp32; on GPUs it is a plain half-precision matmul.
    fp16 rounding (relative error ~5e-4 per weight) is far below int8's, so outputs stay close to fp32.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.out_features = weight.shape[0]
        self.on_cpu = weight.device.type == "cpu"
        if self.on_cpu:
            check_fbgemm_supported()
            bias = None if bias is None else bias.detach().float().contiguous()
            self.packed = torch.ops.quantized.linear_prepack_fp16(weight.detach().float().contiguous(), bias)
        else:
            self.weight = weight.detach().half()
            self.bias = None if bias is None else bias.detach().half()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.on_cpu:
            return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)
        return F.linear(x.half(), self.weight, self.bias).float()


def check_fbgemm_supported() -> None:
    """Raise a clear error where PyTorch has no fbgemm/x86 kernels (e.g. ARM builds), which fp16 packing needs."""
    engines = torch.backends.quantized.supported_engines
    if not {"fbgemm", "x86"} & set(engines):
        raise ValueError(
            f"quantize='fp16' on CPU needs PyTorch's x86 (fbgemm) kernels; this build has {engines}; "
            "use quantize='none', 'int8' or 'int4'"
        )


Projection = Linear | Fp16Linear | WeightOnly | Concatenated


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None, quantize: str) -> Projection:
    """The matrix product for one fp32 weight [out, in] under the engine's `quantize` mode."""
    if quantize in ("int8", "int4"):
        bits, group_size = (8, None) if quantize == "int8" else (4, INT4_GROUP_SIZE)
        try:
            check_weight_only("weight", weight.shape[1], weight.shape[0], bits, group_size)
        except ValueError:  # a shape the int4 packing cannot take: this one weight stays fp16
            return Fp16Linear(weight, bias) if weight.device.type == "cpu" else Linear(weight, bias)
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias, requires_grad=False)
        return WeightOnly(WeightOnlyLinear.from_linear(linear, bits=bits, group_size=group_size))
    if quantize == "fp16":
        return Fp16Linear(weight, bias)
    return Linear(weight, bias)


def weight_only_projection(parts: list[nn.Module], quantize: str) -> Projection:
    """The product of several modules over one input (a fused qkv or gate/up), some `WeightOnlyLinear`.

    Packed weights are concatenated along the output when their layout allows (models/weight_only.py,
    `WeightOnlyLinear.concatenate`): one kernel call; otherwise each part runs and the outputs are joined.
    Parts still in floating point follow `quantize`.
    """
    if all(isinstance(part, WeightOnlyLinear) for part in parts):
        fused = parts[0] if len(parts) == 1 else WeightOnlyLinear.concatenate(parts)
        if fused is not None:
            return WeightOnly(fused)
    products = [
        WeightOnly(part)
        if isinstance(part, WeightOnlyLinear)
        else make_linear(part.weight.detach(), None if part.bias is None else part.bias.detach(), quantize)
        for part in parts
    ]
    return products[0] if len(products) == 1 else Concatenated(products)
