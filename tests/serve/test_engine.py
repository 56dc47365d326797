"""The generation engine on tiny random models: continuous batching must not change greedy results, and
every way a request ends (length, eos, stop string, cancel, timeout, drain) frees its slot."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from llmkernel.data.config import TokenizerConfig
from llmkernel.data.tokenizer import train_tokenizer
from llmkernel.serve.engine import GenerationEngine, SamplingParams, _sample
from llmkernel.serve.text import MAX_STOP_CHARS, MAX_STOPS, TextStream
from tests.tiny_models import make_tiny_llama

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a tiny model writes tiny words, one token at a time",
    "continuous batching lets new requests join at every step",
] * 10


def save_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """A 300-token byte-level BPE tokenizer (so multi-byte characters span several tokens)."""
    return train_tokenizer(SENTENCES, TokenizerConfig(kind="bpe", vocab_size=300, min_frequency=1), folder)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A 2-layer width-64 decoder with a 300-token tokenizer (so multi-byte characters span several tokens)."""
    return make_tiny_llama(
        tmp_path_factory.mktemp("tiny-llama"), width=64, tokenizer_corpus=SENTENCES, vocab_size=300
    )


@pytest.fixture(scope="module")
def hf_model(llama_dir):
    return AutoModelForCausalLM.from_pretrained(llama_dir).eval()


def make_engine(folder: Path, **options) -> GenerationEngine:
    engine = GenerationEngine(folder, quantize=options.pop("quantize", "none"), **options)
    engine.start()
    return engine


@pytest.fixture
def engine(llama_dir):
    engine = make_engine(llama_dir, max_batch_size=4)
    yield engine
    engine.stop(drain_timeout_s=0)


def hf_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False)
    return out[0, len(prompt) :].tolist()


PROMPTS = [[5, 17, 42], list(range(30, 61)), [7] * 12, list(range(100, 110)), [200, 3, 9, 250, 11]]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
VOCAB_SIZE = 300


def collect(handle) -> tuple[list[int], str, str | None]:
    events = list(handle)
    ids = [e.token_id for e in events if e.token_id is not None]
    return ids, "".join(e.text for e in events), events[-1].finish_reason


def test_concurrent_greedy_equals_hf_generate(engine, hf_model) -> None:
    handles = [engine.submit(p, GREEDY) for p in PROMPTS]  # 5 requests, 4 slots: one waits, then joins
    for prompt, handle in zip(PROMPTS, handles):
        ids, _, reason = collect(handle)
        assert ids == hf_greedy(hf_model, prompt, 12)
        assert reason == "length" and handle.completion_tokens == 12 and handle.prompt_tokens == len(prompt)
        assert handle.time_to_first_token is not None


def test_chunked_prefill_under_a_small_token_budget(llama_dir, hf_model) -> None:
    engine = make_engine(llama_dir, max_batch_size=4, max_num_batched_tokens=8)
    try:
        handles = [engine.submit(p, GREEDY) for p in PROMPTS[:3]]
        for prompt, handle in zip(PROMPTS, handles):
            assert collect(handle)[0] == hf_greedy(hf_model, prompt, 12)
    finally:
        engine.stop(0)


def test_request_admitted_while_another_decodes(engine, hf_model) -> None:
    long = engine.submit(PROMPTS[0], SamplingParams(max_tokens=200, temperature=0.0))
    events = iter(long)
    first = [next(events).token_id for _ in range(3)]
    short_ids, _, _ = collect(engine.submit(PROMPTS[1], GREEDY))
    assert long.finish_reason is None  # the short request ran to its end while the long one decoded
    rest = [e.token_id for e in events if e.token_id is not None]
    assert first + rest == hf_greedy(hf_model, PROMPTS[0], 200)
    assert short_ids == hf_greedy(hf_model, PROMPTS[1], 12)


def test_max_batch_size_leaves_the_rest_waiting(llama_dir, hf_model) -> None:
    engine = make_engine(llama_dir, max_batch_size=2)
    slow_forward = engine.model.forward
    engine.model.forward = lambda step: (time.sleep(0.005), slow_forward(step))[1]
    try:
        handles = [engine.submit(p, SamplingParams(max_tokens=20, temperature=0.0)) for p in PROMPTS[:4]]
        deadline = time.monotonic() + 5
        while engine.num_running < 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert engine.num_running == 2 and engine.num_waiting == 2
        for prompt, handle in zip(PROMPTS, handles):  # later requests reuse freed slots correctly
            assert collect(handle)[0] == hf_greedy(hf_model, prompt, 20)
        assert engine.num_running == 0 and engine.num_waiting == 0
    finally:
        engine.stop(0)


