"""WeightOnlyLinear and quantize_weight_only on tiny Llamas: accuracy, saving and loading, tied heads, errors."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llmkernel.models.weight_only import (
    WeightOnlyLinear,
    prepare_weight_only,
    quantize_int4,
    quantize_weight_only,
)
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
    # int4 packing interleaves blocks of 64 rows: parts of 32 rows cannot be joined as packed
    small = [WeightOnlyLinear.from_linear(nn.Linear(64, 32), bits=4, group_size=32) for _ in range(2)]
    assert WeightOnlyLinear.concatenate(small) is None
