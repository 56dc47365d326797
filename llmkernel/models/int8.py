"""Int8 weights and int8 activations for encoders, classifiers and NER models on the CPU.

`quantize_int8(model)` replaces every `nn.Linear` by an `Int8Linear` in place: int8 weights with one fp32
scale per output channel, activations quantized to 8 bits per call (dynamic: scale and zero point from the
input's min and max) or with one scale per layer measured on calibration batches (static), and the matrix
product on the CPU's integer dot-product instructions (AVX-512 VNNI / AVX-VNNI) through fbgemm.
`prepare_int8(model, names, static=...)` builds the empty shells a saved quantized state dict loads into.

Measured on the all-MiniLM-L6-v2 SST-2 classifier (6 layers, hidden 384), 2 threads of a shared,
oversubscribed 2-core AMD EPYC (load 5-11, so figures are medians with their spread; bench/int8_kernels.py):
whole model at batch 32 x length 64, fp32 2.2-2.9 s against int8 1.1-1.3 s, 1.8x-2.1x over four runs
(median of rounds; 1.75x-2.4x fastest against fastest). The Linears themselves run 4-7x faster; what is
left is GELU, LayerNorm, residual adds and attention, which stay fp32. SST-2 dev accuracy (872 sentences,
the run's best checkpoint at step 500): fp32 86.58%, dynamic int8 87.27%, static int8 (8 calibration batches
of 32 training sentences) 87.04%; keeping the pooler and classifier fp32 changes neither. Linear weights
(with scales and biases) are 25.3% of their fp32 bytes. ONNX Runtime's dynamic int8 (quantize_dynamic,
per-channel QInt8) of the same model ran 715 ms against our 1342 ms in the same alternating run (its fp32
1179 ms): it also fuses attention, LayerNorm and GELU, so it is the faster export target.

Deprecated API this rests on: PyTorch 2.13 deprecates the quantized tensor dtypes (`torch.qint8`, creating
them warns, pytorch/pytorch#184982) that `quantized::linear_prepack` still takes. Only the one-off weight
packing creates one, inside a local `warnings.catch_warnings`, so no warning reaches a user; the kernels
(`quantized::linear_dynamic`, `quantized::linear_with_input_q_dq_qweight_dq_output_fp32`) take fp32 and
return fp32. The replacement is torchao's int8 dynamic-activation/int8-weight path, which keeps the same
plain int8 tensors plus scales that our state dict holds, so saved folders stay loadable.
"""

from __future__ import annotations

import functools
import threading
import warnings
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

DYNAMIC_ENGINES = ("fbgemm", "onednn", "qnnpack")  # fbgemm measured fastest here; the others elsewhere
STATIC_ENGINE = "fbgemm"  # the one engine with a fused static-input, fp32-output int8 Linear
STATIC_ZERO_POINT = 128  # static activations are uint8 around 128: symmetric, as `input_scale` alone says


@functools.cache
def seven_bit_activations() -> bool:
    """Whether activations must be quantized to 7 bits (PyTorch's `reduce_range`): fbgemm without VNNI
    (AVX2, AVX-512 before Cascade Lake) adds pairs of uint8 x int8 products in int16 (vpmaddubsw), which
    saturates for full-range activations. Measured on an AVX2-only machine, a 64->48 Linear: relative
    error 0.17 with 8-bit activations, 0.016 with 7-bit; with VNNI the products add in int32."""
    return not torch.cpu._is_vnni_supported()


def static_grid(input_scale: float) -> tuple[float, int, int]:
    """(scale, zero point, largest code) of static uint8 activations on this CPU (see seven_bit_activations)."""
    if seven_bit_activations():
        return 2 * input_scale, STATIC_ZERO_POINT // 2, 127
    return input_scale, STATIC_ZERO_POINT, 255


_pack_lock = threading.Lock()  # the engine switch and the warning filter below are process-wide


def _quantized_engine(static: bool) -> str | None:
    """The engine for static or dynamic activations in this PyTorch build; None: Int8Linear emulates in fp32."""
    supported = torch.backends.quantized.supported_engines
    return next(
        (engine for engine in ((STATIC_ENGINE,) if static else DYNAMIC_ENGINES) if engine in supported), None
    )


