"""Shared fixtures: the offline environment, the shared data folder, running the real CLI, small prepared
data folders (built once per session with the real `prepare`) and tiny model folders."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never download
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from llmkernel.config import build  # noqa: E402  (after the offline switches)
from llmkernel.data.config import PrepareConfig  # noqa: E402
from llmkernel.data.pipeline import prepare  # noqa: E402
from tests.browser import browser  # noqa: E402, F401  (the headless Chromium fixture)
from tests.tiny_models import make_tiny_bert, make_tiny_llama  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (test and benchmark data, not part of the product); skips when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent (tests that need real data are skipped)")
    return SHARED_DATA


def run_llmk(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real `llmk` command line in a subprocess; returns the completed process (text output)."""
    return subprocess.run(
        [sys.executable, "-m", "llmkernel.cli", *args],
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def fails_in_one_line(*args: str) -> str:
    """Run `llmk *args`, check it refused the input as the house does (exit 2, one line, no traceback);
    returns that line."""
    result = run_llmk(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    return result.stderr


def kill_after_checkpoint(args: list[str], out: Path, step: int, timeout: float = 120) -> None:
    """Run `llmk *args --out out` and SIGKILL it as soon as the checkpoint of `step` exists."""
    import signal
    import time

    process = subprocess.Popen(
        [sys.executable, "-m", "llmkernel.cli", *args, "--out", str(out)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    deadline = time.time() + timeout
    while not (out / "checkpoints" / f"step_{step:06d}").is_dir() and time.time() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


# ------------------------------------------------------------------- small prepared data folders

WORDS = (
    "the a river ran past old mill where miller kept books and counted grain each evening while his daughter "
    "read letters sent by cousin who travelled far beyond hills to seek work in growing towns of north"
).split()


def _corpus(folder, documents: int = 60, words: int = 300) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir()
    for index in range(documents):
        sentences = [" ".join(rng.choice(WORDS, size=10)).capitalize() + "." for _ in range(words // 10)]
        (folder / f"doc{index:03d}.txt").write_text(" ".join(sentences))


def _prepare(root, kind: str):
    _corpus(root / "corpus")
    config = build(
        PrepareConfig,
        {
            "inputs": [str(root / "corpus")],
            "out": str(root / "data"),
            "workers": 1,
            "progress": False,
            "dedup": {"near": False},
            "filter": {"enabled": False},
            "tokenizer": {"kind": kind, "vocab_size": 300},
            "pack": {"val_fraction": 0.1},
        },
    )
    prepare(config)
    return root / "data"


@pytest.fixture(scope="session")
def bpe_data(tmp_path_factory):
    return _prepare(tmp_path_factory.mktemp("bpe"), "bpe")


@pytest.fixture(scope="session")
def wordpiece_data(tmp_path_factory):
    return _prepare(tmp_path_factory.mktemp("wordpiece"), "wordpiece")


# ----------------------------------------------------------------------------- tiny fine-tuning models


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on busy shared cores they spin (100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def bert_folder(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("bert_classify"), "classify")


@pytest.fixture(scope="session")
def ner_folder(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("bert_ner"), "ner")


@pytest.fixture(scope="session")
def llama_folder(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("llama"))
