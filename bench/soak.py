"""Soak `llmk serve`: a fixed request rate for a fixed time, streaming and non-streaming clients, some of
which leave early, against a real `llmk serve` subprocess on loopback; bounded in requests and time.

Each request is one of four kinds, in turn: a non-streamed chat completion, a streamed one, a non-streamed
one whose client leaves after `--leave_after_s`, a streamed one whose client leaves after its first chunk.
The server's RSS (from /proc) is read after warm-up and at the end. Prints one JSON line:

* sent, answered (complete 2xx answers of the clients that stay), left (clients that left on purpose),
  refused (429 with Retry-After: the limits working, not losses), server_errors (5xx), lost (requests that
  stayed and got neither an answer nor a refusal: transport errors, timeouts, truncated streams);
* rss_start_mb, rss_end_mb, rss_growth (end / start - 1); p50/p99 latency of the answered requests;
* after the soak, /ready and the server's own count of 5xx (llmk:request_errors_total) and of running and
  waiting requests (all must be back to 0 once the clients are gone).

Usage: python bench/soak.py [--model smollm2-135m-instruct] [--rate 2] [--duration_s 120] [--max_tokens 16]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import SERVED_NAME, TOPICS, llmk_serve, log, messages, percentile  # noqa: E402

KINDS = ("plain", "stream", "plain_leaves", "stream_leaves")


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


async def one_request(client: httpx.AsyncClient, url: str, index: int, args: argparse.Namespace) -> dict:
    kind = KINDS[index % len(KINDS)]
    body = {
        "model": SERVED_NAME,
        "messages": messages(TOPICS[index % len(TOPICS)]),
        "max_tokens": args.max_tokens,
        "temperature": 0.7,
        "seed": index,
        "stream": kind.startswith("stream"),
    }
    started = time.perf_counter()
    try:
        if kind == "plain_leaves":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    client.post(url + "/v1/chat/completions", json=body), args.leave_after_s
                )
            return {"kind": kind, "outcome": "left"}
        if kind == "plain":
            response = await client.post(url + "/v1/chat/completions", json=body)
            return _outcome(
                kind,
                response.status_code,
                started,
                complete=response.status_code != 200 or "choices" in response.json(),
            )
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return _outcome(kind, response.status_code, started, complete=True)
            done = False
            async for line in response.aiter_lines():
                if kind == "stream_leaves" and line.startswith("data: "):
                    return {"kind": kind, "outcome": "left"}
                done = done or line == "data: [DONE]"
                if '"error"' in line:
                    return _outcome(kind, 500, started, complete=True)
            return _outcome(kind, 200, started, complete=done)
    except httpx.HTTPError as error:
        return {"kind": kind, "outcome": "lost", "error": f"{type(error).__name__}: {error}"}


def _outcome(kind: str, status: int, started: float, complete: bool) -> dict:
    if status >= 500:
        outcome = "server_error"
    elif status == 429:
        outcome = "refused"
    elif status == 200 and complete:
        outcome = "answered"
    else:
        outcome = "lost"
    return {"kind": kind, "outcome": outcome, "status": status, "seconds": time.perf_counter() - started}


async def soak(url: str, args: argparse.Namespace) -> list[dict]:
    """`rate` requests a second for `duration_s` seconds, each on its own schedule (an open loop: a slow
    server does not slow the clients down, as real traffic does not)."""
    count = int(args.rate * args.duration_s)
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=32)
    async with httpx.AsyncClient(timeout=args.request_timeout_s, limits=limits) as client:
        start = time.perf_counter()
        tasks = []
        for index in range(count):
            await asyncio.sleep(max(0.0, start + index / args.rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one_request(client, url, index, args)))
            if index % max(1, int(args.rate * 15)) == 0:
                log(f"soak: {index}/{count} sent, {time.perf_counter() - start:.0f} s")
        return list(await asyncio.gather(*tasks))


def server_counts(url: str) -> dict:
    metrics = httpx.get(url + "/metrics", timeout=60).text

    def value(pattern: str) -> float:
        return sum(float(v) for v in re.findall(rf"^{pattern} (\S+)$", metrics, re.M))

    return {
        "server_5xx": value(r'llmk:request_errors_total\{code="5\d\d"\}'),
        "server_running": value("llmk:num_requests_running"),
        "server_waiting": value("llmk:num_requests_waiting"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model folder or offline name")
    parser.add_argument("--rate", type=float, default=2.0, help="requests per second")
    parser.add_argument("--duration_s", type=float, default=120.0, help="how long requests are sent")
    parser.add_argument("--max_tokens", type=int, default=16)
    parser.add_argument("--leave_after_s", type=float, default=0.3, help="when leaving clients close")
    parser.add_argument("--request_timeout_s", type=float, default=120.0, help="client-side timeout")
    parser.add_argument("--serve_flags", default="", help="extra `llmk serve` flags, space-separated")
    args = parser.parse_args()
    with llmk_serve(Path(args.model), *args.serve_flags.split()) as (url, process):
        rss_start = rss_mb(process.pid)
        started = time.perf_counter()
        results = asyncio.run(soak(url, args))
        wall = time.perf_counter() - started
        time.sleep(1.0)  # requests of clients that left end at the engine's next step
        after = server_counts(url)
        ready = httpx.get(url + "/ready", timeout=10).status_code
        rss_end = rss_mb(process.pid)
    outcomes = {
        name: sum(r["outcome"] == name for r in results) for name in ("answered", "left", "refused", "lost")
    }
    server_errors = sum(r["outcome"] == "server_error" for r in results)
    latencies = [r["seconds"] for r in results if r["outcome"] == "answered"]
    for problem in [r for r in results if r["outcome"] in ("lost", "server_error")][:5]:
        log(f"problem: {problem}")
    print(
        json.dumps(
            {
                "bench": "soak",
                "model": args.model,
                "rate": args.rate,
                "duration_s": args.duration_s,
                "wall_s": round(wall, 1),
                "sent": len(results),
                **outcomes,
                "server_errors": server_errors,
                "rss_start_mb": round(rss_start, 1),
                "rss_end_mb": round(rss_end, 1),
                "rss_growth": round(rss_end / rss_start - 1, 4),
                "latency_p50_s": round(statistics.median(latencies), 3) if latencies else None,
                "latency_p99_s": round(percentile(latencies, 0.99), 3) if latencies else None,
                "ready_after": ready,
                **after,
            }
        )
    )


if __name__ == "__main__":
    main()
