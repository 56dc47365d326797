"""Fixtures of the retrieval tests: a tiny BEIR folder, a tiny BERT encoder and an index of the two."""

from __future__ import annotations

import pytest

from llmkernel.retrieval.build import build_index
from llmkernel.retrieval.config import IndexConfig
from tests.retrieval.tiny_beir import make_tiny_beir
from tests.tiny_models import make_tiny_bert


@pytest.fixture(scope="session")
def tiny_beir(tmp_path_factory):
    return make_tiny_beir(tmp_path_factory.mktemp("beir") / "tiny")


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-encoder"), "model")


@pytest.fixture(scope="session")
def tiny_index(tmp_path_factory, tiny_beir, tiny_encoder):
    out = tmp_path_factory.mktemp("index") / "index"
    build_index(IndexConfig(encoder=str(tiny_encoder), corpus=str(tiny_beir), out=str(out), progress=False))
    return out


@pytest.fixture
def llmk(capsys):
    """`llmk ARGS...` in this process (the real parser and error handling): (exit code, stdout, stderr)."""
    import signal

    from llmkernel.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        handler = signal.getsignal(signal.SIGTERM)  # main installs its own
        try:
            code = main(list(args))
        except SystemExit as exit:
            code = exit.code
        finally:
            signal.signal(signal.SIGTERM, handler)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
