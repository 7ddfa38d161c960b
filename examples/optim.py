"""The optimizer chain named on the command line, built from gradxform (or, to compare, optax).

Order of the chain: gradient clipping -> L2 / L1 penalty -> gradient noise -> the optimizer
(which ends with the learning rate). AdamW's decoupled decay lives inside `adamw` itself;
for every other optimizer `--weight-decay` is the coupled L2 penalty (PyTorch's convention).
Weight decay skips biases and normalisation scales (`gx.weight_decay_mask`).

The chain is always wrapped in `gx.health(...)`, so every step records its gradient telemetry
(global and per-layer norms, non-finite count, explosion flag) in the optimizer state, whichever
library built the chain: `--on-instability skip` puts `gx.skip_if(...)` between the two, and
`--stable` puts `gx.stable(..., telemetry=False)` (skip guard, ZClip, step bound) there instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import optax

import gradxform as gx

from .config import Config, UsageError

OPTIMIZERS = ("sgd", "adagrad", "rmsprop", "adam", "adamw", "nadam", "amsgrad", "adamax")
SCHEDULES = ("constant", "cosine", "linear", "exponential")


def learning_rate(cfg: Config) -> optax.Schedule:
    """`--lr` under `--lr-schedule` with `--warmup` linear warm-up steps (optax schedules)."""
    lr, warmup, steps = cfg.lr, cfg.warmup, cfg.steps
    if not lr > 0:
        raise UsageError(f"`--lr` must be positive, got {lr}.")
    if warmup >= steps and cfg.lr_schedule != "constant":
        raise UsageError(f"`--warmup` ({warmup}) must be smaller than `--steps` ({steps}).")
    if cfg.lr_schedule == "constant":
        return (
            optax.warmup_constant_schedule(0.0, lr, warmup)
            if warmup
            else optax.constant_schedule(lr)
        )
    if cfg.lr_schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, end_value=0.0)
    if cfg.lr_schedule == "linear":
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, lr, warmup),
                optax.linear_schedule(lr, 0.0, steps - warmup),
            ],
            [warmup],
        )
    if cfg.lr_schedule == "exponential":  # decays 100x over the run
        return optax.warmup_exponential_decay_schedule(0.0, lr, warmup, steps - warmup, 0.01)
    raise UsageError(f"`--lr-schedule` must be one of {SCHEDULES}, got {cfg.lr_schedule!r}.")


def build(cfg: Config, key_seed: int) -> optax.GradientTransformation:
    """The full transformation for `cfg`; `key_seed` seeds gradient noise.

    A hyperparameter the library rejects (e.g. a negative `--lr`) becomes a `UsageError`.
    """
    try:
        return _build(cfg, key_seed)
    except UsageError:
        raise
    except ValueError as e:
        raise UsageError(f"{e} (from the optimizer flags)") from e


def _build(cfg: Config, key_seed: int) -> optax.GradientTransformation:
    if cfg.optimizer not in OPTIMIZERS:
        raise UsageError(f"`--optimizer` must be one of {OPTIMIZERS}, got {cfg.optimizer!r}.")
    if cfg.impl not in ("gradxform", "optax"):
        raise UsageError(f"`--impl` must be 'gradxform' or 'optax', got {cfg.impl!r}.")
    lib = gx if cfg.impl == "gradxform" else optax
    lr = learning_rate(cfg)
    parts: list[optax.GradientTransformation] = []

    if cfg.clip_value is not None:
        parts.append(lib.clip(cfg.clip_value))
    if cfg.clip_leaf_norm is not None:
        parts.append(_gx_only(cfg, "clip_by_leaf_norm")(cfg.clip_leaf_norm))
    if cfg.clip_block_rms is not None:
        parts.append(lib.clip_by_block_rms(cfg.clip_block_rms))
    if cfg.agc is not None:
        parts.append(lib.adaptive_grad_clip(cfg.agc))
    if cfg.clip_global_norm is not None:
        parts.append(lib.clip_by_global_norm(cfg.clip_global_norm))

    if cfg.optimizer != "adamw" and cfg.weight_decay:
        parts.append(lib.add_decayed_weights(cfg.weight_decay, mask=gx.weight_decay_mask))
    if cfg.l1:
        parts.append(_gx_only(cfg, "add_l1_decay")(cfg.l1, mask=gx.weight_decay_mask))
    if cfg.noise_eta:
        parts.append(lib.add_noise(cfg.noise_eta, cfg.noise_gamma, key_seed))

    parts.append(_optimizer(cfg, lib, lr))
    tx = parts[0] if len(parts) == 1 else lib.chain(*parts)
    if cfg.stable:  # skip_if(chain(zclip, tx)); its telemetry is the health wrapper below
        tx = _gx_only(cfg, "stable")(tx, telemetry=False)
    elif cfg.on_instability == "skip":  # zero update, optimizer state kept: bad step or loss
        tx = gx.skip_if(tx, max_norm=cfg.max_grad_norm)
    # `exploding` = non-finite or above `--max-grad-norm`, the bound `--on-instability` acts on.
    # The z-score and growth are recorded but not flagged: health's z-score has no floor on the
    # spread of the norm, so late in a calm run a 1.5x wobble passes z > 4 and would stop a
    # healthy run (RMSprop `--lr 1e-3 --lr-schedule constant`, with or without `--stable`).
    return gx.health(tx, max_norm=cfg.max_grad_norm, z_threshold=math.inf, max_growth=None)


def _optimizer(cfg: Config, lib, lr: optax.Schedule) -> optax.GradientTransformation:
    adam_args = dict(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    name = cfg.optimizer
    if name == "sgd":
        return lib.sgd(lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if name == "adagrad":
        return lib.adagrad(lr, eps=cfg.eps)
    if name == "rmsprop":
        return lib.rmsprop(
            lr, decay=cfg.rms_decay, eps=cfg.eps, centered=cfg.centered,
            momentum=cfg.momentum, nesterov=cfg.nesterov,
        )  # fmt: skip
    if name == "adamw":
        decay = 1e-4 if cfg.weight_decay is None else cfg.weight_decay
        return lib.adamw(
            lr, **adam_args, weight_decay=decay, mask=gx.weight_decay_mask, nesterov=cfg.nesterov
        )
    if name == "adam":
        return lib.adam(lr, **adam_args, nesterov=cfg.nesterov)
    if name == "adamax":
        return lib.adamax(lr, **adam_args)
    return getattr(lib, name)(lr, **adam_args)  # nadam, amsgrad


def _gx_only(cfg: Config, name: str) -> Callable[..., optax.GradientTransformation]:
    if cfg.impl == "optax":
        raise UsageError(
            f"`{name}` has no optax equivalent; drop the flag or use `--impl gradxform`."
        )
    return getattr(gx, name)
