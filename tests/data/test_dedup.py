"""Tests of the dedup step: normalisation, exact keys, MinHash signatures, LSH parameters, the Deduplicator."""

from __future__ import annotations

import os
import pickle
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llmkernel.data.config import DedupConfig
from llmkernel.data.dedup import Deduplicator, MinHasher, exact_key, lsh_params, normalize_for_exact

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real-data check: {DATA} is absent")

VOCABULARY = """time year people way day man thing woman life child world school state family student group
country problem hand part place case week company system program question work government number night
point home water room mother area money story fact month lot right study book eye job word business issue
side kind head house service friend father power hour game line end member law car city community name
president team minute idea kid body information back parent face others level office door health person
art war history party result change morning reason research girl guy moment air teacher force education
river bridge garden window letter winter summer market church village doctor music picture horse train
ship island forest mountain station kitchen street paper table evening voice answer silence journey
""".split()


def paragraph(seed: int, words: int = 300) -> list[str]:
    """Deterministic English-like text: `words` words drawn from a 160-word vocabulary."""
    rng = random.Random(seed)
    return [rng.choice(VOCABULARY) for _ in range(words)]


POEMS = """《静夜思》作者：李白 床前明月光，疑是地上霜。举头望明月，低头思故乡。
《春晓》作者：孟浩然 春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。
《登鹳雀楼》作者：王之涣 白日依山尽，黄河入海流。欲穷千里目，更上一层楼。
《相思》作者：王维 红豆生南国，春来发几枝。愿君多采撷，此物最相思。
《鹿柴》作者：王维 空山不见人，但闻人语响。返景入深林，复照青苔上。
《江雪》作者：柳宗元 千山鸟飞绝，万径人踪灭。孤舟蓑笠翁，独钓寒江雪。
《寻隐者不遇》作者：贾岛 松下问童子，言师采药去。只在此山中，云深不知处。"""


@pytest.fixture(scope="module")
def hasher() -> MinHasher:
    config = DedupConfig()
    return MinHasher(config.num_perm, config.shingle_size, config.seed)


def test_normalize_lowercases_strips_punctuation_and_collapses_whitespace() -> None:
    assert normalize_for_exact("  Hello,\tWORLD!\n\n(again)  ") == "hello world again"
    assert normalize_for_exact("Café — «très» bien…") == "café très bien"
    assert normalize_for_exact("床前明月光，疑是地上霜。") == "床前明月光 疑是地上霜"
    assert normalize_for_exact("snake_case and x+y=2") == "snake case and x y 2"


def test_exact_key_is_16_bytes_and_ignores_case_whitespace_and_punctuation() -> None:
    key = exact_key("Hello, World!")
    assert isinstance(key, bytes) and len(key) == 16
    assert exact_key("hello   world") == key
    assert exact_key("HELLO\nWORLD.") == key
    assert exact_key("hello world again") != key


def test_lsh_params_balance_false_positives_and_negatives() -> None:
    assert lsh_params(0.8, 128) == (14, 9)
    for threshold in (0.5, 0.7, 0.8, 0.9):
        bands, rows = lsh_params(threshold, 128)
        assert bands * rows <= 128
        # Misses are weighted more than extra candidates: a pair at the threshold is a candidate with
        # probability >= 0.8, a pair 0.2 below it with at most 0.35.
        assert 1 - (1 - threshold**rows) ** bands >= 0.8
        assert 1 - (1 - (threshold - 0.2) ** rows) ** bands <= 0.35
    assert lsh_params(0.9, 128)[1] > lsh_params(0.5, 128)[1]


def test_signature_golden_values_for_a_fixed_seed() -> None:
    signature = MinHasher(16, 5, 1).signature(
        "The quick brown fox jumps over the lazy dog, twice: the quick brown fox!"
    )
    assert signature.dtype == np.uint32 and signature.shape == (16,)
    assert signature.tolist()[:6] == [71749068, 481515792, 283488800, 124130446, 691044748, 796592683]
    assert (
        MinHasher(16, 5, 2).signature("The quick brown fox").tolist()
        != MinHasher(16, 5, 1).signature("The quick brown fox").tolist()
    )


