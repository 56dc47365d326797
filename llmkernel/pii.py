"""Find personal data (PII) in text and replace it with typed placeholders such as <EMAIL>.

Used by the `pii` step of `llmk prepare` and by the server to mask request logs and prompts, so it has to
be fast on ordinary prose and must not mask years, versions, prices or code. The approach:

* Each type has a cheap candidate regex (precompiled, starting with a literal or one character class so
  `re` can skip ahead in C, possessive or bounded repeats so nothing backtracks catastrophically) and a
  Python validator that does the real check: Luhn for cards, ISO 13616 mod-97 for IBANs, ISO 7064
  MOD 11-2 plus a birth date for Chinese IDs, the `ipaddress` module for IPs, shape rules for phones.
* Every type except email contains a digit, so those detectors only look at windows around digit runs;
  emails are only looked for around '@'. Text without digits or '@' costs one scan.
* A match may not be glued to ASCII letters or digits ("v1.2.3.4", "x13800138000"), but CJK neighbours
  are fine ("请拨打13800138000联系我").
* Overlapping matches are resolved by keeping the longer one, then the more specific type.
"""

from __future__ import annotations

import ipaddress
import re
import string
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import date

PLACEHOLDERS: dict[str, str] = {
    "email": "<EMAIL>",
    "phone": "<PHONE>",
    "ip": "<IP_ADDRESS>",
    "credit_card": "<CREDIT_CARD>",
    "iban": "<IBAN>",
    "cn_id": "<CN_ID>",
}

# On overlaps of equal length the type with stronger evidence wins: checksum + date, then checksum, ...
_SPECIFICITY = ("cn_id", "iban", "credit_card", "email", "ip", "phone")
_RANK = {kind: rank for rank, kind in enumerate(_SPECIFICITY)}

Span = tuple[int, int]


PII_TYPES = ("email", "phone", "ip", "credit_card", "iban", "cn_id")


@dataclass(frozen=True)
class PiiSpan:
    """One match: `text[start:end]` is personal data of `type` (one of PII_TYPES)."""

    start: int
    end: int
    type: str


# --- context ------------------------------------------------------------------------------------------

_WORD = frozenset(string.ascii_letters + string.digits + "_")


def _free(text: str, start: int, end: int, glue: str = "") -> bool:
    """True when text[start:end] is not part of a longer ASCII token.

    A neighbour that is an ASCII letter, digit or '_' glues; so does a `glue` character (such as '.' for
    dotted numbers) followed by one, which keeps "1.2.3.4" out of "1.2.3.4.5". CJK and punctuation don't.
    """
    if start > 0:
        before = text[start - 1]
        if before in _WORD or (before in glue and start > 1 and text[start - 2] in _WORD):
            return False
    if end < len(text):
        after = text[end]
        if after in _WORD or (after in glue and end + 1 < len(text) and text[end + 1] in _WORD):
            return False
    return True


# --- checksums ----------------------------------------------------------------------------------------


def luhn_ok(digits: str) -> bool:
    """Luhn (ISO/IEC 7812-1) check used by payment cards: doubling every second digit from the right."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    """ISO 13616 / ISO 7064 MOD 97-10: with the first four characters moved to the end and letters
    read as numbers (A=10 ... Z=35), a valid IBAN is 1 modulo 97."""
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(char, 36)) for char in rearranged)) % 97 == 1


# ISO 7064 MOD 11-2 weights for the 18 characters of a Chinese ID: 2^(17-i) mod 11.
_CN_ID_WEIGHTS = tuple(pow(2, 17 - i, 11) for i in range(18))


def cn_id_ok(value: str) -> bool:
    """GB 11643 resident ID: a real birth date (YYYYMMDD at 6..14) and the ISO 7064 MOD 11-2 check
    (the weighted sum of all 18 characters, with 'X' for 10, is 1 modulo 11)."""
    year, month, day = int(value[6:10]), int(value[10:12]), int(value[12:14])
    if not 1900 <= year <= 2099:
        return False
    try:
        date(year, month, day)
    except ValueError:
        return False
    values = [int(char) for char in value[:17]] + [10 if value[17] in "Xx" else int(value[17])]
    return sum(v * w for v, w in zip(values, _CN_ID_WEIGHTS)) % 11 == 1


# --- email --------------------------------------------------------------------------------------------

# The local part is matched backwards from the '@' (on the reversed text) so the scan is anchored on the
# rare '@' instead of trying every word; Latin letters only, so a CJK sentence is not swallowed into it.
_EMAIL_LOCAL_REVERSED = re.compile(r"[A-Za-z0-9\u00c0-\u024f._%+\-]{1,65}")
_EMAIL_DOMAIN = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.){1,8}[A-Za-z]{2,24}(?![A-Za-z0-9\-])"
)


def _find_emails(text: str) -> Iterator[Span]:
    """local@domain.tld; "@property" (no local part) and "foo@bar" (no TLD) don't match."""
    at = text.find("@")
    while at != -1:
        domain = _EMAIL_DOMAIN.match(text, at + 1)
        if domain is not None and at > 0:
            local = _EMAIL_LOCAL_REVERSED.match(text[max(0, at - 65) : at][::-1])
            if local is not None and local.end() <= 64:
                start = at - local.end()
                while text[start] == ".":  # "...john@x.org": the dots are punctuation, not the address
                    start += 1
                if start < at and text[at - 1] != ".":
                    yield start, domain.end()
        at = text.find("@", at + 1)