@pytest.mark.parametrize("stop_chars", [3, 20])  # 20 characters span several tokens
def test_stop_string_ends_the_text_before_it(engine, stop_chars: int) -> None:
    params = SamplingParams(max_tokens=30, temperature=0.0)
    _, text, _ = engine.generate(PROMPTS[1], params)
    stop = text[len(text) // 2 : len(text) // 2 + stop_chars]
    cut = text.index(stop)
    ids, stopped_text, reason = engine.generate(
        PROMPTS[1], SamplingParams(max_tokens=30, temperature=0, stop=[stop])
    )
    assert reason == "stop" and stopped_text == text[:cut] and len(ids) < 30


def test_eos_ends_with_stop_and_max_tokens_with_length(engine) -> None:
    ids, _, reason = engine.generate(PROMPTS[2], SamplingParams(max_tokens=5, temperature=0.0))
    assert reason == "length" and len(ids) == 5
    engine.eos_ids = {ids[2]}  # pretend the third greedy token is the end of sequence
    stopped, _, reason = engine.generate(PROMPTS[2], SamplingParams(max_tokens=5, temperature=0.0))
    assert reason == "stop" and stopped == ids[: ids.index(ids[2]) + 1]


def test_cancel_frees_the_slot(llama_dir, hf_model) -> None:
    engine = make_engine(llama_dir, max_batch_size=1)
    try:
        long = engine.submit(PROMPTS[0], SamplingParams(max_tokens=200, temperature=0.0))
        events = iter(long)
        next(events)
        waiting = engine.submit(PROMPTS[1], GREEDY)  # no slot until the long one goes
        long.cancel()
        assert [e.finish_reason for e in events][-1] == "cancelled"
        assert long.completion_tokens < 200
        assert collect(waiting)[0] == hf_greedy(hf_model, PROMPTS[1], 12)
    finally:
        engine.stop(0)


def test_stuck_request_times_out(llama_dir) -> None:
    engine = make_engine(llama_dir, request_timeout_s=0.2)
    forward = engine.model.forward
    engine.model.forward = lambda step: (time.sleep(0.02), forward(step))[1]
    try:
        ids, _, reason = engine.generate(PROMPTS[0], SamplingParams(max_tokens=200, temperature=0.0))
        assert reason == "timeout" and len(ids) < 200
        assert engine.num_running == 0
    finally:
        engine.stop(0)


def test_seeded_sampling_is_reproducible(engine) -> None:
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234)
    first = engine.generate(PROMPTS[3], params)[0]
    concurrent = [engine.submit(PROMPTS[3], params) for _ in range(3)]
    assert all(collect(h)[0] == first for h in concurrent)
    other = engine.generate(PROMPTS[3], SamplingParams(max_tokens=16, temperature=1.0, seed=99))[0]
    assert other != first


def test_too_long_prompts_and_bad_params_raise_value_error(engine) -> None:
    with pytest.raises(ValueError, match="at most 255"):
        engine.submit([1] * 256, GREEDY)
    with pytest.raises(ValueError, match="lower max_tokens to 56"):
        engine.submit([1] * 200, SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], GREEDY)
    with pytest.raises(ValueError, match="vocabulary"):
        engine.submit([10_000], GREEDY)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match=f"at most {MAX_STOPS} strings"):
        SamplingParams(stop=["x"] * (MAX_STOPS + 1))
    with pytest.raises(ValueError, match=f"at most {MAX_STOP_CHARS} characters, got one of 513"):
        SamplingParams(stop=["x", "y" * (MAX_STOP_CHARS + 1)])
    SamplingParams(stop=["z" * MAX_STOP_CHARS] * MAX_STOPS)  # the limits themselves are allowed


def test_stop_drains_running_requests_then_refuses_new_ones(llama_dir) -> None:
    engine = make_engine(llama_dir)
    handles = [engine.submit(p, GREEDY) for p in PROMPTS[:3]]
    engine.stop(drain_timeout_s=30)
    assert [h.finish_reason for h in handles] == ["length"] * 3
    with pytest.raises(RuntimeError, match="stopping"):
        engine.submit(PROMPTS[0], GREEDY)


def test_stop_cancels_what_is_left_at_the_deadline(llama_dir) -> None:
    engine = make_engine(llama_dir)
    forward = engine.model.forward
    engine.model.forward = lambda step: (time.sleep(0.01), forward(step))[1]
    handle = engine.submit(PROMPTS[0], SamplingParams(max_tokens=200, temperature=0.0))
    engine.stop(drain_timeout_s=0.1)
    assert collect(handle)[2] == "cancelled"


