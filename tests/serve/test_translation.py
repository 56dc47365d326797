"""Serving an encoder-decoder: /v1/completions translates the prompt (beam search), through the real app
with its key check, limits and metrics (a trained model's served translations: tests/tasks/test_seq2seq.py)."""

from __future__ import annotations

import json
import os

import pytest

from llmkernel.models.loading import preset_folder
from llmkernel.serve.security import KeyStore, create_key
from tests.serve.conftest import running_client
from tests.translation_data import make_translation_set

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def translation_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-translation")
    before = os.environ.get("LLMK_CACHE")
    os.environ["LLMK_CACHE"] = str(root / "cache")  # presets are built into this test's own cache
    yield make_translation_set(root)
    if before is None:
        os.environ.pop("LLMK_CACHE", None)
    else:
        os.environ["LLMK_CACHE"] = before


@pytest.fixture(scope="module")
def seq2seq_dir(translation_set):
    """An untrained seq2seq-tiny folder (random weights): what is served, not how well."""
    return preset_folder("seq2seq-tiny", translation_set["tokenizer"], seed=0)


@pytest.fixture(scope="module")
def keyed(seq2seq_dir, tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("keys") / "keys.json"
    key, _ = create_key(keys_file, "translator")
    headers = {"Authorization": f"Bearer {key}"}
    with running_client(seq2seq_dir, headers=headers, keys=KeyStore.load(keys_file)) as client:
        yield client, headers


def test_models_lists_the_completions_route_for_translation(keyed, seq2seq_dir):
    client, headers = keyed
    card = client.get("/v1/models", headers=headers).json()["data"][0]
    assert card["task"] == "translate" and card["routes"] == ["/v1/completions"]


def test_a_completion_is_a_translation_with_usage(keyed, seq2seq_dir):
    client, headers = keyed
    body = {"model": seq2seq_dir.name, "prompt": "三五七。", "max_tokens": 6}
    first = client.post("/v1/completions", json=body, headers=headers)
    assert first.status_code == 200, first.text
    answer = first.json()
    choice = answer["choices"][0]
    assert choice["finish_reason"] in ("stop", "length") and isinstance(choice["text"], str)
    assert answer["usage"]["prompt_tokens"] >= 1 and 1 <= answer["usage"]["completion_tokens"] <= 6
    again = client.post("/v1/completions", json=body, headers=headers).json()
    assert again["choices"][0]["text"] == choice["text"]  # beam search: deterministic
    listed = client.post("/v1/completions", json={**body, "prompt": ["一。", "二。"]}, headers=headers).json()
    assert [c["index"] for c in listed["choices"]] == [0, 1]


def test_a_streamed_translation_ends_with_done(keyed):
    client, headers = keyed
    body = {"prompt": "一二。", "max_tokens": 4, "stream": True}
    with client.stream("POST", "/v1/completions", json=body, headers=headers) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize(
    "body, status, needle",
    [
        ({"prompt": "一。", "max_tokens": 1000}, 400, "--max_tokens"),
        ({"prompt": ""}, 400, "the prompt is empty"),
        ({"messages": [{"role": "user", "content": "一"}]}, 400, "/v1/chat/completions needs a decoder"),
    ],
)
def test_limits_and_routes_answer_400(keyed, body, status, needle):
    client, headers = keyed
    route = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    answer = client.post(route, json=body, headers=headers)
    assert answer.status_code == status and needle in answer.json()["error"]["message"]


def test_no_key_is_401_and_metrics_count_the_tokens(keyed):
    client, headers = keyed
    assert client.post("/v1/completions", json={"prompt": "一。"}).status_code == 401
    client.post("/v1/completions", json={"prompt": "一。", "max_tokens": 3}, headers=headers)
    text = client.get("/metrics", headers=headers).text
    assert 'llmk:requests_total{code="200",route="/v1/completions"}' in text
    generated = next(line for line in text.splitlines() if line.startswith("llmk:generation_tokens_total"))
    assert float(generated.split()[-1]) > 0