# --- IP addresses -------------------------------------------------------------------------------------

_IPV4 = re.compile(r"[0-9][0-9]{0,2}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}")
_NUMBERING_WORD = re.compile(r"(?:section|chapter|version|release|§)\s*\Z", re.IGNORECASE)


def _find_ipv4(text: str, lo: int, hi: int) -> Iterator[Span]:
    """Dotted quads with octets 0-255 (no leading zeros); not inside "1.2.3.4.5", OIDs or "v1.2.3.4"."""
    for match in _IPV4.finditer(text, lo, hi):
        start, end = match.span()
        quad = match.group()
        if _free(text, start, end, glue=".") and _is_ip(quad) and not _numbering(text, start, end, quad):
            yield start, end


def _numbering(text: str, start: int, end: int, quad: str) -> bool:
    """True for valid dotted quads that are not anyone's address: netmasks ("255.255.255.0"), package
    versions ("novas-3.1.1.3", "version 1.5.0.9") and section numbers ("Section 6.2.4.3", "4.8.3.1. Recap")."""
    if quad.startswith("255.") or (text[start - 1 : start] == "-" and text[start - 2 : start - 1].isalpha()):
        return True
    if _NUMBERING_WORD.search(text, max(0, start - 12), start):
        return True
    # A heading number ends with a dot and counts from 1 with small numbers; an address such as
    # "10.0.0.1." at the end of a sentence usually has a zero or a three-digit octet.
    parts = quad.split(".")
    return (
        text[end : end + 1] == "."
        and (end + 1 == len(text) or text[end + 1] == "<" or text[end + 1].isspace())
        and all(len(part) <= 2 and part != "0" for part in parts)
    )


# Every IPv6 address has two colons with at most four hex digits between them; find those, then widen to
# the whole run of address characters and let `ipaddress` decide.
_IPV6_HINT = re.compile(r":[0-9A-Fa-f]{0,4}:")
_IPV6_CHARS = re.compile(r"[0-9A-Fa-f:.]*")
_IPV6_ZONE = re.compile(r"%[0-9A-Za-z_.\-]{1,15}")
_IPV6_MAX = 45  # "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"


def _find_ipv6(text: str, lo: int, hi: int) -> Iterator[Span]:
    """Full, compressed ("2001:db8::1", "::1"), IPv4-mapped and zoned ("fe80::1%eth0") IPv6 addresses."""
    pos = lo
    while (hint := _IPV6_HINT.search(text, pos, hi)) is not None:
        left = _IPV6_CHARS.match(text[max(0, hint.start() - _IPV6_MAX - 1) : hint.start()][::-1])
        start = hint.start() - left.end()
        end = pos = _IPV6_CHARS.match(text, hint.start()).end()
        while text[end - 1] == "." or (text[end - 1] == ":" and text[end - 2] != ":"):
            end -= 1  # a full stop or a label colon after the address, as in "fe80::1: the router"
        while text[start] == "." or (text[start] == ":" and text[start + 1] != ":"):
            start += 1  # "IP:fe80::1": a label colon before the address
        candidate = text[start:end]
        if len(candidate) > _IPV6_MAX or not any(char.isdigit() for char in candidate):
            continue  # too long for an address; no digit: C++ "a::b", "::" alone
        zone = _IPV6_ZONE.match(text, end)
        if zone is not None and _is_ip(text[start : zone.end()]):
            end = zone.end()
        if not _free(text, start, end, glue=".") or not _is_ip(text[start:end]):
            continue
        # "a[::2]", "xs[1::2]": a slice of something indexable, not an address in brackets like "[::1]:80"
        if start >= 2 and text[start - 1] == "[" and (text[start - 2] in _WORD or text[start - 2] in ")]"):
            continue
        yield start, end


