"""Weight-only int8 and int4 linear layers for decoders, stored in the packed form PyTorch's CPU kernels read.

Decoding at batch 1 is bound by the bytes of weight read per token, so smaller weights decode faster, and
weight-only quantization keeps the activations in floating point (bf16 here), which SmolLM2's activation
outliers need (fbgemm's dynamic int8, activations quantized per call, drifts: see serve/quantize.py).

* int4 (`bits=4`): one group of `group_size` weights along the input shares a bf16 scale and zero,
  w ~= (q - 8) * scale + zero with q in 0..15 (asymmetric, min/max per group). The weights are stored as
  `aten._convert_weight_to_int4pack_for_cpu` writes them ([out, in / 2] uint8, blocks of 64 output rows
  interleaved) with the scales as [in / group_size, out, 2]; `aten._weight_int4pack_mm_for_cpu` reads both.
* int8 (`bits=8`): one bf16 scale per output row (symmetric, max|w| / 127), [out, in] int8, read by
  `aten._weight_int8pack_mm`. That kernel takes per-row scales only, so `group_size` is not used for int8
  (the module records None); per-row int8 already keeps perplexity within the 2% gate (see below).

Both kernels are fast only for bf16 activations (fp32 and fp16 inputs take a reference path 50-100x
slower), so `forward` rounds x to bf16, and returns fp32. Loading a saved model is a read: the state dict
holds exactly the kernel's tensors (`prepare_weight_only` builds empty shells, `load_state_dict` fills them).

Measured (PyTorch 2.13, this 2-core AVX-512 machine, busy with other jobs; 1 thread; all the matrix products
of one SmolLM2-135M decode step, 30 layers + vocab projection, so weights are not cache-resident; best of 4
alternating rounds, the median was 1.2-1.5x higher; `bench/weight_only_kernels.py`):

    kernel (activations)          bytes   batch 1     batch 4     batch 16
    int4 g32 int4pack (bf16)       84 MB   7.9 ms      16 ms       50 ms
    int4 g64 int4pack (bf16)       76 MB   7.6 ms      15 ms       60 ms
    int8 int8pack (bf16)          134 MB  14.6 ms      20 ms       68 ms
    int8 as 2 int4 planes (bf16)  168 MB  15.1 ms      35 ms      123 ms
    int8 fbgemm dynamic (int8)    134 MB   (fast, but drifts on SmolLM2: serve/quantize.py)
    torch._int_mm + per-token     134 MB  31.6 ms      --          22 ms
    fp16 fbgemm (fp32)            269 MB  17.5 ms      21 ms       44 ms
    bf16 F.linear                 269 MB  39.6 ms      49 ms       57 ms
    int4pack / int8pack (fp32 x)  --     485 / 145 ms  (reference path)

So int4 halves the batch-1 step of fp16 and int8 is slightly faster than fp16, but both kernels dequantize
per activation row: at batch 16 fp16 wins (the serving engine's continuous batching still works, it is just
not where int4 pays). Group size 128 does not divide SmolLM2's hidden size 576 (ValueError).

Whole decode steps, 1 thread (`bench/weight_only_kernels.py`, median of 3 rounds of 8 steps, tok/s):

    batch    fp32   fp16   int8   int4 g32   int4 g64
    1        28.8   59.3   64.8     89.7       90.4
    4        50.4    190    238      253        266
    16        125    357    258      301        339

Beside llama-cpp-python 0.3.36 (batch 1, 1 thread, same process, rounds alternating, median of 6 rounds of
24 tokens; Q8_0/Q4_0 requantized from the shipped Q4_1): ours int8 61.3, int4 g32 79.5, fp16 55.4 tok/s
against llama.cpp Q8_0 108.9 and Q4_0 168.6 (a busier run: 27.8 / 40.0 / 26.9 against 58.0 / 81.3). So
these aten kernels reach about half of llama.cpp: their products stream ~5-10 GB/s where llama.cpp's
int8-activation VNNI dot products stream about twice that, and our Python forward costs ~2.5 ms a step
outside the products (rms_norm ~1 ms of it). At 2 threads, on this 2-core machine shared with other jobs,
ours and llama.cpp both collapse (4-30 tok/s, 10x spread): not measurable here.

Perplexity on the last 20,000 characters of Tiny Shakespeare (6,488 tokens, 12 windows of 512), SmolLM2-135M
converted from the shipped Q4_1 GGUF (so its weights already lie on a 4-bit grid of 32-groups, which
flatters g32 and hurts g64): fp32 36.87; int8 37.13 (+0.7%); int4 g32 with the int8 head 36.97 (+0.3%),
with an int4 head 38.72 (+5.0%); int4 g64 with the int8 head 47.83 (+30%), int4 head 52.00 (+41%).
Greedy tokens (4 prompts, 32 tokens) against fp32: int8 1 of 4 identical (the others differ from token 5, 5, 25),
int4 g32 (int8 head) 1 of 4 (from token 5, 8, 16).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

BITS = (4, 8)
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what `_weight_int4pack_mm_for_cpu` accepts
INT4_BLOCK_N = 64  # the int4 CPU packing interleaves blocks of 64 output rows (16 at the least)
HEAD_BITS = 8  # the LM head of an int4 model, as llama.cpp's Q4_0 keeps its output tensor at 8 bits


def check_weight_only(
    name: str, in_features: int, out_features: int, bits: int, group_size: int | None
) -> None:
    """Raise a ValueError naming the layer and the setting when `bits`/`group_size` cannot pack this layer."""
    if bits not in BITS:
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if bits == 8:  # one scale per output row: `_weight_int8pack_mm` takes no groups, group_size is unused
        return
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size!r}")
    if in_features % group_size:
        raise ValueError(
            f"{name}: group_size {group_size} does not divide in_features {in_features}; pick a group size "
            f"among {[g for g in INT4_GROUP_SIZES if in_features % g == 0] or 'none'} or skip this layer"
        )
    if out_features % 16:
        raise ValueError(f"{name}: int4 packing needs out_features divisible by 16, got {out_features}")


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (packed [out, in / 2] uint8, scales and zeros [in / group_size, out, 2] bf16)."""
    out_features, in_features = weight.shape
    groups = weight.detach().float().reshape(out_features, in_features // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # [out, groups]
    # Scale and zero are rounded to bf16 first and q is computed against the rounded values, so the
    # kernel's dequantization (q - 8) * scale + zero reproduces exactly the grid q was rounded to.
    scale = ((high - low) / 15).clamp(min=1e-8).bfloat16()
    zero = (low + 8 * scale.float()).bfloat16()
    q = ((groups - zero.float()[..., None]) / scale.float()[..., None] + 8).round().clamp(0, 15)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        q.reshape(out_features, in_features).to(torch.int32), 1
    )
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # [groups, out, 2]
    return packed, scales_and_zeros


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (int8 [out, in], one bf16 scale per output row [out])."""
    weight = weight.detach().float()
    scale = (weight.abs().amax(dim=1) / 127).clamp(min=1e-8).bfloat16()
    q = (weight / scale.float()[:, None]).round().clamp(-128, 127).to(torch.int8)
    return q.contiguous(), scale


class WeightOnlyLinear(nn.Module):
    """y ~= x W^T + b with W in int8 (per output row) or int4 (per group), fp32 in and out.

    Buffers (the state dict): `packed_weight` (int4: [out, in / 2] uint8 in the int4pack layout; int8:
    [out, in] int8), `scales` (int4: [in / group_size, out, 2] bf16 scales and zeros; int8: [out] bf16) and
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
            scales = torch.zeros(in_features // group_size, out_features, 2, dtype=torch.bfloat16)
        else:
            packed = torch.zeros(out_features, in_features, dtype=torch.int8)
            scales = torch.zeros(out_features, dtype=torch.bfloat16)
        self.register_buffer("packed_weight", packed)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, bits: int, group_size: int | None, name: str = "layer"):
        """The quantized copy of `linear` (its weight is read, not kept)."""
        check_weight_only(name, linear.in_features, linear.out_features, bits, group_size)
        module = cls(
            linear.in_features,
            linear.out_features,
            bits=bits,
            group_size=group_size,
            bias=linear.bias is not None,
        )
        weight = linear.weight.detach().to("cpu")
        packed, scales = quantize_int4(weight, group_size) if bits == 4 else quantize_int8(weight)
        module.packed_weight, module.scales = packed, scales
        if linear.bias is not None:
            module.bias = linear.bias.detach().float().to("cpu").clone()
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.in_features).to(torch.bfloat16)  # the kernels' fast path is bf16 only
        if self.bits == 4:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x, self.packed_weight, self.group_size, self.scales
            )
        else:
            y = torch.ops.aten._weight_int8pack_mm(x, self.packed_weight, self.scales)
        y = y.float() if self.bias is None else torch.add(self.bias, y)  # bias in fp32
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        grouping = f"group_size={self.group_size}" if self.bits == 4 else "per output row"
        return f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}, {grouping}"

    @staticmethod
    def concatenate(parts: list[WeightOnlyLinear]) -> WeightOnlyLinear | None:
        """One module whose outputs are the parts' outputs side by side, or None where the packed layout
        does not allow it (different settings or inputs; int4 parts whose rows are not whole blocks of 64).

        Concatenating packed rows is exact: int8 rows are independent, and int4 packing is blocked by 64
        output rows, so whole blocks concatenate (checked against packing the concatenated weight).
        """
        first = parts[0]
        settings = {(p.in_features, p.bits, p.group_size, p.bias is None) for p in parts}
        if len(settings) != 1:
            return None
        if first.bits == 4 and any(p.out_features % INT4_BLOCK_N for p in parts[:-1]):
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
        fused.scales = torch.cat([p.scales for p in parts], dim=1 if first.bits == 4 else 0)
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
        check_weight_only(name, linear.in_features, linear.out_features, layer_bits, layer_group)
        shell = WeightOnlyLinear(
            linear.in_features,
            linear.out_features,
            bits=layer_bits,
            group_size=layer_group,
            bias=linear.bias is not None,
        )
        _replace(model, name, shell)
