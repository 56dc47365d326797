"""The README's serving section works as written: its `llmk` lines parse and its curl commands succeed against live
servers (tiny random models standing in for SmolLM2, MiniLM and the classifier / NER folders)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import time

import httpx
import pytest

from llmkernel.cli import build_parser
from llmkernel.config import config_from_args
from llmkernel.serve.app import create_app
from llmkernel.serve.security import KeyStore, create_key
from tests.conftest import REPO
from tests.serve.conftest import live_server, serve_config

DOC = REPO / "README.md"


def _commands(prefix: str) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.S)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [line for line in lines if line.startswith(prefix)]


def test_llmk_commands_in_the_doc_parse():
    parser = build_parser()
    commands = [shlex.split(line, comments=True)[1:] for line in _commands("llmk ")]
    assert any(args[0] == "serve" for args in commands) and any(args[0] == "keys" for args in commands)
    for args in commands:
        parsed = parser.parse_args(args)
        if parsed.command == "serve":
            config = config_from_args(parsed.stage.config_class(), parsed)
            assert config.api_keys == "keys.json" and config.host == "127.0.0.1"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_examples_run_as_written(
    tmp_path, llama_dir, bert_dir, classifier_dir, ner_dir, relation_dir, index_dir
):
    key, _ = create_key(tmp_path / "keys.json", "docs")
    keys = KeyStore.load(tmp_path / "keys.json")
    servers = {  # port in the doc -> (model folder, the name the doc uses)
        "8000": (llama_dir, "smollm2-135m-instruct"),
        "8001": (bert_dir, "all-minilm-l6-v2"),
        "8002": (classifier_dir, "classifier"),
        "8003": (ner_dir, "ner"),
        "8004": (relation_dir, "relation"),
        "8005": (bert_dir, "scifact-search", {"index": str(index_dir)}),
    }
    with contextlib.ExitStack() as stack:
        urls = {}
        for port, (folder, name, *extra) in servers.items():
            config = serve_config(folder, served_model_name=name, **(extra[0] if extra else {}))
            app = create_app(config, model_dir=folder, keys=keys)
            urls[port] = stack.enter_context(live_server(app))
        for url in urls.values():
            _wait_ready(url, key)
        commands = _commands("curl ")
        assert len(commands) >= 9
        for command in commands:
            _run_curl(command, urls, key)


def _wait_ready(url: str, key: str) -> None:
    deadline = time.monotonic() + 60
    while httpx.get(f"{url}/ready", headers={"Authorization": f"Bearer {key}"}).status_code != 200:
        assert time.monotonic() < deadline, f"{url} did not become ready"
        time.sleep(0.05)


def _run_curl(command: str, urls: dict[str, str], key: str) -> None:
    command, _, comment = command.partition("#")
    expected = re.search(r"-> (\d{3})", comment)
    for port, url in urls.items():
        command = command.replace(f"http://127.0.0.1:{port}", url)
    if not expected:
        command += " -w '\\n%{http_code}'"  # append the status after the body
    done = subprocess.run(
        ["bash", "-c", command],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LLMK_KEY": key},
    )
    assert done.returncode == 0, (command, done.stderr)
    if expected:
        assert done.stdout.strip() == expected.group(1), command
        return
    body, _, status = done.stdout.rpartition("\n")
    assert status == "200", (command, body)
    if "/metrics" in command:
        assert "llmk:e2e_request_latency_seconds_bucket" in body
    elif '"stream": true' in command:
        events = [line for line in body.splitlines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"
    else:
        answer = json.loads(body)
        assert "error" not in answer
