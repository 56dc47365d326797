"""Text attacks (typo, swap, delete) and HotFlip on a tiny embedding + linear classifier."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmkernel.errors import InputError
from llmkernel.eval.attacks import (
    ATTACKS,
    QWERTY_NEIGHBOURS,
    TEXT_ATTACKS,
    hotflip,
    perturb_text,
    perturb_words,
)

WORDS = (
    "The quick brown fox jumps over the lazy dog while seven wizards quietly judge boxing matches "
    "near an old harbour"
).split()


def _edit_kind(before: str, after: str) -> str | None:
    """Which single edit turns `before` into `after`: typo, swap, delete, or None if it is none of them."""
    if len(after) == len(before) - 1:
        inner = range(1, len(before) - 1)
        return "delete" if any(before[:i] + before[i + 1 :] == after for i in inner) else None
    if len(after) != len(before):
        return None
    diff = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
    if len(diff) == 1:
        i = diff[0]
        neighbour = after[i].lower() in QWERTY_NEIGHBOURS.get(before[i].lower(), "")
        same_case = before[i].isupper() == after[i].isupper()
        return "typo" if neighbour and same_case else None
    if len(diff) == 2 and diff[1] == diff[0] + 1 and diff[0] >= 1:
        i = diff[0]
        return "swap" if (before[i], before[i + 1]) == (after[i + 1], after[i]) else None
    return None


def test_attack_names() -> None:
    assert ATTACKS == ("typo", "swap", "delete", "hotflip")
    assert TEXT_ATTACKS == ATTACKS[:3]


@pytest.mark.parametrize("kind", TEXT_ATTACKS)
def test_each_changed_word_differs_by_one_edit_of_its_kind(kind: str) -> None:
    for seed in range(20):
        out = perturb_words(WORDS, kind, rate=0.3, seed=seed)
        assert len(out) == len(WORDS)
        changed = [(a, b) for a, b in zip(WORDS, out) if a != b]
        # every word of WORDS except "an" is eligible for all three kinds: 19 * 0.3 -> 6 edits
        assert len(changed) == 6
        for before, after in changed:
            assert after
            assert _edit_kind(before, after) == kind, (before, after)


@pytest.mark.parametrize("kind", TEXT_ATTACKS)
def test_same_seed_same_output_other_seed_differs(kind: str) -> None:
    first = perturb_words(WORDS, kind, 0.5, seed=7)
    assert perturb_words(WORDS, kind, 0.5, seed=7) == first
    assert any(perturb_words(WORDS, kind, 0.5, seed=seed) != first for seed in range(8, 12))


@pytest.mark.parametrize("kind", TEXT_ATTACKS)
def test_rate_zero_is_identity_and_small_rate_edits_one_word(kind: str) -> None:
    assert perturb_words(WORDS, kind, 0.0, seed=1) == WORDS
    assert sum(a != b for a, b in zip(WORDS, perturb_words(WORDS, kind, 0.01, seed=1))) == 1


def test_eligibility() -> None:
    # one-letter words and words without letters never change; two letters allow a typo only
    short = ["a", "I", "42", "--", "ok"]
    assert perturb_words(short, "delete", 1.0, seed=0) == short
    assert perturb_words(short, "swap", 1.0, seed=0) == short
    typo = perturb_words(short, "typo", 1.0, seed=0)
    assert typo[:4] == short[:4] and typo[4] != "ok"
    # "abb" has no two different adjacent letters after the first, so swap cannot change it
    assert perturb_words(["abb", "see"], "swap", 1.0, seed=0) == ["abb", "see"]
    # rate 1 edits every eligible word
    out = perturb_words(WORDS, "delete", 1.0, seed=3)
    assert [a == b for a, b in zip(WORDS, out)] == [w == "an" for w in WORDS]


def test_typo_keeps_case_and_punctuation() -> None:
    for seed in range(30):
        (word,) = perturb_words(["HELLO!"], "typo", 1.0, seed=seed)
        assert word.endswith("!") and word[:-1].isupper() and word != "HELLO!"


def test_perturb_text_keeps_separators_and_is_seeded() -> None:
    text = "  Hello,   wonderful\tworld!\nSee you tomorrow.  "
    out = perturb_text(text, "swap", 1.0, seed=5)
    assert out != text
    assert [len(part) for part in out.split()] == [len(part) for part in text.split()]
    assert [c for c in out if c.isspace()] == [c for c in text if c.isspace()]
    assert out[:2] == "  " and out.endswith(".  ")
    assert perturb_text(text, "swap", 1.0, seed=5) == out
    assert perturb_text(text, "typo", 0.0, seed=5) == text
    assert perturb_text("", "delete", 0.5, seed=0) == ""


def test_bad_arguments_raise_input_error() -> None:
    with pytest.raises(InputError, match="hotflip needs the model"):
        perturb_words(WORDS, "hotflip", 0.1, seed=0)
    with pytest.raises(InputError, match="unknown text attack 'shuffle'"):
        perturb_text("some text", "shuffle", 0.1, seed=0)
    with pytest.raises(InputError, match="outside \\[0, 1\\]"):
        perturb_words(WORDS, "typo", 1.5, seed=0)


# --- HotFlip -------------------------------------------------------------------------------------------

VOCAB, DIM, CLASSES = 64, 16, 3
FORBIDDEN = [0, 1, 2]  # pad, bos, eos of the toy vocabulary


def _tiny_classifier() -> tuple[torch.nn.Embedding, torch.nn.Linear]:
    torch.manual_seed(0)
    return torch.nn.Embedding(VOCAB, DIM), torch.nn.Linear(DIM, CLASSES)


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (4, 12), generator=generator)
    input_ids[:, 0] = 1  # bos
    input_ids[2, 8:] = 0  # padding at the end of one sequence
    protected = (input_ids == 0) | (input_ids == 1)
    labels = torch.tensor([0, 1, 2, 1])
    return input_ids, protected, labels


def _loss_fn(head: torch.nn.Linear, labels: torch.Tensor):
    # mean-pooled embeddings -> linear -> cross entropy summed over the batch; convex in the embeddings
    return lambda embeds: F.cross_entropy(head(embeds.mean(dim=1)), labels, reduction="sum")


def test_hotflip_flips_expected_unprotected_positions_and_raises_loss() -> None:
    embedding, head = _tiny_classifier()
    input_ids, protected, labels = _batch()
    original = input_ids.clone()
    loss_fn = _loss_fn(head, labels)
    flipped = hotflip(embedding, input_ids, loss_fn, 0.3, protected, FORBIDDEN)

    assert torch.equal(input_ids, original)  # input not modified
    changed = flipped != input_ids
    assert not changed[protected].any()
    # unprotected positions per row: 11, 11, 7, 11 -> round(0.3 * u) = 3, 3, 2, 3
    assert changed.sum(dim=1).tolist() == [3, 3, 2, 3]
    assert not torch.isin(flipped[changed], torch.tensor(FORBIDDEN)).any()
    with torch.no_grad():
        before = loss_fn(embedding(input_ids))
        after = loss_fn(embedding(flipped))
    # the loss is convex in the embeddings, so a positive first-order estimate guarantees an increase
    assert after > before
    # parameters' gradients are untouched (autograd.grad, not backward)
    assert embedding.weight.grad is None and head.weight.grad is None


def test_hotflip_is_deterministic_and_picks_first_order_best_token() -> None:
    embedding, head = _tiny_classifier()
    input_ids, protected, labels = _batch()
    loss_fn = _loss_fn(head, labels)
    first = hotflip(embedding, input_ids, loss_fn, 0.1, protected, FORBIDDEN)
    assert torch.equal(hotflip(embedding, input_ids, loss_fn, 0.1, protected, FORBIDDEN), first)

    # recompute the single flip of row 0 by brute force over positions and tokens
    embeds = embedding(input_ids).detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fn(embeds), embeds)
    weight = embedding.weight.detach()
    best = (float("-inf"), -1, -1)
    for position in range(1, input_ids.shape[1]):
        current = input_ids[0, position].item()
        for token in range(3, VOCAB):
            if token != current:
                gain = ((weight[token] - weight[current]) @ grad[0, position]).item()
                best = max(best, (gain, position, token))
    _, position, token = best
    assert (first[0] != input_ids[0]).nonzero().flatten().tolist() == [position]
    assert first[0, position].item() == token


def test_hotflip_rate_zero_and_all_protected_are_identity() -> None:
    embedding, head = _tiny_classifier()
    input_ids, protected, labels = _batch()
    loss_fn = _loss_fn(head, labels)
    same = hotflip(embedding, input_ids, loss_fn, 0.0, protected, FORBIDDEN)
    assert torch.equal(same, input_ids) and same is not input_ids
    all_protected = torch.ones_like(protected)
    assert torch.equal(hotflip(embedding, input_ids, loss_fn, 0.5, all_protected, FORBIDDEN), input_ids)


def test_hotflip_small_rate_flips_one_per_sequence_and_checks_arguments() -> None:
    embedding, head = _tiny_classifier()
    input_ids, protected, labels = _batch()
    loss_fn = _loss_fn(head, labels)
    flipped = hotflip(embedding, input_ids, loss_fn, 0.01, protected, FORBIDDEN)
    assert (flipped != input_ids).sum(dim=1).tolist() == [1, 1, 1, 1]
    with pytest.raises(InputError, match="outside \\[0, 1\\]"):
        hotflip(embedding, input_ids, loss_fn, -0.1, protected, FORBIDDEN)
    with pytest.raises(ValueError, match="protected has shape"):
        hotflip(embedding, input_ids, loss_fn, 0.1, protected[:, :3], FORBIDDEN)
    with pytest.raises(ValueError, match="scalar"):
        hotflip(embedding, input_ids, lambda e: e.sum(dim=(1, 2)), 0.1, protected, FORBIDDEN)
