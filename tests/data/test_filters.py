"""Tests of the filter step: Gopher quality rules, CJK handling, language ID, and real data."""

from __future__ import annotations

import glob
import html
import json
import re
from pathlib import Path

import pytest

from llmkernel.data.config import FilterConfig
from llmkernel.data.filters import NgramStats, QualityFilter, detect_language, sample_text, tokenize

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real-data check: {DATA} is absent")

PROSE = """The river had risen in the night, and by morning the low meadow behind the mill was a grey
sheet of water with the tops of the fence posts standing out of it like a row of small islands.
Martha went down to look at it before breakfast, wrapped in her father's old coat, and found the
miller already there, leaning on his stick and counting the ducks that had come in with the flood.

"It will go down by Thursday," he said, without turning round. "It always does. The trouble is
what it leaves behind: mud in the cellar, weed on the wheel, and half the county asking whether
the bridge will hold." She laughed, because he said the same thing every spring, and because the
bridge had held for two hundred years and would very likely hold for two hundred more.

They walked back together along the bank. The sun came out for a moment over the hill, turned the
water to silver, and went in again, and somewhere beyond the orchard a blackbird began to sing as
if nothing at all had happened."""
FLAT = PROSE.replace("\n", " ")

POEMS = """《静夜思》
作者：李白
床前明月光，疑是地上霜。
举头望明月，低头思故乡。

《春晓》
作者：孟浩然
春眠不觉晓，处处闻啼鸟。
夜来风雨声，花落知多少。

《登鹳雀楼》
作者：王之涣
白日依山尽，黄河入海流。
欲穷千里目，更上一层楼。"""


@pytest.fixture(scope="module")
def keep() -> QualityFilter:
    return QualityFilter(FilterConfig())


def reason(text: str, **config: object) -> str | None:
    return QualityFilter(FilterConfig(**config))(text)[0]  # type: ignore[arg-type]


def test_keeps_prose_and_detects_english(keep: QualityFilter) -> None:
    assert keep(PROSE)[:2] == (None, "en")
    assert keep(PROSE)[2] > 0.99


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("buy now!!! " * 100, "top_ngram"),  # one phrase over and over
        ("### ### ###\n" * 40, "symbol_ratio"),  # hashes: markup debris
        ("Loading... please wait... " * 20 + PROSE, "symbol_ratio"),  # ellipses per word
        ("\n".join(str(n * 7919) for n in range(300)), "low_alpha_ratio"),  # a list of numbers
        (" ".join("abcdefghijklmnopqrstuvwxyz"[n % 26] for n in range(400)), "mean_word_length"),
        (" ".join(["pneumonoultramicroscopicsilicovolcanoconiosis"] * 3 + ["x"]), "mean_word_length"),
        ("Home\nAbout us\nContact\n" * 10 + PROSE, "duplicate_lines"),  # repeated menu lines
        (PROSE + "\n" + FLAT + "\n" + FLAT, "duplicate_line_chars"),  # one long line twice
        (FLAT + " " + FLAT, "duplicate_ngrams"),  # the whole text twice, on one line
    ],
)
def test_drops_junk_with_the_gopher_reason(keep: QualityFilter, text: str, expected: str) -> None:
    assert keep(text)[0] == expected


def test_length_and_word_limits() -> None:
    assert reason("Too short.") == "too_short"
    assert reason(PROSE, max_chars=100) == "too_long"
    assert reason(PROSE, min_words=1000) == "too_few_words"
    assert reason(PROSE, min_words=100) is None
    assert reason(POEMS, min_words=60) is None  # each Chinese character is a word
    assert reason(POEMS, min_words=200) == "too_few_words"


def test_disabled_filter_never_drops_but_still_detects_language() -> None:
    result = QualityFilter(FilterConfig(enabled=False))("buy now!!! " * 100)
    assert result[0] is None and result[1] == "en"


def test_language_filter_uses_languages_and_min_score() -> None:
    assert reason(PROSE, languages=["en"]) is None
    assert reason(PROSE, languages=["zh", "de"]) == "language"
    assert reason(POEMS, languages=["zh"]) is None
    assert reason(POEMS, languages=["zh"], min_language_score=1.0) in (None, "language")


