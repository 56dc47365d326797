"""Serving an encoder-decoder (a `seq2seq` translation model) behind /v1/completions.

The prompt is the source text and the completion its translation. Requests run one at a time on a worker
thread with HF `generate`: beam search with `--num_beams` (greedy at 1), deterministic whatever the
request's temperature. The object has the generation engine's interface (serve/engine.py: `submit`
returning a RequestHandle, `start`/`stop`, `health`, the queue counts), so the completions route, its
limits, the access log and the metrics are the same code as for decoders. A translation is one event:
its whole text and the finish reason ("stop" at eos, "length" at max_tokens, "timeout" past
--request_timeout_s, "cancelled" when the client left).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from llmkernel.models.loading import load_model, load_tokenizer_for, resolve_model
from llmkernel.serve.engine import RequestHandle, SamplingParams, TokenEvent

log = logging.getLogger("llmkernel.serve")


@dataclass
class _Request:
    handle: RequestHandle
    source: list[int]
    params: SamplingParams
    deadline: float


class _Abandoned(StoppingCriteria):
    """Stops `generate` once the client left or the request's deadline passed (checked every step)."""

    def __init__(self, request: _Request) -> None:
        self.request = request

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        over = self.request.handle.cancelled or time.monotonic() > self.request.deadline
        return torch.full((input_ids.shape[0],), over, dtype=torch.bool, device=input_ids.device)


class Seq2SeqEngine:
    """One encoder-decoder model translating queued requests in order on its own thread."""

    def __init__(
        self,
        model_dir: str | Path,
        num_beams: int = 4,
        request_timeout_s: float = 60.0,
        device: str = "cpu",
    ) -> None:
        self.model_dir = resolve_model(model_dir)
        self.tokenizer = load_tokenizer_for(self.model_dir)
        self.num_beams, self.request_timeout_s = num_beams, request_timeout_s
        self.device = torch.device(device)
        self.model = None
        self.max_model_len = 512
        self._queue: collections.deque[_Request] = collections.deque()
        self._wake = threading.Condition()
        self._ids = itertools.count()
        self._running = 0
        self._accepting, self._exit = True, False
        self._thread: threading.Thread | None = None
        self._error: str | None = None

    def start(self) -> None:
        self.model = load_model(self.model_dir, "seq2seq").to(self.device).eval()
        self.max_model_len = getattr(self.model.config, "max_position_embeddings", None) or 512
        self._thread = threading.Thread(target=self._loop, name="llmk-seq2seq", daemon=True)
        self._thread.start()

    def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Finish the running and queued requests within `drain_timeout_s`, then cancel what is left."""
        with self._wake:
            self._accepting = False
        ends = time.monotonic() + drain_timeout_s
        while (self._queue or self._running) and time.monotonic() < ends:
            time.sleep(0.05)
        with self._wake:
            for request in self._queue:
                request.handle._deliver(TokenEvent(None, "", "cancelled"))
            self._queue.clear()
            self._exit = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def health(self) -> str | None:
        if self._thread is not None and not self._thread.is_alive() and not self._exit:
            return f"the translation thread has stopped: {self._error or 'it exited'}"
        return None

    @property
    def num_running(self) -> int:
        return self._running

    @property
    def num_waiting(self) -> int:
        return len(self._queue)

    def submit(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> RequestHandle:
        """Queue the translation of a source; ValueError for an empty or too long one."""
        source = [int(t) for t in prompt_token_ids]
        if not source:
            raise ValueError("the prompt is empty; give the text to translate")
        eos = self.tokenizer.eos_token_id
        if eos is not None and source[-1] != eos:
            source.append(eos)  # the task ends every training source with eos
        if len(source) > self.max_model_len:
            raise ValueError(
                f"the prompt has {len(source)} tokens; this model reads at most {self.max_model_len}"
            )
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
        handle = RequestHandle(f"req-{next(self._ids)}", len(prompt_token_ids), loop, self._wake)
        with self._wake:
            if not self._accepting:
                raise RuntimeError("the server is stopping and takes no new requests")
            self._queue.append(_Request(handle, source, params, time.monotonic() + self.request_timeout_s))
            self._wake.notify()
        return handle

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._exit:
                    self._wake.wait()
                if self._exit:
                    return
                request = self._queue.popleft()
                self._running = 1
            try:
                if not request.handle.cancelled:
                    self._translate(request)
            except Exception as error:  # one bad request must not stop the server
                log.exception("translation failed")
                self._error = str(error).splitlines()[0] if str(error) else type(error).__name__
                request.handle._deliver(TokenEvent(None, "", "error"))
            finally:
                self._running = 0

    @torch.no_grad()
    def _translate(self, request: _Request) -> None:
        started = time.monotonic()
        eos = self.tokenizer.eos_token_id
        ids = torch.tensor([request.source], device=self.device)
        output = self.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            num_beams=self.num_beams,
            do_sample=False,
            max_new_tokens=request.params.max_tokens,
            eos_token_id=eos,
            pad_token_id=self.tokenizer.pad_token_id,
            stopping_criteria=StoppingCriteriaList([_Abandoned(request)]),
        )[0].tolist()
        start = getattr(self.model.config, "decoder_start_token_id", None)
        tokens = output[1:] if output and output[0] == start else output
        finished = eos in tokens
        tokens = tokens[: tokens.index(eos)] if finished else tokens
        tokens = [t for t in tokens if t != self.tokenizer.pad_token_id]
        handle = request.handle
        handle.completion_tokens = len(tokens) + int(finished)
        handle.time_to_first_token = time.monotonic() - started
        text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        for stop in request.params.stop:
            if stop in text:
                text, finished = text[: text.index(stop)], True
        if handle.cancelled:
            reason = "cancelled"
        elif time.monotonic() > request.deadline:
            reason = "timeout"
        else:
            reason = "stop" if finished else "length"
        handle.finish_reason = reason
        handle._deliver(TokenEvent(tokens[-1] if tokens else None, text, reason))
