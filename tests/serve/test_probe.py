"""`serve` in a recipe (serve/probe.py): a real server on a free loopback port, `/ready`, one request per
route the model serves, then stopped; keys through LLMK_API_KEY; a folder that does not load is one error."""

from __future__ import annotations

import json
import socket

import pytest

from llmkernel.errors import ConfigError, InputError
from llmkernel.serve.probe import probe
from llmkernel.serve.security import create_key
from tests.serve.conftest import serve_config


def _closed(url: str) -> bool:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.socket() as sock:
        return sock.connect_ex((host, int(port))) != 0


@pytest.mark.parametrize(
    ("folder", "routes"),
    [
        ("llama_dir", {"/v1/completions", "/v1/chat/completions"}),
        ("classifier_dir", {"/v1/classify", "/v1/embeddings"}),
        ("ner_dir", {"/v1/ner"}),
    ],
)
def test_every_route_the_model_serves_answers_once_and_the_server_stops(folder, routes, request, capsys):
    result = probe(serve_config(request.getfixturevalue(folder), port=8000))
    assert set(result["routes"]) == routes
    assert all(answer["status"] == 200 and answer["answer"] for answer in result["routes"].values())
    assert result["url"].startswith("http://127.0.0.1:") and not result["url"].endswith(
        ":8000"
    )  # a free port
    assert _closed(result["url"])
    out = capsys.readouterr().out
    assert all(f"POST {route}" in out for route in routes) and '"event": "request"' not in out


def test_a_decoder_without_a_chat_template_is_checked_on_completions_only(llama_dir, tmp_path, capsys):
    base = tmp_path / "base"
    base.mkdir()
    for path in llama_dir.iterdir():
        (base / path.name).write_bytes(path.read_bytes())
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    (base / "chat_template.jinja").unlink(missing_ok=True)
    result = probe(serve_config(base))
    assert set(result["routes"]) == {"/v1/completions"}
    assert "not checked: the model has no chat template" in capsys.readouterr().out


def test_a_server_with_keys_is_checked_with_the_key_in_llmk_api_key(classifier_dir, tmp_path, monkeypatch):
    keys = tmp_path / "keys.json"
    key, _ = create_key(keys, "recipe")
    monkeypatch.delenv("LLMK_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="set LLMK_API_KEY to one of them"):
        probe(serve_config(classifier_dir, api_keys=str(keys)))
    monkeypatch.setenv("LLMK_API_KEY", "not-a-key")
    with pytest.raises(InputError, match="/ready answered 401"):
        probe(serve_config(classifier_dir, api_keys=str(keys)))
    monkeypatch.setenv("LLMK_API_KEY", key)
    assert probe(serve_config(classifier_dir, api_keys=str(keys)))["routes"]["/v1/classify"]["status"] == 200


def test_a_folder_that_does_not_load_is_one_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(InputError):
        probe(serve_config(tmp_path))
