"""Fine-tuning tasks: length-grouped batches, padding, classify / ner encoding and losses, chat SFT labels."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from llmkernel.errors import InputError
from llmkernel.io.conll import TaggedSentence
from llmkernel.io.tables import ClassificationData
from llmkernel.tasks.base import IGNORE, LengthGroupedBatches, pad
from llmkernel.tasks.classify import Classify
from llmkernel.tasks.ner import TokenClassify
from llmkernel.tasks.sft import ChatSFT, SelectedPositionsLM
from tests.tiny_models import NER_LABELS

TEXTS = ["hello world", "alice lives in paris", "bob", "call me in berlin, bob!", "the world"]


pytestmark = pytest.mark.usefixtures("one_thread")


def classification(texts, labels=None, pairs=None) -> ClassificationData:
    return ClassificationData(texts, pairs, labels, "text", "text_pair" if pairs else None, "label", "mem")


def stub_tokenizer(pad_token_id=5):
    """Enough of a tokenizer for batching tests (collate only reads the pad id)."""
    return SimpleNamespace(pad_token_id=pad_token_id)


def numbered_examples(lengths):
    """Examples whose first token is their index + 10, so a batch names the examples it holds."""
    return [{"input_ids": [index + 10] * length, "labels": index % 2} for index, length in enumerate(lengths)]


# ----------------------------------------------------------------------------------- LengthGroupedBatches


def padding_share(batches, lengths) -> float:
    padded = sum(lengths[b].max() * len(b) - lengths[b].sum() for b in batches)
    return padded / lengths.sum()


@pytest.mark.parametrize("group_by_length", [True, False])
def test_every_example_appears_exactly_once_per_epoch(group_by_length):
    lengths = np.random.default_rng(0).integers(1, 50, size=103)
    batches = LengthGroupedBatches(lengths, batch_size=4, seed=1, group_by_length=group_by_length)
    assert batches.per_epoch == 26
    for epoch in range(3):
        indices = np.concatenate(batches.epoch(epoch))
        assert sorted(indices.tolist()) == list(range(103))
        assert sorted(len(b) for b in batches.epoch(epoch)) == [3] + [4] * 25  # one short batch


def test_same_seed_same_batches_other_epoch_or_seed_other_order():
    lengths = np.random.default_rng(0).integers(1, 50, size=64)
    first, again = LengthGroupedBatches(lengths, 4, seed=7), LengthGroupedBatches(lengths, 4, seed=7)
    for epoch in (0, 1):
        assert all(np.array_equal(a, b) for a, b in zip(first.epoch(epoch), again.epoch(epoch), strict=True))
    epoch0 = np.concatenate(first.epoch(0))
    assert not np.array_equal(epoch0, np.concatenate(first.epoch(1)))
    assert not np.array_equal(epoch0, np.concatenate(LengthGroupedBatches(lengths, 4, seed=8).epoch(0)))


def test_batches_are_length_grouped():
    lengths = np.random.default_rng(0).integers(1, 200, size=1000)  # several windows of 50 batches
    grouped = LengthGroupedBatches(lengths, 8, seed=0).epoch(0)
    random = LengthGroupedBatches(lengths, 8, seed=0, group_by_length=False).epoch(0)
    assert padding_share(grouped, lengths) < 0.1 * padding_share(random, lengths)


def test_batch_index_spans_epochs():
    lengths = np.arange(1, 11)
    batches = LengthGroupedBatches(lengths, 3, seed=0)
    reference = LengthGroupedBatches(lengths, 3, seed=0)
    assert batches.per_epoch == 4
    # epoch 1 first, then back to epoch 0: the one-epoch cache must not leak between epochs
    for index in (5, 0, 3, 4, 11, 8):
        epoch, position = divmod(index, 4)
        assert np.array_equal(batches.batch(index), reference.epoch(epoch)[position])


def test_pad_right_pads_rows_with_value():
    out = pad([[1, 2, 3], [4], []], value=9)
    assert out.dtype == torch.long
    assert out.tolist() == [[1, 2, 3], [4, 9, 9], [9, 9, 9]]


# ----------------------------------------------------------------------------------- SupervisedTask


def test_collate_pads_ids_with_pad_id_and_class_labels_as_tensor():
    task = Classify(stub_tokenizer(pad_token_id=5), ["a", "b"], max_length=16, batch_size=2)
    examples = [
        {"input_ids": [11, 12, 13], "token_type_ids": [0, 0, 1], "labels": 1},
        {"input_ids": [21], "token_type_ids": [0], "labels": 0},
    ]
    batch = task.collate(examples)
    assert batch["input_ids"].tolist() == [[11, 12, 13], [21, 5, 5]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 1], [0, 0, 0]]
    assert batch["labels"].tolist() == [1, 0]
    assert set(task.model_inputs(batch)) == {"input_ids", "attention_mask", "token_type_ids"}


def test_collate_pads_token_labels_with_ignore():
    task = TokenClassify(stub_tokenizer(), ["O", "B-X"], max_length=16, batch_size=2)
    examples = [
        {"input_ids": [11, 12, 13], "labels": [IGNORE, 1, IGNORE], "word_starts": [1]},
        {"input_ids": [21, 22], "labels": [IGNORE, 0], "word_starts": [1]},
    ]
    batch = task.collate(examples)
    assert "word_starts" not in batch
    assert batch["labels"].tolist() == [[IGNORE, 1, IGNORE], [IGNORE, 0, IGNORE]]
    assert task.count(batch) == 2


def test_micro_batches_of_two_ranks_split_the_batches_of_one_rank():
    lengths = np.random.default_rng(0).integers(1, 30, size=50)
    task = Classify(stub_tokenizer(pad_token_id=0), ["a", "b"], max_length=64, batch_size=3, seed=4)
    task.set_train(numbered_examples(lengths))

    def members(batch) -> list[int]:
        return (batch["input_ids"][:, 0] - 10).tolist()

    for step in (0, 3, 5):  # step 3 crosses into the second epoch (17 batches per epoch)
        ranks = [[members(b) for b in task.micro_batches(step, 2, rank, 2)] for rank in (0, 1)]
        single = [members(b) for b in task.micro_batches(step, 4, 0, 1)]
        rank0, rank1 = sum(ranks[0], []), sum(ranks[1], [])
        assert not set(rank0) & set(rank1)
        assert ranks[0] + ranks[1] == single


def test_steps_per_epoch_counts_every_micro_batch_of_every_rank():
    task = Classify(stub_tokenizer(), ["a", "b"], max_length=64, batch_size=4)
    task.set_train(numbered_examples([3] * 50))  # 13 batches
    assert task.steps_per_epoch(grad_accum=1, world_size=1) == 13
    assert task.steps_per_epoch(grad_accum=2, world_size=2) == 4


def test_eval_batches_cover_each_example_once_longest_first():
    examples = numbered_examples([3, 9, 1, 7, 5])
    task = Classify(stub_tokenizer(), ["a", "b"], max_length=64, batch_size=2)
    seen = []
    for rank in (0, 1):
        for indices, batch in task.eval_batches(examples, rank, 2):
            assert (batch["input_ids"][:, 0] - 10).tolist() == list(indices)
            seen += list(indices)
    assert sorted(seen) == [0, 1, 2, 3, 4]
    assert [i for i, _ in task.eval_batches(examples)][0].tolist() == [1, 3]


# ----------------------------------------------------------------------------------- Classify


def test_classify_encode_pairs_gives_token_type_ids(bert_folder):
    tokenizer = AutoTokenizer.from_pretrained(bert_folder)
    # the tiny folder's generic tokenizer class does not list them; the product's WordPiece tokenizers do
    tokenizer.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]
    task = Classify(tokenizer, ["negative", "positive"], max_length=32, batch_size=2)
    examples = task.encode(
        classification(["hello world", "bob"], ["positive", "negative"], ["paris", "in berlin"])
    )
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    hello, world, paris = tokenizer.convert_tokens_to_ids(["hello", "world", "paris"])
    assert examples[0]["input_ids"] == [cls, hello, world, sep, paris, sep]
    assert examples[0]["token_type_ids"] == [0, 0, 0, 0, 1, 1]
    assert examples[1]["token_type_ids"] == [0, 0, 0, 1, 1, 1]
    assert [e["labels"] for e in examples] == [1, 0]
    assert task.collate(examples)["token_type_ids"].shape == (2, 6)


def test_classify_encode_truncates_and_defaults_missing_labels(bert_folder):
    tokenizer = AutoTokenizer.from_pretrained(bert_folder)
    task = Classify(tokenizer, ["negative", "positive"], max_length=4, batch_size=2)
    examples = task.encode(classification(["alice lives in paris today", "bob"]))
    assert [len(e["input_ids"]) for e in examples] == [4, 3]
    assert examples[0]["input_ids"][-1] == tokenizer.sep_token_id
    assert [e["labels"] for e in examples] == [0, 0]  # prediction-only data: the first label stands in


def test_classify_loss_is_the_sum_of_per_example_cross_entropies(bert_folder):
    tokenizer = AutoTokenizer.from_pretrained(bert_folder)
    model = AutoModelForSequenceClassification.from_pretrained(bert_folder).eval()
    task = Classify(tokenizer, ["negative", "positive"], max_length=32, batch_size=8)
    examples = task.encode(
        classification(TEXTS, ["positive", "negative", "negative", "positive", "negative"])
    )
    with torch.no_grad():
        loss = task.loss(model, task.collate(examples))
        expected = sum(
            F.cross_entropy(
                model(input_ids=torch.tensor([e["input_ids"]])).logits, torch.tensor([e["labels"]])
            )
            for e in examples
        )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_class_weights_auto_turn_on_for_imbalanced_data(bert_folder):
    tokenizer = AutoTokenizer.from_pretrained(bert_folder)
    task = Classify(tokenizer, ["negative", "positive"], max_length=32, batch_size=8)
    task.set_train(task.encode(classification(TEXTS[:4], ["negative", "negative", "positive", "positive"])))
    assert not task.wants_class_weights("auto") and task.wants_class_weights("true")
    task.set_train(task.encode(classification(TEXTS[:4], ["negative", "negative", "negative", "positive"])))
    assert task.wants_class_weights("auto") and not task.wants_class_weights("false")


def test_class_weights_are_inverse_frequency_and_weight_the_loss(bert_folder):
    tokenizer = AutoTokenizer.from_pretrained(bert_folder)
    model = AutoModelForSequenceClassification.from_pretrained(bert_folder).eval()
    task = Classify(tokenizer, ["negative", "positive"], max_length=32, batch_size=8)
    labels = ["negative", "negative", "negative", "positive"]
    task.set_train(task.encode(classification(TEXTS[:4], labels)))
    task.use_class_weights()
    assert task.class_weights.tolist() == pytest.approx([4 / 6, 2.0])  # n / (classes x count)
    batch = task.collate(task.train)
    with torch.no_grad():
        logits = model(**task.model_inputs(batch)).logits
        per_example = F.cross_entropy(logits, batch["labels"], reduction="none")
        weighted = task.loss(model, batch)
    expected = (task.class_weights[batch["labels"]] * per_example).sum()
    assert weighted.item() == pytest.approx(expected.item(), rel=1e-5)


def test_class_weights_with_an_absent_class_stay_finite():
    task = Classify(stub_tokenizer(), ["a", "b", "c"], max_length=8, batch_size=2)
    task.set_train([{"input_ids": [1], "labels": 0}, {"input_ids": [1], "labels": 1}])
    task.use_class_weights()
    assert task.class_weights.tolist() == pytest.approx([2 / 3, 2 / 3, 2 / 3])


# ----------------------------------------------------------------------------------- TokenClassify


def test_token_classify_labels_only_the_first_sub_token_of_each_word(ner_folder):
    tokenizer = AutoTokenizer.from_pretrained(ner_folder)
    task = TokenClassify(tokenizer, NER_LABELS, max_length=32, batch_size=2)
    sentence = TaggedSentence(
        ["Alice", "lives", "in", "Berlins", "xyz"], ["B-PER", "O", "O", "B-LOC", "O"], 1
    )
    (example,) = task.encode([sentence])
    tokens = tokenizer.convert_ids_to_tokens(example["input_ids"])
    assert tokens == ["[CLS]", "alice", "lives", "in", "berlin", "##s", "x", "##y", "##z", "[SEP]"]
    assert example["word_starts"] == [1, 2, 3, 4, 6]
    b_per, o, b_loc = (NER_LABELS.index(t) for t in ("B-PER", "O", "B-LOC"))
    assert example["labels"] == [IGNORE, b_per, o, o, b_loc, IGNORE, o, IGNORE, IGNORE, IGNORE]


def test_token_classify_unknown_tag_becomes_the_first_tag(ner_folder):
    task = TokenClassify(AutoTokenizer.from_pretrained(ner_folder), NER_LABELS, max_length=32, batch_size=2)
    (example,) = task.encode([TaggedSentence(["bob"], ["B-ORG"], 1)])
    assert example["labels"] == [IGNORE, 0, IGNORE]


class ConstantTagger(torch.nn.Module):
    """A token classifier whose logits always pick tag `tag`."""

    def __init__(self, tags: int, tag: int) -> None:
        super().__init__()
        self.tags, self.tag = tags, tag

    def forward(self, input_ids, attention_mask, **_):
        logits = torch.zeros(*input_ids.shape, self.tags)
        logits[..., self.tag] = 5.0
        return SimpleNamespace(logits=logits)


def test_token_classify_predict_gives_o_for_words_cut_by_max_length(ner_folder):
    tokenizer = AutoTokenizer.from_pretrained(ner_folder)
    task = TokenClassify(tokenizer, NER_LABELS, max_length=6, batch_size=2)
    sentences = [
        TaggedSentence(["Alice", "lives", "in", "Berlins", "xyz"], ["B-PER", "O", "O", "B-LOC", "O"], 1),
        TaggedSentence(["bob"], ["B-PER"], 8),
    ]
    examples = task.encode(sentences)
    assert examples[0]["word_starts"] == [1, 2, 3, 4, -1]  # [CLS] alice lives in berlin [SEP]
    predicted, total = task.predict(ConstantTagger(len(NER_LABELS), tag=1), examples, torch.device("cpu"))
    assert predicted == [["B-PER", "B-PER", "B-PER", "B-PER", "O"], ["B-PER"]]
    assert total > 0


# ----------------------------------------------------------------------------------- ChatSFT

CONVERSATIONS = [
    [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hello world"},
        {"role": "assistant", "content": "Alice lives in Paris."},
        {"role": "user", "content": "And Bob?"},
        {"role": "assistant", "content": "Bob works in Berlin."},
    ],
    [{"role": "user", "content": "Call me"}, {"role": "assistant", "content": "Hello Alice."}],
    [
        {"role": "user", "content": "the quick brown fox"},
        {"role": "assistant", "content": "jumps over the dog"},
    ],
]


def labelled_runs(example) -> list[list[int]]:
    """The contiguous runs of labelled token ids."""
    runs, previous = [], False
    for token, label in zip(example["input_ids"], example["labels"], strict=True):
        if label != IGNORE:
            assert label == token
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = label != IGNORE
    return runs


def test_sft_labels_only_the_assistant_replies_and_their_end_of_turn(llama_folder):
    tokenizer = AutoTokenizer.from_pretrained(llama_folder)
    task = ChatSFT(tokenizer, max_length=256, batch_size=2)
    conversation = CONVERSATIONS[0]
    example = task.encode_conversation(conversation)
    assert tokenizer.decode(example["input_ids"]) == task.render(conversation)
    replies = [m["content"] for m in conversation if m["role"] == "assistant"]
    assert [tokenizer.decode(run) for run in labelled_runs(example)] == [f"{r}<|im_end|>\n" for r in replies]


def test_sft_packing_fills_rows_of_max_length_with_every_conversation(llama_folder):
    tokenizer = AutoTokenizer.from_pretrained(llama_folder)
    task = ChatSFT(tokenizer, max_length=16, batch_size=2, seed=3)
    rows = task.encode(CONVERSATIONS, pack=True)
    assert all(len(r["input_ids"]) == 16 for r in rows[:-1])
    assert 0 < len(rows[-1]["input_ids"]) <= 16
    assert all(len(r["labels"]) == len(r["input_ids"]) for r in rows)
    joined = sum((r["input_ids"] for r in rows), [])
    assert joined[-1] == task.eos_id  # conversations end with an end-of-text token each
    segments, current = [], []
    for token in joined:
        if token == task.eos_id:
            segments.append(current)
            current = []
        else:
            current.append(token)
    singles = [task.encode_conversation(c)["input_ids"] for c in CONVERSATIONS]
    assert sorted(segments) == sorted(singles)
    labelled = sum(label != IGNORE for r in rows for label in r["labels"])
    assert labelled == sum(len(sum(labelled_runs(task.encode_conversation(c)), [])) for c in CONVERSATIONS)


def test_sft_without_packing_truncates_each_conversation(llama_folder):
    task = ChatSFT(AutoTokenizer.from_pretrained(llama_folder), max_length=20, batch_size=2)
    rows = task.encode(CONVERSATIONS, pack=False)
    assert len(rows) == 3
    full = [len(task.encode_conversation(c)["input_ids"]) for c in CONVERSATIONS]
    assert [len(r["input_ids"]) for r in rows] == [min(20, n) for n in full]
    assert max(full) > 20


def test_sft_set_data_rejects_conversations_without_assistant_tokens(llama_folder):
    task = ChatSFT(AutoTokenizer.from_pretrained(llama_folder), max_length=32, batch_size=2)
    with pytest.raises(InputError, match="no assistant tokens"):
        task.set_data([[{"role": "user", "content": "hello"}]], [])


def test_sft_collate_positions_are_the_shifted_labels(llama_folder):
    task = ChatSFT(AutoTokenizer.from_pretrained(llama_folder), max_length=64, batch_size=2)
    batch = task.collate(task.encode(CONVERSATIONS, pack=False))
    positions = batch["positions"]
    assert positions.dtype == torch.bool and positions.shape == batch["input_ids"].shape
    assert not positions[:, -1].any()
    assert int(positions.sum()) == task.count(batch) == batch["labels"].numel()
    rows, columns = positions.nonzero(as_tuple=True)
    assert batch["labels"].tolist() == batch["input_ids"][rows, columns + 1].tolist()


def test_sft_loss_equals_the_causal_lm_loss_on_assistant_tokens(llama_folder):
    tokenizer = AutoTokenizer.from_pretrained(llama_folder)
    model = AutoModelForCausalLM.from_pretrained(llama_folder).eval()
    task = ChatSFT(tokenizer, max_length=64, batch_size=3)
    examples = task.encode(CONVERSATIONS, pack=False)
    batch = task.collate(examples)
    wrapped = task.wrap(model)
    assert isinstance(wrapped, SelectedPositionsLM)
    unshifted = pad([e["labels"] for e in examples], IGNORE)
    with torch.no_grad():
        loss = task.loss(wrapped, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        expected = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)),
            unshifted[:, 1:].reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        )
        hf_mean = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=unshifted
        ).loss
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() == pytest.approx(hf_mean.item() * task.count(batch), rel=1e-5)


def test_sft_report_loss_is_the_mean_over_assistant_tokens(llama_folder):
    model = AutoModelForCausalLM.from_pretrained(llama_folder).eval()
    task = ChatSFT(AutoTokenizer.from_pretrained(llama_folder), max_length=64, batch_size=2)
    task.set_data(CONVERSATIONS, CONVERSATIONS)
    report = task.report(model, torch.device("cpu"))
    batch = task.collate(task.eval)
    with torch.no_grad():
        expected = task.loss(task.wrap(model), batch).item() / task.count(batch)
    assert report["assistant_tokens"] == task.count(batch)
    assert report["loss"] == pytest.approx(expected, rel=1e-5)
    assert report["perplexity"] == pytest.approx(np.exp(expected), rel=1e-5)
