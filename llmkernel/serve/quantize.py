"""The matrix products of the serving forward: fp32 `Linear` and int8 `Int8Linear`.

Decoding on a CPU is bound by how fast the weights stream from memory: every step reads every weight once
(0.54 GB for SmolLM2-135M in fp32). Storing them as int8 with one scale per output channel moves 4x fewer
bytes. We measured the kernels PyTorch 2.13 offers on this 2-core AVX-512 machine (bench/serve.py notes):

* `aten._weight_int8pack_mm` (weight-only int8) runs at ~2.4 GB/s, 4-20x *slower* than fp32 here;
* `quantized.linear_dynamic` (fbgemm: int8 weights, activations quantized to int8 per call, int32
  accumulation with VNNI) is 5-10x faster than fp32 `F.linear` on the decode shapes, at batch 1 and 16.

So int8 here is fbgemm's dynamic quantization with symmetric per-channel weight scales. Its activations
get one scale per call (the whole batch), so in int8 mode a sequence's logits depend slightly on what else
shares the step; fp32 does not have that caveat and stays available (`quantize="none"`).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

QUANTIZE_MODES = ("none", "fp16", "int8")


class Linear:
    """y = x W^T + b with fp32 weights [out, in] (shared, not copied: tied embeddings stay one tensor)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight, self.bias = weight, bias
        self.out_features = weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


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


def make_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, quantize: str
) -> Linear | Fp16Linear | Int8Linear:
    """The matrix product for one weight under the engine's `quantize` mode."""
    if quantize == "int8":
        return Int8Linear(weight, bias)
    if quantize == "fp16":
        return Fp16Linear(weight, bias)
    return Linear(weight, bias)