def test_chinese_is_counted_by_character(keep: QualityFilter) -> None:
    assert tokenize("床前明月光，疑是 LLM kernel。") == [
        "床",
        "前",
        "明",
        "月",
        "光",
        "疑",
        "是",
        "LLM",
        "kernel",
    ]
    assert keep(POEMS)[:2] == (None, "zh")  # no spaces, yet no mean-word-length drop
    assert keep("买买买！" * 50)[0] == "top_ngram"
    assert keep((POEMS + "\n") * 3)[0] == "duplicate_lines"


def test_ngram_statistics_match_hand_counts() -> None:
    words = "a b c d e a b c d e".split()
    stats = NgramStats(words, total_chars=10)
    assert stats.duplicate_fraction(5) == pytest.approx(0.5)  # the second copy, not the first
    assert stats.duplicate_fraction(6) == 0.0
    # "a b" occurs twice: 2 occurrences x 2 characters of 10
    assert stats.top_fraction(2) == pytest.approx(0.4)
    assert NgramStats(["x"], 1).top_fraction(2) == 0.0


def test_config_scales_the_ngram_thresholds() -> None:
    quality = QualityFilter(FilterConfig(max_top_ngram_fraction=0.4, max_duplicate_ngram_fraction=0.3))
    assert quality.top_ngram_limits == pytest.approx({2: 0.4, 3: 0.36, 4: 0.32})
    assert quality.duplicate_ngram_limits[10] == pytest.approx(0.2)
    assert reason(FLAT + " " + FLAT, max_duplicate_ngram_fraction=0.9) is None


def test_long_documents_are_sampled_in_whole_lines() -> None:
    text = "\n".join(f"line {n} of a long document" for n in range(20000))
    sample = sample_text(text, max_chars=10000, chunks=4)
    assert len(sample) <= 10000
    assert sample.startswith("line 0 of") and "line 19999 of" in sample
    assert all(re.fullmatch(r"line \d+ of a long document", line) for line in sample.split("\n"))
    assert sample_text(PROSE) is PROSE


def test_language_detection_reads_head_and_middle() -> None:
    assert detect_language("") == ("unknown", 0.0)
    language, probability = detect_language("x" * 10 + POEMS * 200)
    assert language == "zh" and probability > 0.9


# ---------------------------------------------------------------- real data


def _book(path: str) -> str:
    text = Path(path).read_text(encoding="utf-8-sig").replace("\r\n", "\n")
    start = re.search(r"\*\*\* ?START OF[^\n]*\n", text)
    end = re.search(r"\*\*\* ?END OF", text)
    assert start and end
    return text[start.end() : end.start()]


@needs_data
def test_all_gutenberg_books_are_kept(keep: QualityFilter) -> None:
    paths = sorted(glob.glob(str(DATA / "gutenberg_en" / "books" / "*.txt")))
    assert len(paths) == 30
    results = {Path(p).name: keep(_book(p)) for p in paths}
    assert {name: r for name, r in results.items() if r[:2] != (None, "en")} == {}


@needs_data
def test_chinese_fortunes_are_kept_as_entries_and_as_a_whole(keep: QualityFilter) -> None:
    for name in ("tang300.txt", "song100.txt"):
        text = (DATA / "zh_fortunes" / name).read_text(encoding="utf-8")
        entries = [e.strip() for e in re.split(r"\n\s*\n", text) if len(e.strip()) >= 50]
        kept = sum(keep(e)[:2] == (None, "zh") for e in entries)
        assert kept >= 0.95 * len(entries), name
    whole = (DATA / "zh_fortunes" / "chinese.txt").read_text(encoding="utf-8")
    assert keep(whole)[:2] == (None, "zh")


@needs_data
def test_python_doc_pages_are_kept(keep: QualityFilter) -> None:
    """Main text of the Sphinx pages, tags stripped with a regex (a rough stand-in for the clean step)."""
    dropped = []
    for line in (DATA / "html_pages" / "pages.jsonl").read_text(encoding="utf-8").splitlines():
        page = json.loads(line)
        main = re.search(r'(?s)<div class="body" role="main">(.*?)<div class="sphinxsidebar"', page["html"])
        if main is None:
            continue
        text = html.unescape(re.sub(r"(?s)<[^>]+>", "", main.group(1)))
        if keep(text)[0] is not None:
            dropped.append((page["path"], keep(text)[0]))
    # howto/argparse.html repeats its example programs line for line: 40% of its lines are repeats,
    # which is what Gopher's duplicate-line rule (max 30%) is for.
    assert dropped == [("howto/argparse.html", "duplicate_lines")]
