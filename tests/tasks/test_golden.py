"""Golden values with fixed seeds: the first losses of each fine-tuning task and the MLM masks, so a refactor
cannot silently change the math. The models are the tiny seeded folders of tests/tiny_models.py; the
values were computed on this code and hold to 1e-4 on any machine (fp32, one thread)."""

from __future__ import annotations

import pytest
import torch

from llmkernel.io.conll import TaggedSentence
from llmkernel.io.tables import ClassificationData
from llmkernel.models.loading import load_model, load_tokenizer_for
from llmkernel.tasks.classify import Classify
from llmkernel.tasks.mlm import MaskedLM
from llmkernel.tasks.ner import TokenClassify
from llmkernel.tasks.sft import ChatSFT

TEXTS = ["hello world", "alice lives in paris", "bob works in berlin", "call me", "the world", "me"]
LABELS = ["positive", "negative", "positive", "negative", "positive", "negative"]
SENTENCES = [
    TaggedSentence(["alice", "lives", "in", "paris"], ["B-PER", "O", "O", "B-LOC"], 1),
    TaggedSentence(["bob", "works", "in", "berlin"], ["B-PER", "O", "O", "B-LOC"], 6),
    TaggedSentence(["hello", "world"], ["O", "O"], 11),
]
CHATS = [
    [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello world."}],
    [{"role": "user", "content": "Where is Alice?"}, {"role": "assistant", "content": "In Paris."}],
]


def first_losses(task, model, steps: int = 3) -> list[float]:
    """Mean loss of the first `steps` micro-batches, with one SGD step after each (so the update counts too)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    module = task.wrap(model)
    losses = []
    for step in range(steps):
        batch = task.micro_batches(step, 1, 0, 1)[0]
        loss = task.loss(module, batch) / task.count(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(round(loss.item(), 4))
    return losses


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    torch.manual_seed(0)


def test_classify_first_losses(bert_folder):
    tokenizer = load_tokenizer_for(bert_folder)
    task = Classify(tokenizer, ["negative", "positive"], max_length=16, batch_size=4, seed=0)
    task.set_train(task.encode(ClassificationData(TEXTS, None, LABELS, "text", None, "label", "mem")))
    model = load_model(bert_folder, "classifier", new_head=task.new_head())
    assert first_losses(task, model) == pytest.approx(GOLDEN["classify"], abs=1e-4)


def test_ner_first_losses(ner_folder):
    tokenizer = load_tokenizer_for(ner_folder)
    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    task = TokenClassify(tokenizer, tags, max_length=16, batch_size=2, seed=0)
    task.set_train(task.encode(SENTENCES))
    model = load_model(ner_folder, "token_classifier", new_head=task.new_head())
    assert first_losses(task, model) == pytest.approx(GOLDEN["ner"], abs=1e-4)


def test_sft_first_losses(llama_folder):
    tokenizer = load_tokenizer_for(llama_folder)
    task = ChatSFT(tokenizer, max_length=64, batch_size=2, seed=0, packing=False)
    task.set_data(CHATS, CHATS[:1])
    model = load_model(llama_folder, "decoder")
    assert first_losses(task, model) == pytest.approx(GOLDEN["sft"], abs=1e-4)


def test_mlm_masks_for_a_fixed_seed(wordpiece_data):
    tokenizer = load_tokenizer_for(wordpiece_data / "tokenizer")
    task = MaskedLM(str(wordpiece_data), tokenizer, 2, 32, seed=7, eval_batches=1, probability=0.15)
    batch = task.micro_batches(0, 1, 0, 1)[0]
    positions = batch["positions"].nonzero().tolist()
    assert positions == GOLDEN["mlm_positions"]
    changed = (batch["input_ids"][batch["positions"]] != batch["labels"]).tolist()
    assert changed == GOLDEN["mlm_changed"]
    assert (batch["input_ids"] == tokenizer.mask_token_id).sum().item() == GOLDEN["mlm_masked"]


GOLDEN = {
    "classify": [0.6932, 0.6932, 0.6932],  # a fresh head (std 0.02) on two labels: ln 2, barely moving
    "ner": [1.6152, 1.3808, 0.8758],
    "sft": [5.794, 5.3259, 4.9914],
    "mlm_positions": [[0, 8], [0, 10], [0, 12], [0, 13], [1, 19], [1, 22], [1, 24], [1, 28]],
    "mlm_changed": [True, False, True, True, True, True, True, True],  # 80% [MASK], 10% random, 10% kept
    "mlm_masked": 7,
}
