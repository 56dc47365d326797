"""Step 2 of `llmk prepare`: drop low-quality documents and detect their language.

The quality rules are the heuristics of Gopher (Rae et al. 2021, "Scaling Language Models: Methods,
Analysis & Insights from Training Gopher", appendix A.1.1, "MassiveWeb" quality filter): length, symbol
to word ratio, mean word length, share of letters, and the repetition rules (duplicate lines, most frequent
n-grams, duplicated n-grams). Gopher was built for English; here "words" of Chinese, Japanese and Korean
text are single characters, so the same rules work on text without spaces.

`QualityFilter` is constructed once per worker process; the language model of langid is loaded lazily on
the first call and cached for the process.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

import numpy as np

from llmkernel.data.config import FilterConfig

# CJK ideographs (with extensions and compatibility ideographs), Japanese kana and Hangul syllables:
# each character of these scripts is one "word", since they are written without spaces.
CJK_CHARS = (
    "\u3040-\u30ff"  # hiragana, katakana
    "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # CJK ideographs
    "\uac00-\ud7af"  # Hangul syllables
    "\U00020000-\U0003134f"  # CJK extensions B..H
)
# CJK punctuation (ideographic comma and full stop, fullwidth punctuation) separates words like a space.
_CJK_PUNCT = "\u3000-\u303f\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65"
# Words: one CJK character, or a whitespace-delimited run of other characters (Gopher splits on spaces).
TOKEN_RE = re.compile(rf"[{CJK_CHARS}]|[^\s{CJK_CHARS}{_CJK_PUNCT}]+")
_CJK_RE = re.compile(rf"[{CJK_CHARS}]")
# Characters of words that are not letters (str.isalpha), up to rare cases such as '²' or 'Ⅻ'.
_NON_LETTER_RE = re.compile(r"[\W\d_]")

# Gopher thresholds for the repetition rules; the config scales them (see QualityFilter.__init__).
_TOP_NGRAM_LIMITS = {2: 0.20, 3: 0.18, 4: 0.16}
_DUP_NGRAM_LIMITS = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}

# Documents longer than SAMPLE_CHARS are measured on SAMPLE_CHUNKS chunks spread evenly over the text
# (cut at line breaks). All quality statistics are fractions or means, so a spread sample estimates them
# well (repetitive spam repeats throughout), and the cost per document is bounded: a 3 MB book costs
# about as much as a 128 KB web page.
SAMPLE_CHARS = 128_000
SAMPLE_CHUNKS = 8

# Language ID reads the start and a middle chunk: enough for a confident guess, cheap for long books.
LANGID_HEAD_CHARS = 1500
LANGID_MIDDLE_CHARS = 1500


@lru_cache(maxsize=1)
def _language_identifier() -> Any:
    """The langid model with normalised probabilities, loaded once per process (about 1 s)."""
    from langid.langid import LanguageIdentifier, model

    return LanguageIdentifier.from_modelstring(model, norm_probs=True)


def detect_language(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability) of `text`, from its start and a chunk from its middle."""
    if len(text) > LANGID_HEAD_CHARS + LANGID_MIDDLE_CHARS:
        middle = len(text) // 2
        text = text[:LANGID_HEAD_CHARS] + "\n" + text[middle : middle + LANGID_MIDDLE_CHARS]
    if not text.strip():
        return "unknown", 0.0
    # langid's own classify() is a dense product of all ~7,500 byte n-gram features with the model
    # (a BLAS call that is slow when its threads compete with other workers); a text has a few hundred
    # features, so sum only their rows. Same result as classify(), without BLAS.
    identifier = _language_identifier()
    counts = identifier.instance2fv(text)
    features = np.flatnonzero(counts)
    log_probs = identifier.nb_pc + (identifier.nb_ptc[features] * counts[features, None]).sum(axis=0)
    best = int(np.argmax(log_probs))
    probability = 1.0 / float(np.exp(log_probs - log_probs[best]).sum())  # softmax of the best class
    return str(identifier.nb_classes[best]), probability


