"""WeightOnlyLinear and quantize_weight_only on tiny Llamas: accuracy, saving and loading, tied heads, errors;
the C++ kernel against the dequantized product, and the fallback without it."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from llmkernel.models import weight_only
from llmkernel.models.weight_only import (
    WeightOnlyLinear,
    dequantize,
    prepare_weight_only,
    quantize_int4,
    quantize_weight_only,
)
from llmkernel.serve.quantize import WeightOnly
from tests.tiny_models import tiny_llama

VOCAB = 256
SETTINGS = [(8, None), (4, 32), (4, 64)]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize(("bits", "group_size", "tolerance"), [(8, None, 0.01), (4, 32, 0.12), (4, 64, 0.15)])
def test_layer_output_close_to_fp32(bits: int, group_size: int | None, tolerance: float) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(128, 192)
    x = torch.randn(5, 128)
    module = WeightOnlyLinear.from_linear(linear, bits=bits, group_size=group_size)
    with torch.no_grad():
        expected = linear(x)
    # Gaussian weights: int8 per row ~0.5%, int4 (16 levels per group) ~8-10% relative error.
    assert relative_error(module(x), expected) < tolerance
    assert module(x.unsqueeze(0)).shape == (1, 5, 192)  # any leading dimensions


@pytest.mark.parametrize(("bits", "group_size", "tolerance"), [(8, None, 0.03), (4, 32, 0.25)])
def test_model_logits_close_to_fp32(bits: int, group_size: int | None, tolerance: float) -> None:
    model = tiny_llama(VOCAB, width=128)
    ids = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        expected = model(ids).logits
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no deprecation (or other) warning reaches a user
            names = quantize_weight_only(model, bits=bits, group_size=group_size)
            logits = model(ids).logits
    assert "lm_head" in names and len(names) == 2 * 7 + 1
    assert all(isinstance(model.get_submodule(name), WeightOnlyLinear) for name in names)
    assert relative_error(logits, expected) < tolerance


@pytest.mark.parametrize(("bits", "group_size"), SETTINGS)
def test_state_dict_round_trip_through_safetensors(tmp_path, bits: int, group_size: int | None) -> None:
    model = tiny_llama(VOCAB, width=64, tie_word_embeddings=True)
    names = quantize_weight_only(
        model, bits=bits, group_size=group_size, skip=lambda name, _: "o_proj" in name
    )
    assert not any("o_proj" in name for name in names)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))

    fresh = tiny_llama(VOCAB, width=64, tie_word_embeddings=True)
    prepare_weight_only(fresh, names, bits=bits, group_size=group_size)
    fresh.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=True)
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)
    assert fresh.lm_head.packed_weight.dtype == torch.int8  # int4 models keep an int8 head (HEAD_BITS)
    assert fresh.model.layers[0].mlp.down_proj.packed_weight.dtype == (
        torch.uint8 if bits == 4 else torch.int8
    )


def test_tied_head_gets_its_own_copy_and_stays_quantized() -> None:
    model = tiny_llama(VOCAB, width=64, tie_word_embeddings=True)
    embedding = model.get_input_embeddings().weight
    before = embedding.detach().clone()
    quantize_weight_only(model, bits=4, group_size=32)
    model.tie_weights()  # what from_pretrained and resizing call: must not overwrite the quantized head
    assert isinstance(model.lm_head, WeightOnlyLinear) and not model.config.tie_word_embeddings
    assert model.get_input_embeddings().weight is embedding and torch.equal(embedding, before)
    assert "model.embed_tokens.weight" in model.state_dict() and "lm_head.weight" not in model.state_dict()


def test_bias_is_kept_in_fp32() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    module = WeightOnlyLinear.from_linear(linear, bits=8, group_size=None)
    assert module.bias.dtype == torch.float32
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert relative_error(module(x), linear(x)) < 0.01


def test_group_size_that_does_not_divide_in_features_names_it() -> None:
    model = tiny_llama(VOCAB, width=64)
    with pytest.raises(
        ValueError, match=r"model\.layers\.0\.self_attn\.q_proj: group_size 128 does not divide "
    ):
        quantize_weight_only(model, bits=4, group_size=128)
    assert not any(isinstance(m, WeightOnlyLinear) for m in model.modules())  # nothing half-replaced
    with pytest.raises(ValueError, match="group_size must be one of"):
        quantize_weight_only(model, bits=4, group_size=48)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        quantize_weight_only(model, bits=2, group_size=32)


def test_concatenated_packed_rows_equal_packing_the_concatenation() -> None:
    torch.manual_seed(0)
    parts = [nn.Linear(64, n, bias=False) for n in (128, 64, 64)]
    for bits, group_size in SETTINGS[:2]:
        quantized = [WeightOnlyLinear.from_linear(p, bits=bits, group_size=group_size) for p in parts]
        fused = WeightOnlyLinear.concatenate(quantized)
        x = torch.randn(3, 64)
        torch.testing.assert_close(fused(x), torch.cat([q(x) for q in quantized], dim=-1))
    weight = torch.cat([p.weight for p in parts])
    packed, scales = quantize_int4(weight, 32)
    fused = WeightOnlyLinear.concatenate(
        [WeightOnlyLinear.from_linear(p, bits=4, group_size=32) for p in parts]
    )
    assert torch.equal(fused.packed_weight, packed) and torch.equal(fused.scales, scales)
    # rows are independent, so any row counts join; different settings do not
    small = [WeightOnlyLinear.from_linear(nn.Linear(64, n), bits=4, group_size=32) for n in (7, 9)]
    assert WeightOnlyLinear.concatenate(small).out_features == 16
    mixed = [WeightOnlyLinear.from_linear(nn.Linear(64, 8), bits=b, group_size=32) for b in (4, 8)]
    assert WeightOnlyLinear.concatenate(mixed) is None


def quantized_input(x: torch.Tensor) -> torch.Tensor:
    """x rounded as the kernel rounds it: int8 per block of 32, scale max|x| / 127."""
    blocks = x.reshape(x.shape[0], -1, 32)
    scale = blocks.abs().amax(dim=-1, keepdim=True) / 127
    return (torch.round(blocks / torch.where(scale > 0, scale, 1)) * scale).reshape(x.shape)


def built_kernel():
    problem = weight_only.load_kernel()
    if problem:
        pytest.skip(f"the weight-only kernel did not build: {problem}")
    return weight_only.kernel()


# in 32, 96, 160: 1, 3, 5 blocks (odd: the int4 kernel's last block pair is half empty); odd output rows
KERNEL_SHAPES = [(7, 32), (13, 96), (9, 160), (70, 128), (5, 256)]


@pytest.mark.parametrize(("bits", "group_size"), [(4, 32), (4, 64), (4, 128), (8, None)])
@pytest.mark.parametrize("rows", [1, 3, 4, 6, 17])
def test_kernel_equals_dequantized_product_of_rounded_input(
    bits: int, group_size: int | None, rows: int
) -> None:
    built_kernel()
    torch.manual_seed(rows)
    for out_features, in_features in KERNEL_SHAPES:
        if bits == 4 and in_features % group_size:
            continue
        linear = nn.Linear(in_features, out_features)
        module = WeightOnlyLinear.from_linear(linear, bits=bits, group_size=group_size)
        weight = dequantize(module.packed_weight, module.scales, bits)
        x = torch.randn(rows, in_features) * torch.rand(in_features) * 3  # uneven block scales
        x[0, :32] = 0  # an all-zero block has scale 0
        expected = F.linear(quantized_input(x), weight, module.bias)
        torch.testing.assert_close(module(x), expected, atol=1e-5, rtol=1e-5)
        with torch.no_grad():  # and the input's rounding costs little against fp32 x
            assert relative_error(module(x), F.linear(x, weight, module.bias)) < 0.01


def test_fallback_without_the_kernel_multiplies_by_the_dequantized_weight(monkeypatch) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(96, 24)
    modules = {bits: WeightOnlyLinear.from_linear(linear, bits=bits, group_size=32) for bits in (4, 8)}
    monkeypatch.setattr(weight_only, "_kernel", "RuntimeError: no compiler")
    assert weight_only.load_kernel() == "RuntimeError: no compiler" and weight_only.kernel() is None
    x = torch.randn(3, 96)
    for bits, module in modules.items():
        expected = F.linear(x, dequantize(module.packed_weight, module.scales, bits), linear.bias)
        torch.testing.assert_close(module(x), expected)
        projection = WeightOnly(module)  # the serving wrapper: dequantized once, fp32 products
        assert projection.mm is None
        torch.testing.assert_close(projection(x), expected)
