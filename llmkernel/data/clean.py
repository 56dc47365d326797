"""Step 1 of `llmk prepare`: raw text or HTML -> clean, normalised text.

`Cleaner` runs the steps in a fixed order (HTML extraction, mojibake repair, control characters,
Unicode normalisation, Gutenberg boilerplate, regex removals, whitespace) and reports which of them
changed the text. Every step first does a cheap C-speed check so clean plain text passes through fast.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from functools import partial

from ftfy import fix_encoding
from lxml import etree

from llmkernel.data.config import CleanConfig

# ---------------------------------------------------------------- HTML -> text

# Never content: metadata, code, widgets and page chrome.
_DROP_TAGS = frozenset(
    "head script style noscript template nav aside iframe object embed canvas svg form button select "
    "input textarea label".split()
)
_DROP_ROLES = frozenset({"navigation", "banner", "contentinfo", "search", "complementary"})
_DROP_CLASSES = frozenset(
    "sphinxsidebar sphinxsidebarwrapper related navheader navfooter footer breadcrumb breadcrumbs toc "
    "toctree-wrapper list-of-tables list-of-figures list-of-examples headerlink mobile-nav sidebar navbar "
    "navigation linenos skip-link".split()
)
_DROP_IDS = frozenset(
    "sidebar navigation nav navbar footer header breadcrumb breadcrumbs toc searchbox".split()
)
# Elements that start and end a paragraph-like block (a blank line around them).
_BLOCK_TAGS = frozenset(
    "address article blockquote body caption center details dd div dl dt fieldset figcaption figure footer "
    "h1 h2 h3 h4 h5 h6 header hr html legend main p section summary table".split()
)
# HTML collapses these; the no-break space is layout, not content, so it becomes a plain space too.
_HTML_SPACE = re.compile(r"[ \t\n\r\f\xa0]+")
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)


def _is_chrome(el: etree._Element, tag: str) -> bool:
    """Whether `el` is navigation, a sidebar or other page furniture rather than content."""
    if tag in _DROP_TAGS:
        return True
    # <header>/<footer> inside an article are its title or byline; at page level they are chrome.
    if tag in ("header", "footer") and next(el.iterancestors("article", "main", "section"), None) is None:
        return True
    attrib = el.attrib
    if not attrib:
        return False
    if "hidden" in attrib or (attrib.get("role") or "").lower() in _DROP_ROLES:
        return True
    classes = attrib.get("class")
    if classes:
        tokens = classes.lower().split()
        if not _DROP_CLASSES.isdisjoint(tokens):
            return True
        # Sphinx's local "Contents" box; a bare "contents" class is often the main text itself.
        if "contents" in tokens and ("topic" in tokens or "local" in tokens):
            return True
    return (attrib.get("id") or "").lower() in _DROP_IDS


# Only <br> and line-number gutters need the slow walk below; everything else is plain itertext.
_PRE_NEEDS_WALK = etree.XPath("boolean(.//br | .//*[contains(concat(' ', @class, ' '), ' linenos ')])")


def _pre_text(el: etree._Element) -> str:
    """The verbatim text of a <pre> subtree (line-number gutters left out)."""
    if not _PRE_NEEDS_WALK(el):
        return "".join(el.itertext())
    parts = [el.text or ""]
    for child in el:
        tag = child.tag
        if isinstance(tag, str):
            if tag == "br":
                parts.append("\n")
            elif not _is_chrome(child, tag):
                parts.append(_pre_text(child))
        parts.append(child.tail or "")
    return "".join(parts)


class _TextBuilder:
    """Turns an element tree into text: owed line breaks are kept pending and merged, so nested blocks
    give one blank line, not many."""

    def __init__(self) -> None:
        self.out: list[str] = []
        self.pending = 0  # newlines owed before the next text (0, 1 or 2)
        self.space = False  # a collapsed space is owed before the next word
        self.line_start = True
        self.hold = False  # right after a list marker: the item's first paragraph stays on its line
        self.lists: list[list[int]] = []  # per open list: [ordered, items so far, start number]
        self.items = 0  # depth of open <li>: blocks inside items are separated by one newline
        self.cells = 0  # depth of open table cells: breaks inside a cell become spaces
        self.row_has_text = False
        self.cell_sep = False

    def brk(self, newlines: int) -> None:
        if self.cells:
            self.space = True
        elif self.out and not self.hold:
            self.pending = max(self.pending, newlines)

    def block(self) -> None:
        self.brk(1 if self.items else 2)

    def _flush(self) -> None:
        if self.pending:
            self.out.append("\n" * self.pending)
            self.pending = 0
            self.line_start, self.space = True, False

    def text(self, raw: str) -> None:
        s = _HTML_SPACE.sub(" ", raw)
        if not s.strip():
            self.space = self.space or bool(s)
            return
        if s[0] == " ":
            self.space, s = True, s[1:]
        trailing = s[-1] == " "
        if trailing:
            s = s[:-1]
        self._flush()
        if self.cell_sep:
            self.out.append(" | ")
            self.cell_sep = False
        elif self.space and not self.line_start:
            self.out.append(" ")
        self.out.append(s)
        self.line_start, self.hold, self.space = False, False, trailing
        if self.cells:
            self.row_has_text = True

    def pre(self, el: etree._Element) -> None:
        code = _pre_text(el).lstrip("\r\n").rstrip()
        if not code:
            return
        self.hold = False
        self.block()
        self._flush()
        self.out.append(code)
        self.line_start, self.space = False, False
        self.block()

    def item(self) -> None:
        if self.cells:
            self.space = True
            return
        current = self.lists[-1] if self.lists else [0, 0, 1]
        self.hold = False
        if current[1] and self.out:
            self.pending = 1  # consecutive items: one per line even if they hold <p> blocks
        else:
            self.brk(1)
        self._flush()
        marker = f"{current[2] + current[1]}." if current[0] else "-"
        self.out.append("  " * max(len(self.lists) - 1, 0) + marker + " ")
        current[1] += 1
        self.line_start, self.space, self.hold = True, False, True

    def walk(self, el: etree._Element) -> None:
        """Emit `el` and its subtree (not its tail, which belongs to the parent)."""
        tag = el.tag
        if tag in ("ul", "ol", "menu"):
            start = el.get("start", "1")
            self.lists.append([tag == "ol", 0, int(start) if start.isdigit() else 1])
            self.block()
        elif tag == "li":
            self.item()
            self.items += 1
        elif tag == "tr":
            self.brk(1)
            self.row_has_text = False
        elif tag in ("td", "th"):
            self.cell_sep = self.row_has_text
            self.cells += 1
        elif tag in _BLOCK_TAGS:
            self.block()
        if el.text:
            self.text(el.text)
        for child in el:
            ctag = child.tag
            if isinstance(ctag, str) and not _is_chrome(child, ctag):
                if ctag == "pre":
                    self.pre(child)
                elif ctag == "br":
                    self.brk(1)
                else:
                    self.walk(child)
            if child.tail:
                self.text(child.tail)
        if tag in ("ul", "ol", "menu"):
            self.lists.pop()
            self.block()
        elif tag == "li":
            self.items -= 1
        elif tag in ("td", "th"):
            self.cells -= 1
            self.cell_sep = False
        elif tag == "tr":
            self.brk(1)
        elif tag in _BLOCK_TAGS:
            self.block()


# huge_tree: the default 256-level depth limit silently drops deeply nested text.
_PARSER = etree.HTMLParser(
    encoding="utf-8", remove_comments=True, remove_pis=True, no_network=True, huge_tree=True
)


def html_to_text(html: str) -> str:
    """The main text of an HTML page: headings, paragraphs, "- " list items, " | "-joined table cells
    and verbatim <pre> blocks, separated by blank lines; navigation and other chrome dropped."""
    if not html or not html.strip():
        return ""
    try:
        # Bytes with an explicit encoding: lxml refuses str input that has an XML encoding declaration.
        root = etree.fromstring(html.encode("utf-8", "replace"), _PARSER)
    except (etree.LxmlError, ValueError):
        return ""
    if root is None:
        return ""
    # A page that marks its main content (Sphinx: role="main") needs no further guessing.
    main = root.xpath("//main | //*[@role='main']")
    builder = _TextBuilder()
    try:
        builder.walk(main[0] if main else root)
    except RecursionError:  # absurdly deep nesting: fall back to the flat text, minus code and chrome
        etree.strip_elements(root, *_DROP_TAGS, with_tail=False)
        return _HTML_SPACE.sub(" ", "".join(root.itertext())).strip()
    return _TRAILING_SPACE.sub("", "".join(builder.out)).strip("\n")


# ---------------------------------------------------------------- Project Gutenberg boilerplate

_PG_START = re.compile(
    r"^[ \t]*\*{3}[ \t]*START OF[^\n]*PROJECT GUTENBERG[^\n]*|^[ \t]*\*END\*[ \t]*THE SMALL PRINT[^\n]*",
    re.IGNORECASE | re.MULTILINE,
)
_PG_END = re.compile(r"^[ \t]*\*{3}[ \t]*END OF[^\n]*PROJECT GUTENBERG[^\n]*", re.IGNORECASE | re.MULTILINE)
# "End of the Project Gutenberg EBook of ...", "End of Project Gutenberg's ...": just before END.
_PG_END_LINE = re.compile(r"^[ \t]*End of (?:the |this )?Project Gutenberg", re.IGNORECASE | re.MULTILINE)
# Words that mark the first paragraph after START as a production credit, not the book.
_PG_CREDIT = re.compile(
    r"produced by|prepared by|transcribed (?:from|by)|proof-?read|volunteer|e-?text|e-?book|special thanks",
    re.IGNORECASE,
)
_PG_MENTION = re.compile(r"project gutenberg|gutenberg\.(?:org|net)", re.IGNORECASE)
_BLANK_LINES = re.compile(r"(?:[ \t]*\r?\n)*")
_BLANK_LINE = re.compile(r"\n[ \t\r]*\n")
_PG_WINDOW = 100_000  # headers and license footers are well under this; bounds the search cost


def _paragraph_span(text: str, pos: int, reach: int = 3000) -> tuple[int, int]:
    """Start and end (after its last newline) of the blank-line-delimited paragraph around `pos`,
    looking at most `reach` characters each way (a longer "paragraph" is unwrapped text anyway)."""
    low = max(0, pos - reach)
    start = max(text.rfind("\n\n", low, pos) + 2, text.rfind("\n\r\n", low, pos) + 3, low)
    blank = _BLANK_LINE.search(text, pos, pos + reach)
    return start, (blank.start() + 1 if blank else min(len(text), pos + reach))


def _drop_credits(body: str) -> str:
    """Drop short "Produced by ..." style credit paragraphs at the very start of the book."""
    offset = 0
    for _ in range(3):
        start = _BLANK_LINES.match(body, offset).end()
        end = _paragraph_span(body, start)[1]
        if end - start > 600 or not _PG_CREDIT.search(body, start, end):
            break
        offset = end
    return body[offset:] if offset else body


def _mentions(body: str) -> list[int]:
    """Offsets of "Project Gutenberg" / "gutenberg.org" mentions. A plain substring scan finds the
    candidates at C speed (a case-insensitive regex over a whole book is ~20x slower); the regex confirms."""
    found = set()
    for needle in ("utenberg", "UTENBERG"):
        i = body.find(needle)
        while i >= 0:
            match = _PG_MENTION.search(body, max(0, i - 9), i + 12)
            if match:
                found.add(match.start())
            i = body.find(needle, i + 8)
    return sorted(found)


def _drop_mentions(body: str) -> str:
    """Drop editor's and transcriber's notes that name Project Gutenberg (the line if the paragraph is long)."""
    pieces, done = [], 0
    for pos in _mentions(body):
        if pos < done:
            continue
        start, end = _paragraph_span(body, pos)
        if end - start > 2000:  # a huge "paragraph" is really unwrapped text: drop just the line
            start = body.rfind("\n", 0, pos) + 1
            line_end = body.find("\n", pos)
            end = len(body) if line_end < 0 else line_end + 1
        pieces.append(body[done : max(start, done)])
        done = end
    pieces.append(body[done:])
    return "".join(pieces)


def strip_gutenberg(text: str) -> tuple[str, bool]:
    """Remove the Project Gutenberg header, credits, notes and license footer; (text, whether removed).

    Text without a START or END marker is returned unchanged."""
    start, end = 0, len(text)
    head = _PG_START.search(text, 0, _PG_WINDOW)
    if head:
        start = text.find("\n", head.end())
        start = len(text) if start < 0 else start + 1
        # A long title can wrap the marker onto a second line that ends with "***".
        if not head.group().rstrip().endswith("*"):
            nxt = text.find("\n", start)
            if text[start : nxt if nxt >= 0 else len(text)].rstrip().endswith("***"):
                start = len(text) if nxt < 0 else nxt + 1
    tail = _PG_END.search(text, max(start, len(text) - _PG_WINDOW))
    if tail:
        end = tail.start()
    end_lines = list(_PG_END_LINE.finditer(text, max(start, end - (3000 if tail else _PG_WINDOW)), end))
    last = end_lines[-1] if end_lines else None
    if last:
        end = last.start()
    if not (head or tail or last):
        return text, False
    body = _drop_mentions(_drop_credits(text[start:end]))
    return body.strip("\r\n"), True


# ---------------------------------------------------------------- character-level repairs

# Mojibake is UTF-8 read as cp1252/latin-1: a lead byte shown as Â..ô followed by a continuation byte
# shown as a C1 control, a Latin-1 symbol or a cp1252 punctuation mark. One character class plus one
# follower keeps the regex on its fast path; ftfy then decides, per flagged line, what really is broken.
_CP1252 = "€‚ƒ„…†‡ˆ‰Š‹ŒŽ‘’“”•–—˜™š›œžŸ"
_MOJIBAKE = re.compile("[\xc2-\xf4][\x80-\xbf" + _CP1252 + "]")
# C0/C1 controls except \t and \n, DEL, zero-width space, word joiner, BOM, lone surrogates (they break
# UTF-8 encoding later) and non-characters. ZWJ/ZWNJ stay: emoji and Indic/Persian scripts need them.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\u2060\ufeff\ud800-\udfff\ufffe\uffff]")


def fix_mojibake(text: str) -> str:
    """Repair UTF-8-as-cp1252 mojibake, running ftfy only on the lines that look broken."""
    if text.isascii() or not _MOJIBAKE.search(text):
        return text
    pieces, done = [], 0
    for match in _MOJIBAKE.finditer(text):
        if match.start() < done:
            continue
        start = text.rfind("\n", 0, match.start()) + 1
        end = text.find("\n", match.end())
        end = len(text) if end < 0 else end
        pieces.append(text[done:start])
        pieces.append(fix_encoding(text[start:end]))  # encoding only: no quote uncurling etc.
        done = end
    pieces.append(text[done:])
    return "".join(pieces)


def remove_control(text: str) -> str:
    """CRLF and CR -> LF; drop control, zero-width and BOM characters (keeps \\n and \\t)."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if "\u2028" in text or "\u2029" in text:
        text = text.replace("\u2028", "\n").replace("\u2029", "\n\n")
    return _CONTROL.sub("", text)