def test_async_iteration_on_the_running_loop(engine) -> None:
    async def run() -> tuple[str, str | None]:
        handle = engine.submit(PROMPTS[1], GREEDY)  # the running loop is picked up
        events = [event async for event in handle]
        return "".join(e.text for e in events), events[-1].finish_reason

    text, reason = asyncio.run(run())
    assert (text, reason) == (engine.generate(PROMPTS[1], GREEDY)[1], "length")


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_weight_only_engine_serves(llama_dir, quantize: str) -> None:
    engine = make_engine(llama_dir, quantize=quantize)
    try:
        ids, _, reason = engine.generate(PROMPTS[1], GREEDY)
        assert reason == "length" and len(ids) == 12
    finally:
        engine.stop(0)


def test_other_architectures_serve_through_the_hf_fallback(tmp_path) -> None:
    tokenizer = save_tokenizer(tmp_path)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128)
    config.eos_token_id = config.bos_token_id = tokenizer.eos_token_id
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(tmp_path)
    engine = make_engine(tmp_path)
    try:
        handles = [engine.submit(p, GREEDY) for p in PROMPTS[:3]]
        for prompt, handle in zip(PROMPTS, handles):
            assert collect(handle)[0] == hf_greedy(model, prompt, 12)
    finally:
        engine.stop(0)


def test_text_stream_waits_for_whole_characters_and_holds_back_stop_strings(llama_dir) -> None:
    tokenizer = PreTrainedTokenizerFast.from_pretrained(llama_dir)
    ids = tokenizer.encode("fox ✓ dog")
    stream = TextStream(tokenizer, [], [])
    deltas = [stream.add(i)[0] for i in ids]
    assert "".join(deltas) == "fox ✓ dog" and "" in deltas  # "✓" is three byte tokens
    stream = TextStream(tokenizer, [], ["x", " d"])  # " d" spans tokens: its " " is held back
    deltas = []
    for token in ids:
        delta, stopped = stream.add(token)
        deltas.append(delta)
        if stopped:
            break
    assert stopped and "".join(deltas) == "fo" and stream.flush() == ""
    stream = TextStream(tokenizer, [], [" d"])
    results = [stream.add(token) for token in ids[:-1]]  # the stop string completes at "do"
    assert [stopped for _, stopped in results] == [False] * (len(ids) - 2) + [True]
    assert "".join(delta for delta, _ in results) == "fox ✓"