class Int8Linear(torch.nn.Module):
    """A Linear with int8 weights (per output channel scales) and int8 activations, fp32 in and out.

    Kernel: fbgemm's `quantized::linear_dynamic` (dynamic) and its static-scale twin with fp32 output, on a
    weight packed once on the first forward. Measured at 2048 rows on 2 shared cores (median of 5 rounds,
    speedup over fp32 F.linear): 384->1536 fbgemm 6.8x, oneDNN's linear_dynamic 4.4x, oneDNN's
    qlinear_pointwise with our own static quantization 3.8x, `torch._int_mm` with per-token scales 0.66x
    (slower than fp32: the int32 rescale and quantization passes are separate eager ops, and its GEMM is
    not faster here), ONNX Runtime's MatMulInteger 5-31x (its spread, 2.2-24 ms, spans the others);
    1536->384 fbgemm 5.3x, oneDNN 2.9x, qlinear_pointwise 0.9x, `_int_mm` 0.54x, ONNX Runtime 5.1x.
    Fastest calls agree (2.1-2.3 ms for every VNNI kernel at 384->1536); under load fbgemm held up best
    (on 40 calls of 640 rows, 20 against 41 ms per call for oneDNN, fixed or varying row counts).
    Without fbgemm (non-x86 builds) the dynamic path packs for oneDNN or qnnpack; without any engine, or
    for static scales without fbgemm, fp32 arithmetic runs on the int8 weights (and on the static uint8
    activations), which matches the kernel to rounding.

    Buffers (all in the state dict, so safetensors stores them): `weight` int8 [out, in], `weight_scale`
    fp32 [out], `bias` fp32 [out] (absent without bias) and, for static activation scales only,
    `input_scale` fp32 []. The kernel's packed weight is built on the first forward and never saved.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, static: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.register_buffer("input_scale", torch.ones(()) if static else None)
        self._packed: object | None = None  # the kernel's form of `weight`, rebuilt after any load

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, input_scale: torch.Tensor | None = None) -> Int8Linear:
        """Quantize `linear` symmetrically per output channel; `input_scale` (a 0-d tensor) makes it static."""
        weight = linear.weight.detach().float()
        out_features, in_features = weight.shape
        module = cls(in_features, out_features, bias=linear.bias is not None, static=input_scale is not None)
        scale = weight.abs().amax(dim=1).clamp_min(1e-12) / 127
        module.weight.copy_(torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
        module.weight_scale.copy_(scale)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach().float())
        if input_scale is not None:
            module.input_scale.copy_(input_scale.detach().float().clamp_min(1e-12))
        return module.to(linear.weight.device)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_packed"] = None  # copies and pickles pack again: the packed form is never stored
        return state

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._packed = None  # new weights: pack again on the next forward

    def _pack(self) -> object | None:
        """The weight as the engine's packed params (None without a quantized engine: then fp32 emulation)."""
        engine = _quantized_engine(static=self.input_scale is not None)
        if engine is None:
            return None
        with _pack_lock, warnings.catch_warnings():
            # torch 2.13 warns on creating qint8 tensors (see the module docstring); this is the only one
            warnings.filterwarnings("ignore", message=".*quantized tensor creation", category=UserWarning)
            previous = torch.backends.quantized.engine
            torch.backends.quantized.engine = engine
            try:
                zero_points = torch.zeros(self.out_features, dtype=torch.long)
                scales = self.weight_scale.double()
                weight = torch._make_per_channel_quantized_tensor(self.weight, scales, zero_points, 0)
                return torch.ops.quantized.linear_prepack(weight, self.bias)
            finally:
                torch.backends.quantized.engine = previous

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is None:
            self._packed = self._pack()
        shape, dtype = x.shape, x.dtype
        x = x.reshape(-1, self.in_features).float().contiguous()
        if self._packed is None:
            y = self._emulated(x)
        elif self.input_scale is not None:  # x quantized with the calibrated scale, GEMM, fp32 out: one op
            scale, zero_point, _ = static_grid(float(self.input_scale))
            y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
                x, scale, zero_point, self._packed
            )
        else:  # per-call scale and zero point from x's min and max, inside the kernel
            y = torch.ops.quantized.linear_dynamic(x, self._packed, seven_bit_activations())
        return y.reshape(*shape[:-1], self.out_features).to(dtype)

    def _emulated(self, x: torch.Tensor) -> torch.Tensor:
        """The same rounding in fp32 arithmetic, for builds without the kernel (static: uint8 around 128)."""
        if self.input_scale is not None:
            scale, zero_point, top = static_grid(float(self.input_scale))
            x = (torch.clamp(torch.round(x / scale) + zero_point, 0, top) - zero_point) * scale
        return F.linear(x, self.weight.float() * self.weight_scale[:, None], self.bias)

    def extra_repr(self) -> str:
        kind = "static" if self.input_scale is not None else "dynamic"
        return f"in_features={self.in_features}, out_features={self.out_features}, activations={kind}"


