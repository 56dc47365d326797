"""Multi-node `torchrun`, as far as one machine allows: two launchers, one per "node" (`--nnodes 2
--node-rank 0|1`, c10d rendezvous on loopback), one gloo process each. One rank is SIGKILLed after a
checkpoint; the job stops; both nodes started again with `--resume` continue from the last checkpoint, and
every loss from there on equals the uninterrupted run's (one process with the same global batch)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, run_llmk
from tests.serve.conftest import free_port
from tests.train.test_dist import PRETRAIN

pytestmark = pytest.mark.e2e
STEPS = ["--train.max_steps", "24", "--train.checkpoint_every", "8", "--train.eval_every", "8"]


def launch_nodes(args: list[str], port: int) -> list[subprocess.Popen]:
    """One torchrun launcher per node, each in its own process group (so a test can end it whole)."""
    nodes = []
    for node_rank in (0, 1):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
        command += ["--node-rank", str(node_rank), "--rdzv-backend", "c10d"]
        command += ["--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "llmk-test"]
        command += ["--max-restarts", "0"]  # a failed rank ends the job; it is started again with --resume
        nodes.append(
            subprocess.Popen(
                [*command, "-m", "llmkernel.cli", *args],
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
        )
    return nodes


def finish(nodes: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str]]:
    """Wait for every launcher (killing what is left after `timeout`); their exit codes and output."""
    results = []
    deadline = time.monotonic() + timeout
    for node in nodes:
        try:
            output, _ = node.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
            output, _ = node.communicate()
        results.append((node.returncode, output))
    return results


def worker_of(launcher: subprocess.Popen) -> int:
    """The pid of the training process a torchrun launcher started."""
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    return int(children[0])


def losses_by_step(out: Path) -> dict[int, float]:
    """Train loss per step; a step logged twice (before the kill and after the resume) keeps the last."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


@pytest.fixture(scope="module")
def reference(bpe_data, tmp_path_factory) -> Path:
    """The uninterrupted run: one process with the global batch of both nodes (2 x 4)."""
    out = tmp_path_factory.mktemp("multinode") / "one"
    args = ["pretrain", "--data", str(bpe_data), *PRETRAIN, *STEPS, "--train.batch_size", "8"]
    one = run_llmk(*args, "--out", str(out))
    assert one.returncode == 0, one.stderr[-3000:]
    return out


def two_node_args(bpe_data: Path, out: Path) -> list[str]:
    return [
        "pretrain",
        "--data",
        str(bpe_data),
        *PRETRAIN,
        *STEPS,
        "--train.batch_size",
        "4",
        "--out",
        str(out),
    ]


def kill_a_rank_after_a_checkpoint(args: list[str], out: Path) -> list[tuple[int, str]]:
    nodes = launch_nodes(args, free_port())
    deadline = time.monotonic() + 180
    while not (out / "checkpoints" / "step_000008").is_dir() and time.monotonic() < deadline:
        assert all(node.poll() is None for node in nodes), finish(nodes)
        time.sleep(0.02)
    os.kill(worker_of(nodes[1]), signal.SIGKILL)  # node 1's rank dies
    return finish(nodes)


def assert_same_losses(out: Path, reference: Path) -> None:
    expected, got = losses_by_step(reference), losses_by_step(out)
    assert sorted(got) == sorted(expected)
    steps = sorted(expected)
    assert [got[step] for step in steps] == pytest.approx([expected[step] for step in steps], abs=1e-5)


def test_a_killed_rank_then_resume_on_both_nodes_ends_like_an_uninterrupted_run(
    bpe_data, reference, tmp_path
):
    out = tmp_path / "two-nodes"
    args = two_node_args(bpe_data, out)
    results = kill_a_rank_after_a_checkpoint(args, out)
    assert all(code != 0 for code, _ in results)  # the job stops on both nodes, with no finished run
    assert not (out / "run.json").exists()
    resumed = finish(launch_nodes([*args, "--resume"], free_port()))
    assert [code for code, _ in resumed] == [0, 0], resumed[0][1][-3000:] + resumed[1][1][-3000:]
    assert "resuming from" in resumed[0][1]
    assert json.loads((out / "run.json").read_text())["metrics"]["step"] == 24
    assert_same_losses(out, reference)
