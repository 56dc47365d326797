"""The generation engine: continuous batching over a per-sequence KV cache, in a background thread.

The HTTP layer calls `submit(prompt_ids, params, loop)` and iterates the returned `RequestHandle` for
`TokenEvent`s. One scheduler thread runs steps; each step:

1. ends requests that were cancelled (the client went away) or ran past `request_timeout_s`;
2. admits waiting requests into free cache slots, up to `max_batch_size` running sequences;
3. builds one forward of at most `max_num_batched_tokens` rows: one token for every decoding sequence,
   then chunks of the prompts still being prefilled (oldest first) with the rest of the budget;
4. samples a token for every sequence whose prompt is complete and streams it to its client.

New requests join at every step, and finished ones leave at every step, so a long generation never
blocks a short one (continuous batching, as in Orca, OSDI '22, and vLLM). Events cross to the client's
asyncio loop with `loop.call_soon_threadsafe`; torch releases the GIL inside the forward, so the server
keeps answering while the model runs.

Faults stay visible and bounded: a failed step fails the sequences it ran and the engine goes on; if the
scheduler thread itself dies, every request still waiting or running ends with finish_reason "error" and
`submit` refuses new ones; `health()` says which of the two is happening.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import os
import queue
import random
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmkernel.models.loading import load_model, load_tokenizer_for, resolve_model
from llmkernel.serve.decoder import HFDecoder, LlamaDecoder, PrefillChunk, Step, supports_fast_path
from llmkernel.serve.quantize import QUANTIZE_MODES
from llmkernel.serve.text import MAX_STOP_CHARS, MAX_STOPS, TextStream

log = logging.getLogger("llmkernel.serve")
DEFAULT_MAX_MODEL_LEN = 4096  # cap on the model's own context length: bounds the KV cache's memory
UNHEALTHY_AFTER_FAILURES = 3  # consecutive failed steps after which health() reports the engine unhealthy


@dataclass
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; `seed` makes sampling reproducible per request."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if len(self.stop) > MAX_STOPS:
            raise ValueError(f"stop takes at most {MAX_STOPS} strings, got {len(self.stop)}")
        if (longest := max(map(len, self.stop), default=0)) > MAX_STOP_CHARS:
            raise ValueError(f"stop strings take at most {MAX_STOP_CHARS} characters, got one of {longest}")


@dataclass
class TokenEvent:
    """One streamed step: the new token and its text delta ("" while a multi-byte character is partial).

    finish_reason is None while running, then "stop" (eos or a stop string, which is not in `text`),
    "length", "cancelled", "timeout" or "error" on the last event.
    """

    token_id: int | None
    text: str
    finish_reason: str | None = None


class RequestHandle:
    """A submitted request: iterate it (async, or plain iteration without a loop) for its events."""

    def __init__(
        self,
        request_id: str,
        prompt_tokens: int,
        loop: asyncio.AbstractEventLoop | None,
        wake: threading.Condition,
    ) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.time_to_first_token: float | None = None
        self.finish_reason: str | None = None
        self.cancelled = False
        self._loop = loop
        self._events: asyncio.Queue | queue.Queue = asyncio.Queue() if loop else queue.Queue()
        self._wake = wake

    def cancel(self) -> None:
        """Thread-safe; the scheduler frees the request's cache slot at its next step."""
        if self.finish_reason is None and not self.cancelled:
            self.cancelled = True
            with self._wake:
                self._wake.notify()

    def expire(self) -> None:
        """End the iteration now with finish_reason "deadline" and cancel the request (the HTTP deadline,
        for an engine that does not end it in time); call it on the handle's event loop."""
        self._events.put_nowait(TokenEvent(None, "", "deadline"))
        self.cancel()

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        if self._loop is None:
            raise RuntimeError("submit() was called without an event loop; iterate the handle with `for`")
        while True:
            event = await self._events.get()
            yield event
            if event.finish_reason is not None:
                return

    def __iter__(self) -> Iterator[TokenEvent]:
        if self._loop is not None:
            raise RuntimeError("submit() was given an event loop; iterate the handle with `async for`")
        while True:
            event = self._events.get()
            yield event
            if event.finish_reason is not None:
                return

    def _deliver(self, event: TokenEvent) -> None:
        """Called from the scheduler thread."""
        if self._loop is None:
            self._events.put(event)
            return
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the client's loop is closed: nobody is listening any more
            self.cancelled = True


