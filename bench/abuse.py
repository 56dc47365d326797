"""What one abusive client costs the others on a real `llmk serve` (SmolLM2-135M, loopback).

1. Stop strings: the latency of a short request (5 tokens) alone, next to a long generation (200 tokens)
   without stop strings, and next to one with the most stop strings a request may send (4 x 512
   characters, built so that partial matches never end: "a" * 511 + "b" against a model that writes
   letters); the ratios to "alone" are the cost of the stop strings. Sides alternate, `--repeats` each.
2. A non-streamed client that leaves after 0.3 s: how soon the engine has no running request, and the
   tokens the request cost in all (llmk:generation_tokens_total; 400 if it had run on).

Prints one JSON line. Usage: python bench/abuse.py [--model smollm2-135m-instruct] [--repeats 5]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import SERVED_NAME, llmk_serve, log  # noqa: E402

SHORT = {"model": SERVED_NAME, "prompt": "The capital of France is", "max_tokens": 5, "temperature": 0}
LONG = {"model": SERVED_NAME, "prompt": "Write the alphabet many times: a b c", "max_tokens": 200}
MAX_STOPS = ["a" * 511 + "b", "e" * 511 + "z", " " * 511 + "q", "t" * 511 + "x"]


def generated(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return float(re.search(r"^llmk:generation_tokens_total (\S+)$", text, re.M).group(1))


def short_latency(url: str) -> float:
    started = time.perf_counter()
    httpx.post(url + "/v1/completions", json=SHORT, timeout=120).raise_for_status()
    return time.perf_counter() - started


def beside(url: str, long_body: dict | None, long_tokens: list[int]) -> float:
    """The short request's latency while `long_body` (if any) generates; its token count goes to
    `long_tokens` (the long request must really run: 200 tokens, answered 200)."""
    if long_body is None:
        return short_latency(url)

    def long_request() -> None:
        answer = httpx.post(url + "/v1/completions", json=long_body, timeout=300)
        answer.raise_for_status()
        long_tokens.append(answer.json()["usage"]["completion_tokens"])

    thread = threading.Thread(target=long_request)
    thread.start()
    time.sleep(0.5)  # the long request is decoding
    latency = short_latency(url)
    thread.join()
    return latency


def running(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return float(re.search(r"^llmk:num_requests_running (\S+)$", text, re.M).group(1))


def left_early(url: str) -> dict:
    """A 400-token non-streamed request whose client leaves after 0.3 s: how soon the engine stops it and
    how many tokens it cost (counted when it ended; 400 if it had run on)."""
    before = generated(url)
    body = {**LONG, "max_tokens": 400, "temperature": 0}
    with contextlib.suppress(httpx.TimeoutException):
        httpx.post(url + "/v1/completions", json=body, timeout=0.3)
    left = time.perf_counter()
    while running(url) and time.perf_counter() - left < 60:
        time.sleep(0.01)
    stopped = time.perf_counter() - left
    time.sleep(0.2)
    return {
        "left_after_s": 0.3,
        "stopped_within_s": round(stopped, 3),
        "tokens_of_the_left_request": generated(url) - before,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    sides = {
        "alone": None,
        "beside_long": {**LONG, "temperature": 0},
        "beside_max_stops": {**LONG, "temperature": 0, "stop": MAX_STOPS},
    }
    times: dict[str, list[float]] = {name: [] for name in sides}
    tokens: dict[str, list[int]] = {name: [] for name in sides}
    with llmk_serve(Path(args.model)) as (url, _):
        short_latency(url)  # warm
        for repeat in range(args.repeats):
            for name in list(sides) if repeat % 2 == 0 else reversed(list(sides)):
                times[name].append(beside(url, sides[name], tokens[name]))
            log(
                f"abuse: round {repeat + 1}/{args.repeats}: "
                + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items())
            )
        leaving = left_early(url)
    median = {name: statistics.median(values) for name, values in times.items()}
    print(
        json.dumps(
            {
                "bench": "abuse",
                "model": args.model,
                **{f"short_{name}_s": round(value, 3) for name, value in median.items()},
                **{
                    f"short_{name}_range_s": [round(min(v), 3), round(max(v), 3)] for name, v in times.items()
                },
                "long_request_tokens": {name: sorted(set(v)) for name, v in tokens.items() if v},
                "ratio_beside_max_stops_vs_alone": round(median["beside_max_stops"] / median["alone"], 2),
                "ratio_beside_long_vs_alone": round(median["beside_long"] / median["alone"], 2),
                "ratio_max_stops_vs_no_stops": round(median["beside_max_stops"] / median["beside_long"], 2),
                **leaving,
            }
        )
    )


if __name__ == "__main__":
    main()
