"""API keys, auth on every route, rate limits with Retry-After, body size limits and PII-free logs."""

from __future__ import annotations

import json
import logging
import random
import stat

import httpx
import pytest

from llmkernel.errors import InputError, UserError
from llmkernel.serve.security import ApiKey, KeyStore, PiiMasker, RateLimiter, create_key, hash_key
from tests.conftest import run_llmk
from tests.serve.conftest import live_server, running_client, serve_config

PROTECTED = [
    ("GET", "/ready", None),
    ("GET", "/metrics", None),
    ("GET", "/v1/models", None),
    ("POST", "/v1/embeddings", {"input": "hello"}),
    ("POST", "/v1/classify", {"input": "hello"}),
    ("POST", "/v1/ner", {"input": "hello"}),
    ("POST", "/v1/completions", {"prompt": "hello"}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}]}),
]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_create_key_stores_only_a_hash(tmp_path):
    keys_file = tmp_path / "keys.json"
    key, entry = create_key(keys_file, "alice")
    second, _ = create_key(keys_file)
    stored = keys_file.read_text()
    assert key.startswith("llmk-") and len(key) > 40 and key not in stored and second not in stored
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    records = json.loads(stored)["keys"]
    assert [r["name"] for r in records] == ["alice", "key-2"]
    assert records[0]["hash"] == hash_key(key) and records[0]["created"]
    store = KeyStore.load(keys_file)
    assert store.verify(key).name == "alice" and store.verify(second).name == "key-2"
    assert store.verify(key[:-1]) is None and store.verify("") is None
    with pytest.raises(UserError, match="exists already"):
        create_key(keys_file, "alice")


def test_keys_file_errors_are_one_line(tmp_path):
    with pytest.raises(InputError, match="llmk keys create"):
        KeyStore.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"keys": [{"name": "x", "hash": "md5:00", "created": ""}]}')
    (tmp_path / "bad.json").chmod(0o600)  # under a umask of 002 it would be refused as group-writable
    with pytest.raises(InputError, match="sha256"):
        KeyStore.load(tmp_path / "bad.json")


def test_llmk_keys_create_prints_the_key_once(tmp_path):
    keys_file = tmp_path / "keys.json"
    done = run_llmk("keys", "create", "--keys-file", str(keys_file), "--name", "ci")
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip()
    assert KeyStore.load(keys_file).verify(key).name == "ci"
    assert key not in done.stderr
    again = run_llmk("keys", "create", "--keys-file", str(keys_file), "--name", "ci")
    assert again.returncode == 2 and "exists already" in again.stderr


@pytest.fixture()
def keys(tmp_path) -> tuple[KeyStore, str]:
    key, _ = create_key(tmp_path / "keys.json", "alice")
    return KeyStore.load(tmp_path / "keys.json"), key


def test_every_route_but_health_needs_a_key(bert_dir, keys):
    store, key = keys
    good = {"Authorization": f"Bearer {key}"}
    with running_client(bert_dir, headers=good, keys=store) as client:
        assert client.get("/health").status_code == 200
        for method, path, body in PROTECTED:
            for headers in ({}, {"Authorization": "Bearer llmk-wrong"}, {"Authorization": f"Basic {key}"}):
                answer = client.request(method, path, json=body, headers=headers)
                assert answer.status_code == 401, (path, headers)
                assert answer.headers["WWW-Authenticate"] == "Bearer"
                assert answer.json()["error"]["type"] == "authentication_error"
            # with the key: 200, or 400 for the routes a BERT does not serve
            expected = (
                400 if path in ("/v1/classify", "/v1/ner", "/v1/completions", "/v1/chat/completions") else 200
            )
            assert client.request(method, path, json=body, headers=good).status_code == expected, path


def test_public_metrics_opens_only_metrics(bert_dir, keys):
    store, key = keys
    good = {"Authorization": f"Bearer {key}"}
    with running_client(bert_dir, headers=good, keys=store, options={"public_metrics": True}) as client:
        assert client.get("/metrics").status_code == 200
        assert client.get("/v1/models").status_code == 401


