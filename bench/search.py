"""Benchmark `/v1/search` over SciFact's 5,183 abstracts: latency of single queries, one at a time.

A real `llmk serve ENCODER --index DIR` subprocess (uvicorn, on loopback; the encoder's torch threads are
the machine's cores) answers the 300 SciFact test claims one request at a time. The three modes take
turns within each round (the order rotating), so a change in the shared machine's load hits them alike:

* per mode: p50 and p95 latency over all rounds (client-side: request sent to answer parsed), and the
  spread of the per-round p50s (min-max);
* peer, in this process: the same queries embedded with the same encoder and searched in the same index
  without HTTP (embedding + search), so the server's own overhead shows.

The index is `--index` (default runs/scifact/index, what the README's commands build); without one, it is
built first with `llmk index all-minilm-l6-v2`. Target from the issue: p50 < 50 ms on 2 cores.
Prints one JSON line.

Usage: python bench/search.py [--index DIR] [--queries 300] [--rounds 3] [--modes hybrid,dense,bm25]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
SCIFACT = REPO.parent / "shared" / "data" / "scifact_beir"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_index(index: Path) -> Path:
    if (index / "index.json").is_file():
        return index
    command = [
        sys.executable,
        "-m",
        "llmkernel.cli",
        "index",
        "all-minilm-l6-v2",
        str(SCIFACT),
        "--out",
        str(index),
    ]
    subprocess.run(command, check=True, cwd=REPO)
    return index


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(share * (len(ordered) - 1))))]


def serve(encoder: str, index: Path, port: int) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "llmkernel.cli",
        "serve",
        encoder,
        "--index",
        str(index),
        "--port",
        str(port),
    ]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            raise SystemExit(f"llmk serve exited with {process.returncode}")
        time.sleep(0.5)
    process.kill()
    raise SystemExit("llmk serve did not become ready in 300 s")


def peer(encoder: str, index: Path, queries: list[str], modes: list[str]) -> dict[str, float]:
    """p50 ms of embedding + search in this process (no HTTP), per mode."""
    from llmkernel.models.loading import resolve_model
    from llmkernel.retrieval.index import Index
    from llmkernel.serve.encoders import EncoderModel

    model, searched = EncoderModel(resolve_model(encoder), "encoder"), Index(index)
    figures = {}
    for mode in modes:
        times = []
        for query in queries:
            began = time.perf_counter()
            vector = model.embed([query])
            searched.search([query], vector, 10, mode)
            times.append(1000 * (time.perf_counter() - began))
        figures[f"in_process_{mode}_p50_ms"] = round(statistics.median(times), 2)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", default=str(REPO / "runs" / "scifact" / "index"))
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default="hybrid,dense,bm25")
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    index = ensure_index(Path(args.index))
    meta = json.loads((index / "index.json").read_text())
    modes = args.modes.split(",")
    lines = (SCIFACT / "queries.jsonl").read_text().splitlines()
    test_ids = {line.split("\t")[0] for line in (SCIFACT / "qrels" / "test.tsv").read_text().splitlines()[1:]}
    queries = [row["text"] for row in map(json.loads, lines) if row["_id"] in test_ids][: args.queries]
    port = free_port()
    process = serve(meta["encoder"], index, port)
    latencies: dict[str, list[float]] = {mode: [] for mode in modes}
    round_p50: dict[str, list[float]] = {mode: [] for mode in modes}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            for query in queries[:10]:  # warm-up
                client.post("/v1/search", json={"query": query, "k": args.k})
            for round_ in range(args.rounds):
                for mode in modes[round_ % len(modes) :] + modes[: round_ % len(modes)]:
                    times = []
                    for query in queries:
                        began = time.perf_counter()
                        answer = client.post("/v1/search", json={"query": query, "k": args.k, "mode": mode})
                        answer.raise_for_status()
                        answer.json()
                        times.append(1000 * (time.perf_counter() - began))
                    latencies[mode] += times
                    round_p50[mode].append(statistics.median(times))
    finally:
        process.terminate()
        process.wait(timeout=60)
    figures: dict[str, object] = {
        "bench": "search",
        "documents": meta["documents"],
        "encoder": Path(meta["encoder"]).name,
        "queries": len(queries),
        "rounds": args.rounds,
        "k": args.k,
        "cores": len(os.sched_getaffinity(0)),
    }
    for mode in modes:
        figures[f"{mode}_p50_ms"] = round(percentile(latencies[mode], 0.5), 2)
        figures[f"{mode}_p95_ms"] = round(percentile(latencies[mode], 0.95), 2)
        figures[f"{mode}_round_p50_range_ms"] = [
            round(min(round_p50[mode]), 2),
            round(max(round_p50[mode]), 2),
        ]
    figures.update(peer(meta["encoder"], index, queries, modes))
    figures["target_p50_ms"] = 50
    figures["meets_target"] = all(figures[f"{mode}_p50_ms"] < 50 for mode in modes)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