def _is_ip(candidate: str) -> bool:
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return True


# --- phone numbers ------------------------------------------------------------------------------------

# "+44 20 7946 0958", "+1 (415) 555-2671", "+49-30-1234567": '+', then digit groups joined by one
# space, dot or dash with an optional parenthesis. Digit runs are possessive, so a long run of digits
# and separators is scanned once.
_PHONE_INTL = re.compile(r"\+[1-9][0-9]*+(?:[ .\-]?[()]?[ .\-]?[0-9]++){0,8}+")
_PHONE_INTL_DIGITS = (8, 15)  # E.164 allows at most 15 digits; fewer than 8 is a score or a sum
# North American "(415) 555-2671", "415-555-2671", "415.555.2671": area code and exchange start 2-9.
_PHONE_NANP = re.compile(r"[2-9][0-9]{2}([\-.])[2-9][0-9]{2}\1[0-9]{4}")
_PHONE_NANP_PAREN = re.compile(r"\([2-9][0-9]{2}\) ?[2-9][0-9]{2}[\-.][0-9]{4}")
# Chinese mobiles: 1, then 3-9, then 9 digits, compact or 3-4-4.
_PHONE_CN = re.compile(r"1[3-9][0-9](?:[0-9]{8}|([ \-])[0-9]{4}\1[0-9]{4})")
_GROUP = re.compile(r"[0-9]+")


def _find_phones(text: str, lo: int, hi: int) -> Iterator[Span]:
    """International (+country code), North American and Chinese mobile numbers."""
    for match in _PHONE_INTL.finditer(text, lo, hi):
        span = _international_phone(text, match)
        if span is not None:
            yield span
    for pattern in (_PHONE_NANP, _PHONE_NANP_PAREN):
        for match in pattern.finditer(text, lo, hi):
            start, end = match.span()
            if text[start - 2 : start] in ("1-", "1.", "1 ") and _free(text, start - 2, end, glue="-."):
                yield start - 2, end  # "1-800-555-0199": the trunk prefix belongs to the number
            elif _free(text, start, end, glue="-."):
                yield start, end
    for match in _PHONE_CN.finditer(text, lo, hi):
        start, end = match.span()
        # "15000000000" is an amount, not a number anyone is given
        if _free(text, start, end, glue="-.") and not match.group().endswith("00000000"):
            yield start, end


def _international_phone(text: str, match: re.Match[str]) -> Span | None:
    """The longest prefix of the matched digit groups that is a plausible E.164 number, or None."""
    start = match.start()
    if start > 0 and (text[start - 1] in _WORD or text[start - 1] == ")"):
        return None  # "2+2", "x+1234567890", "f(x)+..."
    digits, end, at_last_space = 0, None, None
    for group in _GROUP.finditer(text, start, match.end()):
        if digits + len(group.group()) > _PHONE_INTL_DIGITS[1]:
            # Too many digits: another number follows, most likely after the last space, as in
            # "+44 20 7946 0958 415-555-2671".
            digits, end = at_last_space or (digits, end)
            break
        if end is not None and " " in text[end : group.start()]:
            at_last_space = digits, end
        digits, end = digits + len(group.group()), group.end()
    if end is None or digits < _PHONE_INTL_DIGITS[0] or (end < len(text) and text[end] in _WORD):
        return None
    if text[start - 1 : start] == "(" and text.count(")", start, end) > text.count("(", start, end):
        start -= 1  # "(+44) 20 7946 0958": the country code is in parentheses
    opened, closed = text.count("(", start, end), text.count(")", start, end)
    if opened != closed or opened > 1:
        return None  # "+1 (415 555" or "+1 (2) (3)": not a written phone number
    return start, end


