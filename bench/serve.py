"""Benchmark `llmk serve` text generation on SmolLM2-135M-Instruct against Hugging Face `generate`.

Everything is measured in the same run, on the same machine, with greedy decoding and chat prompts that
ask for long answers. The HF side runs in this process while the server idles, and the two sides take
turns, so a change in the machine's load (it is shared) hits both:

1. `clients` concurrent streaming clients, each asking for `max_tokens` new tokens over HTTP from a real
   `llmk serve` subprocess: aggregate generated tokens/s (median of `rounds`), versus a sequential loop
   of HF `generate` calls on the first `hf_requests` of the same prompts (median of `rounds`; tokens/s is
   a rate, so a few calls measure it);
2. one client alone versus one HF `generate` call (median of `repeats` each);
3. p50/p99 time to first token (first streamed chunk with text) and end-to-end latency of the concurrent
   clients, over all rounds.

The headline figures are for the engine's default weights (`weights`: fp16, see
llmkernel/serve/quantize.py); each mode in `--compare` is served and measured the same way afterwards,
with its figures prefixed (`fp32_*` for `--quantize none`, `int8_*`) and its ratios against the same HF
figures. HF uses the faster of 1 and 2 torch threads. `greedy_identical_vs_hf` counts the prompts whose
served text equals HF's fp32 greedy text (fp16 rounding can change a late token; fp32 batching should not).

Usage: python bench/serve.py [--clients 16] [--max_tokens 64] [--hf_requests 4] [--repeats 3] [--rounds 2]
                             [--compare none,int8]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
SERVED_NAME = "smollm2"
TOPICS = [
    "a robot learning to paint", "the history of the printing press", "how volcanoes form",
    "a lighthouse keeper's strangest night", "why the sky is blue", "the life cycle of a star",
    "a detective who is a cat", "how bread rises", "the first trip to Mars", "how vaccines work",
    "a city built underwater", "the invention of the telephone", "a dragon who fears fire",
    "how rivers shape valleys", "a time traveller stuck in 1850", "how computers store numbers",
]  # fmt: skip


def messages(topic: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Write a long, detailed text about {topic}."}]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# ------------------------------------------------------------------ the HTTP side


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def llmk_serve(model: Path, *options: str, timeout_s: float = 300) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start `llmk serve` on a free loopback port; yield (base URL, process) once /ready says so; stop it."""
    port = free_port()
    command = [sys.executable, "-m", "llmkernel.cli", "serve", str(model), "--port", str(port)]
    command += ["--served_model_name", SERVED_NAME, *options]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    # The server's log goes to a file: a pipe nobody reads fills up (64 KiB of request lines) and then
    # blocks the server's event loop on its next log line.
    log_file = tempfile.TemporaryFile()
    server = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log_file)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if server.poll() is not None:
                log_file.seek(0)
                raise RuntimeError(f"llmk serve exited: {log_file.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"llmk serve was not ready after {timeout_s} s")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        yield url, server
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log_file.close()


async def stream_chat(client: httpx.AsyncClient, url: str, topic: str, max_tokens: int) -> dict:
    """One streaming chat request: time to first text, end-to-end time, completion tokens, text."""
    body = {
        "model": SERVED_NAME,
        "messages": messages(topic),
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start, first, parts, tokens = time.perf_counter(), None, [], 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                text = choice["delta"].get("content")
                if text:
                    first = first or time.perf_counter()
                    parts.append(text)
    end = time.perf_counter()
    return {"ttft": (first or end) - start, "e2e": end - start, "tokens": tokens, "text": "".join(parts)}


async def run_clients(url: str, topics: list[str], max_tokens: int) -> tuple[list[dict], float]:
    """All topics at once, one client each; returns the per-request results and the wall time."""
    limits = httpx.Limits(max_connections=len(topics))
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(stream_chat(client, url, t, max_tokens) for t in topics))
        return list(results), time.perf_counter() - start


def single(url: str, max_tokens: int) -> dict:
    return asyncio.run(run_clients(url, [TOPICS[0]], max_tokens))[0][0]


def concurrent(url: str, clients: int, max_tokens: int) -> tuple[list[dict], float]:
    return asyncio.run(run_clients(url, TOPICS[:clients], max_tokens))


def summarize(rounds: list[tuple[list[dict], float]], singles: list[dict]) -> dict:
    """Rates are medians over rounds; latency percentiles pool every request of every round."""
    results = [r for requests, _ in rounds for r in requests]
    ttft, e2e = [r["ttft"] for r in results], [r["e2e"] for r in results]
    return {
        "tokens_per_s": statistics.median(sum(r["tokens"] for r in rs) / wall for rs, wall in rounds),
        "single_stream_tokens_per_s": statistics.median(r["tokens"] / r["e2e"] for r in singles),
        "ttft_p50_s": percentile(ttft, 0.5),
        "ttft_p99_s": percentile(ttft, 0.99),
        "e2e_p50_s": percentile(e2e, 0.5),
        "e2e_p99_s": percentile(e2e, 0.99),
        "completion_tokens": [r["tokens"] for r in rounds[0][0]],
        "texts": [r["text"] for r in rounds[0][0]],
    }


# ------------------------------------------------------------------ the Hugging Face baseline


class HFBaseline:
    """HF `generate`, greedy, fp32, in this process (the server idles meanwhile)."""

    def __init__(self, model: Path, max_tokens: int) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        self.max_tokens = max_tokens
        self.threads_tokens_per_s: dict[int, float] = {}

    def generate(self, topic: str) -> dict:
        ids = self.tokenizer.apply_chat_template(
            messages(topic), add_generation_prompt=True, return_tensors="pt"
        )
        ids = ids["input_ids"]
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(ids, max_new_tokens=self.max_tokens, do_sample=False)
        new = out[0, ids.shape[1] :]
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return {"tokens": len(new), "seconds": time.perf_counter() - start, "text": text}

    def choose_threads(self) -> int:
        """The faster of 1 and 2 torch threads for one call (2 can lose badly on a busy machine)."""
        self.generate(TOPICS[0])  # warm-up
        for threads in (1, 2):
            torch.set_num_threads(threads)
            run = self.generate(TOPICS[0])
            self.threads_tokens_per_s[threads] = run["tokens"] / run["seconds"]
            log(f"HF generate, {threads} thread(s): {self.threads_tokens_per_s[threads]:.1f} tokens/s")
        best = max(self.threads_tokens_per_s, key=self.threads_tokens_per_s.get)
        torch.set_num_threads(best)
        return best

    def sequential(self, count: int) -> tuple[float, list[str]]:
        """Tokens/s of a loop of `count` generate calls, and their texts."""
        start = time.perf_counter()
        runs = [self.generate(topic) for topic in TOPICS[:count]]
        return sum(r["tokens"] for r in runs) / (time.perf_counter() - start), [r["text"] for r in runs]


def identical(texts: list[str], hf_texts: list[str]) -> str:
    return f"{sum(a == b for a, b in zip(texts, hf_texts))}/{len(hf_texts)}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--hf_requests", type=int, default=4, help="HF generate calls in the sequential loop")
    parser.add_argument("--repeats", type=int, default=3, help="single-stream runs, each side (median)")
    parser.add_argument("--rounds", type=int, default=2, help="concurrent rounds, each side (median)")
    parser.add_argument(
        "--compare", default="none", help="other --quantize modes to serve and measure too (comma-separated)"
    )
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    sys.path.insert(0, str(REPO))
    from llmkernel.models.loading import resolve_model
    from llmkernel.serve.engine import GenerationEngine

    model = resolve_model(MODEL)
    default = inspect.signature(GenerationEngine.__init__).parameters["quantize"].default
    hf = HFBaseline(model, args.max_tokens)
    served, hf_single, hf_sequential = {}, [], []
    log(f"llmk serve --quantize {default} and HF generate, alternating")
    with llmk_serve(model, "--quantize", default) as (url, _):
        concurrent(url, 2, 8)  # warm the server's paths
        hf_threads = hf.choose_threads()
        singles, rounds = [], []
        for _ in range(args.repeats):  # alternate, so a change in the machine's load hits both sides
            run = hf.generate(TOPICS[0])
            hf_single.append(run["tokens"] / run["seconds"])
            singles.append(single(url, args.max_tokens))
        for _ in range(args.rounds):
            rounds.append(concurrent(url, args.clients, args.max_tokens))
            rate, hf_texts = hf.sequential(args.hf_requests)
            hf_sequential.append(rate)
        served[default] = summarize(rounds, singles)
    for quantize in [q for q in args.compare.split(",") if q and q != default]:
        log(f"llmk serve --quantize {quantize}")
        with llmk_serve(model, "--quantize", quantize) as (url, _):
            concurrent(url, 2, 8)
            singles = [single(url, args.max_tokens) for _ in range(args.repeats)]
            rounds = [concurrent(url, args.clients, args.max_tokens) for _ in range(args.rounds)]
            served[quantize] = summarize(rounds, singles)
    hf_sequential_rate, hf_single_rate = statistics.median(hf_sequential), statistics.median(hf_single)
    result = {"model": MODEL, "weights": default, "clients": args.clients, "max_tokens": args.max_tokens}
    result["measured_via"] = "http (llmk serve subprocess, streaming chat completions)"
    for quantize, figures in served.items():
        prefix = "" if quantize == default else ("fp32_" if quantize == "none" else f"{quantize}_")
        result |= {
            f"{prefix}tokens_per_s": figures["tokens_per_s"],
            f"{prefix}ratio_vs_hf_sequential": figures["tokens_per_s"] / hf_sequential_rate,
            f"{prefix}single_stream_tokens_per_s": figures["single_stream_tokens_per_s"],
            f"{prefix}ratio_single_stream": figures["single_stream_tokens_per_s"] / hf_single_rate,
            **{prefix + k: figures[k] for k in ("ttft_p50_s", "ttft_p99_s", "e2e_p50_s", "e2e_p99_s")},
            f"{prefix}completion_tokens_total": sum(figures["completion_tokens"]),
            f"{prefix}greedy_identical_vs_hf": identical(figures["texts"], hf_texts),
        }
        if not prefix:
            result["hf_sequential_tokens_per_s"] = hf_sequential_rate
            result["hf_single_stream_tokens_per_s"] = hf_single_rate
    result["hf_threads"] = hf_threads
    result["hf_single_stream_tokens_per_s_by_threads"] = hf.threads_tokens_per_s
    result["hf_sequential_requests"] = args.hf_requests
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
