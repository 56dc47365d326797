"""Encoder routes on tiny BERTs: serving modes, embeddings, classify, ner, micro-batching, wrong routes."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import threading

import numpy as np
import pytest
import torch

from llmkernel.models.loading import model_kind
from llmkernel.serve.encoders import EncoderModel, MicroBatcher, merge_bio
from llmkernel.serve.state import ROUTES, SERVING_MODES
from tests.serve.conftest import running_client


def test_serving_mode_follows_the_model_kind(tmp_path, bert_dir, classifier_dir, ner_dir, llama_dir):
    modes = [SERVING_MODES[model_kind(d)] for d in (bert_dir, classifier_dir, ner_dir, llama_dir)]
    assert modes == ["embed", "classify", "ner", "generate"]
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"]}))
    assert SERVING_MODES[model_kind(tmp_path)] == "embed"
    assert set(SERVING_MODES.values()) == set(ROUTES)  # every mode has its routes


def test_a_masked_lm_folder_serves_embeddings_from_its_encoder(tmp_path, bert_dir):
    from transformers import AutoConfig, BertForMaskedLM

    for tokenizer_file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(bert_dir / tokenizer_file, tmp_path)
    torch.manual_seed(0)
    BertForMaskedLM(AutoConfig.from_pretrained(bert_dir)).save_pretrained(tmp_path)  # no pooler weights
    with running_client(tmp_path) as client:
        card = client.get("/v1/models").json()["data"][0]
        assert (card["task"], card["routes"]) == ("embed", ["/v1/embeddings"])
        vector = client.post("/v1/embeddings", json={"input": "hello world"}).json()["data"][0]["embedding"]
        assert len(vector) == 32 and np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)


def test_merge_bio_joins_tags_into_spans():
    text = "Alice Smith lives in New York"
    words = [
        ("B-PER", 0.9, 0, 5),
        ("I-PER", 0.7, 6, 11),
        ("O", 0.99, 12, 17),
        ("O", 0.99, 18, 20),
        ("I-LOC", 0.6, 21, 24),  # an I- without a B- starts an entity
        ("I-LOC", 0.8, 25, 29),
    ]
    entities = merge_bio(words, text)
    assert [(e["type"], e["text"], e["start"], e["end"]) for e in entities] == [
        ("PER", "Alice Smith", 0, 11),
        ("LOC", "New York", 21, 29),
    ]
    assert entities[0]["score"] == pytest.approx(0.8)
    # B- right after an entity of the same type starts a new one; bare types behave like I-
    assert len(merge_bio([("B-PER", 1, 0, 1), ("B-PER", 1, 2, 3)], "a b")) == 2
    assert merge_bio([("PER", 1, 0, 1), ("PER", 1, 2, 3)], "a b")[0]["text"] == "a b"


def test_embeddings_are_normalised_and_independent_of_batching(bert_dir):
    encoder = EncoderModel(bert_dir, "encoder", max_batch_size=2)
    texts = ["hello world", "alice lives in paris and bob works in berlin", "the"]
    together = np.array(encoder.embed(texts))
    alone = np.array([encoder.embed([t])[0] for t in texts])
    assert together.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(together, alone, atol=1e-5)  # padding does not leak into the mean


def test_micro_batcher_shares_one_forward_pass():
    calls: list[list[str]] = []
    ran_on: set[str] = set()

    def run(kind: str, texts: list[str]) -> list[str]:
        calls.append(texts)
        ran_on.add(threading.current_thread().name)
        return [f"{kind}:{t}" for t in texts]

    async def scenario() -> list:
        batcher = MicroBatcher(run, window_s=0.05, max_batch_size=8)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit("embed", [f"t{i}", f"u{i}"]) for i in range(3)))
        await batcher.stop()
        return results

    results = asyncio.run(scenario())
    assert results == [[f"embed:t{i}", f"embed:u{i}"] for i in range(3)]
    assert len(calls) == 1 and len(calls[0]) == 6  # three requests, one pass
    assert all(name.startswith("llmk-encoder") for name in ran_on)


def test_micro_batcher_fails_only_the_batch_that_failed():
    def run(kind: str, texts: list[str]) -> list[str]:
        if "boom" in texts:
            raise RuntimeError("forward failed")
        return texts

    async def scenario() -> tuple:
        batcher = MicroBatcher(run, window_s=0.0, max_batch_size=1)
        batcher.start()
        failed = await asyncio.gather(batcher.submit("embed", ["boom"]), return_exceptions=True)
        ok = await batcher.submit("embed", ["fine"])
        await batcher.stop()
        return failed[0], ok

    failed, ok = asyncio.run(scenario())
    assert isinstance(failed, RuntimeError) and ok == ["fine"]


def test_embeddings_route_float_and_base64(bert_dir):
    with running_client(bert_dir) as client:
        body = {"model": bert_dir.name, "input": ["hello world", "alice lives in paris"]}
        floats = client.post("/v1/embeddings", json=body).json()
        assert floats["object"] == "list" and floats["model"] == bert_dir.name
        assert [d["index"] for d in floats["data"]] == [0, 1]
        assert floats["usage"]["prompt_tokens"] == floats["usage"]["total_tokens"] > 0
        packed = client.post("/v1/embeddings", json={**body, "encoding_format": "base64"}).json()
        decoded = np.frombuffer(base64.b64decode(packed["data"][1]["embedding"]), dtype="<f4")
        np.testing.assert_allclose(decoded, floats["data"][1]["embedding"], rtol=1e-6)
        single = client.post("/v1/embeddings", json={"input": "hello world"}).json()
        np.testing.assert_allclose(single["data"][0]["embedding"], floats["data"][0]["embedding"], atol=1e-5)
        wrong = client.post("/v1/embeddings", json={"input": "x", "dimensions": 7})
        assert wrong.status_code == 400 and "32 dimensions" in wrong.json()["error"]["message"]


def test_routes_that_do_not_fit_the_model_answer_400(bert_dir):
    with running_client(bert_dir) as client:
        for route, body in [
            ("/v1/classify", {"input": "x"}),
            ("/v1/ner", {"input": "x"}),
            ("/v1/completions", {"prompt": "x"}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
        ]:
            answer = client.post(route, json=body)
            assert answer.status_code == 400, route
            assert "embed model" in answer.json()["error"]["message"]
        assert client.post("/v1/embeddings", json={"input": "x", "model": "gpt-4"}).status_code == 404


def test_classify_route_gives_labels_best_first(classifier_dir):
    with running_client(classifier_dir) as client:
        answer = client.post("/v1/classify", json={"input": ["hello world", "the"]}).json()
        assert len(answer["data"]) == 2
        first = answer["data"][0]
        assert {s["label"] for s in first["scores"]} == {"negative", "positive"}
        assert first["label"] == first["scores"][0]["label"]
        assert first["scores"][0]["score"] >= first["scores"][1]["score"]
        assert sum(s["score"] for s in first["scores"]) == pytest.approx(1.0, abs=1e-5)
        top1 = client.post("/v1/classify", json={"input": "hello", "top_k": 1}).json()
        assert len(top1["data"][0]["scores"]) == 1
        # a classifier also serves embeddings from its encoder
        assert client.post("/v1/embeddings", json={"input": "hello"}).status_code == 200


def test_ner_route_gives_spans_with_character_offsets(ner_dir):
    text = "Alice lives in Paris"
    with running_client(ner_dir) as client:
        answer = client.post("/v1/ner", json={"input": [text, "bob"]})
        assert answer.status_code == 200
        data = answer.json()["data"]
        assert [d["index"] for d in data] == [0, 1]
        for entity in data[0]["entities"]:  # a random model tags at random; the spans must still be exact
            assert text[entity["start"] : entity["end"]] == entity["text"]
            assert entity["type"] in {"PER", "LOC"} and 0 <= entity["score"] <= 1


def test_input_limits_name_the_flag(bert_dir):
    options = {"max_inputs": 2, "max_prompt_tokens": 8}
    with running_client(bert_dir, options=options) as client:
        many = client.post("/v1/embeddings", json={"input": ["a", "b", "c"]})
        assert many.status_code == 400 and "--max_inputs" in many.json()["error"]["message"]
        long = client.post("/v1/embeddings", json={"input": "hello " * 20})
        assert long.status_code == 400 and "--max_prompt_tokens" in long.json()["error"]["message"]
        empty = client.post("/v1/embeddings", json={"input": []})
        assert empty.status_code == 400
