"""Benchmark `llmk prepare` end to end on gutenberg_en (31 MB) and on the same corpus repeated ten times.

Prints one JSON line: mb_per_s (input MB / wall seconds, clean + filter + dedup + PII + tokenizer training +
packing), mb_per_s_by_step (input MB of each step / its CPU seconds, summed over workers for the parallel
steps), peak_rss_mb (peak of the summed resident memory of the whole process tree, sampled every 0.1 s)
and peak_rss_mb_10x. Targets from the issue: >= 1 MB/s on 2 cores, < 1.5 GB peak for the 10x corpus.

Usage: python bench/prepare.py [--data ../shared/data/gutenberg_en/books] [--skip-10x]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "gutenberg_en" / "books"


def _tree_rss_bytes(root: int) -> int:
    """Summed RSS of `root` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/statm") as handle:
                total += int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            pass
    return total


def run_prepare(inputs: Path, out: Path) -> tuple[dict, float, float]:
    """Run the real CLI; return (stats.json, wall seconds, peak tree RSS in MB)."""
    command = [
        sys.executable,
        "-m",
        "llmkernel.cli",
        "prepare",
        str(inputs),
        "--out",
        str(out),
        "--progress",
        "false",
        "--force",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while process.poll() is None:
        peak = max(peak, _tree_rss_bytes(process.pid))
        time.sleep(0.1)
    wall = time.perf_counter() - started
    stdout, stderr = process.communicate()
    if process.returncode != 0:
        sys.exit(f"llmk prepare failed ({process.returncode}): {stderr.strip()[-2000:]}")
    return json.loads((out / "stats.json").read_text()), wall, peak / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of input files")
    parser.add_argument("--skip-10x", action="store_true", help="skip the ten-times corpus")
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"benchmark data {args.data} not found; pass --data FOLDER")
    with tempfile.TemporaryDirectory(prefix="llmk-bench-") as tmp:
        tmp = Path(tmp)
        stats, wall, peak = run_prepare(args.data, tmp / "out")
        result = {
            "bench": "prepare",
            "data": str(args.data),
            "input_mb": round(stats["input"]["bytes"] / 1e6, 2),
            "mb_per_s": round(stats["input"]["bytes"] / 1e6 / wall, 3),
            "wall_s": round(wall, 2),
            "mb_per_s_by_step": {name: step["mb_per_s"] for name, step in stats["steps"].items()},
            "seconds_by_step": {name: step["seconds"] for name, step in stats["steps"].items()},
            "peak_rss_mb": round(peak, 1),
            "documents_kept": stats["output"]["documents"],
            "tokens": stats["tokens"],
            "cpus": os.cpu_count(),
        }
        if not args.skip_10x:
            repeated = tmp / "10x"
            repeated.mkdir()
            for copy in range(10):  # symlinks: ten times the input without ten times the disk
                for source in sorted(args.data.iterdir()):
                    if source.is_file():
                        (repeated / f"copy{copy}_{source.name}").symlink_to(source.resolve())
            stats10, wall10, peak10 = run_prepare(repeated, tmp / "out10")
            result.update(
                input_mb_10x=round(stats10["input"]["bytes"] / 1e6, 2),
                mb_per_s_10x=round(stats10["input"]["bytes"] / 1e6 / wall10, 3),
                peak_rss_mb_10x=round(peak10, 1),
                dropped_10x=stats10["dropped"],
            )
        result["targets"] = {"mb_per_s": 1.0, "peak_rss_mb_10x": 1500}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
