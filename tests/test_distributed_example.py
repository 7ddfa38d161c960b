"""Multi-host training of the example: two processes on 127.0.0.1 with JAX's CPU collectives
(gloo), one shared run directory, a few steps, a resume that trains longer; then the same run
from one process driving two devices. Slow-ish (three rounds of subprocesses, ~1 minute)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 300  # a hung collective fails the test instead of blocking CI
TINY = ["--model", "mlp", "--depth", "1", "--width", "16", "--batch-size", "32", "--lr", "0.01",
        "--lr-schedule", "constant", "--warmup", "0", "--log-every", "1", "--eval-every", "2",
        "--checkpoint-every", "2", "--parallel", "sharded", "--no-progress",
        "--no-plots"]  # fmt: skip


def _env(devices: int) -> dict[str, str]:
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
        # conftest's cheaper compile flags, with this test's own device count
        "XLA_FLAGS": " ".join(
            f"--xla_force_host_platform_device_count={devices}"
            if flag.startswith("--xla_force_host_platform_device_count")
            else flag
            for flag in os.environ["XLA_FLAGS"].split()
        ),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(commands: list[list[str]], devices: int) -> list[subprocess.CompletedProcess]:
    """Start every command at once (one process each) and wait for all, killing on a hang."""
    procs = [
        subprocess.Popen(
            [sys.executable, "examples/train.py", *args],
            cwd=ROOT,
            env=_env(devices),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in commands
    ]
    try:
        outs = [p.communicate(timeout=TIMEOUT_S) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"a process hung for {TIMEOUT_S} s")
    return [
        subprocess.CompletedProcess(p.args, p.returncode, out, err)
        for p, (out, err) in zip(procs, outs, strict=True)
    ]


def _two_hosts(*args: str) -> list[subprocess.CompletedProcess]:
    cluster = ["--distributed", "--coordinator-address", f"127.0.0.1:{_free_port()}",
               "--num-processes", "2"]  # fmt: skip
    done = _run([[*args, *cluster, "--process-id", str(i)] for i in range(2)], devices=1)
    for i, p in enumerate(done):
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{p.stderr[-3000:]}"
    return done


def test_two_processes_share_one_run_dir_resume_and_match_one_process(tmp_path):
    shared = tmp_path / "shared"
    _two_hosts(*TINY, "--steps", "4", "--run-dir", str(shared))
    summary = json.loads((shared / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["devices"] == 2 and summary["steps_done"] == 4
    _two_hosts(
        "--resume", str(shared), "--steps", "6", "--no-progress", "--no-plots"
    )  # and train longer
    summary = json.loads((shared / "summary.json").read_text())
    assert summary["resumed_from"] == 4 and summary["steps_done"] == 6

    (alone,) = _run([[*TINY, "--steps", "6", "--run-dir", str(tmp_path / "alone")]], devices=2)
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert json.loads((tmp_path / "alone" / "summary.json").read_text())["devices"] == 2
    ours = (shared / "metrics.jsonl").read_text().splitlines()
    assert len(ours) == 6
    assert ours == (tmp_path / "alone" / "metrics.jsonl").read_text().splitlines()


def test_a_refused_start_stops_every_process_alike(tmp_path):
    """Process 0 alone checks the run directory; its refusal reaches process 1 (no hang)."""
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "config.json").write_text("{}")
    cluster = ["--distributed", "--coordinator-address", f"127.0.0.1:{_free_port()}",
               "--num-processes", "2"]  # fmt: skip
    args = [*TINY, "--steps", "2", "--run-dir", str(tmp_path / "taken"), *cluster]
    done = _run([[*args, "--process-id", str(i)] for i in range(2)], devices=1)
    assert [p.returncode for p in done] == [2, 2], [p.stderr[-2000:] for p in done]
    assert all("already holds a run" in p.stderr for p in done)