def test_request_rate_limit_answers_429_with_retry_after(bert_dir, keys):
    store, key = keys
    good = {"Authorization": f"Bearer {key}"}
    clock = FakeClock()
    with running_client(
        bert_dir, headers=good, keys=store, clock=clock, options={"requests_per_minute": 3}
    ) as client:
        codes = [client.get("/v1/models", headers=good).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        limited = client.get("/v1/models", headers=good)
        assert limited.headers["Retry-After"] == "20"  # one request refills in 60/3 s
        assert limited.json()["error"]["type"] == "rate_limit_error"
        clock.now += 20
        assert client.get("/v1/models", headers=good).status_code == 200
        metrics = client.get("/metrics", headers=good).text
        assert "llmk:rate_limited_total 2.0" in metrics
        assert 'llmk:request_errors_total{code="429"} 2.0' in metrics


def test_token_bucket_reserve_refund_and_debt():
    clock = FakeClock()
    limiter = RateLimiter(0, 600, clock=clock)  # 10 tokens per second
    assert limiter.take_request("a") == 0  # no request limit
    assert limiter.reserve_tokens("a", 500) == 0
    assert limiter.reserve_tokens("a", 200) == pytest.approx(10.0)  # 100 left, 100 missing
    limiter.refund_tokens("a", 300)
    assert limiter.reserve_tokens("a", 200) == 0
    limiter.charge_tokens("a", 400)  # usage known afterwards may leave a debt
    assert limiter.reserve_tokens("a", 1) == pytest.approx(20.1)
    assert limiter.reserve_tokens("b", 600) == 0  # buckets are per key
    vip = ApiKey(name="vip", hash=hash_key("k"), created="", requests_per_minute=1)
    per_key = RateLimiter(100, 0, KeyStore([vip]), clock=clock)  # a keys-file entry overrides the default
    assert per_key.take_request("vip") == 0 and per_key.take_request("vip") == pytest.approx(60.0)
    assert per_key.take_request("other") == 0 and per_key.take_request("other") == 0


def test_body_size_limit_413_for_declared_and_chunked_bodies(bert_dir):
    with running_client(bert_dir, options={"max_body_bytes": 2048}) as client:
        big = {"input": "hello " * 1000}
        declared = client.post("/v1/embeddings", json=big)
        assert declared.status_code == 413 and "2048 bytes" in declared.json()["error"]["message"]

        def chunks():
            for _ in range(10):
                yield b"x" * 500

        chunked = client.post(
            "/v1/embeddings", content=chunks(), headers={"Content-Type": "application/json"}
        )
        assert chunked.status_code == 413
        assert client.post("/v1/embeddings", json={"input": "hello"}).status_code == 200


def test_body_size_limit_on_a_real_server_with_chunked_upload(bert_dir):
    from llmkernel.serve.app import create_app

    app = create_app(serve_config(bert_dir, max_body_bytes=4096), model_dir=bert_dir)
    with live_server(app) as url:

        def chunks():
            for _ in range(100):
                yield b"y" * 1000

        answer = httpx.post(
            f"{url}/v1/embeddings", content=chunks(), headers={"Content-Type": "application/json"}
        )
        assert answer.status_code == 413
        assert "x-request-id" in answer.headers


def test_logs_hold_no_raw_pii_and_no_key(bert_dir, keys, caplog):
    store, key = keys
    good = {"Authorization": f"Bearer {key}"}
    secret = "mail alice@example.com or call +44 20 7946 0958, card 4111 1111 1111 1111"
    with caplog.at_level(logging.INFO, logger="llmkernel.serve"):
        with running_client(bert_dir, headers=good, keys=store) as client:
            answer = client.post("/v1/embeddings", json={"input": secret}, headers=good)
            assert answer.status_code == 200
            client.get(f"/v1/unknown/{'bob@example.org'}", headers=good)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "llmkernel.serve.access"]
    text = "\n".join(r.getMessage() for r in caplog.records)
    for raw in ("alice@example.com", "7946 0958", "4111 1111", "bob@example.org", key):
        assert raw not in text
    embed = next(line for line in lines if line["route"] == "/v1/embeddings")
    assert embed["key"] == "alice" and embed["status"] == 200 and embed["prompt_tokens"] > 0
    assert "<EMAIL>" in embed["prompt_preview"] and answer.headers["X-Request-ID"] == embed["request_id"]