def sample_text(text: str, max_chars: int = SAMPLE_CHARS, chunks: int = SAMPLE_CHUNKS) -> str:
    """`text` itself if short, else `chunks` pieces of it spread evenly, each cut to whole lines."""
    if len(text) <= max_chars:
        return text
    size = max_chars // chunks
    step = (len(text) - size) / (chunks - 1)
    pieces = []
    for i in range(chunks):
        start = int(i * step)
        end = start + size
        if start > 0:  # begin after a line break, if one is near, so no line is cut in two
            newline = text.find("\n", start, end)
            start = newline + 1 if newline >= 0 else start
        if end < len(text):  # and end before one
            newline = text.rfind("\n", start, end)
            end = newline if newline > start else end
        pieces.append(text[start:end])
    return "\n".join(pieces)


def tokenize(text: str) -> list[str]:
    """Words for the statistics: CJK characters one by one, other scripts split on whitespace."""
    return TOKEN_RE.findall(text)


class NgramStats:
    """Gopher's n-gram repetition statistics of one word sequence, computed on hashes with numpy.

    Fractions are characters of words over `total_chars`, the length of the text (as in the paper:
    "fraction of characters"), so spaces and punctuation between words only enlarge the denominator.
    """

    def __init__(self, words: list[str], total_chars: int) -> None:
        # Python's string hash is random per process but fixed within it, which is all that comparing
        # n-grams of one document needs; collisions at 64 bits are negligible.
        self.hashes = np.fromiter(map(hash, words), dtype=np.int64, count=len(words)).view(np.uint64)
        self.lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        self.total_chars = max(1, total_chars)

    def _sorted(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(n-gram start positions ordered by hash, start of each run of equal hashes, run sizes)."""
        count = len(self.hashes) - n + 1
        # Polynomial rolling hash of the n words, wrapping in uint64; the multiplier is odd and mixes bits.
        hashes = self.hashes[:count].copy()
        for offset in range(1, n):
            hashes *= np.uint64(0x9E3779B97F4A7C15)
            hashes += self.hashes[offset : offset + count]
        order = np.argsort(hashes)
        ordered = hashes[order]
        run_starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
        return order, run_starts, np.diff(np.append(run_starts, count))

    def top_fraction(self, n: int) -> float:
        """Share of characters covered by the most frequent n-gram (each occurrence counted)."""
        if len(self.hashes) < n + 1:
            return 0.0
        order, run_starts, sizes = self._sorted(n)
        top = int(np.argmax(sizes))
        if sizes[top] < 2:  # an n-gram that occurs once is not repetition
            return 0.0
        start = int(order[run_starts[top]])
        return int(self.lengths[start : start + n].sum()) * int(sizes[top]) / self.total_chars

    def duplicate_fraction(self, n: int) -> float:
        """Share of characters inside repeats of an earlier n-gram; overlapping repeats count once."""
        count = len(self.hashes) - n + 1
        if count < 2:
            return 0.0
        order, run_starts, sizes = self._sorted(n)
        # Every occurrence but the earliest of an n-gram is a repeat (as for lines, the first copy is
        # not counted).
        repeated = np.zeros(count, dtype=bool)
        repeated[order] = np.repeat(sizes > 1, sizes)
        repeated[np.minimum.reduceat(order, run_starts)] = False
        # A word is covered when a repeat starts at most n - 1 words before it: +1 at each start, -1 n
        # words later, and a running sum above zero marks the covered words.
        steps = np.zeros(len(self.hashes) + 1, dtype=np.int32)
        positions = np.flatnonzero(repeated)
        steps[positions] += 1  # positions are distinct, so fancy indexing adds correctly
        steps[positions + n] -= 1
        covered = np.cumsum(steps[:-1]) > 0
        return int(self.lengths[covered].sum()) / self.total_chars


def duplicate_line_fractions(text: str) -> tuple[float, float]:
    """(share of non-empty lines that repeat an earlier line, share of characters in those lines)."""
    seen: set[str] = set()
    lines = duplicates = chars = duplicate_chars = 0
    for line in text.split("\n"):
        line = line.strip()
        if not line:
            continue
        lines += 1
        chars += len(line)
        if line in seen:
            duplicates += 1
            duplicate_chars += len(line)
        else:
            seen.add(line)
    return duplicates / max(1, lines), duplicate_chars / max(1, chars)


class QualityFilter:
    """Gopher quality rules plus a language filter, with CJK text counted character by character."""

    def __init__(self, config: FilterConfig) -> None:
        self.config = config
        self.languages = set(config.languages)
        # The config gives the limit for the 2-gram (5-gram) rule; the others keep Gopher's spacing.
        top_scale = config.max_top_ngram_fraction / _TOP_NGRAM_LIMITS[2]
        dup_scale = config.max_duplicate_ngram_fraction / _DUP_NGRAM_LIMITS[5]
        self.top_ngram_limits = {n: limit * top_scale for n, limit in _TOP_NGRAM_LIMITS.items()}
        self.duplicate_ngram_limits = {n: limit * dup_scale for n, limit in _DUP_NGRAM_LIMITS.items()}

    def __call__(self, text: str) -> tuple[str | None, str, float]:
        """(drop reason or None if kept, detected language, language probability)."""
        language, probability = detect_language(text)
        if not self.config.enabled:
            return None, language, probability
        reason = self.quality_reason(text)
        if reason is None and self.languages:
            if language not in self.languages or probability < self.config.min_language_score:
                reason = "language"
        return reason, language, probability

    def quality_reason(self, text: str) -> str | None:
        """The first quality rule that `text` fails, or None."""
        config = self.config
        text = text.strip()
        if len(text) < config.min_chars:
            return "too_short"
        if config.max_chars and len(text) > config.max_chars:
            return "too_long"
        sample = sample_text(text)
        tokens = tokenize(sample.lower())
        if config.min_words and len(tokens) < config.min_words and len(tokenize(text)) < config.min_words:
            return "too_few_words"

        # Symbols: '#' (markup, hashtags) and ellipses (truncated text) per word, each on its own (Gopher).
        parts = sample.split()
        words = max(len(parts), len(tokens), 1)
        hashes = sample.count("#")
        ellipses = sample.count("...") + sample.count("…")
        if max(hashes, ellipses) / words > config.max_symbol_ratio:
            return "symbol_ratio"

        # Words hold every letter, so count the non-letters among their characters.
        joined = "".join(tokens)
        letters = len(joined) - len(_NON_LETTER_RE.findall(joined))
        if letters < config.min_alpha_ratio * sum(map(len, parts)):
            return "low_alpha_ratio"

        # Mean word length only makes sense for text written with spaces; for mostly-CJK text it is skipped.
        cjk = 0 if sample.isascii() else len(_CJK_RE.findall(sample))
        cjk_mode = cjk >= 0.5 * len(tokens)
        if tokens and not cjk_mode:
            mean = (len(joined) - cjk) / (len(tokens) - cjk)
            if not config.min_mean_word_length <= mean <= config.max_mean_word_length:
                return "mean_word_length"

        line_fraction, line_char_fraction = duplicate_line_fractions(sample)
        if line_fraction > config.max_duplicate_line_fraction:
            return "duplicate_lines"
        if line_char_fraction > config.max_duplicate_line_char_fraction:
            return "duplicate_line_chars"

        # For CJK text a "word" is one character, while a word of Chinese is 1.5-2 characters on average,
        # so Gopher's n words become 2n characters; with n characters, common two-character words make
        # ordinary Chinese prose look repetitive (e.g. the whole of fortunes-zh's chinese.txt).
        scale = 2 if cjk_mode else 1
        ngrams = NgramStats(tokens, len(sample))
        for n, limit in self.top_ngram_limits.items():
            if ngrams.top_fraction(n * scale) > limit:
                return "top_ngram"
        # Every word inside a repeated (n+1)-gram is inside a repeated n-gram too, so the fraction only
        # falls as n grows: once it is under the smallest limit, the longer n-grams cannot fail.
        smallest = min(self.duplicate_ngram_limits.values())
        for n, limit in self.duplicate_ngram_limits.items():
            fraction = ngrams.duplicate_fraction(n * scale)
            if fraction > limit:
                return "duplicate_ngrams"
            if fraction <= smallest:
                break
        return None
