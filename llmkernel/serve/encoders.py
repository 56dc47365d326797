"""Encoder models behind /v1/embeddings, /v1/classify, /v1/ner and /v1/relations, and the micro-batcher
that feeds them.

A folder is loaded as its own kind (`model_kind`: encoder, masked_lm, classifier, token_classifier or
relation_classifier) through the one loader, `llmkernel.models.loading.load_model`; which routes each kind
serves is in state.py.

Embeddings are the mean of the last hidden states over the real (unpadded) tokens, L2-normalised, as
sentence-transformers does for all-MiniLM-L6-v2; models with a head embed with their encoder (`base_model`).
Decoders do not serve embeddings: mean-pooled hidden states of a causal LM are poor sentence vectors, and
serving them would need a second copy of the weights beside the generation engine's.

Micro-batching: requests wait up to `window_s` (a few ms) in a queue; everything gathered by then, up to
`max_batch_size` texts, shares one forward pass on one worker thread, and each request's future gets its
slice of the results. Under load this turns many one-text requests into a few full batches.
"""

from __future__ import annotations

import asyncio
import copy
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmkernel.models.loading import load_model, load_tokenizer_for

ENCODER_KINDS = ("encoder", "masked_lm", "classifier", "token_classifier", "relation_classifier")
LABELLED_KINDS = ("classifier", "token_classifier", "relation_classifier")  # heads with config.id2label
WARM_UP_INPUTS = {"relation": "<e1>warm</e1> <e2>up</e2>"}  # a relation model needs both entities marked
UNHEALTHY_AFTER_FAILURES = 3  # consecutive failed passes after which /ready says unhealthy


