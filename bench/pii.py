"""Benchmark the PII detector (llmkernel/pii.py) on realistic text and on adversarial input.

Prints one JSON line:

* find_chars_per_s, mask_chars_per_s: characters per second of `PiiDetector.find` and `.mask` on a novel
  (Treasure Island from ../shared/data/gutenberg_en, or `--text FILE`; a built-in paragraph when it is
  missing) with a line of personal data (email, phone, IP, card, IBAN, Chinese ID) and a line of look-alikes
  (years, versions, prices, times) every `--every` lines; `spans` and `spans_by_type` count what it found;
* clean_chars_per_s: `mask` on the same novel without the inserted lines (mostly the no-digit fast path);
* adversarial_s, adversarial_chars_per_s: `mask` over four adversarial megabytes of digits, dots, colons,
  dashes and pluses (the shapes that make a careless regex backtrack catastrophically); about 1 s;
* reference_regex_chars_per_s: the peer, measured in the same run on the same text: one simple email regex
  scanned with `re.finditer`, so figures from machines of different speeds can be compared.

Each rate is the median of `--repeats` runs.

Usage: python bench/pii.py [--text FILE] [--every 40] [--copies 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from llmkernel.pii import PiiDetector

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = REPO.parent / "shared" / "data" / "gutenberg_en" / "books" / "pg120_treasure_island.txt"
FALLBACK = (
    "Squire Trelawney, Dr. Livesey, and the rest of these gentlemen having asked me to write down the whole "
    "particulars about Treasure Island, from the beginning to the end, keeping nothing back but the bearings "
    "of the island, and that only because there is still treasure not yet lifted, I take up my pen.\n"
) * 2000
PII_LINES = [
    "Ticket from jane.doe@example.com: call +44 20 7946 0958 or 415-555-2671, host 192.168.10.4.",
    "Paid with card 4111 1111 1111 1111 to GB82 WEST 1234 5698 7654 32; ID 11010519491231002X.",
    "Reach bob_smith+news@mail.example.org from 2001:db8::8a2e:370:7334, or 13800138000 in Beijing.",
]
LOOK_ALIKES = [
    "In 1887 version 3.11.4 cost $1,299.00 and the train left at 12:30:45 on 2023-10-05.",
    "Chapter 12, page 345, item 6-7-8; ratio 1.2.3.4.5 and build v10.0.0.1 shipped on 05/06/2024.",
]


def realistic_text(path: Path, every: int, copies: int) -> tuple[str, str]:
    """(the novel with PII and look-alike lines every `every` lines, the novel alone), `copies` times over."""
    prose = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else FALLBACK
    lines, mixed, rng = prose.splitlines(keepends=True), [], random.Random(0)
    for number, line in enumerate(lines):
        mixed.append(line)
        if number % every == every - 1:
            mixed += [rng.choice(PII_LINES) + "\n", rng.choice(LOOK_ALIKES) + "\n"]
    return "".join(mixed) * copies, prose * copies


def adversarial_texts() -> list[str]:
    """The four megabytes tests/test_pii.py masks for robustness."""
    rng = random.Random(0)
    return [
        "".join(rng.choices("0123456789.:", k=1_000_000)),
        "".join(rng.choices("0123456789 -()+@.", k=1_000_000)),
        "1:" * 500_000,
        "+1 " * 100_000,
    ]


def median_seconds(work: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="a UTF-8 text file of prose")
    parser.add_argument("--every", type=int, default=40, help="insert PII lines after every N lines")
    parser.add_argument("--copies", type=int, default=4, help="repeat the text this many times")
    parser.add_argument("--repeats", type=int, default=5, help="runs per figure (median)")
    args = parser.parse_args()

    detector = PiiDetector()
    text, clean = realistic_text(args.text, args.every, args.copies)
    spans = detector.find(text)
    email = re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+")
    adversarial = adversarial_texts()
    adversarial_chars = sum(len(t) for t in adversarial)

    find_s = median_seconds(lambda: detector.find(text), args.repeats)
    mask_s = median_seconds(lambda: detector.mask(text), args.repeats)
    clean_s = median_seconds(lambda: detector.mask(clean), args.repeats)
    reference_s = median_seconds(lambda: sum(1 for _ in email.finditer(text)), args.repeats)
    adversarial_s = median_seconds(lambda: [detector.mask(t) for t in adversarial], args.repeats)
    figures = {
        "text": args.text.name if args.text.is_file() else "built-in paragraph",
        "chars": len(text),
        "spans": len(spans),
        "spans_by_type": dict(sorted(Counter(span.type for span in spans).items())),
        "find_chars_per_s": round(len(text) / find_s),
        "mask_chars_per_s": round(len(text) / mask_s),
        "clean_chars_per_s": round(len(clean) / clean_s),
        "adversarial_s": round(adversarial_s, 3),
        "adversarial_chars_per_s": round(adversarial_chars / adversarial_s),
        "reference_regex_chars_per_s": round(len(text) / reference_s),
        "repeats": args.repeats,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
