"""Tests of the clean step: HTML extraction, Gutenberg stripping and the Cleaner's character repairs."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest

from llmkernel.data.clean import Cleaner, html_to_text, strip_gutenberg
from llmkernel.data.config import CleanConfig

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
ACTIONS = {
    "html_extracted",
    "mojibake_fixed",
    "boilerplate_removed",
    "normalized",
    "control_removed",
    "whitespace_collapsed",
    "regex_removed",
}

SPHINX_PAGE = """<!DOCTYPE html><html><head><title>T</title><script>var x = 1;</script>
<style>p { color: red }</style></head><body>
<div class="related" role="navigation"><h3>Navigation</h3><ul><li><a>index</a></li><li><a>modules</a> |</li></ul></div>
<div class="document"><div class="body" role="main">
<h1>4. Control Flow<a class="headerlink" href="#x">¶</a></h1>
<p>Use the <code>if</code>   statement,
like this:</p>
<div class="highlight"><pre><span></span><span class="k">if</span> x &lt; 0:
    x = 0

    print(&#39;negative&#39;)
</pre></div>
<p>Done &amp; dusted.</p>
</div></div>
<div class="sphinxsidebar" role="navigation"><h4>Previous topic</h4><p>Intro</p></div>
<div class="footer">&copy; Copyright 2001</div>
</body></html>"""


# ---------------------------------------------------------------- html_to_text


def test_html_keeps_headings_paragraphs_and_code_and_drops_chrome() -> None:
    text = html_to_text(SPHINX_PAGE)
    assert text == (
        "4. Control Flow\n\n"
        "Use the if statement, like this:\n\n"
        "if x < 0:\n    x = 0\n\n    print('negative')\n\n"
        "Done & dusted."
    )


def test_html_without_main_drops_nav_header_footer_toc_and_scripts() -> None:
    page = """<?xml version="1.0" encoding="UTF-8"?>
<html><head><title>Chapter 3</title></head><body>
<header>Site name</header><nav><a>Home</a></nav>
<div class="navheader"><table><tr><td>Prev</td><td>Next</td></tr></table></div>
<div class="chapter"><h1>Chapter&nbsp;3. Boot</h1>
<div class="toc"><p>Table of Contents</p><dl><dt>3.1. Overview</dt></dl></div>
<p>The system boots.</p><noscript>enable JS</noscript>
<aside class="sidebar">Related links</aside><div id="breadcrumbs">a &gt; b</div></div>
<div class="navfooter"><a>Home</a></div><footer>Imprint</footer>
<script>document.write("x")</script></body></html>"""
    assert html_to_text(page) == "Chapter 3. Boot\n\nThe system boots."


def test_html_lists_one_item_per_line() -> None:
    page = "<p>Intro</p><ul><li><p>a</p></li><li><p>b</p><ul><li>c</li><li>d</li></ul></li></ul><ol start='3'><li>x<li>y</ol><p>after</p>"
    assert html_to_text(page) == "Intro\n\n- a\n- b\n  - c\n  - d\n\n3. x\n4. y\n\nafter"


def test_html_tables_one_row_per_line() -> None:
    page = (
        "<p>Table 1</p><table><thead><tr><th>package</th><th>size</th></tr></thead>"
        "<tbody><tr><td>grub</td><td><p>159</p></td></tr><tr><td><img alt='x'></td><td>note</td></tr></tbody></table>"
    )
    assert html_to_text(page) == "Table 1\n\npackage | size\ngrub | 159\nnote"


def test_html_inline_whitespace_and_breaks() -> None:
    assert html_to_text("<p>one <b>two</b>three\n  four<br>five</p><h2>Head</h2>tail") == (
        "one twothree four\nfive\n\nHead\n\ntail"
    )


@pytest.mark.parametrize(
    "html",
    [
        "",
        "   ",
        "<<<>>>",
        "<html></html>",
        "<!-- only a comment -->",
        "<p>unclosed <b>bold",
        "\ud800<p>x</p>",
    ],
)
def test_html_malformed_or_empty_does_not_crash(html: str) -> None:
    assert isinstance(html_to_text(html), str)


def test_html_empty_documents_give_empty_text() -> None:
    assert html_to_text("") == html_to_text("<html><head><title>t</title></head></html>") == ""


def test_html_encoding_declaration_and_deep_nesting() -> None:
    assert html_to_text('<?xml version="1.0" encoding="ISO-8859-1"?><p>café</p>') == "café"
    assert html_to_text('<meta charset="iso-8859-1"><p>naïve – ok</p>') == "naïve – ok"
    deep = "<script>x()</script>" + "<div>" * 1500 + "deep <b>text</b>" + "</div>" * 1500
    assert html_to_text(deep) == "deep text"


# ---------------------------------------------------------------- strip_gutenberg

BOOK = """\ufeffThe Project Gutenberg EBook of Tiny Tales, by A. Writer

This eBook is for the use of anyone anywhere at no cost.

*** START OF THIS PROJECT GUTENBERG EBOOK TINY TALES ***




Produced by Some Volunteer and the Online
Distributed Proofreading Team at http://www.pgdp.net



TINY TALES

    Chapter I

It was a dark night, produced by clouds.

[Project Gutenberg Editor's Note: another version of this
etext exists.]

The end.


End of the Project Gutenberg EBook of Tiny Tales, by A. Writer

*** END OF THIS PROJECT GUTENBERG EBOOK TINY TALES ***

***** This file should be named 1-0.txt *****
Updated editions will replace the previous one.
"""


def test_strip_gutenberg_header_credits_notes_and_footer() -> None:
    text, removed = strip_gutenberg(BOOK)
    assert removed
    # The note paragraph goes; the blank lines around it are left to the Cleaner's whitespace step.
    assert text == "TINY TALES\n\n    Chapter I\n\nIt was a dark night, produced by clouds.\n\n\nThe end."
    assert not re.search(r"gutenberg", text, re.IGNORECASE)


def test_strip_gutenberg_old_marker_form_and_crlf() -> None:
    book = (
        "Title: X\r\n\r\n***START OF THE PROJECT GUTENBERG EBOOK JANE***\r\n\r\n\r\n"
        "Transcribed from the 1897 edition by D. P.\r\n\r\nJANE\r\n\r\nReader, I married him.\r\n\r\n"
        "***END OF THE PROJECT GUTENBERG EBOOK JANE***\r\n\r\nLicense text.\r\n"
    )
    text, removed = strip_gutenberg(book)
    assert removed
    assert text == "JANE\r\n\r\nReader, I married him."


def test_strip_gutenberg_wrapped_marker_and_footer_without_end_marker() -> None:
    book = (
        "Header\n*** START OF THIS PROJECT GUTENBERG EBOOK THE ADVENTURES OF\nSHERLOCK HOLMES ***\n\n"
        "Text of the book.\n\nEnd of Project Gutenberg's Adventures, by A. C. Doyle\n\nLicense text.\n"
    )
    assert strip_gutenberg(book) == ("Text of the book.", True)


def test_strip_gutenberg_leaves_ordinary_text_untouched() -> None:
    ordinary = (
        "Produced by the studio.\n\nThe Project Gutenberg archive is discussed here.\n*** not a marker ***\n"
    )
    assert strip_gutenberg(ordinary) == (ordinary, False)
    assert strip_gutenberg("") == ("", False)


# ---------------------------------------------------------------- Cleaner


def clean(text: str, is_html: bool = False, **options: object) -> tuple[str, list[str]]:
    return Cleaner(CleanConfig(**options))(text, is_html)


def test_mojibake_is_repaired() -> None:
    assert clean("cafÃ© â€œquotedâ€\x9d") == ("café “quoted”", ["mojibake_fixed"])
    assert clean("smile ðŸ˜€ and BjÃ¶rk")[0] == "smile 😀 and Björk"


@pytest.mark.parametrize(
    "text",
    [
        "兰叶春葳蕤，桂华秋皎洁。",  # a line of tang300.txt
        "Il a dit «déjà» à l’école.",
        "„Straße“ — naïve señor ±2 °C",
        "code:\n\tif x:\n\t\treturn y",
    ],
)
def test_good_text_passes_unchanged(text: str) -> None:
    assert clean(text) == (text, [])


def test_control_characters_bom_zero_width_and_crlf() -> None:
    text, actions = clean("\ufeffa\r\nb\x00c\u200bd\te\x07\rf\x9d")
    assert text == "a\nbcd\te\nf"
    assert actions == ["control_removed"]
    assert clean("a\r\nb", remove_control=False, collapse_whitespace=False)[0] == "a\r\nb"


def test_unicode_normalization_forms() -> None:
    decomposed = "cafe\u0301 ﬁ ①"
    assert clean(decomposed) == ("café ﬁ ①", ["normalized"])
    assert clean(decomposed, normalization="NFKC")[0] == "café fi 1"
    assert clean(decomposed, normalization="none") == (decomposed, [])


def test_whitespace_collapsed_but_indentation_and_code_kept() -> None:
    text = "\n\n  title  \n\n\n\n\npara one\nline two   \n\n    def f():\n        return 1\n\n\n"
    assert clean(text) == (
        "  title\n\npara one\nline two\n\n    def f():\n        return 1",
        ["whitespace_collapsed"],
    )
    assert clean(text, collapse_whitespace=False) == (text, [])


def test_regex_removals_run_after_extraction() -> None:
    text, actions = clean("<p>see [12] here</p>", is_html=True, remove_patterns=[r"\s*\[\d+\]"])
    assert (text, actions) == ("see here", ["html_extracted", "regex_removed"])


def test_boilerplate_step_and_its_flag() -> None:
    text, actions = clean(BOOK.replace("\n", "\r\n"))
    assert text.startswith("TINY TALES\n\n    Chapter I") and text.endswith("The end.")
    assert actions == ["control_removed", "boilerplate_removed", "whitespace_collapsed"]
    assert "START OF THIS PROJECT" in clean(BOOK, boilerplate=False)[0]


def test_disabled_flags_leave_text_alone() -> None:
    raw = "<p>cafÃ©\r\n</p>"
    assert clean(raw, is_html=True, enabled=False) == (raw, [])
    assert clean(
        raw, is_html=True, html=False, fix_unicode=False, remove_control=False, collapse_whitespace=False
    ) == (
        raw,
        [],
    )
    assert clean("cafÃ©", fix_unicode=False) == ("cafÃ©", [])


def test_actions_come_from_the_known_set_and_cleaner_pickles() -> None:
    cleaner = pickle.loads(pickle.dumps(Cleaner(CleanConfig(remove_patterns=["x{3}"], normalization="NFKC"))))
    text, actions = cleaner(SPHINX_PAGE, True)
    assert actions == ["html_extracted"] and text.startswith("4. Control Flow\n\n")
    text, actions = cleaner("\u200bxxxﬁ cafÃ©  \n", False)
    assert text == "fi café"
    assert set(actions) == ACTIONS - {"html_extracted", "boilerplate_removed"}


# ---------------------------------------------------------------- real data (not copied into the repo)


@pytest.mark.skipif(not (DATA / "gutenberg_en").is_dir(), reason=f"real data not found at {DATA}")
def test_real_gutenberg_books_lose_all_gutenberg_text() -> None:
    books = sorted((DATA / "gutenberg_en" / "books").glob("*.txt"))
    assert len(books) == 30
    cleaner = Cleaner(CleanConfig())
    for book in books:
        text, actions = cleaner(book.read_text(encoding="utf-8"), False)
        assert "boilerplate_removed" in actions, book.name
        assert not re.search(r"project gutenberg|gutenberg\.org", text, re.IGNORECASE), book.name
        assert len(text) > 200_000 and "\r" not in text and "\ufeff" not in text, book.name


@pytest.mark.skipif(not (DATA / "html_pages").is_dir(), reason=f"real data not found at {DATA}")
def test_real_sphinx_and_docbook_pages_come_out_as_clean_prose() -> None:
    with open(DATA / "html_pages" / "pages.jsonl", encoding="utf-8") as lines:
        pages = {record["path"]: html_to_text(record["html"]) for record in map(json.loads, lines)}
    menu = re.compile(
        r"^(?:Navigation|index|modules \||next \||previous \||Prev|Next|Home|Table of Contents|This Page"
        r"|Show Source|Report a Bug|Quick search|Previous topic|Next topic)$",
        re.MULTILINE,
    )
    for path, text in pages.items():
        assert not menu.search(text), (path, menu.search(text))
        assert not re.search(r"<script|jQuery|_static/|documentation_options|¶", text), path
    controlflow = pages["tutorial/controlflow.html"]
    assert "\n4.1. if Statements\n" in controlflow
    assert ">>> for w in words:\n...     print(w, len(w))\n" in controlflow
    chapter = pages["ch03.en.html"]
    assert chapter.startswith("Chapter 3. The system initialization\n\n")
    assert "\n3.1. An overview of the boot strap process\n" in chapter
    assert "menuentry 'Debian GNU/Linux' ... {\n        load_video\n        insmod gzio\n" in chapter
    assert "\npackage | popcon | size | initrd | bootloader | description\n" in chapter
