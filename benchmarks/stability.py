"""Stability benchmark: real unstable runs, every remedy beside plain optax, telemetry judged.

    python benchmarks/stability.py                        # 10 seeds, all settings (minutes)
    python benchmarks/stability.py --quick                # 3 seeds, shorter runs
    python benchmarks/stability.py --seeds 5 --out benchmarks/results
    python benchmarks/stability.py --proposed             # candidate defaults: *_proposed.*

Data: scikit-learn's 8x8 digits as the example loads them (`examples/data.py`), 1437 train / 360
test (fixed permutation), standardised; batches in the example's order (`BatchOrder`, batch 64).
Model: a ReLU MLP without normalisation, He init (times `init_scale`): a pure function, so that
runs stack as lanes (the example's NNX modules do not). Settings:

  healthy   the reference: SGD momentum 0.9 at lr 0.01, and Adam at lr 1e-3
  explode   16x64 MLP, SGD momentum 0.9 at lr 0.05 and 0.1 (1500 steps)
  inject    gradient x100 (SGD lr 0.01) / x1000 (Adam lr 1e-3) every 250 steps; NaN gradients
            every 300 steps (SGD and Adam)
  vanish    20x50 MLP at 0.5x and 0.7x He scale, SGD momentum lr 0.01 (2000 steps)

Rows: plain optax, then each remedy wrapped around the same optax optimizer (thresholds at their
usual defaults, not tuned here), then `gx.stable(optimizer)` with default arguments; the vanishing
settings add optimizers that rescale per coordinate (Adam, RMSprop). Every row runs with
`gx.health` in its chain (`gx.stable` has its own), and its flags are read per step from the
optimizer state inside the scan.

All (row, setting, seed) runs of one architecture and optimizer family train as lanes of one
jitted `lax.scan` over steps: parameters are stacked along a lane axis, the forward and backward
pass is vmapped over it, and each row applies its own (vmapped) transform to its contiguous
slice of lanes. One compile per group; the per-lane hyperparameters (learning rate, init scale,
injections) are traced values.

A run fails on any non-finite loss or a final (full training set) loss above 2.0. Reported per
row: fail fraction, median test accuracy, loss spikes per run (minibatch loss > 2x the median of
the previous 20 and > 0.5 above it), median over runs of the largest gradient norm (of the
model's own gradient, before any injection), and from the telemetry: for every run that went
non-finite, whether `exploding` was flagged strictly before and by how many steps; flags per run
(on the healthy settings these are false alarms); injected spikes flagged; the first step
flagged `vanishing`; the fraction of steps clipped and skipped.

It prints a table and writes `stability.json`, `stability.md` (the table in Markdown),
`stability.png` (fail fraction and accuracy per row and setting) and `stability_health_*.png`
(`plot_health` of single runs) under `--out`.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gradxform as gx
from benchmarks import machine
from examples import data as example_data
from gradxform.plots import plot_health

FAIL_LOSS = 2.0
SPIKE_WINDOW, SPIKE_RATIO, SPIKE_MARGIN = 20, 2.0, 0.5
VANISH_BY = 100  # goal: setting 3 flagged vanishing within this many steps
PATIENCE = 20  # `health`'s default `patience`, for the vanishing-trigger statistics

# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Digits:
    x_train: np.ndarray  # float32 (1437, 64), standardised with the training mean/std
    y_train: np.ndarray  # int32 (1437,)
    x_test: np.ndarray  # float32 (360, 64)
    y_test: np.ndarray  # int32 (360,)


def load_digits() -> Digits:
    """scikit-learn's bundled digits as the example loads them (`examples/data.py`: the same
    fixed split and standardisation), flattened to 64 features."""
    ds = example_data.load("digits")
    flat = lambda a: a.reshape(len(a), -1)
    return Digits(flat(ds.x_train), ds.y_train, flat(ds.x_test), ds.y_test)


def batch_indices(n: int, batch: int, steps: int, seed: int) -> np.ndarray:
    """int32 (steps, batch): the example's `BatchOrder`, a fresh permutation per epoch."""
    order = example_data.BatchOrder(n, batch, seed)
    return np.stack([order.indices(s) for s in range(steps)]).astype(np.int32)


# ----------------------------------------------------------------------------- model

ACTIVATIONS: dict[str, Callable] = {"relu": jax.nn.relu, "tanh": jnp.tanh, "gelu": jax.nn.gelu}


