"""/v1/relations on a tiny relation model through the real app: inline markers and spans, the answer's
shape, OpenAI-shaped 400s on bad entities, the key, the limits and the metrics every route has.

The model folder (`relation_dir`, tests/serve/conftest.py) is a random tiny BERT with the entity markers and
a relation head, as `llmk finetune relation` writes it."""

from __future__ import annotations

import pytest

from llmkernel.serve.security import KeyStore, create_key
from tests.serve.conftest import running_client
from tests.tiny_models import RELATION_LABELS as LABELS

MARKED = "hello <e1>alice</e1> lives in <e2>paris</e2>"
PLAIN = "hello alice lives in paris"  # alice is [6, 11), paris [21, 26)


def test_inline_markers_and_spans_give_the_same_answer(relation_dir):
    with running_client(relation_dir) as client:
        inline = client.post("/v1/relations", json={"input": {"text": MARKED}})
        assert inline.status_code == 200, inline.text
        body = inline.json()
        assert body["object"] == "list" and body["model"] and body["usage"]["prompt_tokens"] > 0
        [result] = body["data"]
        assert result["index"] == 0 and result["label"] in LABELS
        assert (
            result["label"] == result["scores"][0]["label"]
            and result["score"] == result["scores"][0]["score"]
        )
        assert sum(s["score"] for s in result["scores"]) == pytest.approx(1.0, abs=1e-5)
        assert [s["score"] for s in result["scores"]] == sorted(
            (s["score"] for s in result["scores"]), reverse=True
        )
        expected_direction = {"Lives-In(e1,e2)": "e1,e2", "Lives-In(e2,e1)": "e2,e1", "Other": None}
        assert result["direction"] == expected_direction[result["label"]]
        assert result["relation"] == result["label"].split("(")[0]

        spans = client.post("/v1/relations", json={"input": {"text": PLAIN, "e1": [6, 11], "e2": [21, 26]}})
        assert spans.status_code == 200, spans.text
        again = spans.json()["data"][0]["scores"]
        assert [s["label"] for s in again] == [s["label"] for s in result["scores"]]
        assert [s["score"] for s in again] == pytest.approx([s["score"] for s in result["scores"]])


def test_a_list_of_inputs_and_top_k(relation_dir):
    swapped = {"text": PLAIN, "e1": [21, 26], "e2": [6, 11]}  # e1 after e2 in the sentence
    with running_client(relation_dir) as client:
        answer = client.post("/v1/relations", json={"input": [{"text": MARKED}, swapped], "top_k": 1})
        assert answer.status_code == 200, answer.text
        data = answer.json()["data"]
        assert [d["index"] for d in data] == [0, 1] and all(len(d["scores"]) == 1 for d in data)
        models = client.get("/v1/models").json()["data"][0]
        assert models["task"] == "relation" and "/v1/relations" in models["routes"]
        assert client.post("/v1/embeddings", json={"input": "hello"}).status_code == 200


@pytest.mark.parametrize(
    "item, message",
    [({"text": PLAIN, "e1": [6, 11], "e2": [21, 99]}, "out of range"),
     ({"text": PLAIN, "e1": [6, 11], "e2": [8, 20]}, "overlap"),
     ({"text": PLAIN, "e1": [6, 11]}, "only e1"),
     ({"text": PLAIN}, "no <e1> marker"),
     ({"text": "hello <e1>alice</e1> lives in paris"}, "no <e2> marker"),
     ({"text": MARKED, "e1": [0, 5], "e2": [6, 9]}, "already holds entity markers")],
)  # fmt: skip
def test_bad_entities_answer_an_openai_shaped_400(relation_dir, item, message):
    with running_client(relation_dir) as client:
        answer = client.post("/v1/relations", json={"input": item})
        assert answer.status_code == 400
        error = answer.json()["error"]
        assert message in error["message"] and error["type"] == "invalid_request_error"
        assert error["param"] == "input" and error["code"] == "400"
        second = client.post("/v1/relations", json={"input": [{"text": MARKED}, item]})
        assert second.status_code == 400 and second.json()["error"]["message"].startswith("input[1]:")


def test_schema_errors_limits_and_other_models(relation_dir, bert_dir):
    with running_client(relation_dir, options={"max_inputs": 2, "max_prompt_tokens": 12}) as client:
        negative = client.post("/v1/relations", json={"input": {"text": PLAIN, "e1": [-1, 3], "e2": [6, 9]}})
        assert negative.status_code == 400 and negative.json()["error"]["type"] == "invalid_request_error"
        assert client.post("/v1/relations", json={"input": []}).status_code == 400
        many = client.post("/v1/relations", json={"input": [{"text": MARKED}] * 3})
        assert many.status_code == 400 and "--max_inputs" in many.json()["error"]["message"]
        long = client.post("/v1/relations", json={"input": {"text": MARKED + " the world" * 20}})
        assert long.status_code == 400 and "--max_prompt_tokens" in long.json()["error"]["message"]
        assert client.post("/v1/classify", json={"input": "x"}).status_code == 400
    with running_client(bert_dir) as client:
        answer = client.post("/v1/relations", json={"input": {"text": MARKED}})
        assert answer.status_code == 400 and "relation classification" in answer.json()["error"]["message"]


def test_needs_a_key_and_is_counted(relation_dir, tmp_path):
    key, _ = create_key(tmp_path / "keys.json", "alice")
    good = {"Authorization": f"Bearer {key}"}
    with running_client(relation_dir, headers=good, keys=KeyStore.load(tmp_path / "keys.json")) as client:
        body = {"input": {"text": MARKED}}
        refused = client.post("/v1/relations", json=body)
        assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
        assert client.post("/v1/relations", json=body, headers=good).status_code == 200
        metrics = client.get("/metrics", headers=good).text
        assert 'llmk:requests_total{code="200",route="/v1/relations"} 1.0' in metrics
        assert "llmk:prompt_tokens_total" in metrics