def _linears(
    model: torch.nn.Module, skip: Callable[[str, torch.nn.Linear], bool] | None
) -> dict[str, torch.nn.Linear]:
    """The nn.Linear modules to quantize by name: not skipped, and not sharing their weight (tied heads)."""
    uses: dict[int, int] = {}
    for _, parameter in model.named_parameters(remove_duplicate=False):
        uses[id(parameter)] = uses.get(id(parameter), 0) + 1
    return {
        name: module
        for name, module in model.named_modules()
        if type(module) is torch.nn.Linear
        and uses.get(id(module.weight), 0) == 1  # a tied decoder must stay the embedding's Parameter
        and not (skip is not None and skip(name, module))
    }


def _replace(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


@torch.no_grad()
def calibrate(
    model: torch.nn.Module, names: list[str], calibration: Iterable[dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Run model(**batch) over the calibration batches; the static input scale (max |x| / 127) of each name."""
    peaks: dict[str, torch.Tensor] = {}
    hooks = []
    for name in names:

        def record(module, inputs, name=name) -> None:
            peak = inputs[0].detach().abs().amax().float()
            peaks[name] = torch.maximum(peaks[name], peak) if name in peaks else peak

        hooks.append(model.get_submodule(name).register_forward_pre_hook(record))
    try:
        for batch in calibration:
            model(**batch)
    finally:
        for hook in hooks:
            hook.remove()
    missing = [name for name in names if name not in peaks]
    if missing:
        raise ValueError(f"calibration batches never reached {missing[0]}; pass batches the model runs on")
    return {name: peak / 127 for name, peak in peaks.items()}


def quantize_int8(
    model: torch.nn.Module,
    *,
    calibration: Iterable[dict[str, torch.Tensor]] | None = None,
    skip: Callable[[str, torch.nn.Linear], bool] | None = None,
) -> list[str]:
    """Replace every nn.Linear of `model` (in place) by an Int8Linear.

    Args:
        calibration: batches for model(**batch); given, every replaced layer gets a static input scale.
        skip: skip(name, linear) -> True keeps that layer fp32. Linears whose weight is tied to another
            module (an MLM decoder sharing the embedding matrix) are always kept.
    Returns:
        The names of the replaced modules, in model order (what `prepare_int8` takes).
    """
    linears = _linears(model, skip)
    names = list(linears)
    scales = calibrate(model, names, calibration) if calibration is not None else {}
    for name, linear in linears.items():
        _replace(model, name, Int8Linear.from_linear(linear, scales.get(name)))
    return names


def prepare_int8(model: torch.nn.Module, names: list[str], *, static: bool) -> None:
    """Replace the named nn.Linear modules by empty Int8Linear shells, for model.load_state_dict(saved).

    Raises:
        ValueError: a name is not an nn.Linear of `model`.
    """
    for name in names:
        linear = model.get_submodule(name)
        if not isinstance(linear, torch.nn.Linear):
            raise ValueError(
                f"{name} is a {type(linear).__name__}, not an nn.Linear: not a model of this folder"
            )
        shell = Int8Linear(
            linear.in_features, linear.out_features, bias=linear.bias is not None, static=static
        )
        _replace(model, name, shell.to(linear.weight.device))