@dataclass(frozen=True)
class Arch:
    """A plain MLP (`depth` hidden layers of `width`, no normalisation, He-normal init), or with
    `kind="rnn"` an Elman RNN reading the image row by row (8 steps of 8 pixels, `width` units).

    Leaves are `layer_00` (input) ... in network order; `init_scale` multiplies every kernel.
    """

    depth: int = 16
    width: int = 64
    activation: str = "relu"
    kind: str = "mlp"

    def init(self, key: jax.Array, scale: jax.Array) -> dict:
        if self.kind == "rnn":  # input, recurrent, output; LeCun-normal kernels
            dims = [(8, self.width), (self.width, self.width), (self.width, 10)]
        else:
            widths = [64] + [self.width] * self.depth + [10]
            dims = list(itertools.pairwise(widths))
        keys = jax.random.split(key, len(dims))
        gain = 1.0 if self.kind == "rnn" else 2.0
        return {
            f"layer_{i:02d}": {
                "w": scale * jnp.sqrt(gain / a) * jax.random.normal(k, (a, b), jnp.float32),
                "b": jnp.zeros([b], jnp.float32),
            }
            for i, (k, (a, b)) in enumerate(zip(keys, dims, strict=True))
        }

    def apply(self, params: dict, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        names = sorted(params)
        if self.kind == "rnn":
            inp, rec, out = (params[n] for n in names)
            rows = x.reshape(x.shape[0], 8, 8)
            h = jnp.zeros((x.shape[0], self.width), x.dtype)
            for t in range(8):
                h = act(rows[:, t] @ inp["w"] + h @ rec["w"] + (inp["b"] + rec["b"])[None])
            return h @ out["w"] + out["b"][None]
        for name in names[:-1]:
            x = act(x @ params[name]["w"] + params[name]["b"][None])
        return x @ params[names[-1]]["w"] + params[names[-1]]["b"][None]

    def loss(self, params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(self.apply(params, x), y).mean()

    def describe(self) -> str:
        if self.kind == "rnn":
            return f"{self.width}-unit {self.activation} RNN"
        return f"{self.depth}x{self.width} {self.activation} MLP"


# ----------------------------------------------------------------------------- settings and rows


@dataclass(frozen=True)
class Setting:
    name: str
    group: str  # healthy | explode | inject | vanish
    family: str  # sgd | adam: the optimizer every row wraps
    lr: float
    arch: Arch = Arch()
    steps: int = 1500
    init_scale: float = 1.0  # times He scale
    spike: float = 1.0  # gradient multiplier on injection steps
    spike_every: int = 0  # 0: none; else steps 250, 500, ... (1-based)
    nan_every: int = 0  # 0: none; else the whole gradient is NaN on steps 300, 600, ...


def settings(steps: int = 1500, vanish_steps: int = 2000) -> list[Setting]:
    deep = Arch(20, 50)
    return [
        Setting("healthy SGD lr 0.01", "healthy", "sgd", 0.01, steps=steps),
        Setting("healthy Adam lr 1e-3", "healthy", "adam", 1e-3, steps=steps),
        Setting("1a SGD lr 0.05", "explode", "sgd", 0.05, steps=steps),
        Setting("1b SGD lr 0.1", "explode", "sgd", 0.1, steps=steps),
        Setting("2a SGD lr 0.01, g x100 /250", "inject", "sgd", 0.01, steps=steps, spike=100.0,
                spike_every=250),
        Setting("2b Adam lr 1e-3, g x1000 /250", "inject", "adam", 1e-3, steps=steps, spike=1000.0,
                spike_every=250),
        Setting("2c SGD lr 0.01, NaN /300", "inject", "sgd", 0.01, steps=steps, nan_every=300),
        Setting("2d Adam lr 1e-3, NaN /300", "inject", "adam", 1e-3, steps=steps, nan_every=300),
        Setting("3a 20x50 at 0.5x He, SGD lr 0.01", "vanish", "sgd", 0.01, deep, vanish_steps, 0.5),
        Setting("3b 20x50 at 0.7x He, SGD lr 0.01", "vanish", "sgd", 0.01, deep, vanish_steps, 0.7),
    ]  # fmt: skip


def base_optimizer(family: str, lr: jax.Array) -> optax.GradientTransformation:
    if family == "sgd":
        return optax.sgd(lr, momentum=0.9)
    return optax.adam(lr)


@dataclass(frozen=True)
class Row:
    name: str
    build: Callable[[optax.GradientTransformation], optax.GradientTransformation]
    groups: tuple[str, ...] = ("explode", "inject")  # the settings it runs on
    has_health: bool = False  # the transform holds its own `gx.health` (gx.stable)


def rows(stable_kwargs: dict | None = None) -> list[Row]:
    """Plain optax, each remedy around it (usual defaults), `gx.stable`, per-coordinate
    optimizers; each runs on the setting groups it names."""
    every = ("healthy", "explode", "inject", "vanish")
    stable_kwargs = stable_kwargs or {}
    return [
        Row("optax", lambda opt: opt, ("healthy", "explode", "inject", "vanish")),
        Row("clip_by_global_norm(1)", lambda opt: gx.chain(gx.clip_by_global_norm(1.0), opt)),
        Row("clip_by_leaf_norm(1)", lambda opt: gx.chain(gx.clip_by_leaf_norm(1.0), opt)),
        Row("adaptive_grad_clip(0.01)", lambda opt: gx.chain(gx.adaptive_grad_clip(0.01), opt),
            ("explode", "inject", "vanish")),
        Row("autoclip()", lambda opt: gx.chain(gx.autoclip(), opt)),
        Row("zclip()", lambda opt: gx.chain(gx.zclip(), opt)),
        Row("skip_if()", lambda opt: gx.skip_if(opt)),
        Row("gx.stable()", lambda opt: gx.stable(opt, **stable_kwargs), every, True),
        Row("optax.adam(1e-3)", lambda opt: optax.adam(1e-3), ("vanish",)),
        Row("optax.rmsprop(1e-3)", lambda opt: optax.rmsprop(1e-3), ("vanish",)),
        Row("gx.stable(adam(1e-3))", lambda opt: gx.stable(optax.adam(1e-3), **stable_kwargs),
            ("vanish",), True),
    ]  # fmt: skip


# Candidate defaults, evaluated by passing explicit arguments (`--proposed`); the evidence for
# each is in docs/benchmarks-stability.md.
PROPOSED_HEALTH = {
    "z_threshold": 6.0,
    "decay": 0.99,
    "baseline_decay": 0.999,
    "vanishing_fraction": 1e-3,
}


def proposed_stable_rows(health_kwargs: dict) -> list[Row]:
    """Two candidates for `gx.stable`'s defaults, built from explicit arguments:

    A: today's chain plus `adaptive_grad_clip(0.01)` after the optimizer (each unit's update is
       at most 1% of its weights' norm: a scale-free trust-ratio bound on the step itself);
    B: `zclip` keeps its own absolute cap (`max_norm=1.0`, the issue's ZClip default).
    """

    def build(clipped_opt):
        def make(opt):
            guarded = gx.skip_if(clipped_opt(opt), norm_z=6.0, max_norm_ratio=100.0)
            return gx.health(guarded, **health_kwargs)

        return make

    groups = ("healthy", "explode", "inject", "vanish")
    a = lambda opt: gx.chain(gx.zclip(max_norm=None), opt, gx.adaptive_grad_clip(0.01))
    b = lambda opt: gx.chain(gx.zclip(max_norm=1.0), opt)
    return [
        Row("proposed A: stable + update AGC", build(a), groups, True),
        Row("proposed B: stable, zclip cap 1", build(b), groups, True),
    ]


# ---------------------------------------------------------------------------- telemetry in the scan


def records(state: Any) -> tuple:
    """The telemetry records of `state` (`gx.telemetry_records`), history buffers emptied:
    small enough to emit per step of the scan, and `gx.read_health` reads the tuple."""
    history = ("norms", "losses")
    return tuple(
        record._replace(**{f: jnp.zeros([0]) for f in history if f in record._fields})
        for _, record in gx.telemetry_records(state)
    )


def step_telemetry(recs: tuple, params: dict) -> dict[str, jax.Array]:
    """Per-step scalars for the table, from the records of one lane (and its params, for the
    statistics the vanishing flag thresholds: the smallest leaf RMS relative to the largest,
    and the smallest update ratio among non-zero leaves)."""
    health = next(r for r in recs if isinstance(r, gx.HealthState))
    p_leaves = jax.tree.leaves(params)
    rms = health.leaf_norms / jnp.sqrt(jnp.array([max(p.size, 1) for p in p_leaves], jnp.float32))
    ratios = health.update_ratios
    nonzero = jnp.stack([gx.global_norm(p) > 0 for p in p_leaves])
    out = {
        "exploding": health.exploding,
        "vanishing": health.vanishing,
        "z": health.z_score,
        "growth": health.growth,
        "min_rms_fraction": jnp.min(rms) / jnp.max(rms),
        "min_ratio": jnp.min(jnp.where(nonzero, ratios, jnp.inf)),
        "ratio": health.per_leaf("update_ratios")["layer_00"]["w"],  # the first layer's kernel
        "skipped": jnp.zeros([], bool),
        "clipped": jnp.zeros([], bool),
    }
    for r in recs:
        if isinstance(r, gx.SkipIfState):
            out["skipped"] |= r.skipped
        elif isinstance(getattr(r, "record", None), gx.ClipRecord):
            out["clipped"] |= jnp.any(r.record.clipped)
    return out


# ----------------------------------------------------------------------------- training


@dataclass(frozen=True)
class Group:
    """Runs trained together (same architecture, optimizer family and length): each row with
    the settings it applies to."""

    arch: Arch
    family: str
    steps: int
    runs: tuple[tuple[Row, tuple[Setting, ...]], ...]


def group_runs(sets: Sequence[Setting], all_rows: Sequence[Row]) -> list[Group]:
    groups: dict[tuple, list[Setting]] = {}
    for s in sets:
        groups.setdefault((s.arch, s.family, s.steps), []).append(s)
    out = []
    for (arch, family, steps), members in groups.items():
        runs = []
        for row in all_rows:
            mine = tuple(s for s in members if s.group in row.groups)
            if mine:
                runs.append((row, mine))
        out.append(Group(arch, family, steps, tuple(runs)))
    return out


def train_group(
    group: Group, data: Digits, seeds: int, health_kwargs: dict, batch: int = 64
) -> tuple[dict[str, np.ndarray], dict[tuple[str, str], slice], list]:
    """Train every (row, setting, seed) of `group` as one lane of a vmapped scan.

    Returns per-step arrays `(steps, lanes)` and final metrics `(lanes,)`, the lanes of each
    `(row name, setting name)`, and per row the per-step records of seed 0 of its settings.
    """
    arch = group.arch
    lanes: list[tuple[int, Setting, int]] = []  # (row index, setting, seed), rows contiguous
    where: dict[tuple[str, str], slice] = {}
    spans = []
    for r, (row, sets) in enumerate(group.runs):
        first = len(lanes)
        for s in sets:
            where[row.name, s.name] = slice(len(lanes), len(lanes) + seeds)
            lanes += [(r, s, seed) for seed in range(seeds)]
        spans.append((first, len(lanes)))
    per_lane = lambda attr, dtype: jnp.asarray([getattr(s, attr) for _, s, _ in lanes], dtype)
    lr, scale = per_lane("lr", jnp.float32), per_lane("init_scale", jnp.float32)
    spike, spike_every = per_lane("spike", jnp.float32), per_lane("spike_every", jnp.int32)
    nan_every = per_lane("nan_every", jnp.int32)
    seed_of = jnp.asarray([seed for _, _, seed in lanes], jnp.int32)
    idx = np.stack([batch_indices(len(data.y_train), batch, group.steps, s) for s in range(seeds)])
    idx = jnp.asarray(idx.transpose(1, 0, 2))  # (steps, seeds, batch)
    keys = jax.random.split(jax.random.key(0), seeds)[seed_of]
    x_train, y_train = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    n_lanes = len(lanes)

    def make(row: Row, lane_lr):
        tx = row.build(base_optimizer(group.family, lane_lr))
        return tx if row.has_health else gx.health(tx, **health_kwargs)

    def run(keys, idx):
        params = jax.vmap(arch.init)(keys, scale)
        part = lambda tree, a, b: jax.tree.map(lambda x: x[a:b], tree)
        states = tuple(
            jax.vmap(lambda p, r, row=row: make(row, r).init(p))(part(params, a, b), lr[a:b])
            for (row, _), (a, b) in zip(group.runs, spans, strict=True)
        )

        def step(carry, xs):
            params, states = carry
            t, ib = xs
            ib = ib[seed_of]  # (lanes, batch)
            loss, grads = jax.vmap(jax.value_and_grad(arch.loss))(params, x_train[ib], y_train[ib])
            raw_norm = jax.vmap(gx.global_norm)(grads)
            at = lambda every: (every > 0) & ((t + 1) % jnp.maximum(every, 1) == 0)
            factor = jnp.where(at(nan_every), jnp.nan, jnp.where(at(spike_every), spike, 1.0))
            grads = jax.tree.map(
                lambda g: g * factor.reshape((n_lanes,) + (1,) * (g.ndim - 1)), grads
            )
            new_params, new_states, tele, recs = [], [], [], []
            for (row, _), (a, b), state in zip(group.runs, spans, states, strict=True):

                def update(g, s, p, lane_lr, row=row):
                    u, s = make(row, lane_lr).update(g, s, p)
                    rec = records(s)
                    return optax.apply_updates(p, u), s, step_telemetry(rec, p), rec

                p, s, tel, rec = jax.vmap(update)(
                    part(grads, a, b), state, part(params, a, b), lr[a:b]
                )
                new_params.append(p)
                new_states.append(s)
                tele.append(tel)
                recs.append(jax.tree.map(lambda x: x[::seeds], rec))  # seed 0 of each setting
            params = jax.tree.map(lambda *ps: jnp.concatenate(ps), *new_params)
            tele = jax.tree.map(lambda *xs: jnp.concatenate(xs), *tele)
            per_step = {"loss": loss, "raw_norm": raw_norm, "injected": factor != 1.0, **tele}
            return (params, tuple(new_states)), (per_step, tuple(recs))

        steps = jnp.arange(group.steps, dtype=jnp.int32)
        (params, _), (per_step, recs) = jax.lax.scan(step, (params, states), (steps, idx))
        evaluate = lambda x, y: jax.vmap(lambda p: _metrics(arch, p, x, y))(params)
        train_loss, _ = evaluate(x_train, y_train)
        _, test_acc = evaluate(jnp.asarray(data.x_test), jnp.asarray(data.y_test))
        finite = jax.vmap(lambda p: jnp.isfinite(gx.global_norm(p)))(params)
        return per_step, {"train_loss": train_loss, "test_acc": test_acc, "finite": finite}, recs

    per_step, final, recs = jax.jit(run)(keys, idx)
    out = {k: np.asarray(v) for k, v in {**per_step, **final}.items()}
    return out, where, recs


def _metrics(arch: Arch, params: dict, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits = arch.apply(params, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == y)


# ----------------------------------------------------------------------------- summary


def loss_spikes(loss: np.ndarray) -> np.ndarray:
    """Per run (last axis = steps): steps with loss > 2x the median of the previous 20 steps
    and > 0.5 above it."""
    if loss.shape[-1] <= SPIKE_WINDOW:
        return np.zeros(loss.shape[:-1], int)
    windows = np.lib.stride_tricks.sliding_window_view(loss[..., :-1], SPIKE_WINDOW, axis=-1)
    with np.errstate(invalid="ignore"):
        med = np.median(windows, axis=-1)
        now = loss[..., SPIKE_WINDOW:]
        return np.sum((now > SPIKE_RATIO * med) & (now > med + SPIKE_MARGIN), axis=-1)


def _first(flags: np.ndarray) -> np.ndarray:
    """Index of the first True along the last axis, or -1."""
    return np.where(flags.any(-1), flags.argmax(-1), -1)


def _median(values) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.median(values)) if values else None


def _vanishing_trigger(x: np.ndarray, patience: int = PATIENCE) -> np.ndarray:
    """Per run: the largest bound that `x` (steps on the last axis) stays below for `patience`
    consecutive steps somewhere, i.e. the threshold above which `health` would flag it.
    Non-finite values count as not low, as in `health`."""
    x = np.where(np.isfinite(x), x, np.inf)
    if x.shape[-1] < patience:
        return np.full(x.shape[:-1], 0.0)
    return np.lib.stride_tricks.sliding_window_view(x, patience, axis=-1).max(-1).min(-1)


def summarise(setting: Setting, row: Row, o: dict[str, np.ndarray]) -> dict[str, Any]:
    """One table row from the arrays of one (row, setting): per-step (steps, seeds)."""
    loss, raw = o["loss"].T, o["raw_norm"].T  # (seeds, steps)
    nonfinite_loss = ~np.isfinite(loss)
    failed = nonfinite_loss.any(-1) | ~o["finite"] | ~(o["train_loss"] <= FAIL_LOSS)
    # first non-finite value the model produced: a loss or its own (pre-injection) gradient
    first_bad = _first(nonfinite_loss | ~np.isfinite(raw))
    first_flag = _first(o["exploding"].T)
    leads, flagged = [], 0
    for bad, flag in zip(first_bad, first_flag, strict=True):
        if bad >= 0:
            ok = 0 <= flag < bad
            flagged += ok
            leads.append(float(bad - flag) if ok else None)
    injected = o["injected"].T
    explode_flags = o["exploding"].T.sum(-1)
    vanish_first = _first(o["vanishing"].T)
    finite_raw = np.where(np.isfinite(raw), raw, np.nan)
    max_norm = np.nanmax(np.where(np.isnan(finite_raw).all(-1, keepdims=True), 0, finite_raw), -1)
    ratio = o["ratio"].T
    before = (
        np.arange(loss.shape[1])[None] < np.where(first_bad >= 0, first_bad, loss.shape[1])[:, None]
    )
    peak = lambda x: np.max(np.where(before & np.isfinite(x), x, -np.inf), -1)
    max_z, max_growth = peak(o["z"].T), peak(o["growth"].T)
    trigger = lambda x, by=None: _vanishing_trigger(x[:, :by] if by else x)
    rms_100, ratio_100 = (
        trigger(o["min_rms_fraction"].T, VANISH_BY),
        trigger(o["min_ratio"].T, VANISH_BY),
    )
    rms_all, ratio_all = trigger(o["min_rms_fraction"].T), trigger(o["min_ratio"].T)
    return {
        "setting": setting.name,
        "group": setting.group,
        "row": row.name,
        "seeds": int(loss.shape[0]),
        "fail_fraction": float(failed.mean()),
        "median_test_accuracy": float(np.median(o["test_acc"])),
        "loss_spikes_per_run": float(loss_spikes(loss).mean()),
        "max_grad_norm": float(np.median(max_norm)),
        "nonfinite_runs": int((first_bad >= 0).sum()),
        "nonfinite_flagged_before": int(flagged),
        "median_flag_lead_steps": _median(leads),
        "exploding_flags_per_run": float(explode_flags.mean()),
        "exploding_flags_outside_injections_per_run": float(
            (o["exploding"].T & ~injected).sum(-1).mean()
        ),
        "injections_flagged": f"{int((o['exploding'].T & injected).sum())}/{int(injected.sum())}",
        "vanishing_flags_per_run": float(o["vanishing"].T.sum(-1).mean()),
        "first_vanishing_step": _median([float(v + 1) for v in vanish_first if v >= 0]),
        "vanishing_within_100": int(((vanish_first >= 0) & (vanish_first < VANISH_BY)).sum()),
        "early_update_ratio_first_layer": _median(
            np.nanmedian(np.where(np.isfinite(ratio), ratio, np.nan)[:, :VANISH_BY], -1)
        ),
        "max_z": _median(max_z),
        "max_growth": _median(max_growth),
        "vanishing_trigger_rms_by_100": _median(rms_100),
        "vanishing_trigger_ratio_by_100": _median(ratio_100),
        "vanishing_trigger_rms": float(np.min(rms_all)),
        "vanishing_trigger_ratio": float(np.min(ratio_all)),
        "clipped_fraction": float(o["clipped"].mean()),
        "skipped_per_run": float(o["skipped"].T.sum(-1).mean()),
        "per_seed": {
            "failed": failed.astype(int).tolist(),
            "test_accuracy": np.round(o["test_acc"], 4).tolist(),
            "final_train_loss": [float(x) if math.isfinite(x) else None for x in o["train_loss"]],
            "first_exploding_flag": first_flag.tolist(),
            "first_nonfinite": first_bad.tolist(),
            "first_vanishing_flag": vanish_first.tolist(),
            "max_z": np.round(max_z, 2).tolist(),
            "max_growth": np.round(max_growth, 2).tolist(),
            "vanishing_trigger_rms_by_100": rms_100.tolist(),
            "vanishing_trigger_ratio_by_100": ratio_100.tolist(),
            "vanishing_trigger_rms": rms_all.tolist(),
            "vanishing_trigger_ratio": ratio_all.tolist(),
        },
    }  # fmt: skip


def goals(table: list[dict], stable_row: str = "gx.stable()") -> dict[str, Any]:
    """The issue's goals, checked against the table (`stable_row`: the row of the default)."""
    ref = next((t for t in table if t["row"] == "optax" and t["group"] == "healthy"), None)
    ref_acc = ref["median_test_accuracy"] if ref else None
    stable = [t for t in table if t["row"] == stable_row and t["group"] in ("explode", "inject")]
    explosions = [t for t in table if t["group"] in ("explode", "inject", "healthy")]
    healthy_plain = [t for t in table if t["row"] == "optax" and t["group"] == "healthy"]
    vanish = [t for t in table if t["row"] == "optax" and t["group"] == "vanish"]
    recover = {
        v["setting"]: [
            t["row"]
            for t in table
            if t["setting"] == v["setting"]
            and t["row"] != "optax"
            and t["fail_fraction"] == 0.0
            and t["median_test_accuracy"] > v["median_test_accuracy"] + 0.01
        ]
        for v in vanish
    }  # rows with no failure and a better median accuracy than plain optax, per setting
    return {
        "healthy_reference_accuracy": ref_acc,
        "stable_zero_failures": all(t["fail_fraction"] == 0.0 for t in stable) if stable else None,
        "stable_within_1pt_of_reference": (
            all(t["median_test_accuracy"] >= ref_acc - 0.01 for t in stable)
            if stable and ref else None
        ),
        "stable_worst": min(
            ((t["median_test_accuracy"], t["setting"]) for t in stable), default=None
        ),
        "every_explosion_flagged_before_nonfinite": all(
            t["nonfinite_flagged_before"] == t["nonfinite_runs"] for t in explosions
        ),
        "unflagged_explosions": [
            (t["setting"], t["row"], t["nonfinite_runs"] - t["nonfinite_flagged_before"])
            for t in explosions if t["nonfinite_flagged_before"] < t["nonfinite_runs"]
        ],
        "flags_per_run_on_healthy_reference": {
            t["setting"]: (t["exploding_flags_per_run"], t["vanishing_flags_per_run"])
            for t in healthy_plain
        },
        "no_flags_on_healthy_reference": all(
            t["exploding_flags_per_run"] == 0 and t["vanishing_flags_per_run"] == 0
            for t in healthy_plain
        ),
        "vanishing_flagged_within_100": all(
            t["vanishing_within_100"] == t["seeds"] for t in vanish
        ),
        "remedies_recovering_setting_3": recover,
    }  # fmt: skip


# ----------------------------------------------------------------------------- report


COLUMNS = [
    ("row", "row", "{}"),
    ("fail", "fail_fraction", "{:.1f}"),
    ("acc", "median_test_accuracy", "{:.3f}"),
    ("spikes", "loss_spikes_per_run", "{:.1f}"),
    ("max|g|", "max_grad_norm", "{:.3g}"),
    ("nf flagged", None, None),
    ("lead", "median_flag_lead_steps", "{:.0f}"),
    ("expl/run", "exploding_flags_per_run", "{:.1f}"),
    ("inj flagged", "injections_flagged", "{}"),
    ("van@", "first_vanishing_step", "{:.0f}"),
    ("ratio@100", "early_update_ratio_first_layer", "{:.1e}"),
    ("clip%", "clipped_fraction", "{:.0%}"),
    ("skip/run", "skipped_per_run", "{:.1f}"),
]


def _cell(t: dict, head: str, key: str | None, fmt: str | None) -> str:
    if head == "nf flagged":
        return f"{t['nonfinite_flagged_before']}/{t['nonfinite_runs']}"
    return "-" if t[key] is None else fmt.format(t[key])


def format_table(table: list[dict], markdown: bool = False) -> str:
    """The results as plain text blocks per setting, or as one Markdown table."""
    if markdown:
        heads = ["setting"] + [h.replace("|", "\\|") for h, _, _ in COLUMNS]
        lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        previous = None
        for t in table:
            name = t["setting"] if t["setting"] != previous else ""
            previous = t["setting"]
            cells = [name] + [_cell(t, h, k, f) for h, k, f in COLUMNS]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        return "\n".join(lines)
    lines = []
    for setting in dict.fromkeys(t["setting"] for t in table):
        block = [t for t in table if t["setting"] == setting]
        cells = [[_cell(t, h, k, f) for h, k, f in COLUMNS] for t in block]
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (h, _, _) in enumerate(COLUMNS)]
        line = lambda cs, widths=widths: "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cs, widths, strict=True))
        )
        lines += ["", f"== {setting}", line([h for h, _, _ in COLUMNS])]
        lines += [line(c) for c in cells]
    return "\n".join(lines)