@dataclass
class Sequence:
    """The scheduler's state for one request."""

    handle: RequestHandle
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    text: TextStream
    submitted: float
    deadline: float
    slot: int = -1
    num_cached: int = 0  # tokens whose keys/values are in the cache
    output: list[int] = field(default_factory=list)

    @property
    def prefilling(self) -> bool:
        return self.num_cached < len(self.prompt)


class GenerationEngine:
    """Continuous-batching text generation for a decoder model folder (see the module docstring).

    Args:
        model_dir: an HF causal LM folder (or a .gguf file / offline model name, via `resolve_model`).
        max_batch_size: most sequences decoding together (each holds one KV cache slot).
        max_num_batched_tokens: most rows in one forward (decode tokens + prompt chunks).
        max_model_len: longest prompt + completion; default the model's, capped at 4096.
        request_timeout_s: requests running longer end with finish_reason "timeout".
        quantize: weight format of the Llama fast path: "none" (fp32), "fp16", "int8" or "int4" (see
            quantize.py); a folder quantized by `llmk quantize` runs as stored.
        device: torch device ("cpu", "cuda", ...); int8 is CPU-only.
        seed: seeds requests that do not give their own seed.
        num_threads: torch threads for the forward; default: all cores but one, which stays free for the
            HTTP server (on a busy 2-core machine, 2 threads were up to 10x slower than 1).
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        max_batch_size: int = 16,
        max_num_batched_tokens: int = 4096,
        max_model_len: int | None = None,
        request_timeout_s: float = 600.0,
        quantize: str = "fp16",
        device: str = "cpu",
        seed: int = 0,
        num_threads: int | None = None,
    ) -> None:
        from transformers import AutoConfig

        if quantize not in QUANTIZE_MODES:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {quantize!r}")
        if quantize in ("int8", "int4") and not str(device).startswith("cpu"):
            raise ValueError(f"quantize={quantize!r} runs on CPU only; use 'fp16' or 'none' on {device}")
        if max_batch_size < 1 or max_num_batched_tokens < max_batch_size:
            raise ValueError("need max_batch_size >= 1 and max_num_batched_tokens >= max_batch_size")
        self.model_dir = resolve_model(model_dir)
        self.config = AutoConfig.from_pretrained(self.model_dir)
        self.tokenizer = load_tokenizer_for(self.model_dir)
        self.model_name = self.model_dir.name
        limit = getattr(self.config, "max_position_embeddings", None) or DEFAULT_MAX_MODEL_LEN
        if max_model_len is not None and max_model_len > limit:
            raise ValueError(f"max_model_len {max_model_len} is over the model's context length {limit}")
        self.max_model_len = max_model_len or min(limit, DEFAULT_MAX_MODEL_LEN)
        self.max_batch_size, self.max_num_batched_tokens = max_batch_size, max_num_batched_tokens
        self.request_timeout_s, self.device = request_timeout_s, torch.device(device)
        self.quantize = quantize if supports_fast_path(self.config) else "none"
        self.num_threads = num_threads or max(1, (os.cpu_count() or 2) - 1)
        self.eos_ids = _eos_ids(self.model_dir, self.config, self.tokenizer)
        self._seeds = random.Random(seed)
        self._ids = itertools.count()
        self._wake = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._free_slots = list(range(max_batch_size))  # a heap: lowest slot first keeps attention short
        self._accepting, self._cancel_all, self._exit = True, False, False
        self._thread: threading.Thread | None = None
        self._thread_ended: str | None = None  # why the scheduler thread ended, once it has
        self._thread_error: str | None = None  # the error that killed it, if one did
        self._failed_steps, self._last_step_error = 0, ""  # consecutive failed steps, for health()
        self.model = None
        self.ready = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Load the model, warm it up and start the scheduler thread (blocking; call it from any thread)."""
        if self._thread is not None:
            return
        torch.set_num_threads(self.num_threads)
        hf_model = load_model(self.model_dir, "decoder")  # ties the output embeddings itself
        if any(p.is_meta for p in hf_model.parameters()):
            raise RuntimeError(
                f"{self.model_dir}: some weights were not loaded (still on the meta device); was another "
                "model loading in this process at the same time? transformers' loading is not thread-safe"
            )
        hf_model.to(self.device).eval()
        if supports_fast_path(self.config):
            self.model = LlamaDecoder(
                hf_model, num_slots=self.max_batch_size, max_len=self.max_model_len, quantize=self.quantize
            )
            del hf_model  # our decoder holds what it needs (fused copies, or the shared fp32 tensors)
        else:
            log.info(
                f"{self.config.model_type}: no fast path, serving with the HF forward one sequence at a time"
            )
            self.model = HFDecoder(hf_model)
        # Warm-up: the first calls allocate and pick kernels; do that before the first client waits.
        self.model.forward(Step([0, 0], chunks=[PrefillChunk(0, 0, 2)], sample_rows=[1]))
        self.model.forward(Step([0], decode_slots=[0], decode_positions=[2], sample_rows=[0]))
        self.model.free(0)
        self._thread = threading.Thread(target=self._loop, name="llmk-engine", daemon=True)
        self._thread.start()
        self.ready = True

    def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Stop admitting; let submitted requests finish until the deadline; then cancel the rest."""
        deadline = time.monotonic() + drain_timeout_s
        with self._wake:
            self._accepting = False
            while (self._waiting or self._running) and self._thread is not None and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._wake.wait(timeout=min(left, 0.05))
            self._cancel_all = True
            self._exit = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)
        self.ready = False

    def health(self) -> str | None:
        """None while the engine generates; else one line saying why not.

        The scheduler thread has stopped (after `start`): "the generation thread has stopped: <why>"
        (its error's first line, or "stop() was called"); or the last n >= UNHEALTHY_AFTER_FAILURES steps
        all failed, until one succeeds: "the last <n> generation steps failed: <the last error's first
        line>".
        """
        thread = self._thread
        if thread is not None and (self._thread_ended is not None or not thread.is_alive()):
            return f"the generation thread has stopped: {self._thread_ended or 'it exited'}"
        if self._failed_steps >= UNHEALTHY_AFTER_FAILURES:
            return f"the last {self._failed_steps} generation steps failed: {self._last_step_error}"
        return None

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    # ------------------------------------------------------------------ requests

    def submit(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> RequestHandle:
        """Queue a request; events go to `loop` (default: the running loop, if any).

        Raises:
            ValueError: empty prompt, prompt too long, or prompt + max_tokens over max_model_len.
            RuntimeError: the engine is stopping, or its generation thread has stopped.
        """
        prompt = [int(t) for t in prompt_token_ids]
        if not prompt:
            raise ValueError("the prompt is empty; give at least one token")
        vocab_size = getattr(self.config, "vocab_size", None)
        if vocab_size and not all(0 <= t < vocab_size for t in prompt):
            raise ValueError(f"the prompt has token ids outside the vocabulary [0, {vocab_size})")
        if len(prompt) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt)} tokens; this model takes at most {self.max_model_len - 1} "
                f"(max_model_len {self.max_model_len}, one position is kept for the first new token)"
            )
        if len(prompt) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) is over max_model_len "
                f"{self.max_model_len}; lower max_tokens to {self.max_model_len - len(prompt)} or less"
            )
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
        handle = RequestHandle(f"req-{next(self._ids)}", len(prompt), loop, self._wake)
        seed = params.seed if params.seed is not None else self._seeds.getrandbits(63)
        now = time.monotonic()
        sequence = Sequence(
            handle=handle,
            prompt=prompt,
            params=params,
            generator=torch.Generator().manual_seed(seed),
            text=TextStream(self.tokenizer, prompt, params.stop),
            submitted=now,
            deadline=now + self.request_timeout_s,
        )
        with self._wake:
            if self._thread_error is not None:
                raise RuntimeError(
                    f"the generation thread has stopped; no new requests until a restart ({self._thread_error})"
                )
            if not self._accepting:
                raise RuntimeError("the engine is stopping and takes no new requests")
            self._waiting.append(sequence)
            self._wake.notify()
        return handle

    def generate(self, prompt_token_ids: list[int], params: SamplingParams) -> tuple[list[int], str, str]:
        """Blocking helper (tests, benchmarks): returns (token ids, text, finish_reason)."""
        handle = self.submit(prompt_token_ids, params, loop=None)
        ids, parts, reason = [], [], ""
        for event in handle:
            if event.token_id is not None:
                ids.append(event.token_id)
            parts.append(event.text)
            reason = event.finish_reason or reason
        return ids, "".join(parts), reason

    # ------------------------------------------------------------------ the scheduler

    def _loop(self) -> None:
        """The scheduler thread. However it ends, no request is left waiting for events that never come."""
        ended, error_line = "stop() was called", None
        try:
            self._schedule()
        except BaseException as error:  # a bug, or a BaseException from the model: the thread is done
            ended = error_line = _first_line(error)
            log.critical("the generation thread stopped", exc_info=True)
        finally:
            with self._wake:
                self._thread_ended, self._thread_error, self._accepting = ended, error_line, False
                for sequence in [*self._waiting, *self._running]:
                    sequence.handle.finish_reason = "error"
                    sequence.handle._deliver(TokenEvent(None, "", "error"))
                self._waiting.clear()
                self._running.clear()  # no model.free: the model may be what failed
                self._wake.notify_all()

    def _schedule(self) -> None:
        torch.set_num_threads(self.num_threads)  # the thread pool size is per thread in OpenMP builds
        while True:
            with self._wake:
                while not (self._waiting or self._running or self._exit):
                    self._wake.wait()
                if self._exit and self._cancel_all:
                    self._end_all("cancelled")
                    return
            try:
                self._step()
            except Exception as error:  # a failed step must not stop the server: fail what was running, go on
                log.exception("generation step failed")
                self._failed_steps, self._last_step_error = self._failed_steps + 1, _first_line(error)
                with self._wake:
                    for sequence in list(self._running):
                        self._finish(sequence, TokenEvent(None, "", "error"))

    def _step(self) -> None:
        now = time.monotonic()
        with self._wake:
            for sequence in [*self._waiting, *self._running]:
                if sequence.handle.cancelled or self._cancel_all:
                    self._finish(sequence, TokenEvent(None, "", "cancelled"))
                elif now > sequence.deadline:
                    self._finish(sequence, TokenEvent(None, sequence.text.flush(), "timeout"))
            while self._waiting and self._free_slots:
                sequence = self._waiting.popleft()
                sequence.slot = heapq.heappop(self._free_slots)
                self._running.append(sequence)
        if not self._running:
            return
        step, sampled = self._plan()
        logits = self.model.forward(step)  # [len(sampled), vocab]
        # Sampling runs on CPU: the per-request generators live there (a [rows, vocab] copy per step).
        tokens = _sample(logits.cpu(), [s.params for s in sampled], [s.generator for s in sampled])
        self._failed_steps = 0
        with self._wake:
            for sequence, token in zip(sampled, tokens):
                if sequence.handle.finish_reason is None and not sequence.handle.cancelled:
                    self._emit(sequence, token)

    def _plan(self) -> tuple[Step, list[Sequence]]:
        """One forward's rows: every decoding sequence's last token, then prompt chunks within the budget."""
        decoding = [s for s in self._running if not s.prefilling]
        budget = self.max_num_batched_tokens - len(decoding)
        step, sampled = Step(token_ids=[]), []
        for sequence in (s for s in self._running if s.prefilling):
            if budget <= 0:
                break
            length = min(len(sequence.prompt) - sequence.num_cached, budget)
            start = sequence.num_cached
            step.chunks.append(PrefillChunk(sequence.slot, start, length))
            step.token_ids += sequence.prompt[start : start + length]
            sequence.num_cached += length
            budget -= length
            if not sequence.prefilling:  # prompt complete: its last row gives the first new token
                step.sample_rows.append(len(step.token_ids) - 1)
                sampled.append(sequence)
        for sequence in decoding:
            step.sample_rows.append(len(step.token_ids))
            step.token_ids.append(sequence.output[-1])
            step.decode_slots.append(sequence.slot)
            step.decode_positions.append(sequence.num_cached)
            sequence.num_cached += 1
            sampled.append(sequence)
        return step, sampled

    def _emit(self, sequence: Sequence, token: int) -> None:
        handle = sequence.handle
        if handle.time_to_first_token is None:
            handle.time_to_first_token = time.monotonic() - sequence.submitted
        sequence.output.append(token)
        handle.completion_tokens += 1
        if token in self.eos_ids:
            self._finish(sequence, TokenEvent(token, sequence.text.flush(), "stop"))
            return
        text, stopped = sequence.text.add(token)
        if stopped:
            self._finish(sequence, TokenEvent(token, text, "stop"))
        elif len(sequence.output) >= sequence.params.max_tokens:
            self._finish(sequence, TokenEvent(token, text + sequence.text.flush(), "length"))
        else:
            handle._deliver(TokenEvent(token, text, None))

    def _finish(self, sequence: Sequence, event: TokenEvent) -> None:
        """Free the sequence's slot, then send the last event (caller holds self._wake).

        In this order a client that sees its last event also sees the slot free (num_running); the event
        goes out even if freeing fails, since the sequence has left the lists that a dying thread ends.
        """
        sequence.handle.finish_reason = event.finish_reason
        try:
            if sequence in self._waiting:
                self._waiting.remove(sequence)
            if sequence in self._running:
                self._running.remove(sequence)
                self.model.free(sequence.slot)
                heapq.heappush(self._free_slots, sequence.slot)
        finally:
            sequence.handle._deliver(event)
            self._wake.notify_all()  # stop() waits for the engine to empty

    def _end_all(self, reason: str) -> None:
        for sequence in [*self._waiting, *self._running]:
            self._finish(sequence, TokenEvent(None, "", reason))


def _sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]
) -> list[int]:
    """One token per row of logits [rows, vocab]: argmax for temperature 0, else top-p sampling."""
    tokens = logits.argmax(dim=-1).tolist()
    for row, (p, generator) in enumerate(zip(params, generators)):
        if p.temperature == 0:
            continue
        probs = torch.softmax(logits[row].double() / p.temperature, dim=-1)  # fp64: tiny temperatures
        if not torch.isfinite(probs).all():  # a temperature so small that it overflows is greedy
            continue
        if p.top_p < 1.0:
            # Keep the smallest set of most likely tokens whose mass reaches top_p (nucleus sampling);
            # the most likely token always stays, however small top_p is.
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(0) - sorted_probs >= p.top_p
            outside[0] = False
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        tokens[row] = int(torch.multinomial(probs, 1, generator=generator))
    return tokens


def _first_line(error: BaseException) -> str:
    """'Type: message' of an error, first line only (health reasons are one line)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _eos_ids(model_dir: Path, config, tokenizer) -> set[int]:
    """Token ids that end a generation: the generation config's, the model config's and the tokenizer's."""
    from transformers import GenerationConfig

    found: list = [config.eos_token_id, tokenizer.eos_token_id]
    try:
        found.append(GenerationConfig.from_pretrained(model_dir).eos_token_id)
    except OSError:
        pass
    ids: set[int] = set()
    for item in found:
        ids.update(item if isinstance(item, list) else [item] if item is not None else [])
    return ids
