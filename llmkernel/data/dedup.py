"""Step 3 of `llmk prepare`: exact and near-duplicate detection across the corpus.

Exact duplicates share the hash of their normalised text. Near-duplicates are found with MinHash
(Broder 1997, "On the resemblance and containment of documents") and locality-sensitive hashing over
bands of the signature (Leskovec, Rajaraman & Ullman, "Mining of Massive Datasets", ch. 3); Gopher's
MassiveWeb pipeline (Rae et al. 2021, appendix A.1.1) removes near-duplicates the same way, at a
Jaccard similarity of 0.8.

`exact_key` and `MinHasher.signature` run in worker processes: they are pure functions of the text,
and MinHasher is cheap to construct and to pickle (two arrays of `num_perm` integers). `Deduplicator`
runs in the driver, once per document in corpus order, so the first copy of a document is the one kept.
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np
import xxhash

from llmkernel.data.config import DedupConfig
from llmkernel.data.filters import CJK_CHARS

# Everything that is not a letter or digit (punctuation, symbols, '_' and whitespace) becomes one space.
_SEPARATORS_RE = re.compile(r"[\W_]+")
# Shingle words: each CJK character on its own (no spaces in CJK text), other words split on spaces.
_WORD_RE = re.compile(rf"[{CJK_CHARS}]|[^\s{CJK_CHARS}]+")
_CJK_RE = re.compile(rf"[{CJK_CHARS}]")

# Universal hashing h(x) = (a*x + b) mod p with the prime p = 2^32 - 5: for x, a, b < p every product
# fits in 64 bits, so numpy computes it exactly, and the values fit a uint32 signature.
PRIME = (1 << 32) - 5
# Shingles hashed at once: a (num_perm, CHUNK) uint64 block is 8 MB for 128 permutations.
CHUNK = 8192
_MASK64 = (1 << 64) - 1


@lru_cache(maxsize=2)
def normalize_for_exact(text: str) -> str:
    """Lowercase, punctuation and symbols removed (Unicode-aware), whitespace collapsed to one space.

    Cached for the last two texts: a worker calls it for `exact_key` and again for the MinHash signature
    of the same document, and on a 3 MB book it takes a tenth of a second.
    """
    return _SEPARATORS_RE.sub(" ", text.lower()).strip()


def exact_key(text: str) -> bytes:
    """16-byte hash (xxh3-128) of the normalised text: equal for copies that differ in case,
    whitespace or punctuation."""
    return xxhash.xxh3_128_digest(normalize_for_exact(text).encode("utf-8"))


def shingle_words(text: str) -> list[str]:
    """Words of the normalised text for shingling; CJK characters are words of their own."""
    normalized = normalize_for_exact(text)
    if _CJK_RE.search(normalized) is None:  # fast path: splitting is 3x faster than the regex
        return normalized.split()
    return _WORD_RE.findall(normalized)


def _mix64(x: np.ndarray) -> np.ndarray:
    """The 64-bit finaliser of MurmurHash3 (in place): spreads every input bit over the output."""
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xFF51AFD7ED558CCD)
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xC4CEB93FE1A85EC9)
    x ^= x >> np.uint64(33)
    return x


class MinHasher:
    """MinHash signatures of word-shingle sets, vectorised with numpy."""

    def __init__(self, num_perm: int, shingle_size: int, seed: int) -> None:
        self.num_perm = num_perm
        self.shingle_size = shingle_size
        self.seed = seed
        # The coefficients come from xxh3 of (seed, index), not from a numpy generator, so a signature
        # stays the same across numpy versions as well as across processes.
        a = [
            xxhash.xxh3_64_intdigest(b"a%d" % i, seed=seed & _MASK64) % (PRIME - 1) + 1
            for i in range(num_perm)
        ]
        b = [xxhash.xxh3_64_intdigest(b"b%d" % i, seed=seed & _MASK64) % PRIME for i in range(num_perm)]
        self._a = np.array(a, dtype=np.uint64).reshape(num_perm, 1)
        self._b = np.array(b, dtype=np.uint64).reshape(num_perm, 1)

    def shingle_hashes(self, text: str) -> np.ndarray:
        """One 64-bit hash per shingle (run of `shingle_size` words; the whole text if shorter)."""
        words = shingle_words(text)
        # Hash each word once with xxh3 (the same in every process, unlike Python's hash), then combine
        # the words of each shingle with a polynomial rolling hash in wrapping uint64 arithmetic and mix.
        word_hashes = np.fromiter(
            map(xxhash.xxh3_64_intdigest, map(str.encode, words)), dtype=np.uint64, count=len(words)
        )
        size = min(self.shingle_size, len(words))
        if size == 0:
            return np.array([xxhash.xxh3_64_intdigest(b"")], dtype=np.uint64)
        count = len(words) - size + 1
        hashes = word_hashes[:count].copy()
        for offset in range(1, size):
            hashes *= np.uint64(0x9E3779B97F4A7C15)
            hashes += word_hashes[offset : offset + count]
        return _mix64(hashes)

    def signature(self, text: str) -> np.ndarray:
        """MinHash signature of `text`: (num_perm,) uint32, the minimum of each hash over the shingles."""
        shingles = self.shingle_hashes(text) % np.uint64(PRIME)
        signature = np.full(self.num_perm, PRIME, dtype=np.uint64)
        for start in range(0, len(shingles), CHUNK):
            block = self._a * shingles[start : start + CHUNK]  # (num_perm, chunk): all permutations at once
            block += self._b
            block %= np.uint64(PRIME)
            np.minimum(signature, block.min(axis=1), out=signature)
        return signature.astype(np.uint32)


# Weights of the two LSH errors. Every candidate pair is confirmed on its signatures, so a false positive
# only costs one comparison, while a false negative keeps a duplicate: missing one weighs 9 times more.
# With equal weights, 0.8 and 128 permutations give 9 bands of 13 rows, which finds only 40% of the
# pairs at similarity 0.8 and 69% at 0.85; with these, 14 bands of 9 rows find 87% and 97.5%.
FALSE_POSITIVE_WEIGHT = 0.1
FALSE_NEGATIVE_WEIGHT = 0.9


@lru_cache(maxsize=16)
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm that minimise the weighted false positives and negatives.

    A pair with Jaccard similarity s shares at least one band with probability 1 - (1 - s^rows)^bands.
    False positives integrate that probability below the threshold, false negatives its complement above
    it (Leskovec et al., "Mining of Massive Datasets", section 3.4.3).
    """
    steps = 200  # midpoint rule on a uniform grid
    below = (np.arange(steps) + 0.5) / steps * threshold
    above = threshold + (np.arange(steps) + 0.5) / steps * (1.0 - threshold)
    best = (float("inf"), 1, num_perm)
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            false_positive = (1 - (1 - below**rows) ** bands).mean() * threshold
            false_negative = ((1 - above**rows) ** bands).mean() * (1.0 - threshold)
            error = float(FALSE_POSITIVE_WEIGHT * false_positive + FALSE_NEGATIVE_WEIGHT * false_negative)
            if error < best[0]:
                best = (error, bands, rows)
    return best[1], best[2]


