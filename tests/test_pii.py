"""Tests for llmkernel.pii: what each PII type matches and what it must leave alone."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter

import pytest

from llmkernel.pii import PII_TYPES, PLACEHOLDERS, PiiDetector, PiiSpan

DETECTOR = PiiDetector()


def found(text: str, detector: PiiDetector = DETECTOR) -> list[tuple[str, str]]:
    """(type, matched text) for every span the detector reports."""
    return [(span.type, text[span.start : span.end]) for span in detector.find(text)]


# Independent makers of valid numbers, so the tests don't trust the checksums they are testing.


def luhn_complete(payload: str) -> str:
    """`payload` plus the Luhn check digit that makes it valid."""
    total = 0
    for i, char in enumerate(reversed(payload)):
        digit = int(char) * (2 if i % 2 == 0 else 1)
        total += digit - 9 if digit > 9 else digit
    return payload + str(-total % 10)


def make_iban(country: str, bban: str) -> str:
    """An IBAN with the check digits ISO 13616 prescribes: 98 - (BBAN + country + '00' as a number) mod 97."""
    number = int("".join(str(int(char, 36)) for char in bban + country + "00"))
    return f"{country}{98 - number % 97:02d}{bban}"


def make_cn_id(region: str, birth: str, sequence: str) -> str:
    """A Chinese resident ID with the GB 11643 check character: (12 - sum(a_i * W_i) mod 11) mod 11."""
    body = region + birth + sequence
    weights = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2]
    check = (12 - sum(int(a) * w for a, w in zip(body, weights)) % 11) % 11
    return body + ("X" if check == 10 else str(check))


def test_makers_agree_with_published_examples() -> None:
    assert luhn_complete("411111111111111") == "4111111111111111"
    assert luhn_complete("555555555555444") == "5555555555554444"
    assert make_iban("DE", "370400440532013000") == "DE89370400440532013000"
    assert make_iban("GB", "WEST12345698765432") == "GB82WEST12345698765432"
    assert make_cn_id("110105", "19491231", "002") == "11010519491231002X"  # the GB 11643 example


# --- API ----------------------------------------------------------------------------------------------


def test_placeholders_cover_every_type() -> None:
    assert set(PLACEHOLDERS) == set(PII_TYPES)


def test_unknown_type_is_rejected() -> None:
    with pytest.raises(ValueError, match="postcode"):
        PiiDetector(["email", "postcode"])


def test_types_filter_is_honoured() -> None:
    text = "mail a.b@example.com, call +44 20 7946 0958, host 10.0.0.1"
    assert found(text, PiiDetector(["email"])) == [("email", "a.b@example.com")]
    assert found(text, PiiDetector(["phone", "ip"])) == [("phone", "+44 20 7946 0958"), ("ip", "10.0.0.1")]
    assert found(text, PiiDetector([])) == []


def test_spans_are_frozen_and_offsets_exact() -> None:
    text = "a@b.co and 10.0.0.1"
    spans = DETECTOR.find(text)
    assert spans == [PiiSpan(0, 6, "email"), PiiSpan(11, 19, "ip")]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spans[0].start = 1  # type: ignore[misc]


def test_mask_golden() -> None:
    text = (
        "Contact Jane at jane.doe@example.com or +44 20 7946 0958; server 192.168.1.20, "
        "card 4111 1111 1111 1111, IBAN GB82 WEST 1234 5698 7654 32, 身份证 11010519491231002X."
    )
    masked, counts = DETECTOR.mask(text)
    assert masked == (
        "Contact Jane at <EMAIL> or <PHONE>; server <IP_ADDRESS>, "
        "card <CREDIT_CARD>, IBAN <IBAN>, 身份证 <CN_ID>."
    )
    assert counts == Counter({kind: 1 for kind in PII_TYPES})


def test_mask_counts_repeats_and_leaves_clean_text_alone() -> None:
    masked, counts = DETECTOR.mask("ping ::1 or 127.0.0.1, mail x@y.org or z@y.org")
    assert masked == "ping <IP_ADDRESS> or <IP_ADDRESS>, mail <EMAIL> or <EMAIL>"
    assert counts == Counter(ip=2, email=2)
    prose = "It is a truth universally acknowledged, in 1813, that chapter 3 costs £5."
    assert DETECTOR.mask(prose) == (prose, Counter())


def test_chinese_text_around_a_phone_number() -> None:
    assert DETECTOR.mask("请拨打13800138000联系我")[0] == "请拨打<PHONE>联系我"
    assert (
        DETECTOR.mask("手机：138 0013 8000。邮箱test@example.com谢谢")[0] == "手机：<PHONE>。邮箱<EMAIL>谢谢"
    )


# --- positives: (text, the exact match, type) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "match", "kind"),
    [
        ("write to jane.doe@example.com today", "jane.doe@example.com", "email"),
        ("first+tag@mail.example.co.uk.", "first+tag@mail.example.co.uk", "email"),
        ("Osamu Aoki <osamu@debian.org>", "osamu@debian.org", "email"),
        ("...user_name@example.org", "user_name@example.org", "email"),
        ("Call +44 20 7946 0958 now", "+44 20 7946 0958", "phone"),
        ("Call +1 (415) 555-2671 now", "+1 (415) 555-2671", "phone"),
        ("Tel. +49-30-1234567.", "+49-30-1234567", "phone"),
        ("电话 +86 138 0013 8000", "+86 138 0013 8000", "phone"),
        ("电话+86 13800138000", "+86 13800138000", "phone"),
        ("Ring (+44) 20 7946 0958", "(+44) 20 7946 0958", "phone"),
        ("UK: +44 (0)20 7946 0958", "+44 (0)20 7946 0958", "phone"),
        ("office (415) 555-2671.", "(415) 555-2671", "phone"),
        ("office 415-555-2671", "415-555-2671", "phone"),
        ("office 415.555.2671", "415.555.2671", "phone"),
        ("toll free 1-800-555-0199", "1-800-555-0199", "phone"),
        ("手机13800138000", "13800138000", "phone"),
        ("mobile 138-0013-8000", "138-0013-8000", "phone"),
        ("vanity 13888888888", "13888888888", "phone"),
        ("host 192.168.1.20 is up", "192.168.1.20", "ip"),
        ("the address was 10.0.0.1.", "10.0.0.1", "ip"),
        ("net 192.0.2.0/24", "192.0.2.0", "ip"),
        ("DNS is 8.8.8.8, or 1.1.1.1", "8.8.8.8", "ip"),
        ("v6 2001:db8::1 here", "2001:db8::1", "ip"),
        ("full 2001:0db8:0000:0000:0000:0000:0000:0001", "2001:0db8:0000:0000:0000:0000:0000:0001", "ip"),
        ("link fe80::1%eth0 up", "fe80::1%eth0", "ip"),
        ("loopback ::1.", "::1", "ip"),
        ("mapped ::ffff:192.0.2.1", "::ffff:192.0.2.1", "ip"),
        ("url http://[2001:db8::1]:8080/", "2001:db8::1", "ip"),
        ("inet6 addr:fe80::21a:2bff:fe3c:4d5e/64", "fe80::21a:2bff:fe3c:4d5e", "ip"),
        ("card 4111 1111 1111 1111.", "4111 1111 1111 1111", "credit_card"),
        ("card 4111-1111-1111-1111", "4111-1111-1111-1111", "credit_card"),
        ("card 4111111111111111", "4111111111111111", "credit_card"),
        ("mc 5555 5555 5555 4444", "5555 5555 5555 4444", "credit_card"),
        ("amex 3782 822463 10005", "3782 822463 10005", "credit_card"),
        ("amex 378282246310005", "378282246310005", "credit_card"),
        ("iban GB82 WEST 1234 5698 7654 32.", "GB82 WEST 1234 5698 7654 32", "iban"),
        ("iban GB82WEST12345698765432", "GB82WEST12345698765432", "iban"),
        ("IBAN: DE89 3704 0044 0532 0130 00", "DE89 3704 0044 0532 0130 00", "iban"),
        ("身份证号11010519491231002X。", "11010519491231002X", "cn_id"),
        ("id 11010519491231002x", "11010519491231002x", "cn_id"),
    ],
)
def test_finds(text: str, match: str, kind: str) -> None:
    assert found(text)[:1] == [(kind, match)]


# --- negatives: nothing of any type may be found ------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "In 1812 the army retreated; the war of 1999-2001 ended.",
        "Python 3.11.2 and version 1.2.3.4 and v1.2.3.4, 1.2.3.4.5, OID 1.3.6.1.4.1.311",
        "see Section 6.2.4.3 and 4.8.3.1. Positional arguments, novas-3.1.1.3",
        "netmask 255.255.255.0",
        "ISBN 978-0-14-143951-8 or 9780141439518, pages 1234-5678, call number 555-1234",
        "at 12:30:45 on 2023-10-05 12:30:45, timestamp 1638316800000",
        "It cost $1,234,567.89 or ¥13,800,138,000 or 15000000000 yuan",
        "+10 points, 2+2=4, 1e+10, x+12345678",
        "order 13800138000000 and ref 113800138000",
        "for i in range(10000000): x = a[::2] + b[1::3] + c[::-1]",
        "std::vector<int>::iterator and Foo::Bar and dead::beef",
        "@property\ndef name(self): return foo@bar",
        "MAC 00:1a:2b:3c:4d:5e",
        "serial 4111 1111 1111 1112 and 1234567890123456 and 41111111111111111111",
        "GB83 WEST 1234 5698 7654 32 and GB82 WEST 1234 5698 7654 3",
        "11010519491231002 and 110105194912310021 and 11010519491231002X1",
    ],
)
def test_leaves_alone(text: str) -> None:
    assert found(text) == []


# --- checksums ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "length"),
    [("4", 16), ("4", 13), ("51", 16), ("2221", 16), ("34", 15), ("37", 15), ("6011", 16), ("65", 19),
     ("62", 19), ("3528", 16), ("36", 14), ("300", 14)],
)  # fmt: skip
def test_cards_with_valid_luhn_and_issuer(prefix: str, length: int) -> None:
    rng = random.Random(length)
    payload = prefix + "".join(rng.choice("0123456789") for _ in range(length - len(prefix) - 1))
    number = luhn_complete(payload)
    assert found(f"pay with {number} now") == [("credit_card", number)]
    wrong = number[:-1] + str((int(number[-1]) + 1) % 10)  # any other check digit fails Luhn
    assert found(f"pay with {wrong} now") == []


def test_cards_need_a_known_issuer_and_its_length() -> None:
    assert found(luhn_complete("123456789012345")) == []  # no issuer starts with 1
    assert found(luhn_complete("3" + "4" * 14)) == []  # American Express is 15 digits, not 16


@pytest.mark.parametrize(
    ("country", "bban"),
    [("FR", "20041010050500013M02606"), ("NL", "ABNA0417164300"), ("ES", "21000418450200051332"),
     ("IT", "X0542811101000000123456"), ("CH", "00762011623852957"), ("PL", "109010140000071219812874"),
     ("XK", "1212012345678906")],
)  # fmt: skip
def test_ibans_with_valid_check_digits(country: str, bban: str) -> None:
    iban = make_iban(country, bban)
    grouped = " ".join(iban[i : i + 4] for i in range(0, len(iban), 4))
    assert found(f"to {iban}.") == [("iban", iban)]
    assert found(f"to {grouped}.") == [("iban", grouped)]
    wrong = iban[:2] + f"{(int(iban[2:4]) + 1) % 100:02d}" + iban[4:]
    assert found(f"to {wrong}.") == []


def test_iban_length_is_checked_and_trailing_words_are_cut_off() -> None:
    assert found(make_iban("DE", "37040044053201300")) == []  # valid mod-97 but 21 characters, DE has 22
    belgian = make_iban("BE", "539007547034")
    grouped = " ".join(belgian[i : i + 4] for i in range(0, 16, 4))
    assert found(f"{grouped} THEN PAY") == [("iban", grouped)]
    polish = "PL61 1090 1014 0000 0712 1981 2874"  # 28 characters, the regex runs on for 8 more
    assert found(f"{polish} ABCD EFGH") == [("iban", polish)]
    assert found("ref AB12 GB82 WEST 1234 5698 7654 32") == [("iban", "GB82 WEST 1234 5698 7654 32")]


def test_cn_id_checksum_and_birth_date() -> None:
    valid = make_cn_id("440305", "19900307", "123")
    assert found(f"证件号码:{valid}") == [("cn_id", valid)]
    wrong = valid[:-1] + ("0" if valid[-1] != "0" else "1")
    assert found(f"证件号码:{wrong}") == []
    assert found(make_cn_id("440305", "19900230", "123")) == []  # 30 February
    assert found(make_cn_id("440305", "18500101", "123")) == []  # before 1900
    assert found(f"9{valid}") == found(f"{valid}7") == []  # part of a longer number


# --- overlaps -----------------------------------------------------------------------------------------


def test_overlaps_keep_the_longer_match() -> None:
    assert found("13800138000@163.com") == [("email", "13800138000@163.com")]
    assert found("::ffff:192.0.2.1") == [("ip", "::ffff:192.0.2.1")]
    assert found("+1 (415) 555-2671") == [("phone", "+1 (415) 555-2671")]
    # more digits than E.164 allows: the number ends at the last space before the surplus
    assert found("+44 20 7946 0958 415-555-2671") == [
        ("phone", "+44 20 7946 0958"),
        ("phone", "415-555-2671"),
    ]


def test_equal_overlap_prefers_the_more_specific_type() -> None:
    # An ID of Gansu (region 62) that also passes as an 18-digit UnionPay card: the ID wins.
    ids = (make_cn_id("620102", "19900101", f"{n:03d}") for n in range(1000))
    both = next(i for i in ids if i[-1] != "X" and luhn_complete(i[:-1]) == i)
    assert found(both, PiiDetector(["credit_card"])) == [("credit_card", both)]
    assert found(both) == [("cn_id", both)]


def test_spans_are_sorted_and_disjoint() -> None:
    text = " ".join(["x@example.com 10.0.0.1 +44 20 7946 0958 415-555-2671 GB82WEST12345698765432"] * 50)
    spans = DETECTOR.find(text)
    assert len(spans) == 250
    assert all(a.end <= b.start for a, b in zip(spans, spans[1:]))


# --- robustness ---------------------------------------------------------------------------------------


def test_adversarial_megabyte_masks_consistently() -> None:
    # Shapes that make a careless regex backtrack catastrophically; the per-test timeout catches a hang and
    # bench/pii.py measures the speed (about 1 s for all four).
    rng = random.Random(0)
    texts = [
        "".join(rng.choices("0123456789.:", k=1_000_000)),
        "".join(rng.choices("0123456789 -()+@.", k=1_000_000)),
        "1:" * 500_000,
        "+1 " * 100_000,
    ]
    for text in texts:
        spans = DETECTOR.find(text)
        masked, counts = DETECTOR.mask(text)
        assert all(0 <= a.start < a.end <= b.start for a, b in zip(spans, spans[1:]))
        assert counts == Counter(span.type for span in spans)
        kept = len(text) - sum(span.end - span.start for span in spans)
        assert len(masked) == kept + sum(len(PLACEHOLDERS[span.type]) for span in spans)