def test_signature_is_the_same_in_another_process_and_after_pickling(hasher: MinHasher) -> None:
    text = " ".join(paragraph(3)) + POEMS
    code = (
        "import sys; from llmkernel.data.dedup import MinHasher; "
        "print(MinHasher(128, 5, 1).signature(sys.stdin.read()).tolist())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # Python's own str hash differs in that process
    out = subprocess.run(
        [sys.executable, "-c", code], input=text, capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == str(hasher.signature(text).tolist())
    assert (pickle.loads(pickle.dumps(hasher)).signature(text) == hasher.signature(text)).all()


def test_short_and_empty_texts_have_one_shingle(hasher: MinHasher) -> None:
    assert len(hasher.shingle_hashes("two words")) == 1
    assert len(hasher.shingle_hashes("")) == 1
    assert (hasher.signature("Two words!") == hasher.signature("two   words")).all()
    assert (hasher.signature("two words") != hasher.signature("other words")).any()
    assert len(hasher.shingle_hashes(" ".join(paragraph(1)))) == 296  # 300 words, 5-word shingles


def test_exact_duplicates_are_dropped_with_the_id_of_the_kept_copy() -> None:
    dedup = Deduplicator(DedupConfig(near=False))
    assert dedup.add("a", exact_key("Some text, here."), None) == (None, None)
    assert dedup.add("b", exact_key("some   TEXT here"), None) == ("exact_duplicate", "a")
    assert dedup.add("c", exact_key("other text"), None) == (None, None)
    assert dedup.add("d", exact_key("Some text here!"), None) == ("exact_duplicate", "a")
    assert dedup.counts == {"exact_duplicate": 2, "near_duplicate": 0}
    assert dedup.clusters == 1


def _add(dedup: Deduplicator, hasher: MinHasher, doc_id: str, text: str) -> tuple[str | None, str | None]:
    return dedup.add(doc_id, exact_key(text), hasher.signature(text))


def test_near_duplicates_are_dropped_and_different_texts_kept(hasher: MinHasher) -> None:
    dedup = Deduplicator(DedupConfig(threshold=0.8))
    original = paragraph(1)
    assert _add(dedup, hasher, "original", " ".join(original)) == (None, None)

    # ~3% of the words changed, in three places (a name, a date, a figure: edits come in runs).
    edited = list(original)
    for start in (40, 150, 260):
        edited[start : start + 3] = ["Zanzibar", "1st", "1999"]
    assert _add(dedup, hasher, "edited", " ".join(edited)) == ("near_duplicate", "original")

    # 2% of the words changed one by one, spread out: each change breaks 5 shingles.
    scattered = list(original)
    for position in range(10, 300, 50):
        scattered[position] = "changed"
    assert _add(dedup, hasher, "scattered", " ".join(scattered)) == ("near_duplicate", "original")

    assert _add(dedup, hasher, "unrelated", " ".join(paragraph(2))) == (None, None)
    half = original[:150] + paragraph(4)[:150]  # Jaccard about 1/3
    assert _add(dedup, hasher, "half", " ".join(half)) == (None, None)
    assert dedup.counts == {"exact_duplicate": 0, "near_duplicate": 2}
    assert dedup.clusters == 1


def test_chinese_near_duplicates_are_found(hasher: MinHasher) -> None:
    dedup = Deduplicator(DedupConfig())
    assert _add(dedup, hasher, "poems", POEMS) == (None, None)
    one_changed = POEMS.replace("孤舟蓑笠翁", "孤舟蓑衣翁")
    assert _add(dedup, hasher, "copy", one_changed) == ("near_duplicate", "poems")
    assert _add(dedup, hasher, "commas", POEMS.replace("，", ", ")) == ("exact_duplicate", "poems")
    other = "《春望》作者：杜甫 国破山河在，城春草木深。感时花溅泪，恨别鸟惊心。烽火连三月，家书抵万金。白头搔更短，浑欲不胜簪。"
    assert _add(dedup, hasher, "other", other) == (None, None)


def test_without_key_and_signature_every_document_is_new() -> None:
    dedup = Deduplicator(DedupConfig(exact=False, near=False))
    assert dedup.add("a", None, None) == (None, None)
    assert dedup.add("b", None, None) == (None, None)
    assert dedup.counts == {"exact_duplicate": 0, "near_duplicate": 0} and dedup.clusters == 0


def test_signature_store_grows_and_random_signatures_do_not_collide() -> None:
    dedup = Deduplicator(DedupConfig())
    signatures = np.random.default_rng(0).integers(0, 2**32 - 5, size=(3000, 128), dtype=np.uint32)
    for number, signature in enumerate(signatures):
        assert dedup.add(str(number), None, signature) == (None, None)
    assert dedup.add("again", None, signatures[2500].copy()) == ("near_duplicate", "2500")
    assert dedup.counts["near_duplicate"] == 1


# ---------------------------------------------------------------- real data


def _book(name: str) -> str:
    text = (DATA / "gutenberg_en" / "books" / name).read_text(encoding="utf-8-sig").replace("\r\n", "\n")
    start = re.search(r"\*\*\* ?START OF[^\n]*\n", text)
    end = re.search(r"\*\*\* ?END OF", text)
    assert start and end
    return text[start.end() : end.start()]


@needs_data
def test_gutenberg_book_with_edited_lines_is_a_near_duplicate(hasher: MinHasher) -> None:
    book = _book("pg244_a_study_in_scarlet.txt")
    lines = book.split("\n")
    rng = random.Random(0)
    filled = [i for i, line in enumerate(lines) if line.strip()]
    for i in rng.sample(filled, len(filled) // 100):  # 1% of the lines rewritten
        lines[i] = "an edited line: " + " ".join(reversed(lines[i].split()))
    dedup = Deduplicator(DedupConfig())
    assert _add(dedup, hasher, "scarlet", book) == (None, None)
    assert _add(dedup, hasher, "peter pan", _book("pg16_peter_pan.txt")) == (None, None)
    assert _add(dedup, hasher, "scarlet edited", "\n".join(lines)) == ("near_duplicate", "scarlet")
