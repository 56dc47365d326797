"""`llmk prepare` end to end through the real CLI, on a small corpus built here with planted problems."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_llmk

BOOK = """\ufeffThe Project Gutenberg EBook of A Small Test, by Nobody\r
\r
This eBook is for the use of anyone anywhere at no cost and with\r
almost no restrictions whatsoever.\r
\r
*** START OF THIS PROJECT GUTENBERG EBOOK A SMALL TEST ***\r
\r
CHAPTER I.\r
\r
{body}\r
\r
*** END OF THIS PROJECT GUTENBERG EBOOK A SMALL TEST ***\r
\r
Updated editions will replace the previous one--the old editions\r
will be renamed. Project Gutenberg-tm License terms apply.\r
"""

WORDS = (
    "the river ran quietly past the old mill where the miller kept his books and counted grain each evening "
    "while his daughter read aloud from letters sent by a cousin who had travelled far beyond the hills to "
    "seek work in the growing towns of the north where factories hummed from dawn until long after dark"
).split()


def prose(seed: int, n_words: int = 400) -> str:
    rng = np.random.default_rng(seed)
    sentences = []
    for _ in range(n_words // 12):
        words = list(rng.choice(WORDS, size=12))
        sentences.append(" ".join(words).capitalize() + ".")
    return " ".join(sentences)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    books = root / "books"
    books.mkdir()
    for i in range(6):
        (books / f"book{i}.txt").write_bytes(BOOK.format(body=prose(i)).encode())
    (books / "book0_copy.txt").write_bytes(BOOK.format(body=prose(0)).encode())  # exact duplicate
    near = prose(1).split()
    near[10] = "lantern"
    (books / "book1_edited.txt").write_bytes(BOOK.format(body=" ".join(near)).encode())  # near duplicate
    pii = prose(7) + " Write to jane.doe@example.com or call +44 20 7946 0958 from 192.168.1.20."
    (books / "contact.txt").write_text(pii)
    pages = [
        {
            "path": f"p{i}.html",
            "html": f"<html><head><script>var x=1;</script><style>p{{}}</style></head><body>"
            f"<div class='sphinxsidebar'>Navigation index modules</div><h1>Page {i}</h1><p>{prose(20 + i)}</p>"
            "<pre>for i in range(3):\n    print(i)</pre></body></html>",
        }
        for i in range(3)
    ]
    lines = [json.dumps(p) for p in pages] + ["{broken json"]
    (root / "pages.jsonl").write_text("\n".join(lines) + "\n")
    zh = (
        "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。这是一段中文测试文本，用来检查中文文档在清洗和过滤之后仍然保留下来。\n\n"
        "床前明月光，疑是地上霜。举头望明月，低头思故乡。静夜思是李白的名作，语言清新朴素而韵味含蓄无穷，历来广为传诵。\n\n"
        "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。这首诗写诗人在登高望远中表现出来的不凡的胸襟抱负。\n"
    )
    (root / "zh.txt").write_text(zh)
    return root


@pytest.mark.e2e
def test_prepare_end_to_end(corpus, tmp_path):
    out = tmp_path / "data"
    args = [
        "prepare",
        str(corpus / "books"),
        str(corpus / "pages.jsonl"),
        str(corpus / "zh.txt"),
        "--out",
        str(out),
        "--tokenizer.vocab_size",
        "600",
        "--pack.val_fraction",
        "0.2",
        "--workers",
        "2",
        "--progress",
        "false",
    ]
    result = run_llmk(*args)
    assert result.returncode == 0, result.stderr
    assert "dropped" in result.stdout and "exact_duplicate" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "clean",
        "excluded",
        "run.json",
        "shards.json",
        "stats.json",
        "tokenizer",
        "train",
        "val",
    ]

    clean = [
        json.loads(line)
        for part in sorted((out / "clean").glob("*.jsonl.gz"))
        for line in gzip.open(part, "rt")
    ]
    texts = "\n".join(r["text"] for r in clean)
    assert "Gutenberg" not in texts and "*** START" not in texts
    assert "<EMAIL>" in texts and "jane.doe@example.com" not in texts
    assert "<PHONE>" in texts and "<IP_ADDRESS>" in texts
    assert "var x=1" not in texts and "Navigation index" not in texts and "print(i)" in texts
    assert "春眠不觉晓" in texts

    excluded = [
        json.loads(line)
        for part in sorted((out / "excluded").glob("*.jsonl.gz"))
        for line in gzip.open(part, "rt")
    ]
    reasons = {r["reason"] for r in excluded}
    assert {"exact_duplicate", "near_duplicate", "malformed"} <= reasons
    dup = next(r for r in excluded if r["reason"] == "exact_duplicate")
    assert dup["duplicate_of"].endswith("book0.txt")

    stats = json.loads((out / "stats.json").read_text())
    assert stats["input"]["malformed_records"] == 1
    assert stats["pii_masked"]["email"] == 1
    assert stats["languages"]["zh"] == 1 and stats["languages"]["en"] >= 6
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["stage"] == "prepare" and manifest["config"]["tokenizer"]["vocab_size"] == 600
    assert len(manifest["inputs"]) == 11 and all(len(i["sha256"]) == 64 for i in manifest["inputs"])

    # the tokenizer loads with AutoTokenizer and the shards decode back to exactly the clean documents
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    shards = json.loads((out / "shards.json").read_text())
    decoded = []
    for split in ("train", "val"):
        for shard in shards["splits"][split]["shards"]:
            tokens = np.fromfile(out / shard["file"], dtype=shards["dtype"])
            ends = np.flatnonzero(tokens == shards["separator_id"])
            starts = np.concatenate([[0], ends[:-1] + 1])
            decoded += [tokenizer.decode(tokens[s:e].tolist()) for s, e in zip(starts, ends)]
    assert sorted(decoded) == sorted(r["text"] for r in clean)
    assert shards["splits"]["val"]["documents"] >= 1

    again = run_llmk(*args)
    assert again.returncode == 0 and "up to date" in again.stdout


@pytest.mark.e2e
def test_bad_input_exits_2_and_keeps_earlier_output(corpus, tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("earlier output")
    cases = [
        (["prepare", str(tmp_path / "missing.txt")], "no such file or folder"),
        (["prepare", str(corpus / "pages.jsonl"), "--text_field", "body"], "no field 'body'"),
        (["prepare", str(corpus / "pages.jsonl"), "--strict"], "not valid JSON"),
        (["prepare", str(corpus / "zh.txt"), "--filter.min_chars", "-1"], "filter.min_chars: must be >= 0"),
        (["prepare", str(corpus / "zh.txt"), "--filter.min_chars", "100000"], "every document was dropped"),
    ]
    for args, message in cases:
        result = run_llmk(*args, "--out", str(out), "--progress", "false", "--tokenizer.vocab_size", "300")
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no staging folder left behind


def test_cli_help_lists_every_field():
    result = run_llmk("prepare", "--help")
    assert result.returncode == 0
    for flag in (
        "--filter.languages",
        "--dedup.threshold",
        "--pii.types",
        "--tokenizer.kind",
        "--pack.val_fraction",
        "--executor",
        "--strict",
        "--config",
    ):
        assert flag in result.stdout
    version = run_llmk("--version")
    assert version.returncode == 0 and version.stdout.startswith("llmk ")


def _clean_records(out: Path) -> list[dict]:
    return [
        json.loads(line)
        for part in sorted((out / "clean").glob("*.jsonl.gz"))
        for line in gzip.open(part, "rt")
    ]


@pytest.mark.e2e
def test_ray_executor_gives_the_same_output_as_local(corpus, tmp_path):
    pytest.importorskip("ray", reason="the 'ray' extra is not installed")
    common = [
        str(corpus / "books"),
        str(corpus / "zh.txt"),
        "--tokenizer.vocab_size",
        "400",
        "--progress",
        "false",
    ]
    local = run_llmk("prepare", *common, "--out", str(tmp_path / "local"), "--workers", "1")
    ray = run_llmk("prepare", *common, "--out", str(tmp_path / "ray"), "--executor", "ray", "--workers", "2")
    assert local.returncode == 0, local.stderr
    assert ray.returncode == 0, ray.stderr
    assert _clean_records(tmp_path / "ray") == _clean_records(tmp_path / "local")
    for name in ("shards.json", "train/shard_00000.bin", "val/shard_00000.bin"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    assert json.loads((tmp_path / "ray" / "run.json").read_text())["config"]["executor"] == "ray"


@pytest.mark.e2e
def test_sigterm_leaves_no_output_and_no_staging(corpus, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    big = tmp_path / "big"
    big.mkdir()
    for i in range(40):  # enough work that the signal lands mid-run
        (big / f"b{i}.txt").write_text(prose(100 + i, 20000))
    out = tmp_path / "out"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llmkernel.cli",
            "prepare",
            str(big),
            "--out",
            str(out),
            "--progress",
            "false",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 60
    while not any(p.name.startswith(".out.partial") for p in tmp_path.iterdir()) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big"]