# --- payment cards ------------------------------------------------------------------------------------

# 13-19 digits, compact or grouped 4-4-4-4(-3) / 4-6-5 (Amex) / 4-6-4 (Diners) with one kind of separator.
_CARD = re.compile(
    r"[2-6][0-9]{3}(?:[0-9]{9,15}|([ \-])[0-9]{4}\1[0-9]{4}\1[0-9]{4}(?:\1[0-9]{3})?|([ \-])[0-9]{6}\2[0-9]{4,5})"
)
# (lowest prefix, highest prefix, allowed lengths): issuer ranges as published by the card networks.
_ANY_LENGTH = tuple(range(16, 20))
_CARD_ISSUERS = (
    ("4", "4", (13, 16, 19)),  # Visa
    ("51", "55", (16,)),  # Mastercard
    ("2221", "2720", (16,)),  # Mastercard 2-series
    ("34", "34", (15,)),  # American Express
    ("37", "37", (15,)),  # American Express
    ("6011", "6011", _ANY_LENGTH),  # Discover
    ("644", "649", _ANY_LENGTH),  # Discover
    ("65", "65", _ANY_LENGTH),  # Discover
    ("62", "62", _ANY_LENGTH),  # UnionPay
    ("3528", "3589", _ANY_LENGTH),  # JCB
    ("300", "305", (14, *_ANY_LENGTH)),  # Diners Club
    ("36", "36", (14, *_ANY_LENGTH)),  # Diners Club
    ("38", "39", (14, *_ANY_LENGTH)),  # Diners Club
)


def _card_issuer_ok(digits: str) -> bool:
    """True when the number starts with a known issuer prefix and has that issuer's length."""
    return any(
        low <= digits[: len(low)] <= high and len(digits) in lengths for low, high, lengths in _CARD_ISSUERS
    )


def _find_cards(text: str, lo: int, hi: int) -> Iterator[Span]:
    """Payment card numbers with a known issuer prefix and a valid Luhn check digit."""
    for match in _CARD.finditer(text, lo, hi):
        start, end = match.span()
        digits = match.group().replace(" ", "").replace("-", "")
        if _free(text, start, end) and _card_issuer_ok(digits) and luhn_ok(digits):
            yield start, end


# --- IBAN ---------------------------------------------------------------------------------------------

# Country code, check digits, then the BBAN compact or in groups of four separated by single spaces.
_IBAN = re.compile(r"[A-Z][A-Z][0-9]{2}(?: ?[A-Z0-9]{4}){2,7}+(?: ?[A-Z0-9]{1,4})?")
# Total IBAN length per country (ISO 13616 registry); others are accepted at 15-34 characters.
_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AT": 20, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29, "CH": 21, "CY": 28,
    "CZ": 24, "DE": 22, "DK": 18, "EE": 20, "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GI": 23,
    "GL": 18, "GR": 27, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IS": 26, "IT": 27, "KW": 30, "KZ": 20,
    "LB": 28, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "ME": 22, "MK": 19, "MT": 31, "MU": 30,
    "NL": 18, "NO": 15, "PK": 24, "PL": 28, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24, "SE": 24,
    "SI": 19, "SK": 24, "SM": 27, "TN": 24, "TR": 26, "UA": 29,
}  # fmt: skip


def _find_ibans(text: str, lo: int, hi: int) -> Iterator[Span]:
    """IBANs with the country's length (where known) and a valid ISO 13616 mod-97 check."""
    pos = lo
    while (match := _IBAN.search(text, pos, hi)) is not None:
        end = _iban_end(text, match)
        # A rejected candidate may have swallowed the start of a real IBAN ("ref AB12 GB82 WEST ..."),
        # so look again after its first group.
        pos = match.start() + 4 if end is None else end
        if end is not None:
            yield match.start(), end


def _iban_end(text: str, match: re.Match[str]) -> int | None:
    """Where the IBAN that `match` starts with ends, or None if it isn't one."""
    compact = match.group().replace(" ", "")
    length = _IBAN_LENGTHS.get(compact[:2], min(len(compact), 34))
    if not 15 <= length <= len(compact):
        return None
    end = match.end()
    while len(compact) > length:  # the grouped form ran into a following word: "BE68 5390 0754 7034 THEN"
        compact = compact[:-1]
        end -= 1
        end -= text[end - 1] == " "
    return end if _free(text, match.start(), end) and iban_ok(compact) else None


