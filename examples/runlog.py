"""The run directory: `config.json`, `metrics.jsonl`, `summary.json`, plots and checkpoints.

`metrics.jsonl` holds one JSON object per logged step and nothing time-dependent, so two runs
with the same seed and flags write byte-identical files (wall-clock numbers go to `summary.json`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .config import Config


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunDir:
    """Files of one run; only the first process of a multi-host job writes."""

    def __init__(self, path: str | Path, *, writer: bool = True):
        self.path = Path(path)
        self.writer = writer
        self.metrics_path = self.path / "metrics.jsonl"
        self.checkpoints = self.path / "checkpoints"

    def start(self, cfg: Config) -> None:
        """Begin a fresh run; refuse to overwrite an existing one."""
        if (self.path / "config.json").exists() or self.metrics_path.exists():
            raise FileExistsError(
                f"{self.path} already holds a run. Continue it with `--resume {self.path}` or "
                "choose another `--run-dir`."
            )
        if self.writer:
            self.path.mkdir(parents=True, exist_ok=True)
            _atomic_write(self.path / "config.json", cfg.to_json())
            self.metrics_path.write_text("")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line]

    def truncate_metrics(self, step: int) -> list[dict[str, Any]]:
        """Drop records after `step` (written after the resumed checkpoint); return the rest."""
        kept = [r for r in self.read_metrics() if r["step"] <= step]
        if self.writer:
            _atomic_write(self.metrics_path, "".join(dumps(r) + "\n" for r in kept))
        return kept

    def log(self, record: dict[str, Any]) -> None:
        if self.writer:
            with open(self.metrics_path, "a") as f:
                f.write(dumps(record) + "\n")

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.writer:
            _atomic_write(self.path / "summary.json", json.dumps(summary, indent=2) + "\n")


def dumps(record: dict[str, Any]) -> str:
    """JSON with exact float round-trip (`repr`), `NaN`/`Infinity` kept as Python writes them."""
    return json.dumps(record, allow_nan=True)
