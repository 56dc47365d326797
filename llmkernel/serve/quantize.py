"""The matrix products of the serving forward: fp32 `Linear`, `Fp16Linear` (the default) and `Int8Linear`.

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
* `aten._weight_int8pack_mm` (weight-only int8) runs at ~2.4 GB/s: slower than fp32 here, unusable;
* fbgemm's dynamic int8 (`quantized.linear_dynamic`: int8 weights with per-channel scales, activations
  quantized per call with one scale, VNNI int32 accumulation) is the fastest (a step 2.6x fp32 at batch
  1, 3.8x at batch 16), but SmolLM2's activation outliers make its greedy output drift early (0 of 8
  chat answers identical, first difference within 0-9 tokens; first-token logits off by 38% relative).
  SmoothQuant-style smoothing (alpha 0.5) cut that error to 15% without fixing greedy agreement, and
  even simulated weight-only per-channel int8 gave 3 of 8; so int8 is opt-in (`quantize="int8"`), and
  in int8 a sequence's logits also depend slightly on what else shares its step.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

QUANTIZE_MODES = ("none", "fp16", "int8")


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


class Int8Linear:
    """y ~= x W^T + b with W stored as int8 with one fp32 scale per output row, run by fbgemm.

    Symmetric per-channel scales (scale = max|W_row| / 127) keep the error of each output independent
    of the other rows' ranges; activations are quantized per call by the kernel itself.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        check_int8_supported()
        weight = weight.detach().float().contiguous()
        scales = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-12).double()  # [out]
        zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
        with warnings.catch_warnings():  # quantized tensor creation is marked deprecated in 2.13, still works
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch.quantize_per_channel(weight, scales, zero_points, 0, torch.qint8)
            bias = None if bias is None else bias.detach().float().contiguous()
            self.packed = torch.ops.quantized.linear_prepack(qweight, bias)
        self.out_features = weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # reduce_range=False: full 8-bit activations; VNNI accumulates in int32 without the 16-bit
        # saturation that made fbgemm's older AVX2 path need 7-bit ranges.
        return torch.ops.quantized.linear_dynamic(x, self.packed, False)


class Fp16Linear:
    """y ~= x W^T + b with W stored as fp16: half the bytes of fp32, outputs in fp32.

    On CPU fbgemm keeps W packed in fp16 and computes in fp32; on GPUs it is a plain half-precision matmul.
    fp16 rounding (relative error ~5e-4 per weight) is far below int8's, so outputs stay close to fp32.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.out_features = weight.shape[0]
        self.on_cpu = weight.device.type == "cpu"
        if self.on_cpu:
            check_int8_supported()
            bias = None if bias is None else bias.detach().float().contiguous()
            self.packed = torch.ops.quantized.linear_prepack_fp16(weight.detach().float().contiguous(), bias)
        else:
            self.weight = weight.detach().half()
            self.bias = None if bias is None else bias.detach().half()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.on_cpu:
            return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)
        return F.linear(x.half(), self.weight, self.bias).float()


def check_int8_supported() -> None:
    """Raise a clear error where PyTorch has no fbgemm/x86 quantized kernels (e.g. ARM builds).

    (fp16 packing on CPU uses the same fbgemm library.)
    """
    engines = torch.backends.quantized.supported_engines
    if not {"fbgemm", "x86"} & set(engines):
        raise ValueError(
            f"quantize='int8' and 'fp16' on CPU need PyTorch's x86 (fbgemm) kernels; this build has "
            f"{engines}; use quantize='none'"
        )


Projection = Linear | Fp16Linear | Int8Linear


def make_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, quantize: str
) -> Linear | Fp16Linear | Int8Linear:
    """The matrix product for one weight under the engine's `quantize` mode."""
    if quantize == "int8":
        return Int8Linear(weight, bias)
    if quantize == "fp16":
        return Fp16Linear(weight, bias)
    return Linear(weight, bias)