class EncoderModel:
    """A BERT-style model folder loaded as its kind, with batched embed / classify / ner functions."""

    def __init__(self, model_dir: str | Path, kind: str, *, device: str = "cpu", max_batch_size: int = 16):
        if kind not in ENCODER_KINDS:
            raise ValueError(f"EncoderModel serves {', '.join(ENCODER_KINDS)} models, not {kind!r}")
        self.kind = kind
        self.device = torch.device(device)
        self.max_batch_size = max_batch_size
        self.tokenizer = load_tokenizer_for(model_dir)
        # Counting runs on request threads while a pass tokenizes on the batcher's: HF fast tokenizers
        # change their padding/truncation state per call, so two threads must not share one.
        self.counter = copy.deepcopy(self.tokenizer)
        self.counter_lock = threading.Lock()
        self.model = load_model(model_dir, kind).to(self.device).eval()
        config = self.model.config
        self.labels = [config.id2label[i] for i in range(config.num_labels)] if kind in LABELLED_KINDS else []
        limits = [getattr(config, "max_position_embeddings", 512), self.tokenizer.model_max_length]
        self.max_length = min(int(limit) for limit in limits if limit)

    def warm_up(self, task: str) -> None:
        """One pass of the serving mode's function (`task`: embed, classify, ner or relation)."""
        getattr(self, task)([WARM_UP_INPUTS.get(task, "warm up")])

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens per text, special tokens included (what the usage and the length limit count)."""
        with self.counter_lock:
            return [len(ids) for ids in self.counter(texts)["input_ids"]]

    def _batches(self, texts: list[str]) -> list[list[int]]:
        """Indices of `texts` in batches of similar length (less padding), longest first."""
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        return [order[i : i + self.max_batch_size] for i in range(0, len(order), self.max_batch_size)]

    def _encode(self, texts: list[str], offsets: bool = False) -> Any:
        return self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
            return_offsets_mapping=offsets,
        )

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> list[list[float]]:
        """Mean-pooled, L2-normalised last hidden states, one vector per text."""
        results: list[list[float]] = [[] for _ in texts]
        encoder = self.model.base_model  # the model itself for a bare encoder (BertModel)
        for batch in self._batches(texts):
            encoded = self._encode([texts[i] for i in batch]).to(self.device)
            hidden = encoder(**encoded).last_hidden_state  # (batch, seq, hidden)
            mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            vectors = torch.nn.functional.normalize(pooled, p=2, dim=-1).cpu().tolist()
            for i, vector in zip(batch, vectors):
                results[i] = vector
        return results

    @torch.inference_mode()
    def classify(self, texts: list[str]) -> list[list[tuple[str, float]]]:
        """(label, probability) pairs per text, best first."""
        results: list[list[tuple[str, float]]] = [[] for _ in texts]
        for batch in self._batches(texts):
            encoded = self._encode([texts[i] for i in batch]).to(self.device)
            probabilities = self.model(**encoded).logits.float().softmax(-1).cpu().tolist()
            for i, row in zip(batch, probabilities):
                results[i] = sorted(zip(self.labels, row), key=lambda pair: -pair[1])
        return results

    @torch.inference_mode()
    def relation(self, texts: list[str]) -> list[list[tuple[str, float]]]:
        """(label, probability) pairs per marked text (<e1>..</e1>, <e2>..</e2>), best first; a text too
        long for the model is cut around its entities, as in training (`tasks.relation.encode_marked`)."""
        from llmkernel.tasks.base import pad
        from llmkernel.tasks.relation import encode_marked, marker_ids

        markers = marker_ids(self.tokenizer)
        results: list[list[tuple[str, float]]] = [[] for _ in texts]
        for batch in self._batches(texts):
            examples = encode_marked(self.tokenizer, [texts[i] for i in batch], self.max_length, markers)
            ids = [e["input_ids"] for e in examples]
            inputs = {
                "input_ids": pad(ids, self.tokenizer.pad_token_id or 0),
                "attention_mask": pad([[1] * len(row) for row in ids], 0),
                "entity_positions": torch.tensor([e["entity_positions"] for e in examples]),
            }
            logits = self.model(**{k: v.to(self.device) for k, v in inputs.items()}).logits
            for i, row in zip(batch, logits.float().softmax(-1).cpu().tolist()):
                results[i] = sorted(zip(self.labels, row), key=lambda pair: -pair[1])
        return results

    @torch.inference_mode()
    def ner(self, texts: list[str]) -> list[list[dict[str, Any]]]:
        """Entities per text: {type, text, start, end, score} with character offsets into the text."""
        results: list[list[dict[str, Any]]] = [[] for _ in texts]
        for batch in self._batches(texts):
            encoded = self._encode([texts[i] for i in batch], offsets=True)
            offsets = encoded.pop("offset_mapping").tolist()
            probabilities = self.model(**encoded.to(self.device)).logits.float().softmax(-1).cpu()
            scores, tags = probabilities.max(-1)
            for row, i in enumerate(batch):
                words = _word_tags(
                    encoded.word_ids(row), tags[row].tolist(), scores[row].tolist(), offsets[row]
                )
                results[i] = merge_bio([(self.labels[t], s, a, b) for t, s, a, b in words], texts[i])
        return results


def _word_tags(
    word_ids: list[int | None], tags: list[int], scores: list[float], offsets: list[list[int]]
) -> list[tuple[int, float, int, int]]:
    """One (tag, score, start, end) per word: the tag of its first sub-word token, the span of all of them."""
    words: dict[int, list] = {}
    for position, word in enumerate(word_ids):
        if word is None:
            continue  # [CLS], [SEP], padding
        start, end = offsets[position]
        if word not in words:
            words[word] = [tags[position], scores[position], start, end]
        else:
            words[word][3] = end
    return [tuple(words[w]) for w in sorted(words)]


def merge_bio(words: list[tuple[str, float, int, int]], text: str) -> list[dict[str, Any]]:
    """Merge per-word tags (BIO, BIOES or bare types; "O" outside) into entity spans.

    An I- tag that does not continue an entity of its type starts one (as HF's "simple" aggregation does),
    so a model that never learnt B- tags still yields entities.
    """
    entities: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    for tag, score, start, end in words:
        prefix, _, kind = tag.partition("-") if "-" in tag else ("I", "", tag)
        if tag == "O" or not kind:
            current = None
            continue
        if prefix in ("B", "S") or current is None or current["type"] != kind:
            current = {"type": kind, "start": start, "end": end, "scores": [score]}
            entities.append(current)
        else:
            current["end"] = end
            current["scores"].append(score)
        if prefix in ("E", "S"):
            current = None
    return [
        {
            "type": e["type"],
            "text": text[e["start"] : e["end"]],
            "start": e["start"],
            "end": e["end"],
            "score": sum(e["scores"]) / len(e["scores"]),
        }
        for e in entities
    ]


@dataclass
class _Pending:
    kind: str
    texts: list[str]
    future: asyncio.Future


class MicroBatcher:
    """Gathers requests for `window_s` (or until `max_batch_size` texts) and runs them as one call of `run`.

    `run(kind, texts) -> results` is a blocking function (a model forward pass; `kind` is embed, classify
    or ner) executed on one worker thread, so passes never overlap; `submit` awaits the caller's own slice.
    """

    def __init__(
        self, run: Callable[[str, list[str]], list[Any]], *, window_s: float, max_batch_size: int
    ) -> None:
        self.run_batch = run
        self.window_s = window_s
        self.max_batch_size = max_batch_size
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmk-encoder")
        self.num_running = 0  # texts in the forward pass now
        self.task: asyncio.Task | None = None
        self.failed_passes = 0  # consecutive forward passes that raised (reset by one that did not)
        self.last_error = ""

    @property
    def num_waiting(self) -> int:
        return self.queue.qsize()

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    def health(self) -> str | None:
        """None while batches run; else why not: the batching task ended, or its last passes all failed."""
        if self.task is not None and self.task.done() and not self.task.cancelled():
            error = self.task.exception()
            return f"the encoder's batching task has stopped: {type(error).__name__}: {error}"
        if self.failed_passes >= UNHEALTHY_AFTER_FAILURES:
            return f"the last {self.failed_passes} encoder passes failed: {self.last_error}"
        return None

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        self.executor.shutdown(wait=True, cancel_futures=True)

    async def submit(self, kind: str, texts: list[str]) -> list[Any]:
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait(_Pending(kind, texts, future))
        return await future

    async def _gather(self) -> list[_Pending]:
        loop = asyncio.get_running_loop()
        batch = [await self.queue.get()]
        deadline = loop.time() + self.window_s
        while sum(len(p.texts) for p in batch) < self.max_batch_size:
            remaining = deadline - loop.time()
            if remaining <= 0:
                if self.queue.empty():
                    break
                batch.append(self.queue.get_nowait())
                continue
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), remaining))
            except TimeoutError:
                break
        return [p for p in batch if not p.future.done()]  # drop requests whose client has left

    async def _loop(self) -> None:
        while True:
            batch = await self._gather()
            for kind in dict.fromkeys(p.kind for p in batch):
                await self._run([p for p in batch if p.kind == kind])

    async def _run(self, batch: list[_Pending]) -> None:
        texts = [text for pending in batch for text in pending.texts]
        self.num_running = len(texts)
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self.executor, self.run_batch, batch[0].kind, texts
            )
        except Exception as error:  # a failed pass fails its requests, not the server
            self.failed_passes += 1
            self.last_error = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(error)
            return
        finally:
            self.num_running = 0
        self.failed_passes = 0
        start = 0
        for pending in batch:
            if not pending.future.done():
                pending.future.set_result(results[start : start + len(pending.texts)])
            start += len(pending.texts)
