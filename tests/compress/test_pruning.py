"""Structured pruning (FFN neurons, heads, layers) and unstructured sparsity on tiny BERT and Llama models."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from llmkernel.compress.pruning import (
    Importance,
    check_architecture,
    measure_importance,
    prune_ffn,
    prune_heads,
    prune_layers,
    transformer_layers,
)
from llmkernel.compress.sparsity import sparsify
from tests.tiny_models import make_tiny_bert, tiny_llama

VOCAB = 64


def _batches(vocab: int = VOCAB) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0  # one padded row: padding must not count
    return [{"input_ids": torch.randint(5, vocab, (2, 12), generator=generator), "attention_mask": mask}]


def _logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture
def llama():
    return tiny_llama(VOCAB, layers=3)  # width 32, 4 heads over 2 KV groups, intermediate 64


@pytest.fixture
def bert(tmp_path):
    folder = make_tiny_bert(tmp_path / "bert", "classify")  # 2 layers, width 32, 2 heads, intermediate 64
    return AutoModelForSequenceClassification.from_pretrained(folder).eval()


def test_importance_has_one_score_per_neuron_head_group_layer_and_input_feature(llama):
    importance = measure_importance(llama, _batches())
    assert importance.tokens == 12 + 8
    assert [s.shape for s in importance.ffn] == [(64,)] * 3
    assert [s.shape for s in importance.heads] == [(2,)] * 3  # per KV group
    assert importance.layers.shape == (3,) and (importance.layers > 0).all()
    assert importance.inputs["model.layers.0.mlp.down_proj"].shape == (64,)
    assert len(importance.inputs) == 3 * 7 and not any(
        "embed" in n or "lm_head" in n for n in importance.inputs
    )


def test_llama_structured_pruning_gives_a_stock_config_that_reloads_identically(llama, tmp_path):
    prune_heads(llama, 0.5, measure_importance(llama, _batches()))
    prune_ffn(llama, 0.5, measure_importance(llama, _batches()))
    assert prune_layers(llama, 1, measure_importance(llama, _batches())) != []
    config = llama.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 1, 8)
    assert (config.intermediate_size, config.num_hidden_layers) == (32, 2)
    layer = transformer_layers(llama)[0]
    assert layer.self_attn.q_proj.weight.shape == (16, 32) and layer.self_attn.k_proj.weight.shape == (8, 32)
    assert layer.self_attn.o_proj.weight.shape == (32, 16) and layer.mlp.down_proj.weight.shape == (32, 32)
    assert [layer.self_attn.layer_idx for layer in transformer_layers(llama)] == [0, 1]

    llama.save_pretrained(tmp_path / "pruned")
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    batch = _batches()[0]
    assert torch.equal(_logits(reloaded.eval(), batch), _logits(llama, batch))
    generated = llama.generate(batch["input_ids"][:1], max_new_tokens=3, do_sample=False)  # KV cache works
    assert generated.shape == (1, 15)


def test_bert_ffn_and_layer_pruning_reload_identically(bert, tmp_path):
    batches = _batches(bert.config.vocab_size)
    prune_ffn(bert, 0.25, measure_importance(bert, batches))
    dropped = prune_layers(bert, 1, measure_importance(bert, batches))
    assert len(dropped) == 1
    assert (bert.config.intermediate_size, bert.config.num_hidden_layers) == (48, 1)
    assert transformer_layers(bert)[0].output.dense.weight.shape == (32, 48)

    bert.save_pretrained(tmp_path / "pruned")
    reloaded, info = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "pruned", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert torch.equal(_logits(reloaded.eval(), batches[0]), _logits(bert, batches[0]))


def test_ffn_pruning_keeps_the_neurons_that_contribute(llama):
    silent = []
    with torch.no_grad():
        for layer in transformer_layers(llama):
            neurons = torch.randperm(64, generator=torch.Generator().manual_seed(len(silent)))[:32]
            layer.mlp.down_proj.weight[:, neurons] = 0  # these neurons add nothing to the output
            silent.append(neurons)
    batch = _batches()[0]
    before = _logits(llama, batch)
    prune_ffn(llama, 0.5, measure_importance(llama, [batch]))
    for layer in transformer_layers(llama):
        assert (layer.mlp.down_proj.weight.abs().sum(0) > 0).all()  # every silent neuron went
    torch.testing.assert_close(_logits(llama, batch), before, rtol=0, atol=1e-5)


def test_head_pruning_removes_the_silent_kv_group(llama):
    with torch.no_grad():
        for layer in transformer_layers(llama):
            layer.self_attn.o_proj.weight[:, :16] = 0  # query heads 0 and 1 (KV group 0) write nothing
    batch = _batches()[0]
    before = _logits(llama, batch)
    importance = measure_importance(llama, [batch])
    assert all(scores[0] == 0 < scores[1] for scores in importance.heads)
    assert prune_heads(llama, 0.5, importance) == 2
    torch.testing.assert_close(_logits(llama, batch), before, rtol=0, atol=1e-5)


def test_layer_dropping_picks_the_layer_that_changes_the_hidden_state_least(llama):
    with torch.no_grad():
        middle = transformer_layers(llama)[1]
        middle.self_attn.o_proj.weight.zero_()  # both residual branches add zero: an identity layer
        middle.mlp.down_proj.weight.zero_()
    batch = _batches()[0]
    before = _logits(llama, batch)
    importance = measure_importance(llama, [batch])
    assert importance.layers[1] < 1e-6 < importance.layers[0]
    llama.config.layer_types = ["full_attention", "sliding_attention", "full_attention"]  # a per-layer list
    assert prune_layers(llama, 1, importance) == [1]
    assert llama.config.layer_types == ["full_attention", "full_attention"]
    torch.testing.assert_close(_logits(llama, batch), before, rtol=0, atol=1e-5)


@pytest.mark.parametrize("scope", ["row", "layer"])
def test_sparsify_reaches_the_target_in_every_layer(llama, scope):
    report = sparsify(
        llama, 0.5, method="wanda", scope=scope, importance=measure_importance(llama, _batches())
    )
    assert report["sparsity"] == 0.5 and report["weights"] == 3 * (4 * 32 * 32 - 2 * 32 * 16 + 3 * 32 * 64)
    assert set(report["layers"].values()) == {0.5}
    if scope == "row":  # Wanda's comparison group: every output row loses the same share
        assert (transformer_layers(llama)[0].self_attn.q_proj.weight == 0).sum(1).eq(16).all()
    assert (llama.model.embed_tokens.weight != 0).all()  # embeddings and the LM head are not touched


def test_sparsify_globally_reaches_the_target_and_recovery_keeps_the_zeros(llama):
    from llmkernel.compress.distill import hold_zeros

    report = sparsify(llama, 0.3, method="magnitude", scope="global")
    assert report["sparsity"] == pytest.approx(0.3, abs=1e-4)  # 0.3 of 27,648 rounds to whole weights
    assert len(set(report["layers"].values())) > 1  # layers end up with different sparsities
    assert hold_zeros(llama) == report["zeros"]
    optimizer = torch.optim.AdamW(llama.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(2):  # optimizer steps would regrow the zeros without the held gradients
        llama(input_ids=torch.tensor([[1, 2, 3, 4]])).logits.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert sparsify(llama, 0.0, method="magnitude")["sparsity"] == report["sparsity"]


def test_wanda_and_magnitude_differ_where_activations_differ(llama):
    importance = measure_importance(llama, _batches())
    name = "model.layers.0.mlp.up_proj"
    importance.inputs[name] = torch.ones(32)
    importance.inputs[name][0] = 1000.0  # input feature 0 is huge: wanda keeps every weight reading it
    wanda, magnitude = copy.deepcopy(llama), copy.deepcopy(llama)
    sparsify(wanda, 0.5, method="wanda", scope="layer", importance=importance)
    sparsify(magnitude, 0.5, method="magnitude", scope="layer")
    wanda_weight = dict(wanda.named_modules())[name].weight
    magnitude_weight = dict(magnitude.named_modules())[name].weight
    assert (wanda_weight[:, 0] != 0).all() and (magnitude_weight[:, 0] == 0).any()
    assert not torch.equal(wanda_weight == 0, magnitude_weight == 0)


def test_bad_inputs_are_refused_with_a_clear_message(llama, bert):
    importance = measure_importance(llama, _batches())
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        sparsify(llama, 1.0, method="magnitude")
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        sparsify(llama, -0.1, method="magnitude")
    with pytest.raises(ValueError, match="wanda needs the input norms"):
        sparsify(llama, 0.5, method="wanda")
    with pytest.raises(ValueError, match="unknown sparsity scope"):
        sparsify(llama, 0.5, method="magnitude", scope="block")
    with pytest.raises(ValueError, match="leaves no KV group"):
        prune_heads(llama, 0.75, importance)
    with pytest.raises(ValueError, match="rounds to none removed"):
        prune_heads(llama, 0.1, importance)
    with pytest.raises(ValueError, match="can drop 0 to 2 of the model's 3 layers, got 3"):
        prune_layers(llama, 3, importance)
    with pytest.raises(ValueError, match="leaves none"):
        prune_ffn(llama, 0.999, importance)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
        prune_ffn(llama, 1.0, importance)
    prune_layers(llama, 1, importance)
    with pytest.raises(ValueError, match="measure_importance again"):
        prune_ffn(llama, 0.5, importance)  # scores of 3 layers for a model of 2
    with pytest.raises(ValueError, match="heads of a BERT cannot be pruned to a stock config"):
        prune_heads(bert, 0.5, measure_importance(bert, _batches(bert.config.vocab_size)))


def test_head_counts_that_do_not_divide_the_width_and_other_architectures_are_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    # 12 query heads over 3 KV groups: keeping 2 groups gives 8 heads, and 36 is not a multiple of 8
    model = tiny_llama(VOCAB, width=36, layers=1, num_attention_heads=12, num_key_value_heads=3, head_dim=4)
    stale = Importance(ffn=[], heads=[torch.ones(3)], layers=torch.ones(1))
    with pytest.raises(ValueError, match="not a stock config.*shares that work: 0.67"):
        prune_heads(model, 0.34, stale)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    with pytest.raises(ValueError, match="pruning does not support GPT2LMHeadModel.*supported: bert"):
        check_architecture(gpt2)
    assert check_architecture(tiny_llama(VOCAB, layers=1)) == "llama"
