"""The run configuration: every choice that affects the numbers, saved as `config.json`."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class UsageError(ValueError):
    """A flag or configuration value is invalid; the message says which and what to use."""


@dataclass(frozen=True)
class Config:
    """Defaults give the README's first run: a CNN on scikit-learn digits, AdamW, cosine decay."""

    # data
    dataset: str = "digits"
    data_dir: str | None = None
    batch_size: int = 128  # global batch, split evenly over devices
    steps: int = 500
    seed: int = 0
    # model
    model: str = "cnn"
    depth: int = 2  # MLP hidden layers
    width: int = 128  # MLP hidden width; CNN dense width
    channels: tuple[int, int] = (32, 64)  # CNN conv channels
    activation: str = "relu"
    init: str = "he"  # MLP kernel initialiser
    init_scale: float = 1.0  # MLP kernel init multiplier (< 1 provokes vanishing gradients)
    batch_norm: bool = False
    dropout: float = 0.0
    # optimizer
    impl: str = "gradxform"  # or "optax": the same chain built from optax's transforms
    optimizer: str = "adamw"
    lr: float = 3e-3
    lr_schedule: str = "cosine"
    warmup: int = 50
    momentum: float | None = None
    nesterov: bool = False
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    rms_decay: float = 0.9
    centered: bool = False
    weight_decay: float | None = None  # None: the optimizer's default (AdamW 1e-4, others 0)
    l1: float = 0.0
    clip_value: float | None = None
    clip_global_norm: float | None = None
    clip_leaf_norm: float | None = None
    clip_block_rms: float | None = None
    agc: float | None = None
    noise_eta: float = 0.0
    noise_gamma: float = 0.55
    stable: bool = False  # guard the chain with gx.stable(...): skip guard, ZClip, step bound
    # parallelism
    parallel: str = "none"  # none | pmap | sharded
    # stability
    on_instability: str = "stop"  # stop | skip | warn
    max_grad_norm: float = 1e3
    check: bool = False
    # logging and checkpoints
    log_every: int = 10
    eval_every: int = 100
    checkpoint_every: int = 0
    keep_checkpoints: int = 2

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> Config:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise UsageError(
                f"{source} has unknown fields {unknown}; expected a subset of {sorted(names)}."
            )
        if "channels" in values:
            values = {**values, "channels": tuple(values["channels"])}
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> Config:
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UsageError(f"Cannot read the run configuration {path}: {e}.") from e
        return cls.from_dict(values, str(path))
