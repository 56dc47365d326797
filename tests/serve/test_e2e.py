"""End to end: the real `llmk serve` process on the real offline models, driven by the official openai
client, with API keys, rate limits and PII-free logs; SIGTERM ends it with exit code 0."""

from __future__ import annotations

import signal
import time

import httpx
import numpy as np
import openai
import pytest

from llmkernel.serve.security import create_key
from tests.serve.conftest import free_port
from tests.serve.test_server import start_llmk_serve

pytestmark = pytest.mark.e2e

SECRET = "Reply to jane.doe@example.org or +1 (415) 555-2671 about card 4111 1111 1111 1111."


def serve_real_model(model: str, tmp_path, *flags: str):
    key, _ = create_key(tmp_path / "keys.json", "e2e")
    port = free_port()
    process = start_llmk_serve(model, "--port", str(port), "--api_keys", str(tmp_path / "keys.json"), *flags)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready_with_key(process, url, key)
    except BaseException:
        process.kill()
        raise
    return process, url, key


def wait_until_ready_with_key(process, url: str, key: str) -> None:
    """Like test_server.wait_until_ready, with the key /ready needs when keys are on."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        try:
            if (
                httpx.get(f"{url}/ready", headers={"Authorization": f"Bearer {key}"}, timeout=2).status_code
                == 200
            ):
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not become ready")


def stop(process) -> str:
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=120)
    stderr = process.stderr.read()
    assert code == 0, stderr[-3000:]
    return stderr


def test_smollm2_with_the_openai_client(tmp_path):
    process, url, key = serve_real_model("smollm2-135m-instruct", tmp_path, "--max_tokens", "32")
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)
        [model] = client.models.list().data
        assert model.id == "smollm2-135m-instruct"
        completion = client.completions.create(
            model=model.id, prompt="The capital of France is", max_tokens=8, temperature=0
        )
        assert completion.choices[0].text.strip() and completion.usage.completion_tokens <= 8
        chat = client.chat.completions.create(
            model=model.id,
            messages=[{"role": "user", "content": "What is 2+2?"}],
            max_tokens=12,
            temperature=0,
        )
        assert chat.choices[0].message.content.strip()
        pieces = [
            chunk.choices[0].delta.content or ""
            for chunk in client.chat.completions.create(
                model=model.id,
                messages=[{"role": "user", "content": "What is 2+2?"}],
                max_tokens=12,
                temperature=0,
                stream=True,
            )
            if chunk.choices
        ]
        assert "".join(pieces) == chat.choices[0].message.content
        leaky = client.chat.completions.create(
            model=model.id, messages=[{"role": "user", "content": SECRET}], max_tokens=4
        )
        assert leaky.usage.prompt_tokens > 20
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/health").status_code == 200
        metrics = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {key}"}).text
        assert "llmk:generation_tokens_total" in metrics
    finally:
        logs = stop(process) if process.poll() is None else process.stderr.read()
    for raw in ("jane.doe@example.org", "555-2671", "4111 1111", key):
        assert raw not in logs
    assert '"key": "e2e"' in logs and "<EMAIL>" in logs


def test_minilm_embeddings_and_rate_limit(tmp_path):
    process, url, key = serve_real_model("all-minilm-l6-v2", tmp_path, "--requests_per_minute", "5")
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)
        texts = [
            "A cat sits on the mat.",
            "A kitten is resting on a rug.",
            "Stock markets fell sharply today.",
        ]
        answer = client.embeddings.create(model="all-minilm-l6-v2", input=texts)  # the client asks for base64
        vectors = np.array([item.embedding for item in answer.data])
        assert vectors.shape == (3, 384)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-4)
        similar, unrelated = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
        assert similar > unrelated + 0.2
        with pytest.raises(openai.RateLimitError) as limited:
            for _ in range(6):
                client.embeddings.create(model="all-minilm-l6-v2", input="again")
        assert int(limited.value.response.headers["Retry-After"]) >= 1
        assert httpx.post(f"{url}/v1/embeddings", json={"input": "x"}).status_code == 401
        wrong_route = httpx.post(
            f"{url}/v1/completions", json={"prompt": "x"}, headers={"Authorization": f"Bearer {key}"}
        )
        assert wrong_route.status_code in (400, 429)
    finally:
        if process.poll() is None:
            stop(process)
