"""The serving forward against HF's: prefill, chunked prefill, batched decode, cache growth, fp16/int8/int4,
and a model with weight-only quantized layers (models/weight_only.py) served as stored."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from llmkernel.models.weight_only import quantize_weight_only
from llmkernel.serve.decoder import HFDecoder, LlamaDecoder, PrefillChunk, Step, supports_fast_path
from llmkernel.serve.quantize import Concatenated, WeightOnly
from tests.tiny_models import tiny_llama

VOCAB = 300


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    return tiny_llama(VOCAB, width=64, max_position_embeddings=512)


def reference(model, ids: list[int]) -> torch.Tensor:
    """HF logits [len(ids), vocab] for one sequence."""
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0]


def prefill(decoder, slot: int, ids: list[int], start: int = 0) -> torch.Tensor:
    """Prefill `ids` at `start` into `slot`; logits of every row."""
    step = Step(list(ids), chunks=[PrefillChunk(slot, start, len(ids))], sample_rows=list(range(len(ids))))
    return decoder.forward(step)


def test_prefill_and_chunked_prefill_match_hf(llama) -> None:
    decoder = LlamaDecoder(llama, num_slots=4, max_len=512)
    ids = torch.randint(0, VOCAB, (20,)).tolist()
    expected = reference(llama, ids)
    torch.testing.assert_close(prefill(decoder, 2, ids), expected, atol=1e-5, rtol=1e-4)
    prefill(decoder, 1, ids[:12])
    torch.testing.assert_close(prefill(decoder, 1, ids[12:], start=12), expected[12:], atol=1e-5, rtol=1e-4)


def test_batched_decode_of_different_lengths_matches_hf(llama) -> None:
    decoder = LlamaDecoder(llama, num_slots=4, max_len=512)
    sequences = {0: torch.randint(0, VOCAB, (7,)).tolist(), 3: torch.randint(0, VOCAB, (19,)).tolist()}
    for slot, ids in sequences.items():
        prefill(decoder, slot, ids[:-1])
    # One mixed step: a prompt chunk for slot 1 plus the last token of slots 0 and 3 as decode rows.
    other = torch.randint(0, VOCAB, (5,)).tolist()
    step = Step(
        other + [sequences[0][-1], sequences[3][-1]],
        chunks=[PrefillChunk(1, 0, 5)],
        decode_slots=[0, 3],
        decode_positions=[6, 18],
        sample_rows=[4, 5, 6],
    )
    logits = decoder.forward(step)
    torch.testing.assert_close(logits[0], reference(llama, other)[-1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits[1], reference(llama, sequences[0])[-1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits[2], reference(llama, sequences[3])[-1], atol=1e-5, rtol=1e-4)


def test_cache_grows_past_its_first_capacity(llama) -> None:
    decoder = LlamaDecoder(llama, num_slots=2, max_len=512)
    first = decoder.cache.capacity
    ids = torch.randint(0, VOCAB, (first + 40,)).tolist()
    prefill(decoder, 0, ids[:first])
    logits = prefill(decoder, 0, ids[first:], start=first)
    assert decoder.cache.capacity >= len(ids)
    torch.testing.assert_close(logits, reference(llama, ids)[first:], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="max_model_len"):
        decoder.cache.reserve(513)


@pytest.mark.parametrize(("quantize", "tolerance"), [("fp16", 2e-3), ("int8", 0.05), ("int4", 0.25)])
def test_quantized_logits_stay_close_to_fp32(llama, quantize: str, tolerance: float) -> None:
    decoder = LlamaDecoder(llama, num_slots=2, max_len=512, quantize=quantize)
    ids = torch.randint(0, VOCAB, (24,)).tolist()
    expected = reference(llama, ids)
    logits = prefill(decoder, 0, ids)
    assert ((logits - expected).norm() / expected.norm()).item() < tolerance


def test_biases_are_fused_too() -> None:
    model = tiny_llama(VOCAB, layers=1, max_position_embeddings=2048, attention_bias=True, mlp_bias=True)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_()  # HF initialises biases to zero, which would hide a missing bias
    ids = torch.randint(0, VOCAB, (6,)).tolist()
    decoder = LlamaDecoder(model, num_slots=1, max_len=64)
    torch.testing.assert_close(prefill(decoder, 0, ids), reference(model, ids), atol=1e-5, rtol=1e-4)


def test_hf_fallback_matches_hf_for_other_architectures() -> None:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=128)
    model = GPT2LMHeadModel(config).eval()
    assert not supports_fast_path(config)
    decoder = HFDecoder(model)
    ids = torch.randint(0, VOCAB, (9,)).tolist()
    expected = reference(model, ids)
    decoder.forward(Step(ids[:8], chunks=[PrefillChunk(0, 0, 8)], sample_rows=[7]))
    logits = decoder.forward(Step(ids[8:], decode_slots=[0], decode_positions=[8], sample_rows=[0]))
    torch.testing.assert_close(logits[0], expected[-1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("bits", "group_size", "width", "fused"),
    # packed rows are independent: q, k and v always fuse into one product
    [(8, None, 64, True), (4, 32, 64, True), (4, 64, 128, True)],
)
def test_weight_only_model_gives_hf_greedy_tokens(
    bits: int, group_size: int | None, width: int, fused: bool
) -> None:
    # vocab 320: int4 packs output rows in multiples of 16
    model = tiny_llama(320, width=width, max_position_embeddings=512, tie_word_embeddings=True)
    quantize_weight_only(model, bits=bits, group_size=group_size)
    decoder = LlamaDecoder(model, num_slots=2, max_len=512, quantize="fp16")  # the stored format wins
    assert isinstance(decoder.layers[0].qkv, WeightOnly if fused else Concatenated)
    assert isinstance(decoder.lm_head, WeightOnly) and isinstance(decoder.layers[0].down, WeightOnly)
    prompt = torch.randint(0, VOCAB, (9,)).tolist()
    tokens = [int(prefill(decoder, 1, prompt)[-1].argmax())]
    for position in range(len(prompt), len(prompt) + 11):  # greedy decode, one row per step
        step = Step([tokens[-1]], decode_slots=[1], decode_positions=[position], sample_rows=[0])
        tokens.append(int(decoder.forward(step)[0].argmax()))
    expected = reference(model, prompt + tokens[:-1])[len(prompt) - 1 :]  # HF with the same modules
    assert expected.argmax(dim=-1).tolist() == tokens


@pytest.mark.parametrize(("bits", "group_size"), [(8, None), (4, 32)])
def test_fused_decode_layers_match_the_python_forward(bits: int, group_size: int | None) -> None:
    from llmkernel.models.weight_only import load_kernel

    if load_kernel():
        pytest.skip("the weight-only kernel did not build")
    model = tiny_llama(320, width=64, max_position_embeddings=512)
    quantize_weight_only(model, bits=bits, group_size=group_size)
    fused, python = (LlamaDecoder(model, num_slots=3, max_len=512) for _ in range(2))
    assert fused.fused_layers is not None
    python.fused_layers = None
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (5, 9)]
    for decoder in (fused, python):
        for slot, prompt in zip((2, 0), prompts):  # slots out of order, different lengths
            prefill(decoder, slot, prompt)
    step = Step([3, 4], decode_slots=[2, 0], decode_positions=[5, 9], sample_rows=[1, 0])
    for _ in range(3):
        torch.testing.assert_close(fused.forward(step), python.forward(step), atol=1e-4, rtol=1e-4)
        step.decode_positions = [p + 1 for p in step.decode_positions]