class QuadraticTextStream(TextStream):
    """TextStream.add as it was before linear stop matching: the reference for the equivalence test."""

    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str]) -> None:
        super().__init__(tokenizer, prompt_ids, stop)
        self.text, self.sent = "", 0

    def add(self, token_id: int) -> tuple[str, bool]:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix : self.read])
        window = self._decode(self.ids[self.prefix :])
        if len(window) > len(before) and not window.endswith("\ufffd"):
            self.text += window[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
        if not self.stop:
            return self.flush(), False
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if hits:
            delta, self.sent = self.text[self.sent : min(hits)], len(self.text)
            return delta, True
        hold = max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        end = max(self.sent, len(self.text) - hold)
        delta, self.sent = self.text[self.sent : end], end
        return delta, False

    def flush(self) -> str:
        delta, self.sent = self.text[self.sent :], len(self.text)
        return delta


class ByteTokenizer:
    """Token ids are byte strings, decoded together as UTF-8: "✓" is 3 tokens, some ids are 2 characters."""

    PIECES = [b"a", b"b", b"ab", b"ba", b"aa", b" ", b"\xe2", b"\x9c", b"\x93", "✓".encode(), b"a\xe2"]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return b"".join(self.PIECES[i] for i in ids).decode("utf-8", errors="replace")


def run_stream(stream: TextStream, ids: list[int]) -> tuple[list[tuple[str, bool]], str]:
    """Every (delta, stopped) until the stream stops, then what a final flush emits."""
    results = []
    for token in ids:
        results.append(stream.add(token))
        if results[-1][1]:
            break
    return results, stream.flush()


def test_linear_stop_matching_emits_and_stops_as_the_quadratic_one(llama_dir) -> None:
    rng = random.Random(0)
    toy, real = ByteTokenizer(), PreTrainedTokenizerFast.from_pretrained(llama_dir)
    stopped = 0
    for case in range(600):
        if (
            case % 2
        ):  # few letters: stop strings overlap themselves and each other, and partial matches abound
            tokenizer, ids = toy, [rng.randrange(len(ByteTokenizer.PIECES)) for _ in range(40)]
            stops = ["".join(rng.choices("ab ✓", k=rng.randint(1, 7))) for _ in range(rng.randint(1, 4))]
        else:  # the real byte-level BPE, stop strings cut from the text (so most of them are hit)
            tokenizer, ids = real, [rng.randrange(VOCAB_SIZE) for _ in range(40)]
            text = tokenizer.decode(ids, skip_special_tokens=True)
            starts = [rng.randrange(max(1, len(text))) for _ in range(rng.randint(1, 4))]
            stops = [text[i : i + rng.randint(1, 12)] or "x" for i in starts]
        prompt = [rng.randrange(len(ByteTokenizer.PIECES))] if tokenizer is toy else [5, 17]
        expected = run_stream(QuadraticTextStream(tokenizer, prompt, stops), ids)
        assert run_stream(TextStream(tokenizer, prompt, stops), ids) == expected, (case, stops)
        stopped += expected[0][-1][1]
    assert 200 < stopped < 580  # both outcomes were exercised


def test_four_longest_stop_strings_cost_a_few_steps_per_character() -> None:
    # The worst case of trying every prefix: long runs of "a" keep almost every prefix in play.
    stops = ["a" * (MAX_STOP_CHARS - 1) + "b", "ab" * (MAX_STOP_CHARS // 2), "a" * MAX_STOP_CHARS]
    stops.append("".join(random.Random(1).choices("ab", k=MAX_STOP_CHARS)))
    pieces = ["a", "aa", "b", "ab"]  # mostly a's: a few stop strings get within a character of matching
    tokenizer = ByteTokenizer()
    tokenizer.PIECES = [p.encode() for p in pieces]
    stream, rng = TextStream(tokenizer, [], stops), random.Random(2)
    characters = 0
    for _ in range(3000):
        token = rng.choices(range(len(pieces)), weights=[50, 50, 1, 1])[0]
        steps = stream.matcher.steps
        delta, stopped = stream.add(token)
        if stopped:
            break
        new = len(pieces[token])
        characters += new
        # KMP: each new character one step, plus fallbacks bounded by the state (< len(stop)) and by n
        assert stream.matcher.steps - steps <= sum(2 * new + len(stop) for stop in stops)
        assert len(stream.held) <= MAX_STOP_CHARS - 1
    assert characters > 2000  # it ran long enough to mean something (no early stop)
    assert stream.matcher.steps <= 2 * len(stops) * characters  # amortized: two steps a character a string
    # trying every prefix, as before, compared about 4 * 511 * 512 / 2 = 523,000 characters per token


def test_a_failing_step_ends_its_requests_with_error_and_the_engine_goes_on(llama_dir) -> None:
    engine = make_engine(llama_dir)
    forward = engine.model.forward

    def fail_once(step):
        engine.model.forward = forward
        raise RuntimeError("boom")

    engine.model.forward = fail_once
    try:
        assert engine.generate(PROMPTS[0], GREEDY)[2] == "error"
        assert engine.generate(PROMPTS[0], GREEDY)[2] == "length"
    finally:
        engine.stop(0)


def test_sampling_edge_cases_fall_back_to_the_most_likely_token() -> None:
    logits = torch.randn(3, VOCAB_SIZE)
    params = [SamplingParams(top_p=1e-60), SamplingParams(temperature=1e-300), SamplingParams(temperature=0)]
    generators = [torch.Generator().manual_seed(0) for _ in params]
    assert _sample(logits, params, generators) == logits.argmax(-1).tolist()


@pytest.mark.e2e
def test_smollm2_batched_greedy_matches_hf_generate() -> None:
    from llmkernel.errors import MissingExtraError
    from llmkernel.models.loading import resolve_model

    try:
        folder = resolve_model("smollm2-135m-instruct")
    except MissingExtraError as error:
        pytest.skip(str(error))
    engine = make_engine(folder, max_batch_size=4)
    questions = ["What is the capital of France?", "Write a haiku about the sea.", "How do I boil an egg?"]
    chats = [[{"role": "user", "content": q}] for q in questions]
    prompts = [
        engine.tokenizer.apply_chat_template(c, add_generation_prompt=True)["input_ids"] for c in chats
    ]
    try:
        handles = [engine.submit(p, SamplingParams(max_tokens=24, temperature=0.0)) for p in prompts]
        results = [collect(h) for h in handles]
    finally:
        engine.stop(0)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    for prompt, (ids, _, _) in zip(prompts, results):
        assert ids == hf_greedy(model, prompt, 24)
    assert "Paris" in results[0][1]


def test_tied_embeddings_load_even_when_transformers_tying_is_disabled(llama_dir, monkeypatch) -> None:
    # Two models loading at once in one process can leave transformers' tie_weights patched to a no-op.
    from transformers import PreTrainedModel

    folder = llama_dir.parent / "tied-llama"
    torch.manual_seed(1)
    config = LlamaConfig.from_pretrained(llama_dir, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    PreTrainedTokenizerFast.from_pretrained(llama_dir).save_pretrained(folder)
    expected = hf_greedy(model, PROMPTS[1], 12)
    monkeypatch.setattr(PreTrainedModel, "tie_weights", lambda self, *args, **kwargs: None)
    engine = make_engine(folder)
    try:
        assert engine.generate(PROMPTS[1], GREEDY)[0] == expected
    finally:
        engine.stop(0)
