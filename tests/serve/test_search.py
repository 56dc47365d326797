"""/v1/search and RAG through the real app: tiny BERT and Llama folders, an index built by `llmk index`."""

from __future__ import annotations

import json

import pytest

from llmkernel.errors import InputError
from llmkernel.serve.app import create_app
from llmkernel.serve.security import create_key
from tests.serve.conftest import running_client, serve_config


def test_search_returns_passages_in_every_mode(bert_dir, index_dir):
    with running_client(bert_dir, options={"index": str(index_dir)}) as client:
        card = client.get("/v1/models").json()["data"][0]
        assert card["routes"] == ["/v1/embeddings", "/v1/search"]
        for mode in ("hybrid", "dense", "bm25"):
            answer = client.post("/v1/search", json={"query": "berlin kay", "k": 3, "mode": mode})
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["mode"] == mode and [p["rank"] for p in body["data"]] == [1, 2, 3]
            scores = [p["score"] for p in body["data"]]
            assert scores == sorted(scores, reverse=True)
            assert body["usage"]["prompt_tokens"] > 0
        # the query's unique word is in document d1 only: BM25 (and so hybrid) put it first, with its text
        for mode in ("bm25", "hybrid"):
            top = client.post("/v1/search", json={"query": "berlin kay", "mode": mode}).json()["data"][0]
            assert top["id"] == "d1" and "kay" in top["text"]
        metrics = client.get("/metrics").text
        assert 'route="/v1/search"' in metrics


@pytest.mark.parametrize(
    "body, param",
    [
        ({"query": ""}, "query"),
        ({"query": "   "}, "query"),
        ({"query": "paris", "k": 0}, "k"),
        ({"query": "paris", "k": 101}, "k"),
        ({"query": "paris", "mode": "fuzzy"}, "mode"),
        ({"k": 3}, "query"),
    ],
)
def test_bad_search_requests_are_openai_shaped_400s(bert_dir, index_dir, body, param):
    with running_client(bert_dir, options={"index": str(index_dir)}) as client:
        answer = client.post("/v1/search", json=body)
        assert answer.status_code == 400
        error = answer.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_search_needs_the_key_and_an_index(bert_dir, index_dir, tmp_path):
    keys_file = tmp_path / "keys.json"
    key, _ = create_key(keys_file, "alice")
    options = {"index": str(index_dir), "api_keys": str(keys_file)}
    headers = {"Authorization": f"Bearer {key}"}
    with running_client(bert_dir, headers=headers, options=options) as client:
        assert client.post("/v1/search", json={"query": "paris"}).status_code == 401
        assert client.post("/v1/search", json={"query": "paris"}, headers=headers).status_code == 200
    with running_client(bert_dir) as client:  # no --index: the route says what it needs
        answer = client.post("/v1/search", json={"query": "paris"})
        assert answer.status_code == 400 and "--index" in answer.json()["error"]["message"]


def test_an_index_of_another_encoder_is_refused_at_start(classifier_dir, index_dir):
    with pytest.raises(InputError, match="was built with the encoder"):
        create_app(serve_config(classifier_dir, index=str(index_dir)), model_dir=classifier_dir)
    with pytest.raises(InputError, match="not an index folder"):
        create_app(serve_config(classifier_dir, index=str(classifier_dir)), model_dir=classifier_dir)


def test_a_decoder_with_an_index_grounds_its_chat_answers(llama_dir, index_dir):
    with running_client(llama_dir, options={"index": str(index_dir), "rag_passages": 2}) as client:
        question = {"messages": [{"role": "user", "content": "berlin kay"}], "max_tokens": 4}
        answer = client.post("/v1/chat/completions", json=question)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert [s["rank"] for s in body["sources"]] == [1, 2] and body["sources"][0]["id"] == "d1"
        # the passages are in the prompt: it is longer than the question alone
        assert body["usage"]["prompt_tokens"] > 40
        stream = client.post("/v1/chat/completions", json={**question, "stream": True})
        first = json.loads(stream.text.split("\n\n")[0].removeprefix("data: "))
        assert first["sources"][0]["id"] == "d1"