def test_stream_masker_masks_pii_split_across_pieces():
    masker = PiiMasker(["email", "phone"])
    text = "Write to alice@example.com or phone +44 20 7946 0958 now. " * 3
    for size in (1, 3, 7):
        stream = masker.stream()
        sent = "".join(stream.feed(text[i : i + size]) for i in range(0, len(text), size)) + stream.flush()
        assert sent == masker.mask(text), size
        assert "alice@" not in sent and "7946" not in sent


SENTENCE = "Reply to jane.doe@example.org or +1 (415) 555-2671 about card 4111 1111 1111 1111."
# 8 labels are allowed; these 3 of 60 characters make a 200-character domain
LONG_DOMAIN = ".".join(["email", "x" * 60, "y" * 60, "z" * 60, "example"]) + ".org"


def streamed(masker: PiiMasker, text: str, sizes) -> str:
    stream, sent, pos = masker.stream(), [], 0
    while pos < len(text):
        size = next(sizes)
        sent.append(stream.feed(text[pos : pos + size]))
        pos += size
    return "".join(sent) + stream.flush()


def chunkings(seed: int = 0):
    """One character at a time, then random sizes up to 40 (seeded)."""
    rng = random.Random(seed)
    yield "1", iter(lambda: 1, None)
    yield "random", iter(lambda: rng.randint(1, 40), None)


def test_stream_masker_holds_an_email_with_a_long_domain():
    assert len(LONG_DOMAIN) == 200
    masker = PiiMasker(["email", "phone", "ip", "credit_card"])
    text = f"Thanks! Write to jane.doe@{LONG_DOMAIN} with the form, or to ops@{LONG_DOMAIN}.\n" * 2
    assert masker.mask(text).count("<EMAIL>") == 4
    for name, sizes in chunkings():
        sent = streamed(masker, text, sizes)
        assert sent == masker.mask(text), name
        assert "jane" not in sent and "xxxxx" not in sent


def test_stream_masker_masks_email_phone_and_card_of_a_sentence():
    masker = PiiMasker(["email", "phone", "credit_card"])
    expected = "Reply to <EMAIL> or <PHONE> about card <CREDIT_CARD>."
    assert masker.mask(SENTENCE) == expected
    for name, sizes in chunkings(1):
        assert streamed(masker, SENTENCE, sizes) == expected, name


def test_stream_masker_equals_masking_the_whole_text():
    masker = PiiMasker(["email", "phone", "ip", "credit_card", "iban", "cn_id"])
    rng = random.Random(7)
    pieces = [SENTENCE, " ", "\n", "and ", "v1.2.3.4 ", "192.168.10.1", "2001:db8::1", "11010519491231002X",
              "GB82 WEST 1234 5698 7654 32", "13800138000", "(415) 555-2671", "...john@x.org", "x" * 70,
              f"bob@{LONG_DOMAIN}", "+44 20 7946 0958", "1-800-555-0199", "<a@b.co>"]  # fmt: skip
    for trial in range(25):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 20)))
        for name, sizes in chunkings(trial):
            assert streamed(masker, text, sizes) == masker.mask(text), (trial, name, text)


def test_stream_masker_releases_prose_promptly_and_bounds_the_hold():
    masker = PiiMasker(["email", "phone", "ip", "credit_card", "iban", "cn_id"])
    prose = ("The quick brown fox jumps over the lazy dog while the band plays on. " * 8)[:500]
    stream, sent = masker.stream(), ""
    for pos in range(0, len(prose), 3):
        sent += stream.feed(prose[pos : pos + 3])
        assert len(stream.pending) <= PiiMasker.STREAM_HOLD_CHARS
    assert sent + stream.pending == prose
    # a long run without spaces (an '@' and then domain characters) is held at most as long as an
    # e-mail can be, and released without a space coming
    stream, longest = masker.stream(), 0
    for char in "a@" + "b" * 3000:
        stream.feed(char)
        longest = max(longest, len(stream.pending))
    assert longest <= 64 + 1 + 8 * 64 + 24 + PiiMasker.STREAM_HOLD_CHARS


def test_preview_masks_an_email_that_runs_past_the_preview():
    masker = PiiMasker(["email"])
    domain = ".".join(["mail", *["q" * 60] * 6, "org"])  # 374 characters: past what an old preview masked
    text = f"see jane.doe@{domain} now " + "word " * 200
    preview = masker.preview(text, 12)
    assert preview == "see <EMAIL> ..." and "jane" not in preview
    assert masker.preview("short", 12) == "short" and masker.preview(text, 0) == ""
