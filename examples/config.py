"""The run configuration: every choice of a run, range-checked, saved as `config.json`."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10")
MODELS = ("mlp", "cnn")
ACTIVATIONS = ("relu", "leaky_relu", "gelu", "silu", "tanh", "elu")
INITS = ("he", "lecun", "glorot", "he_uniform")
IMPLS = ("gradxform", "optax")
OPTIMIZERS = ("sgd", "adagrad", "rmsprop", "adam", "adamw", "nadam", "amsgrad", "adamax", "lbfgs")
SCHEDULES = ("constant", "cosine", "linear", "exponential")
PARALLEL = ("none", "pmap", "sharded")
ON_INSTABILITY = ("stop", "skip", "warn")
# Fields that do not change the numbers: a resumed run may change them (and `steps`, to extend).
NOT_NUMERIC = (
    "data_dir",
    "log_every",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "check",
)

# `--optimizer lbfgs` (full batch) refuses these fields unless they keep their defaults: why.
_LINE_SEARCH = "takes every step size from its line search"
_TRUE_LOSS = "needs the loss's own value and gradient for its line search"
_SAME_LOSS = "needs the same loss at every line-search point"
_NONE = "has no such hyperparameter"
FULL_BATCH_REFUSED = {
    "batch_size": "uses the whole training set in every step", "parallel": "runs on one device",
    "lr": _LINE_SEARCH, "lr_schedule": _LINE_SEARCH, "warmup": _LINE_SEARCH,
    "momentum": _NONE, "nesterov": _NONE, "b1": _NONE, "b2": _NONE, "eps": _NONE,
    "rms_decay": _NONE, "centered": _NONE,
    "weight_decay": _TRUE_LOSS, "l1": _TRUE_LOSS, "clip_value": _TRUE_LOSS,
    "clip_global_norm": _TRUE_LOSS, "clip_leaf_norm": _TRUE_LOSS, "clip_block_rms": _TRUE_LOSS,
    "agc": _TRUE_LOSS, "noise_eta": _TRUE_LOSS, "noise_gamma": _TRUE_LOSS, "stable": _TRUE_LOSS,
    "batch_norm": _SAME_LOSS, "dropout": _SAME_LOSS,
    "on_instability": "stops at an exploding gradient and never steps to a non-finite loss",
    "check": "has no per-step loop for chexify to check",
    "log_every": "writes a metrics line after each chunk of `--eval-every` steps",
}  # fmt: skip


class UsageError(ValueError):
    """A flag or configuration value is invalid; the message says which and what to use."""


@dataclass(frozen=True)
class Config:
    """Defaults give the README's first run: a CNN on scikit-learn digits, AdamW, cosine decay.

    Constructing one checks every field (`UsageError` naming the flag); `warmup=None` becomes
    `min(50, steps // 10)` (0 for `lbfgs`, which has none), so that `config.json` always holds
    the number used. `optimizer="lbfgs"` trains full batch (`full_batch.py`): the fields in
    `FULL_BATCH_REFUSED` must keep their defaults.
    """

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
    init: str | None = None  # kernel initialiser; None: He for the MLP, LeCun for the CNN
    init_scale: float = 1.0  # kernel init multiplier (< 1 provokes vanishing gradients)
    batch_norm: bool = False
    dropout: float = 0.0
    # optimizer
    impl: str = "gradxform"  # or "optax": the same chain built from optax's transforms
    optimizer: str = "adamw"
    lr: float = 3e-3
    lr_schedule: str = "cosine"
    warmup: int | None = None  # None: min(50, steps // 10)
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
    stable: bool = False  # guard the chain with gx.stable(...): skip, z-score clip, backoff
    # parallelism
    parallel: str = "none"  # none | pmap | sharded
    # stability
    on_instability: str = "stop"  # stop | skip | warn
    max_grad_norm: float = 1e3
    check: bool = False
    # logging and checkpoints
    log_every: int = 10
    eval_every: int = 100  # 0: at the end only
    checkpoint_every: int = 0  # 0: none (Ctrl-C still saves one)
    keep_checkpoints: int = 2

    def __post_init__(self):
        if self.warmup is None:
            warmup = 0 if self.optimizer == "lbfgs" else min(50, self.steps // 10)
            object.__setattr__(self, "warmup", warmup)
        object.__setattr__(self, "channels", tuple(self.channels))
        _validate(self)

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
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> Config:
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UsageError(f"Cannot read the run configuration {path}: {e}.") from e
        return cls.from_dict(values, str(path))


# ----------------------------------------------------------------------------- range checks

_CHOICES = {
    "dataset": DATASETS, "model": MODELS, "activation": ACTIVATIONS, "init": INITS,
    "impl": IMPLS, "optimizer": OPTIMIZERS, "lr_schedule": SCHEDULES, "parallel": PARALLEL,
    "on_instability": ON_INSTABILITY,
}  # fmt: skip
# field: (lowest, highest, lowest allowed?, highest allowed?); None fields are not checked.
_RANGES = {
    "batch_size": (1, math.inf, True, False),
    "steps": (1, math.inf, True, False),
    "seed": (0, 2**32 - 1, True, True),
    "depth": (0, math.inf, True, False),
    "width": (1, math.inf, True, False),
    "init_scale": (0, math.inf, False, False),
    "dropout": (0, 1, True, False),
    "lr": (0, math.inf, False, False),
    "warmup": (0, math.inf, True, False),
    "momentum": (0, 1, True, False),
    "b1": (0, 1, True, False),
    "b2": (0, 1, True, False),
    "eps": (0, math.inf, True, False),
    "rms_decay": (0, 1, True, False),
    "weight_decay": (0, math.inf, True, False),
    "l1": (0, math.inf, True, False),
    "clip_value": (0, math.inf, False, False),
    "clip_global_norm": (0, math.inf, False, False),
    "clip_leaf_norm": (0, math.inf, False, False),
    "clip_block_rms": (0, math.inf, False, False),
    "agc": (0, math.inf, False, False),
    "noise_eta": (0, math.inf, True, False),
    "noise_gamma": (0, math.inf, True, False),
    "max_grad_norm": (0, math.inf, False, False),
    "log_every": (1, math.inf, True, False),
    "eval_every": (0, math.inf, True, False),
    "checkpoint_every": (0, math.inf, True, False),
    "keep_checkpoints": (1, math.inf, True, False),
}


def flag(field: str) -> str:
    """The command-line flag of a `Config` field, in backticks: `--batch-size`."""
    return f"`--{field.replace('_', '-')}`"


def _range_text(low, high, low_ok: bool, high_ok: bool) -> str:
    if high == math.inf:
        return f"at least {low}" if low_ok else f"greater than {low}"
    return f"in {'[' if low_ok else '('}{low}, {high}{']' if high_ok else ')'}"


def _validate(cfg: Config) -> None:
    for name, choices in _CHOICES.items():
        if getattr(cfg, name) not in choices and not (name == "init" and cfg.init is None):
            raise UsageError(
                f"{flag(name)} must be one of {', '.join(choices)}; got {getattr(cfg, name)!r}."
            )
    for name, (low, high, low_ok, high_ok) in _RANGES.items():
        value = getattr(cfg, name)
        if value is None:
            continue
        inside = (low <= value if low_ok else low < value) and (
            value <= high if high_ok else value < high
        )
        if isinstance(value, bool) or not isinstance(value, int | float) or not inside:
            raise UsageError(
                f"{flag(name)} must be {_range_text(low, high, low_ok, high_ok)}; got {value!r}."
            )
    if len(cfg.channels) != 2 or any(not isinstance(c, int) or c < 1 for c in cfg.channels):
        given = ",".join(map(str, cfg.channels))
        raise UsageError(f"`--channels` must be two positive integers like 32,64; got {given}.")
    if cfg.optimizer == "lbfgs":
        _check_full_batch(cfg)
    elif cfg.warmup >= cfg.steps and cfg.lr_schedule != "constant":
        raise UsageError(
            f"`--warmup` ({cfg.warmup}) must be smaller than `--steps` ({cfg.steps}) "
            f"with `--lr-schedule {cfg.lr_schedule}`."
        )


def _check_full_batch(cfg: Config) -> None:
    """Refuse the flags that have no meaning for full-batch L-BFGS (`FULL_BATCH_REFUSED`)."""
    defaults = {f.name: f.default for f in dataclasses.fields(Config)} | {"warmup": 0}
    for name, why in FULL_BATCH_REFUSED.items():
        if getattr(cfg, name) != defaults[name]:
            raise UsageError(
                f"{flag(name)} does not apply to `--optimizer lbfgs`, which {why}; drop it."
            )


def free_on_resume(cfg: Config) -> tuple[str, ...]:
    """The fields a resumed run may change: `steps` (to train longer) and `NOT_NUMERIC`; with
    `lbfgs` not `eval_every`, because its chunks end there and each restarts L-BFGS."""
    free = (*NOT_NUMERIC, "steps")
    return tuple(f for f in free if not (cfg.optimizer == "lbfgs" and f == "eval_every"))
