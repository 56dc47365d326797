"""Seeded robustness attacks: character edits on words (typo, swap, delete) and HotFlip token substitution.

The text attacks change `max(1, round(rate * n))` of the n *eligible* words of a text with one character
edit each, chosen by `random.Random(seed)`, so an evaluation run is reproducible from its seed. A word is
eligible for an edit that can change it and still leave a recognisable word (letters = alphabetic characters;
punctuation inside a whitespace-separated word is never touched):

- `typo`: at least 2 letters, one of them an a-z letter; one such letter becomes a neighbouring QWERTY key,
  keeping its case (one-letter words like "a" or "I" are left alone).
- `swap`: at least 3 letters and two adjacent, different letters after the first letter; they trade places
  (the first letter stays, as readers rely on it most).
- `delete`: at least 3 letters; one letter that is neither the first nor the last letter is removed.

`hotflip` is the white-box attack of Ebrahimi et al. 2018 ("HotFlip: White-Box Adversarial Examples for Text
Classification", https://arxiv.org/abs/1712.06751): one gradient of the loss with respect to the input
embeddings ranks every (position, replacement token) pair by its first-order loss increase.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence

import torch

from llmkernel.errors import InputError

ATTACKS = ("typo", "swap", "delete", "hotflip")
TEXT_ATTACKS = ("typo", "swap", "delete")

# neighbouring keys on a US QWERTY keyboard: same row left/right and the touching keys of the rows above/below
QWERTY_NEIGHBOURS = {
    "q": "wa", "w": "qeas", "e": "wrsd", "r": "etdf", "t": "ryfg", "y": "tugh", "u": "yihj", "i": "uojk",
    "o": "ipkl", "p": "ol", "a": "qwsz", "s": "weadzx", "d": "erfsxc", "f": "rtgdcv", "g": "tyhfvb",
    "h": "yujgbn", "j": "uikhnm", "k": "iojlm", "l": "opk", "z": "asx", "x": "zsdc", "c": "xdfv",
    "v": "cfgb", "b": "vghn", "n": "bhjm", "m": "njk",
}  # fmt: skip

# scores for at most this many (position, vocab) pairs are held at once: 2**26 floats = 256 MiB
SCORE_CHUNK_ELEMENTS = 1 << 26


def _check_rate(rate: float) -> None:
    if not 0.0 <= rate <= 1.0:
        raise InputError(f"attack rate {rate} is outside [0, 1]; pass the fraction of words to perturb")


def _letter_positions(word: str) -> list[int]:
    return [index for index, char in enumerate(word) if char.isalpha()]


def _edit_sites(word: str, kind: str) -> list[int]:
    """Character positions where an edit of `kind` changes `word`; empty when the word is not eligible."""
    letters = _letter_positions(word)
    if kind == "typo":
        return [i for i in letters if word[i].lower() in QWERTY_NEIGHBOURS] if len(letters) >= 2 else []
    if len(letters) < 3:
        return []
    if kind == "swap":  # site i swaps word[i] and word[i + 1]
        return [
            i for i in letters[1:] if i + 1 < len(word) and word[i + 1].isalpha() and word[i] != word[i + 1]
        ]
    if kind == "delete":
        return letters[1:-1]
    raise InputError(f"unknown text attack '{kind}'; choose one of {', '.join(TEXT_ATTACKS)}")


def _edit(word: str, kind: str, site: int, rng: random.Random) -> str:
    if kind == "typo":
        char = word[site]
        replacement = rng.choice(QWERTY_NEIGHBOURS[char.lower()])
        return word[:site] + (replacement.upper() if char.isupper() else replacement) + word[site + 1 :]
    if kind == "swap":
        return word[:site] + word[site + 1] + word[site] + word[site + 2 :]
    return word[:site] + word[site + 1 :]  # delete


def perturb_words(words: list[str], kind: str, rate: float, seed: int) -> list[str]:
    """Apply one character edit of `kind` to `max(1, round(rate * n))` of the n eligible words.

    Args:
        words: the words; the result has the same number, in the same order.
        kind: one of TEXT_ATTACKS.
        rate: fraction of the eligible words to edit, in [0, 1]; 0 returns the words unchanged.
        seed: seeds `random.Random`; the same words, kind, rate and seed give the same output.

    Raises:
        InputError: `kind` is not a text attack or `rate` is outside [0, 1].
    """
    if kind not in TEXT_ATTACKS:
        hint = "; hotflip needs the model, use attacks.hotflip" if kind == "hotflip" else ""
        raise InputError(f"unknown text attack '{kind}'; choose one of {', '.join(TEXT_ATTACKS)}{hint}")
    _check_rate(rate)
    out = list(words)
    if rate == 0:
        return out
    sites = {index: _edit_sites(word, kind) for index, word in enumerate(words)}
    eligible = [index for index, word_sites in sites.items() if word_sites]
    if not eligible:
        return out
    count = min(len(eligible), max(1, round(rate * len(eligible))))
    rng = random.Random(seed)
    for index in sorted(rng.sample(eligible, count)):
        out[index] = _edit(words[index], kind, rng.choice(sites[index]), rng)
    return out


def perturb_text(text: str, kind: str, rate: float, seed: int) -> str:
    """`perturb_words` on the whitespace-separated words of `text`; the whitespace itself is kept as is."""
    # with a capturing group, re.split keeps the separators at odd indices: words at 0, 2, 4, ...
    parts = re.split(r"(\s+)", text)
    words = parts[0::2]
    parts[0::2] = perturb_words(words, kind, rate, seed)
    return "".join(parts)


def _best_replacements(
    weight: torch.Tensor, input_ids: torch.Tensor, grad: torch.Tensor, forbidden: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each position, the token v maximising (E[v] - E[x]) . g and that estimated loss increase.

    Args:
        weight: (vocab, dim) embedding matrix E.
        input_ids: (positions,) current tokens x.
        grad: (positions, dim) gradient g of the loss at each position's embedding.
        forbidden: (vocab,) bool, True for tokens never to insert.

    Returns:
        (positions,) best gains (-inf where no token is allowed) and (positions,) best token ids.
    """
    vocab_size = weight.shape[0]
    current = (weight[input_ids] * grad).sum(dim=-1)  # (positions,) E[x] . g
    gains, best_ids = [], []
    rows_per_chunk = max(1, SCORE_CHUNK_ELEMENTS // vocab_size)
    for begin in range(0, grad.shape[0], rows_per_chunk):
        end = begin + rows_per_chunk
        scores = grad[begin:end] @ weight.T - current[begin:end, None]  # (rows, vocab)
        scores.masked_fill_(forbidden, float("-inf"))
        # the current token is no flip at all
        scores.scatter_(1, input_ids[begin:end, None], float("-inf"))
        gain, best = scores.max(dim=-1)
        gains.append(gain)
        best_ids.append(best)
    return torch.cat(gains), torch.cat(best_ids)


def hotflip(
    embedding: torch.nn.Embedding,
    input_ids: torch.Tensor,
    loss_of_embeddings: Callable[[torch.Tensor], torch.Tensor],
    rate: float,
    protected: torch.Tensor,
    forbidden_ids: Sequence[int],
) -> torch.Tensor:
    """HotFlip: swap the tokens whose replacement most increases the loss to first order (one shot).

    One gradient g of the loss with respect to the input embeddings scores replacing token x by v at a
    position as (E[v] - E[x]) . g, for every v at once as one (positions, dim) x (dim, vocab) matmul. Each
    sequence then flips its `max(1, round(rate * u))` best-scoring positions (u = unprotected positions;
    none when rate is 0 or u is 0), each to its best token, even where the best estimate is negative.
    The gradient comes from `torch.autograd.grad`, so parameters' `.grad` are left as they were.

    Args:
        embedding: the model's input embedding; its weight E (vocab, dim) gives the candidate tokens.
        input_ids: (batch, length) token ids.
        loss_of_embeddings: maps (batch, length, dim) embeddings to a scalar loss summed over the batch.
        rate: fraction of each sequence's unprotected positions to flip, in [0, 1].
        protected: (batch, length) bool, True where a token must never change (padding, special tokens).
        forbidden_ids: token ids never inserted (special tokens, and embedding rows beyond the tokenizer's
            vocabulary when the matrix is padded).

    Returns:
        New (batch, length) token ids; `input_ids` is not modified.

    Raises:
        InputError: `rate` is outside [0, 1].
        ValueError: `protected` does not have the shape of `input_ids`, or the loss is not a scalar.
    """
    _check_rate(rate)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
    if protected.shape != input_ids.shape:
        raise ValueError(f"protected has shape {tuple(protected.shape)}, input_ids {tuple(input_ids.shape)}")
    flipped = input_ids.clone()
    protected = protected.to(device=input_ids.device, dtype=torch.bool)
    unprotected_counts = (~protected).sum(dim=1).tolist()
    flips_per_sequence = [max(1, round(rate * u)) if rate > 0 and u > 0 else 0 for u in unprotected_counts]
    if not any(flips_per_sequence):
        return flipped

    with torch.no_grad():
        embeds = embedding(input_ids)
    embeds = embeds.detach().requires_grad_(True)  # (batch, length, dim), a leaf cut off from the weight
    loss = loss_of_embeddings(embeds)
    if loss.dim() != 0:
        raise ValueError(f"loss_of_embeddings must return a scalar, got shape {tuple(loss.shape)}")
    (grad,) = torch.autograd.grad(loss, embeds)

    weight = embedding.weight.detach().float()  # (vocab, dim)
    batch, length, dim = grad.shape
    forbidden = torch.zeros(weight.shape[0], dtype=torch.bool, device=weight.device)
    if len(forbidden_ids):
        forbidden[torch.as_tensor(list(forbidden_ids), dtype=torch.long, device=weight.device)] = True
    gains, best_ids = _best_replacements(
        weight,
        input_ids.reshape(-1).to(weight.device),
        grad.reshape(-1, dim).float().to(weight.device),
        forbidden,
    )
    gains = gains.view(batch, length).masked_fill(protected.to(weight.device), float("-inf")).cpu()
    best_ids = best_ids.view(batch, length).to(input_ids.device)

    for row, flips in enumerate(flips_per_sequence):
        # a stable sort keeps ties in position order, so the choice is deterministic
        order = torch.sort(gains[row], descending=True, stable=True).indices[:flips]
        order = order[torch.isfinite(gains[row, order])]  # skip positions with no allowed replacement
        order = order.to(input_ids.device)
        flipped[row, order] = best_ids[row, order]
    return flipped