# --- Chinese resident ID ------------------------------------------------------------------------------

_CN_ID = re.compile(r"[1-9][0-9]{16}[0-9Xx]")


def _find_cn_ids(text: str, lo: int, hi: int) -> Iterator[Span]:
    """18-character resident identity numbers with a valid birth date and MOD 11-2 check character."""
    for match in _CN_ID.finditer(text, lo, hi):
        start, end = match.span()
        if _free(text, start, end) and cn_id_ok(match.group()):
            yield start, end


# --- detector -----------------------------------------------------------------------------------------

# Finders of the types that contain a digit; they only run on windows around digit runs.
_DIGIT_FINDERS: tuple[tuple[str, Callable[[str, int, int], Iterator[Span]]], ...] = (
    ("phone", _find_phones),
    ("ip", _find_ipv4),
    ("ip", _find_ipv6),
    ("credit_card", _find_cards),
    ("iban", _find_ibans),
    ("cn_id", _find_cn_ids),
)
_DIGIT_RUN = re.compile(r"[0-9][0-9]*")  # not "[0-9]+": a leading repeat defeats re's fast skip
# Longer than any match, so a window reaching this far around a digit run holds every match that
# contains one of its digits, and the windows' edges fall where no digit-based match can be.
_REACH = 64


def _digit_windows(text: str) -> Iterator[Span]:
    """Stretches of `text` around its digit runs, merged where they overlap."""
    window_start = window_end = -1
    for run in _DIGIT_RUN.finditer(text):
        if run.start() - _REACH > window_end:
            if window_end >= 0:
                yield max(0, window_start), min(len(text), window_end)
            window_start = run.start() - _REACH
        window_end = run.end() + _REACH
    if window_end >= 0:
        yield max(0, window_start), min(len(text), window_end)


class PiiDetector:
    """Finds and masks the PII types it was created for (default: all of PII_TYPES)."""

    def __init__(self, types: Iterable[str] = PII_TYPES) -> None:
        chosen = (types,) if isinstance(types, str) else tuple(types)
        unknown = sorted(set(chosen) - set(PII_TYPES))
        if unknown:
            raise ValueError(f"unknown PII type {unknown[0]!r}; known: {', '.join(PII_TYPES)}")
        self.types = frozenset(chosen)
        self._digit_finders = [(kind, finder) for kind, finder in _DIGIT_FINDERS if kind in self.types]

    def find(self, text: str) -> list[PiiSpan]:
        """All matches in `text`, sorted by offset and non-overlapping."""
        spans: list[PiiSpan] = []
        if "email" in self.types and "@" in text:
            spans += [PiiSpan(start, end, "email") for start, end in _find_emails(text)]
        if self._digit_finders:
            for lo, hi in _digit_windows(text):
                for kind, finder in self._digit_finders:
                    spans += [PiiSpan(start, end, kind) for start, end in finder(text, lo, hi)]
        return _resolve_overlaps(spans)

    def mask(self, text: str) -> tuple[str, Counter[str]]:
        """`text` with every match replaced by its type's placeholder, and the number of matches per type."""
        spans = self.find(text)
        counts: Counter[str] = Counter(span.type for span in spans)
        if not spans:
            return text, counts
        parts: list[str] = []
        pos = 0
        for span in spans:
            parts += (text[pos : span.start], PLACEHOLDERS[span.type])
            pos = span.end
        parts.append(text[pos:])
        return "".join(parts), counts


def _resolve_overlaps(spans: list[PiiSpan]) -> list[PiiSpan]:
    """Keep the longest span of each overlapping group (the more specific type on a tie), in text order."""
    if len(spans) < 2:
        return spans
    kept: list[PiiSpan] = []
    starts: list[int] = []
    for span in sorted(set(spans), key=lambda s: (s.start - s.end, _RANK[s.type], s.start)):
        i = bisect_left(starts, span.start)
        if (i > 0 and kept[i - 1].end > span.start) or (i < len(kept) and kept[i].start < span.end):
            continue
        starts.insert(i, span.start)
        kept.insert(i, span)
    return kept
