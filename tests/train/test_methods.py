"""Fine-tuning methods: finding the transformer blocks, top_layers freezing, LoRA targets, apply and merge."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from llmkernel.errors import ConfigError
from llmkernel.tasks.classify import Classify
from llmkernel.tasks.sft import ChatSFT
from llmkernel.train.methods import (
    apply_lora,
    freeze_all_but_top_layers,
    is_peft,
    lora_targets,
    merge_lora,
    trainable_share,
    transformer_blocks,
)

BERT_BLOCK_LINEARS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
LLAMA_BLOCK_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def classifier(bert_folder):
    return AutoModelForSequenceClassification.from_pretrained(bert_folder)


@pytest.fixture
def decoder(llama_folder):
    return AutoModelForCausalLM.from_pretrained(llama_folder)


def trainable_names(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def linear_names(model: torch.nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


# ----------------------------------------------------------------------------------- blocks


def test_transformer_blocks_finds_the_bert_and_llama_stacks(classifier, decoder):
    name, blocks = transformer_blocks(classifier)
    assert name == "bert.encoder.layer" and len(blocks) == 2
    name, blocks = transformer_blocks(decoder)
    assert name == "model.layers" and len(blocks) == 2


def test_transformer_blocks_without_a_module_list_is_a_config_error():
    with pytest.raises(ConfigError, match="no stack of transformer blocks"):
        transformer_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


# ----------------------------------------------------------------------------------- top_layers


def test_top_layers_one_trains_the_top_block_pooler_and_classifier_only(classifier):
    freeze_all_but_top_layers(classifier, 1)
    expected = {
        name
        for name, _ in classifier.named_parameters()
        if name.startswith(("bert.encoder.layer.1.", "bert.pooler.", "classifier."))
    }
    assert trainable_names(classifier) == expected
    assert not classifier.get_input_embeddings().weight.requires_grad
    assert not any(
        p.requires_grad for p in classifier.bert.embeddings.parameters()
    )  # positions, LayerNorm too


def test_top_layers_all_blocks_freezes_only_the_embeddings(classifier):
    freeze_all_but_top_layers(classifier, 2)
    frozen = {name for name, p in classifier.named_parameters() if not p.requires_grad}
    assert frozen == {
        name for name, _ in classifier.named_parameters() if name.startswith("bert.embeddings.")
    }


def test_top_layers_on_a_decoder_keeps_final_norm_and_lm_head_trainable(decoder):
    freeze_all_but_top_layers(decoder, 1)
    trainable = trainable_names(decoder)
    assert {"model.norm.weight", "lm_head.weight"} <= trainable
    assert not any(n.startswith(("model.layers.0.", "model.embed_tokens.")) for n in trainable)
    assert any(n.startswith("model.layers.1.") for n in trainable)


@pytest.mark.parametrize("keep", [0, 3])
def test_top_layers_outside_one_to_block_count_is_a_config_error(classifier, keep):
    with pytest.raises(ConfigError, match="between 1 and the model's 2 blocks"):
        freeze_all_but_top_layers(classifier, keep)


# ----------------------------------------------------------------------------------- LoRA targets


def test_lora_targets_match_block_linears_but_not_pooler_or_classifier(classifier):
    pattern = lora_targets(classifier)
    matched = {name for name in linear_names(classifier) if re.fullmatch(pattern, name)}
    assert matched == {f"bert.encoder.layer.{i}.{leaf}" for i in range(2) for leaf in BERT_BLOCK_LINEARS}
    assert not re.fullmatch(pattern, "bert.pooler.dense")
    assert not re.fullmatch(pattern, "classifier")
    assert re.fullmatch(pattern, "base_model.model.bert.encoder.layer.0.attention.self.query")  # peft's names


def test_lora_targets_on_a_decoder_leave_out_the_lm_head(decoder):
    pattern = lora_targets(decoder)
    matched = {name for name in linear_names(decoder) if re.fullmatch(pattern, name)}
    assert matched == {f"model.layers.{i}.{leaf}" for i in range(2) for leaf in LLAMA_BLOCK_LINEARS}
    assert "lm_head" in linear_names(decoder)


def test_head_modules_are_the_new_head_and_pooler_except_for_sft(classifier, decoder):
    heads = Classify.head_modules(classifier)
    assert {"classifier", "pooler"} <= set(heads)
    assert "bert" not in heads
    assert ChatSFT.head_modules(decoder) == []


# ----------------------------------------------------------------------------------- apply and merge


def lora_classifier(classifier):
    torch.manual_seed(0)
    return apply_lora(classifier, Classify, rank=4, alpha=8, dropout=0.0, target_modules=[])


def test_apply_lora_trains_adapters_and_the_classifier_only(classifier):
    _, total_before = trainable_share(classifier)
    model = lora_classifier(classifier)
    assert is_peft(model)
    trainable, total = trainable_share(model)
    assert 0 < trainable < 0.2 * total
    names = trainable_names(model)
    adapters = {n for n in names if ".lora_A." in n or ".lora_B." in n}
    assert len(adapters) == 2 * 2 * len(BERT_BLOCK_LINEARS)  # A and B for each linear of both blocks
    assert not any("pooler.dense" in n or "classifier" in n for n in adapters)
    assert any(n.endswith("classifier.modules_to_save.default.weight") for n in names)
    assert any(n.endswith("pooler.modules_to_save.default.dense.weight") for n in names)
    assert names == adapters | {n for n in names if ".modules_to_save." in n}  # base weights frozen
    assert not model.get_input_embeddings().weight.requires_grad
    assert total > total_before  # adapters and the trainable copies of the head


def test_apply_lora_on_a_decoder_for_sft_has_no_modules_to_save(decoder):
    model = apply_lora(decoder, ChatSFT, rank=2, alpha=4, dropout=0.0, target_modules=[])
    names = trainable_names(model)
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert len(names) == 2 * 2 * len(LLAMA_BLOCK_LINEARS)


def test_apply_lora_with_unknown_target_modules_is_a_config_error(classifier):
    with pytest.raises(ConfigError, match="lora.target_modules"):
        apply_lora(classifier, Classify, rank=4, alpha=8, dropout=0.0, target_modules=["no_such_layer"])


def test_merge_lora_after_a_step_gives_a_plain_model_with_the_same_logits(classifier, bert_folder):
    tokenizer = AutoTokenizer.from_pretrained(bert_folder)
    model = lora_classifier(classifier)
    inputs = tokenizer(["hello world", "alice lives in paris"], padding=True, return_tensors="pt")
    labels = torch.tensor([0, 1])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    torch.nn.functional.cross_entropy(model(**inputs).logits, labels).backward()
    optimizer.step()
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_B." in n)  # adapters moved
    model.eval()
    with torch.no_grad():
        lora_logits = model(**inputs).logits
        merged = merge_lora(model)
        merged_logits = merged(**inputs).logits
    assert not is_peft(merged)
    assert type(merged).__name__ == "BertForSequenceClassification"
    assert not any("lora_" in n or "modules_to_save" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged_logits, lora_logits, atol=1e-5, rtol=0)


def test_merge_lora_returns_a_plain_model_unchanged(classifier):
    assert merge_lora(classifier) is classifier
