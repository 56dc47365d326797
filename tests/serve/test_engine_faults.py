"""The generation engine under faults: a dead scheduler thread ends every request and says so in health(),
failing steps make it unhealthy until one succeeds, and a cancelled request leaves within one step."""

from __future__ import annotations

import threading

import pytest

from llmkernel.serve.engine import UNHEALTHY_AFTER_FAILURES, GenerationEngine, SamplingParams

PROMPTS = [[5, 17, 42], list(range(30, 61))]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
LONG = SamplingParams(max_tokens=200, temperature=0.0)


class Boom(BaseException):
    """Not an Exception: the scheduler's step handler does not catch it, so the thread dies."""


def make_engine(folder, **options) -> GenerationEngine:
    engine = GenerationEngine(folder, quantize="none", **options)
    engine.start()
    engine.eos_ids = set()  # a random model may pick eos at any step; these tests count steps
    return engine


def finish_reason(handle) -> str | None:
    return [event.finish_reason for event in handle][-1]


def test_a_dead_generation_thread_ends_every_request_with_error_and_refuses_new_ones(llama_dir) -> None:
    engine = make_engine(llama_dir, max_batch_size=1)
    forward, dying = engine.model.forward, threading.Event()

    def forward_or_die(step):
        if dying.is_set():
            raise Boom("the model blew up\nin a way that takes two lines")
        return forward(step)

    engine.model.forward = forward_or_die
    try:
        assert engine.health() is None
        running = engine.submit(PROMPTS[0], LONG)
        events = iter(running)
        next(events)
        waiting = engine.submit(PROMPTS[1], GREEDY)  # no free slot: it waits
        dying.set()
        assert [event.finish_reason for event in events][-1] == "error"
        assert finish_reason(waiting) == "error" and engine.num_running == engine.num_waiting == 0
        assert engine.health() == "the generation thread has stopped: Boom: the model blew up"
        with pytest.raises(RuntimeError, match="the generation thread has stopped; .*Boom"):
            engine.submit(PROMPTS[0], GREEDY)
    finally:
        engine.stop(drain_timeout_s=5)  # returns at once: nothing is left to drain


def test_health_after_a_clean_stop_says_the_thread_has_stopped(llama_dir) -> None:
    engine = make_engine(llama_dir)
    assert engine.generate(PROMPTS[0], GREEDY)[2] == "length" and engine.health() is None
    engine.stop(drain_timeout_s=0)
    assert engine.health() == "the generation thread has stopped: stop() was called"
    with pytest.raises(RuntimeError, match="stopping"):
        engine.submit(PROMPTS[0], GREEDY)


def test_failing_steps_make_the_engine_unhealthy_until_one_succeeds(llama_dir) -> None:
    engine = make_engine(llama_dir)
    forward = engine.model.forward

    def fail(step):
        raise RuntimeError("CUDA out of memory\nwith a traceback-like second line")

    engine.model.forward = fail
    try:
        for _ in range(UNHEALTHY_AFTER_FAILURES):
            assert engine.health() is None  # fewer than 3 failures in a row is not yet unhealthy
            assert engine.generate(PROMPTS[0], GREEDY)[2] == "error"  # each request fails in one step
        assert engine.health() == "the last 3 generation steps failed: RuntimeError: CUDA out of memory"
        engine.model.forward = forward
        assert engine.generate(PROMPTS[0], GREEDY)[2] == "length"
        assert engine.health() is None
    finally:
        engine.stop(0)


def test_a_cancelled_request_leaves_within_one_step(llama_dir) -> None:
    engine = make_engine(llama_dir, max_batch_size=2)
    forward, steps = engine.model.forward, []
    submitted, release = threading.Event(), threading.Event()
    handles = []

    def forward_cancelling_on_the_fifth_step(step):
        submitted.wait(timeout=30)
        steps.append(step)
        if len(steps) == 5:
            handles[0].cancel()  # the client goes away while this step runs
        if len(steps) == 7:
            release.wait(timeout=30)  # hold the engine still while the test looks at it
        return forward(step)

    engine.model.forward = forward_cancelling_on_the_fifth_step
    try:
        handles += [engine.submit(PROMPTS[0], LONG), engine.submit(PROMPTS[1], LONG)]
        submitted.set()
        cancelled, other = handles
        assert finish_reason(cancelled) == "cancelled"
        assert cancelled.completion_tokens == 4  # steps 1-4 each gave a token; the fifth's was dropped
        assert engine.num_running == 1  # its slot is free as soon as its last event arrives
        release.set()
        other.cancel()
        assert finish_reason(other) == "cancelled" and engine.num_running == 0
        after = steps[5:]  # the steps after the one in flight at cancel: the other request's only
        assert after and all(not step.chunks and len(step.decode_slots) == 1 for step in after)
    finally:
        release.set()
        engine.stop(0)
