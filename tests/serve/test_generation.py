"""Completions and chat on a tiny random Llama through the real engine, in OpenAI's shapes (also through
the official openai client), plus limits, token rate limits, PII masking and cancellation."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from llmkernel.serve.app import create_app
from llmkernel.serve.engine import TokenEvent
from llmkernel.serve.security import KeyStore, PiiMasker, create_key
from tests.serve.conftest import live_server, running_client, serve_config, wait_ready

CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"}]}


def sse_events(text: str) -> list:
    lines = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


@pytest.fixture(scope="module")
def llama_client(llama_dir):
    with running_client(llama_dir, options={"max_tokens": 24, "max_prompt_tokens": 64}) as client:
        yield client


def test_completion_shape_usage_and_greedy_determinism(llama_client, llama_dir):
    body = {"model": llama_dir.name, "prompt": "Hello world", "max_tokens": 5, "temperature": 0}
    first = llama_client.post("/v1/completions", json=body)
    assert first.status_code == 200, first.text
    answer = first.json()
    assert answer["object"] == "text_completion" and answer["id"].startswith("cmpl-")
    assert answer["model"] == llama_dir.name and len(answer["choices"]) == 1
    usage = answer["usage"]
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    assert usage["prompt_tokens"] == len(tokenizer("Hello world")["input_ids"])
    assert 1 <= usage["completion_tokens"] <= 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert answer["choices"][0]["finish_reason"] in ("length", "stop")
    assert llama_client.post("/v1/completions", json=body).json()["choices"] == answer["choices"]


def test_seeded_sampling_repeats_and_prompt_lists_give_one_choice_each(llama_client):
    body = {"prompt": "The quick", "max_tokens": 6, "temperature": 1.0, "seed": 7}
    texts = [llama_client.post("/v1/completions", json=body).json()["choices"][0]["text"] for _ in range(2)]
    assert texts[0] == texts[1]
    listed = llama_client.post("/v1/completions", json={**body, "prompt": ["a", "b", "c"]}).json()
    assert [c["index"] for c in listed["choices"]] == [0, 1, 2]


def test_chat_completion_uses_the_chat_template(llama_client, llama_dir):
    answer = llama_client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 4}).json()
    assert answer["object"] == "chat.completion" and answer["id"].startswith("chatcmpl-")
    assert answer["choices"][0]["message"]["role"] == "assistant"
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    templated = tokenizer.apply_chat_template(CHAT["messages"], add_generation_prompt=True, tokenize=False)
    assert answer["usage"]["prompt_tokens"] == len(
        tokenizer(templated, add_special_tokens=False)["input_ids"]
    )


def test_streamed_chat_matches_the_unstreamed_answer(llama_client):
    body = {**CHAT, "max_tokens": 8, "temperature": 0}
    whole = llama_client.post("/v1/chat/completions", json=body).json()
    streamed = llama_client.post(
        "/v1/chat/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert streamed.headers["content-type"].startswith("text/event-stream")
    chunks = sse_events(streamed.text)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_streamed_completion(llama_client):
    streamed = llama_client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4, "stream": True})
    chunks = sse_events(streamed.text)
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] is not None


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"prompt": "hi", "max_tokens": 25}, "--max_tokens"),
        ({"prompt": "hello world " * 40}, "--max_prompt_tokens"),
        ({"prompt": "hi", "n": 2}, "n must be less than or equal to 1"),
        ({"prompt": ["a", "b"], "stream": True}, "one prompt"),
        ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": ""}, "prompt is empty"),
        ({"prompt": "hi", "temperature": 3}, "temperature"),
        ({"prompt": "hi", "model": "gpt-4"}, "not served here"),
    ],
)
def test_limits_answer_400_naming_the_limit(llama_client, body, needle):
    answer = llama_client.post("/v1/completions", json=body)
    assert answer.status_code in (400, 404) and needle in answer.json()["error"]["message"]


def test_decoders_do_not_serve_encoder_routes(llama_client):
    answer = llama_client.post("/v1/embeddings", json={"input": "hi"})
    assert answer.status_code == 400 and "generate model" in answer.json()["error"]["message"]


def test_generation_metrics(llama_client):
    llama_client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3})
    text = llama_client.get("/metrics").text
    for name in (
        "llmk:num_requests_running",
        "llmk:num_requests_waiting",
        "llmk:time_to_first_token_seconds_count",
        "llmk:e2e_request_latency_seconds_count",
        "llmk:prompt_tokens_total",
        "llmk:generation_tokens_total",
        'llmk:requests_total{code="200",route="/v1/completions"}',
    ):
        assert name in text, name
    generated = next(line for line in text.splitlines() if line.startswith("llmk:generation_tokens_total"))
    assert float(generated.split()[-1]) > 0


def test_openai_client_in_process(llama_dir, tmp_path):
    key, _ = create_key(tmp_path / "keys.json", "sdk")
    keys = KeyStore.load(tmp_path / "keys.json")
    headers = {"Authorization": f"Bearer {key}"}
    with running_client(llama_dir, headers=headers, keys=keys, options={"requests_per_minute": 6}) as client:
        sdk = openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=client, max_retries=0)
        completion = sdk.completions.create(model=llama_dir.name, prompt="Hello", max_tokens=3)
        assert completion.usage.completion_tokens >= 1
        chat = sdk.chat.completions.create(model=llama_dir.name, messages=CHAT["messages"], max_tokens=3)
        assert chat.choices[0].message.role == "assistant"
        stream = sdk.chat.completions.create(
            model=llama_dir.name, messages=CHAT["messages"], max_tokens=3, stream=True
        )
        assert len([chunk for chunk in stream]) >= 2
        with pytest.raises(openai.BadRequestError, match="--max_tokens"):
            sdk.completions.create(model=llama_dir.name, prompt="Hello", max_tokens=1000)
        with pytest.raises(openai.RateLimitError):
            for _ in range(6):
                sdk.models.list()
        wrong = openai.OpenAI(
            base_url="http://testserver/v1", api_key="llmk-no", http_client=client, max_retries=0
        )
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()


def test_tokens_per_minute_limit(llama_dir):
    with running_client(llama_dir, options={"tokens_per_minute": 40, "max_tokens": 24}) as client:
        too_big = client.post("/v1/completions", json={"prompt": "hello world " * 5, "max_tokens": 24})
        assert too_big.status_code == 400 and "--tokens_per_minute" in too_big.json()["error"]["message"]
        codes = [
            client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 16}).status_code
            for _ in range(4)
        ]
        assert 429 in codes
        limited = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 16})
        assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1


# ------------------------------------------------------------------ scripted engine: masking, cancel


class ScriptedHandle:
    def __init__(self, pieces: list[str], delay: float) -> None:
        self.request_id, self.prompt_tokens, self.completion_tokens = "r", 3, 0
        self.time_to_first_token = 0.001
        self.pieces, self.delay, self.cancelled = pieces, delay, False

    def cancel(self) -> None:
        self.cancelled = True

    def expire(self) -> None:
        self.cancelled = True

    async def __aiter__(self):
        for i, piece in enumerate(self.pieces):
            if self.cancelled:
                yield TokenEvent(None, "", "cancelled")
                return
            await asyncio.sleep(self.delay)
            self.completion_tokens += 1
            yield TokenEvent(i, piece, "stop" if i == len(self.pieces) - 1 else None)


class ScriptedEngine:
    """Answers every request with the same pieces of text (up to max_tokens of them), slowly if asked."""

    def __init__(self, tokenizer_dir: Path, pieces: list[str], delay: float = 0.0) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.model_name, self.max_model_len, self.ready = "scripted", 256, True
        self.num_running = self.num_waiting = 0
        self.pieces, self.delay, self.handles = pieces, delay, []

    def start(self) -> None:
        pass

    def health(self) -> str | None:
        return None

    def stop(self, drain_timeout_s: float = 30.0) -> None:
        pass

    def submit(self, prompt_token_ids, params, loop=None) -> ScriptedHandle:
        self.handles.append(ScriptedHandle(self.pieces[: params.max_tokens], self.delay))
        return self.handles[-1]


SECRET_PIECES = ["Sure, write to ", "ali", "ce@exam", "ple.com or call +44 20 79", "46 0958", " today."]


def test_output_masking_for_whole_and_streamed_answers(llama_dir):
    engine = ScriptedEngine(llama_dir, SECRET_PIECES)
    options = {"pii_mask": "outputs"}
    with running_client(llama_dir, options=options, engine_factory=lambda d, c: engine) as client:
        whole = client.post("/v1/completions", json={"prompt": "contact?"}).json()["choices"][0]["text"]
        streamed = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        sent = "".join(c["choices"][0]["delta"].get("content", "") for c in sse_events(streamed.text))
    expected = PiiMasker(["email", "phone"]).mask("".join(SECRET_PIECES))
    assert whole == sent == expected == "Sure, write to <EMAIL> or call <PHONE> today."
    assert "alice" not in streamed.text and "0958" not in streamed.text


def test_input_masking_changes_what_the_model_sees(llama_dir):
    prompt = "my card is 4111 1111 1111 1111, thanks"
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    with running_client(llama_dir, options={"pii_mask": "inputs"}) as client:
        usage = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1}).json()["usage"]
    masked = PiiMasker(["credit_card"]).mask(prompt)
    assert (
        usage["prompt_tokens"] == len(tokenizer(masked)["input_ids"]) != len(tokenizer(prompt)["input_ids"])
    )


def test_a_client_leaving_a_stream_cancels_its_request(llama_dir):
    engine = ScriptedEngine(llama_dir, ["x"] * 200, delay=0.02)
    app = create_app(
        serve_config(llama_dir, max_tokens=200), model_dir=llama_dir, engine_factory=lambda d, c: engine
    )
    with live_server(app) as url:
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with httpx.stream(
            "POST", f"{url}/v1/completions", json={"prompt": "go", "stream": True, "max_tokens": 200}
        ) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    break
        deadline = time.monotonic() + 5
        while not engine.handles[-1].cancelled and time.monotonic() < deadline:
            time.sleep(0.02)
    assert engine.handles[-1].cancelled and engine.handles[-1].completion_tokens < 200


def test_ready_waits_for_the_warm_up(llama_dir):
    engine = ScriptedEngine(llama_dir, ["ok"])
    with running_client(llama_dir, engine_factory=lambda d, c: engine) as client:
        wait_ready(client)
        assert len(engine.handles) == 1 and len(engine.handles[0].pieces) == 1  # the one-token warm-up