def plot_summary(table: list[dict], path: Path) -> None:
    """Heatmap of fail fraction (colour) and median accuracy (text), rows x settings."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    row_names = list(dict.fromkeys(t["row"] for t in table))
    set_names = list(dict.fromkeys(t["setting"] for t in table))
    fail = np.full((len(row_names), len(set_names)), np.nan)
    acc = np.full_like(fail, np.nan)
    for t in table:
        i, j = row_names.index(t["row"]), set_names.index(t["setting"])
        fail[i, j], acc[i, j] = t["fail_fraction"], t["median_test_accuracy"]
    # Sized to be read at a documentation page's width (about 900 px): few inches, large text.
    fig = Figure(figsize=(0.85 * len(set_names) + 2.6, 0.42 * len(row_names) + 2.4))
    fig.set_layout_engine("constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(fail, cmap="Reds", vmin=0, vmax=1, aspect="auto")
    for i in range(len(row_names)):
        for j in range(len(set_names)):
            if not np.isnan(fail[i, j]):
                color = "white" if fail[i, j] > 0.5 else "black"
                ax.text(j, i, f"{acc[i, j]:.2f}", ha="center", va="center", fontsize=9, color=color)
    ax.set_xticks(range(len(set_names)), set_names, rotation=35, ha="right", fontsize=9)
    ax.set_yticks(range(len(row_names)), row_names, fontsize=9)
    ax.set_title("fail fraction (colour), median test accuracy (text)", fontsize=10)
    fig.colorbar(image, ax=ax, label="fail fraction", fraction=0.03)
    fig.savefig(path, dpi=110)


def history(recs: tuple, setting_index: int) -> list[dict[str, float]]:
    """`read_health` dicts per step for seed 0 of one setting, from the scan's records."""
    host = jax.device_get(jax.tree.map(lambda x: x[:, setting_index], recs))
    steps = jax.tree.leaves(host)[0].shape[0]
    return [gx.read_health(jax.tree.map(lambda x, t=t: x[t], host)) for t in range(steps)]