def normalize(text: str, form: str) -> str:
    """Unicode normal form `form` (NFC, NFKC) of `text`; "none" leaves it."""
    if form == "none" or unicodedata.is_normalized(form, text):
        return text
    return unicodedata.normalize(form, text)


_MANY_NEWLINES = re.compile("\n\n\n+")  # written out (not \n{3,}) so the regex gets a literal prefix


def collapse_whitespace(text: str) -> str:
    """Strip trailing whitespace per line, collapse 3+ newlines to 2, drop leading/trailing blank lines.

    Leading indentation and single line breaks are kept: code and verse must survive."""
    text = "\n".join([line.rstrip() for line in text.split("\n")])
    return _MANY_NEWLINES.sub("\n\n", text).strip("\n")


def _strip_boilerplate(text: str) -> str:
    return strip_gutenberg(text)[0]


def _remove_patterns(text: str, patterns: list[re.Pattern[str]]) -> str:
    for pattern in patterns:
        text = pattern.sub("", text)
    return text


# ---------------------------------------------------------------- the step


class Cleaner:
    """Applies a `CleanConfig` to one document at a time."""

    def __init__(self, config: CleanConfig) -> None:
        self.config = config
        patterns = [re.compile(pattern) for pattern in config.remove_patterns]
        form = config.normalization
        # (action name, function) in the documented order; HTML extraction is added per document.
        # Module-level functions and partials only, so a Cleaner can be pickled to worker processes.
        self.steps: list[tuple[str, Callable[[str], str]]] = []
        if config.fix_unicode:
            self.steps.append(("mojibake_fixed", fix_mojibake))
        if config.remove_control:
            self.steps.append(("control_removed", remove_control))
        if form != "none":
            self.steps.append(("normalized", partial(normalize, form=form)))
        if config.boilerplate:
            self.steps.append(("boilerplate_removed", _strip_boilerplate))
        if patterns:
            self.steps.append(("regex_removed", partial(_remove_patterns, patterns=patterns)))
        if config.collapse_whitespace:
            self.steps.append(("whitespace_collapsed", collapse_whitespace))

    def __call__(self, text: str, is_html: bool) -> tuple[str, list[str]]:
        """(clean text, names of the actions that changed it)."""
        if not self.config.enabled:
            return text, []
        steps = self.steps
        if is_html and self.config.html:
            steps = [("html_extracted", html_to_text), *steps]
        actions = []
        for name, fn in steps:
            new = fn(text)
            if new != text:
                actions.append(name)
                text = new
        return text, actions
