"""A short soak of the real `llmk serve` (bench/soak.py, bounded): streaming and non-streaming clients at a
fixed rate, a quarter of them leaving early; no 5xx, nothing lost, the engine empty afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.e2e


def test_a_short_soak_loses_nothing_and_answers_no_5xx(llama_dir):
    command = [sys.executable, str(REPO / "bench" / "soak.py"), "--model", str(llama_dir)]
    command += ["--rate", "8", "--duration_s", "15", "--max_tokens", "8", "--request_timeout_s", "60"]
    done = subprocess.run(
        command,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(result)
    assert result["sent"] == 120 and result["left"] == 60
    assert result["server_errors"] == 0 and result["lost"] == 0, done.stderr[-3000:]
    assert result["answered"] + result["refused"] == 60
    assert result["server_5xx"] == 0 and result["ready_after"] == 200
    assert result["server_running"] == 0 and result["server_waiting"] == 0
