"""Does our fp32 CPU causal-attention kernel still make a compiled training step faster than SDPA?

For each configuration, one fresh process per measurement builds the decoder as `llmk pretrain` does
(threads from the cores, glibc's freed-memory tuning, the preset with the config's overrides, AdamW and
the schedule from the optim section), switches its attention with `use_causal_attention` (the kernel, or
the SDPA path the module falls back to: causal, no materialised mask), compiles it as
`wrap_for_training` does and times whole training steps (forward and loss as CausalLM.loss computes it,
backward, gradient clipping, AdamW, the scheduler) on random token windows. The first steps (compilation
and warm-up) are not timed; a process reports the median of its steady steps. The sides alternate
(kernel, SDPA, kernel, SDPA, ...) so a load change on a shared machine hits both; before each process
the bench waits (at most --max-wait s) for other processes to leave the machine mostly idle, each
process reports the share of the machine they used while it timed, and one during which they used more
than --max-others is run again (at most --retries times; the discarded figures are reported too).

Configurations:
  small        the `small` preset (4 layers, width 256, 4 heads, 2 key/value heads) with the default
               tokenizer's vocabulary, batch 8 x window 512 (the backward recomputes the probabilities)
  shakespeare  the model and train shape of recipes/shakespeare-gpt.yaml's pretrain section, with its
               prepare section's vocabulary (batch 16 x window 256: the backward reuses them)

Prints one JSON line: per configuration the median ms/step on each side (median over the processes of
each process's median), the spread (min..max of the process medians), the speedup (SDPA ms / kernel ms),
each round's speedup (its SDPA process over the kernel process before it) and their median, every
process's figure, the same speedup from each process's fastest step (the figure other processes'
load touches least) and the other processes' share per run, plus the rounds and steps.
Usage: python bench/attention.py [--rounds 3] [--steps 10] [--warmup 6] [--configs small,shakespeare]
       [--max-wait 60] [--max-others 0.15] [--retries 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "shakespeare-gpt.yaml"
SIDES = ("kernel", "sdpa")


def configuration(name: str):
    """(PretrainConfig, vocabulary size) of a configuration, built as `llmk pretrain` reads its config."""
    from llmkernel.config import build, load_yaml
    from llmkernel.data.config import TokenizerConfig
    from llmkernel.train.config import PretrainConfig

    if name == "small":
        section = {"objective": "clm", "model": {"size": "small"}, "train": {"batch_size": 8, "seq_len": 512}}
        return build(PretrainConfig, section), TokenizerConfig().vocab_size
    if name == "shakespeare":
        recipe = load_yaml(RECIPE)
        tokenizer = (recipe.get("prepare") or {}).get("tokenizer") or {}
        return build(PretrainConfig, recipe["pretrain"]), build(TokenizerConfig, tokenizer).vocab_size
    raise SystemExit(f"unknown configuration {name!r}: small or shakespeare")


def measure(name: str, side: str, steps: int, warmup: int) -> dict:
    """One process's measurement: the ms of each timed step and the attention line pretrain would log."""
    import torch

    from llmkernel.models.attention import use_causal_attention
    from llmkernel.models.presets import build_model
    from llmkernel.runtime import configure_threads, keep_freed_memory
    from llmkernel.tasks.clm import CausalLM
    from llmkernel.train.optim import build_optimizer, build_scheduler
    from llmkernel.train.parallel import wrap_for_training

    config, vocab = configuration(name)
    threads = configure_threads(config.train.threads, 1)
    keep_freed_memory()
    torch.manual_seed(config.train.seed)
    batch, seq = config.train.batch_size, config.train.seq_len
    model = build_model(config.model, "decoder", vocab, config.model.context_length or seq, {})
    note = use_causal_attention(model, cpu_kernel=side == "kernel")
    expected = "llmk_causal_cpu" if side == "kernel" else "llmk_causal_sdpa"
    if model.config._attn_implementation != expected:
        raise SystemExit(f"{name}/{side}: attention is {model.config._attn_implementation} ({note})")

    class Rank:  # what wrap_for_training reads of dist.DistInfo for one CPU process
        world_size, device = 1, torch.device("cpu")

    train_module = wrap_for_training(model, config.train.strategy, Rank(), compile_module=True)
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, config.train.max_steps, config.optim)
    generator = torch.Generator().manual_seed(0)
    times, machine, own = [], None, None
    for step in range(warmup + steps):
        tokens = torch.randint(0, vocab, (batch, seq + 1), generator=generator)
        data = {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}
        if step == warmup:
            machine, own = cpu_jiffies(), os.times()
        started = time.perf_counter()
        model.train()
        loss = CausalLM.loss(None, train_module, data)  # the task's loss; it reads nothing of the task
        (loss / data["labels"].numel()).backward()
        if config.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - started
        if step >= warmup:
            times.append(1000 * elapsed)
    busy, total = (now - then for now, then in zip(cpu_jiffies(), machine))
    own_jiffies = sum(os.times()[:2]) - sum(own[:2])  # this process's CPU seconds, all its threads
    others = max(0.0, (busy - own_jiffies * os.sysconf("SC_CLK_TCK")) / max(1, total))
    return {
        "ms": times,
        "others_cpu": others,
        "attention": note,
        "threads": threads,
        "shape": [batch, seq],
        "vocab": vocab,
    }


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine so far, in clock ticks summed over its cores."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return sum(fields) - idle, sum(fields)