class Deduplicator:
    """Remembers the kept documents and flags later exact and near duplicates of them.

    Memory per kept document: its id, the exact key in a dict, its signature as one row of a uint32
    array, and `bands` entries in one dict from a 64-bit band key (band index and rows hashed together)
    to the document's number (a list in the rare case of several documents in one bucket).
    """

    def __init__(self, config: DedupConfig) -> None:
        self.config = config
        self.bands, self.rows = lsh_params(config.threshold, config.num_perm) if config.near else (0, 0)
        self._ids: list[str] = []  # kept documents, by number
        self._exact: dict[bytes, int] = {}
        self._buckets: dict[int, int | list[int]] = {}
        self._signatures = np.zeros((0, config.num_perm), dtype=np.uint32)
        self._clusters: set[int] = set()
        self._counts = {"exact_duplicate": 0, "near_duplicate": 0}

    def add(
        self, doc_id: str, key: bytes | None, signature: np.ndarray | None
    ) -> tuple[str | None, str | None]:
        """(None, None) for a new document, which is remembered; else (kind of duplicate, id of the kept one)."""
        if key is not None and key in self._exact:
            return self._duplicate("exact_duplicate", self._exact[key])
        band_keys: list[int] = []
        if signature is not None and self.bands:
            band_keys = self._band_keys(signature)
            match = self._near_match(signature, band_keys)
            if match is not None:
                return self._duplicate("near_duplicate", match)
        number = len(self._ids)
        self._ids.append(doc_id)
        if key is not None:
            self._exact[key] = number
        if signature is not None and self.bands:
            self._store_signature(number, signature)
            for band_key in band_keys:
                bucket = self._buckets.setdefault(band_key, number)
                if bucket != number:
                    if isinstance(bucket, int):
                        self._buckets[band_key] = [bucket, number]
                    else:
                        bucket.append(number)
        return None, None

    @property
    def clusters(self) -> int:
        """Number of kept documents that had at least one duplicate dropped."""
        return len(self._clusters)

    @property
    def counts(self) -> dict[str, int]:
        """Dropped documents by kind: {"exact_duplicate": n, "near_duplicate": m}."""
        return dict(self._counts)

    def _duplicate(self, kind: str, number: int) -> tuple[str, str]:
        self._counts[kind] += 1
        self._clusters.add(number)
        return kind, self._ids[number]

    def _band_keys(self, signature: np.ndarray) -> list[int]:
        """One 64-bit key per band: the band's rows hashed with the band index as seed."""
        rows = np.ascontiguousarray(signature[: self.bands * self.rows], dtype=np.uint32).reshape(
            self.bands, -1
        )
        return [xxhash.xxh3_64_intdigest(band.tobytes(), seed=index) for index, band in enumerate(rows)]

    def _near_match(self, signature: np.ndarray, band_keys: list[int]) -> int | None:
        """The kept document most similar to `signature` among those sharing a band, if similar enough.

        LSH candidates are confirmed with the Jaccard similarity estimated from the two signatures (the
        share of equal MinHash values), which removes the false positives of the banding.
        """
        candidates: set[int] = set()
        for band_key in band_keys:
            bucket = self._buckets.get(band_key)
            if bucket is not None:
                candidates.update((bucket,) if isinstance(bucket, int) else bucket)
        if not candidates:
            return None
        numbers = np.array(sorted(candidates), dtype=np.int64)  # on a tie, the earliest kept document wins
        similarity = (self._signatures[numbers] == signature).mean(axis=1)
        best = int(np.argmax(similarity))
        return int(numbers[best]) if similarity[best] >= self.config.threshold else None

    def _store_signature(self, number: int, signature: np.ndarray) -> None:
        """Put the signature in row `number`, growing the array by half when full (amortised O(1))."""
        if number >= len(self._signatures):
            grown = np.zeros((max(1024, number * 3 // 2), self.config.num_perm), dtype=np.uint32)
            grown[: len(self._signatures)] = self._signatures
            self._signatures = grown
        self._signatures[number] = signature
