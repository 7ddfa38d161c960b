"""Where a benchmark ran: device, CPU, load, library versions and the gradxform commit."""

from __future__ import annotations

import datetime
import importlib.metadata as md
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import jax

import gradxform as gx


def _git(*args: str) -> str | None:
    """Read-only git query about the checkout the library was imported from, if any."""
    try:
        done = subprocess.run(
            ["git", *args], cwd=Path(gx.__file__).parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def describe(libraries: tuple[str, ...] = ("jax", "jaxlib", "optax", "numpy")) -> dict[str, Any]:
    """The machine and software a measurement was taken on, for the results JSON."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = jax.devices()[0]
    return {
        "device": f"{device.platform}: {device.device_kind}",
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        **{lib: md.version(lib) for lib in libraries},
        "gradxform": gx.__version__,
        "gradxform_commit": _git("rev-parse", "--short", "HEAD"),
        "gradxform_uncommitted": _git("status", "--porcelain", "--", "gradxform"),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