def wait_for_quiet(limit_s: float, threshold: float, quiet_s: int = 6) -> float:
    """Wait (at most limit_s) until other processes used under `threshold` of the machine for quiet_s.

    Returns the largest share they used in a 2 s sample of the last quiet_s (other people's tests may
    share the machine).
    """
    deadline, recent = time.monotonic() + limit_s, []
    while True:
        before = cpu_jiffies()
        time.sleep(2)
        busy, total = (now - then for now, then in zip(cpu_jiffies(), before))
        recent = [*recent, busy / max(1, total)][-max(1, quiet_s // 2) :]
        quiet = len(recent) == max(1, quiet_s // 2) and max(recent) < threshold
        if quiet or time.monotonic() > deadline:
            return max(recent)


def child(name: str, side: str, steps: int, warmup: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        __file__,
        "--child",
        name,
        side,
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{name}/{side} failed: {result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="processes per side and configuration")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=6, help="untimed first steps (compilation included)")
    parser.add_argument("--configs", default="small,shakespeare")
    parser.add_argument(
        "--max-wait", type=float, default=60, help="seconds to wait for a quiet machine before each process"
    )
    parser.add_argument(
        "--max-others",
        type=float,
        default=0.15,
        help="a process during which other processes used more of the machine than this is run again",
    )
    parser.add_argument("--retries", type=int, default=3, help="reruns of a loaded measurement at most")
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "SIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child, args.steps, args.warmup)))
        return

    names = args.configs.split(",")
    for name in names:
        configuration(name)  # fail on an unknown name before any process runs
    runs = {name: {side: [] for side in SIDES} for name in names}
    best = {name: {side: [] for side in SIDES} for name in names}
    others = {name: {side: [] for side in SIDES} for name in names}
    notes, shapes = {}, {}
    discarded = []
    for _ in range(args.rounds):
        for name in names:
            for side in SIDES:  # kernel, SDPA, kernel, SDPA, ...
                for attempt in range(args.retries + 1):
                    if os.path.exists("/proc/stat"):
                        wait_for_quiet(args.max_wait, args.max_others)
                    result = child(name, side, args.steps, args.warmup)
                    ms, share = statistics.median(result["ms"]), result["others_cpu"]
                    print(
                        f"{name} {side}: {ms:.1f} ms/step (best {min(result['ms']):.1f}, "
                        f"other processes {share:.0%} of the machine)",
                        file=sys.stderr,
                        flush=True,
                    )
                    if share <= args.max_others or attempt == args.retries:
                        break
                    discarded.append(
                        {"config": name, "side": side, "ms": round(ms, 1), "others_cpu": round(share, 2)}
                    )
                runs[name][side].append(ms)
                best[name][side].append(min(result["ms"]))
                others[name][side].append(round(share, 2))
                notes[f"{name}/{side}"] = result["attention"]
                shapes[name] = {"batch_seq": result["shape"], "vocab": result["vocab"]}
    report = {"rounds": args.rounds, "timed_steps": args.steps, "warmup_steps": args.warmup}
    for name in names:
        kernel, sdpa = (statistics.median(runs[name][side]) for side in SIDES)
        report[name] = {
            **shapes[name],
            "kernel_ms": round(kernel, 1),
            "sdpa_ms": round(sdpa, 1),
            "kernel_range": [round(min(runs[name]["kernel"]), 1), round(max(runs[name]["kernel"]), 1)],
            "sdpa_range": [round(min(runs[name]["sdpa"]), 1), round(max(runs[name]["sdpa"]), 1)],
            "speedup": round(sdpa / kernel, 3),
            # each round's SDPA process against the kernel process next to it: the machine's speed drifts
            # by several percent over minutes, which a pair shares
            "paired_speedups": [round(b / a, 3) for a, b in zip(runs[name]["kernel"], runs[name]["sdpa"])],
            "paired_speedup_median": round(
                statistics.median(b / a for a, b in zip(runs[name]["kernel"], runs[name]["sdpa"])), 3
            ),
            "kernel_runs": [round(ms, 1) for ms in runs[name]["kernel"]],
            "sdpa_runs": [round(ms, 1) for ms in runs[name]["sdpa"]],
            # each process's fastest step: the figure least touched by other processes' load
            "best_step_speedup": round(
                statistics.median(best[name]["sdpa"]) / statistics.median(best[name]["kernel"]), 3
            ),
            "kernel_best_runs": [round(ms, 1) for ms in best[name]["kernel"]],
            "sdpa_best_runs": [round(ms, 1) for ms in best[name]["sdpa"]],
            "others_cpu": others[name],  # share of the machine other processes used while each one timed
        }
    report["attention"] = notes
    report["discarded"] = discarded  # measurements run again because other processes loaded the machine
    print(json.dumps(report))


if __name__ == "__main__":
    main()