# ----------------------------------------------------------------------------- entry point


@dataclass
class Options:
    seeds: int = 10
    steps: int = 1500
    vanish_steps: int = 2000
    settings: Sequence[Setting] | None = None  # None: `settings(steps, vanish_steps)`
    rows: Sequence[str] | None = None  # row names to keep; None: all
    health_kwargs: dict = field(default_factory=dict)
    stable_kwargs: dict = field(default_factory=dict)
    extra_rows: Sequence[Row] = ()  # e.g. candidate defaults, built from explicit arguments
    save_steps: Path | None = None  # write every per-step array here (.npz), for offline analysis
    name: str = "stability"  # prefix of the files written under `out`
    plots: dict[str, tuple[str, str]] = field(
        default_factory=lambda: {
            "explode": ("gx.stable()", "1b SGD lr 0.1"),
            "explode_plain": ("optax", "1a SGD lr 0.05"),
            "vanish": ("optax", "3a 20x50 at 0.5x He, SGD lr 0.01"),
        }
    )


def run_benchmark(opts: Options, out: Path | None = None, log=print) -> dict[str, Any]:
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    data = load_digits()
    sets = list(opts.settings or settings(opts.steps, opts.vanish_steps))
    all_rows = [r for r in rows(opts.stable_kwargs) if opts.rows is None or r.name in opts.rows]
    all_rows += list(opts.extra_rows)
    table, timings, plotted, saved = [], {}, {}, {}
    start = time.perf_counter()
    for group in group_runs(sets, all_rows):
        t0 = time.perf_counter()
        o, where, recs = train_group(group, data, opts.seeds, opts.health_kwargs)
        label = f"{group.arch.describe()}, {group.family}, {group.steps} steps"
        timings[label] = round(time.perf_counter() - t0, 1)
        log(
            f"[{timings[label]:6.1f} s] {label}: "
            f"{len(where)} row x setting pairs x {opts.seeds} seeds"
        )
        for r, (row, row_sets) in enumerate(group.runs):
            for k, setting in enumerate(row_sets):
                lanes = where[row.name, setting.name]
                table.append(summarise(setting, row, {n: v[..., lanes] for n, v in o.items()}))
                if opts.save_steps is not None:
                    saved.update(
                        {f"{row.name}|{setting.name}|{n}": v[..., lanes] for n, v in o.items()}
                    )
                tags = [tag for tag, key in opts.plots.items() if key == (row.name, setting.name)]
                if out is not None and tags:
                    hist = history(recs[r], k)
                    for tag in tags:
                        path = out / f"{opts.name}_health_{tag}.png"
                        plot_health(hist, path, title=f"{row.name}, {setting.name}, seed 0")
                        plotted[tag] = {"row": row.name, "setting": setting.name, "path": path.name}
    if opts.save_steps is not None:
        np.savez_compressed(opts.save_steps, **saved)
    order = {s.name: k for k, s in enumerate(sets)}
    table.sort(key=lambda t: order[t["setting"]])
    result = {
        "benchmark": "stability",
        "machine": machine.describe(("jax", "jaxlib", "optax", "numpy", "scikit-learn")),
        "options": {
            "seeds": opts.seeds,
            "steps": opts.steps,
            "vanish_steps": opts.vanish_steps,
            "health_kwargs": opts.health_kwargs,
            "stable_kwargs": opts.stable_kwargs,
            "settings": [dataclasses.asdict(s) for s in sets],
        },
        "runtime_s": round(time.perf_counter() - start, 1),
        "group_runtime_s": timings,
        "goals": goals(table),
        **{
            f"goals [{name}]": goals(table, name)
            for name in dict.fromkeys(t["row"] for t in table)
            if name.startswith("proposed")
        },
        "rows": table,
        "plots": plotted,
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{opts.name}.json").write_text(json.dumps(result, indent=1))
        (out / f"{opts.name}.md").write_text(format_table(table, markdown=True) + "\n")
        plot_summary(table, out / f"{opts.name}.png")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="3 seeds, 600/800 steps")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--health", type=json.loads, default={}, help="gx.health kwargs, JSON")
    parser.add_argument("--stable", type=json.loads, default={}, help="gx.stable kwargs, JSON")
    parser.add_argument(
        "--proposed",
        action="store_true",
        help="the proposed defaults: PROPOSED_HEALTH in every health record, plain optax and "
        "the two `proposed` stable rows only; writes stability_proposed.*",
    )
    args = parser.parse_args(argv)
    opts = Options(seeds=args.seeds, health_kwargs=args.health, stable_kwargs=args.stable)
    if args.proposed:
        health_kwargs = {**PROPOSED_HEALTH, **args.health}
        opts = dataclasses.replace(
            opts,
            health_kwargs=health_kwargs,
            rows=["optax"],
            extra_rows=proposed_stable_rows(health_kwargs),
            name="stability_proposed",
            plots={
                "explode": ("proposed A: stable + update AGC", "1b SGD lr 0.1"),
                "vanish": ("optax", "3b 20x50 at 0.7x He, SGD lr 0.01"),
            },
        )
    if args.quick:
        opts = dataclasses.replace(opts, seeds=min(args.seeds, 3), steps=600, vanish_steps=800)
    args.out.mkdir(parents=True, exist_ok=True)
    result = run_benchmark(opts, args.out, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_table(result["rows"]))
    print()
    print(json.dumps({k: v for k, v in result.items() if k.startswith("goals")}, indent=1))
    cpu, cores = result["machine"]["cpu"], result["machine"]["cpu_count"]
    print(f"\n{result['runtime_s']} s on {cpu} ({cores} cores)")
    return result


if __name__ == "__main__":
    main()
