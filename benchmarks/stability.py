"""Stability suite: healthy and unstable training runs on which `gx.stable` is judged.

    python benchmarks/stability.py                  # 4 seeds, every family (15-25 minutes)
    python benchmarks/stability.py --quick          # 2 seeds, shorter runs, every family
    python benchmarks/stability.py --families mlp gpt --seeds 3 --out /tmp/results

Six architecture families (`benchmarks/suite_models.py`: ReLU MLP, GroupNorm CNN, LSTM,
character GPT on standard-library source, LoRA fine-tuning of a model pretrained here, scanned
residual layers), each with healthy settings and unstable ones of six kinds: learning rate x10
or more (SGD and Adam), no warm-up, corrupt batches (inputs or loss x1000), NaN batches,
exploding recurrent gradients, float16 overflow. A fixed table (`SETTINGS`) marks each setting
`tune` (defaults may be chosen on it) or `held-out` (reported only); every family is in both.

Two rows per setting, with PAIRED seeds (same init, same batch order): `optax`, the plain
optimizer, and `gx.stable(optax)` with default arguments around the same optimizer object.
Both get `update(grads, state, params, loss=loss)`. `--reference-clip` adds a third row,
`optax+clip(1)`: the textbook remedy, `optax.clip_by_global_norm(1.0)` before the optimizer,
a constant threshold that shows which unstable runs a fixed clip would rescue. The seeds of
one (setting, row) train as lanes of one jitted, vmapped `lax.scan`: one compile each.

Measured per (setting, row):
  fail        seeds with a non-finite loss on a step without injection, non-finite params, or
              a final quality past the family's bound (accuracy < 0.2; held-out loss above
              the unigram entropy of the training text)
  quality     final test accuracy, or held-out loss (nats per character) for `gpt`
  gap         paired difference to the same seed's healthy `optax` run of the setting named
              as reference: accuracy points, or percent of the loss (positive = worse);
              `within_1`: no failure and a mean gap of at most 1
  spikes      loss spikes per run on steps without injection: loss > 2x the median of the
              previous 20 steps and > 0.5 above it
  guard rates per guard, the fraction of steps on which it acted: every field named
              `clipped` or `skipped` of every record in `gx.telemetry_records(state)`, read
              inside the scan at every step (any entry true), named `<record>/<field>`
  step time   per family, one jitted training step of one run, `optax` vs `gx.stable`,
              alternating, medians and their ratio
Healthy settings also report the paired difference stable - optax and the seed noise (std of
optax's quality across seeds).

Writes `stability.json`, `stability.md` and `stability.png` under `--out`, prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
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
from benchmarks.suite_models import SETTINGS, Model, Setting, cross_entropy

GUARD_FIELDS = ("clipped", "skipped")
ROWS = ("optax", "gx.stable")
CLIP_ROW = "optax+clip(1)"  # `--reference-clip`: the textbook remedy, a fixed threshold
HEALTH_ROW = "optax+health"  # the plain optimizer under `stable`'s statistics, no guard
CORRUPT_FACTOR = 1000.0
SPIKE_WINDOW, SPIKE_RATIO, SPIKE_MARGIN = 20, 2.0, 0.5
BATCH = {"gpt": 16}  # batch size per family; 64 otherwise
STEPS = {"gpt": 450}  # steps per family at full size; 600 otherwise


# ----------------------------------------------------------------------------- rows


def schedule(peak: jax.Array, warmup: jax.Array, decay: jax.Array, steps: int):
    """Learning rate at step `count`: linear warm-up from 0 over `warmup` steps, then (if
    `decay`) cosine decay to `peak / 10` at `steps`, as `optax.warmup_cosine_decay_schedule`.
    Arguments may be traced (one value per lane)."""

    def lr(count: jax.Array) -> jax.Array:
        c = count.astype(jnp.float32)
        warm = jnp.minimum(1.0, c / jnp.maximum(warmup, 1.0))
        frac = jnp.clip((c - warmup) / jnp.maximum(steps - warmup, 1.0), 0.0, 1.0)
        cosine = 0.1 + 0.45 * (1.0 + jnp.cos(jnp.pi * frac))
        return peak * jnp.where(warmup > 0, warm, 1.0) * jnp.where(decay, cosine, 1.0)

    return lr


def base_optimizer(kind: str, lr) -> optax.GradientTransformationExtraArgs:
    """The plain optax optimizer (`sgd` with momentum 0.9, `adam`, `adamw` with weight decay
    0.01) at learning rate (or schedule) `lr`, accepting and ignoring `loss=`."""
    make = {
        "sgd": lambda: optax.sgd(lr, momentum=0.9),
        "adam": lambda: optax.adam(lr),
        "adamw": lambda: optax.adamw(lr, weight_decay=0.01),
    }
    return optax.with_extra_args_support(make[kind]())


def build_row(row: str, opt: optax.GradientTransformationExtraArgs):
    """`optax`: the optimizer itself; `gx.stable`: `gx.stable(opt)` with default arguments;
    `optax+clip(1)`: `optax.clip_by_global_norm(1.0)` before it (a reference, not a guard:
    a constant threshold that acts whenever ||g|| > 1, healthy steps included);
    `optax+health`: `gx.health(opt)` with `stable`'s decay of the running moments (0.9), a
    record of the statistics a guard would see, changing nothing."""
    if row == CLIP_ROW:
        return optax.with_extra_args_support(optax.chain(optax.clip_by_global_norm(1.0), opt))
    if row == HEALTH_ROW:
        return gx.health(opt, decay=0.9)
    return opt if row == "optax" else gx.stable(opt)


def _field_name(key: Any) -> str | None:
    return getattr(key, "name", getattr(key, "key", None))


def guard_flags(state: Any) -> dict[str, jax.Array]:
    """Whether each guard in `state` acted on its last step: `{"<record>/<field>": bool}`.

    Generic by field name: every leaf of every telemetry record whose field is named `clipped`
    or `skipped` (a bool, or a per-leaf bool vector: any), so a guard with new record names is
    measured without changing this function. Works on traced states (inside the scan).
    A guard inside the state that `skip_if` leaves untouched on a skipped step keeps its last
    record there, so its flag repeats the previous step's on skipped steps."""
    flags: dict[str, jax.Array] = {}
    for name, record in gx.telemetry_records(state):
        for path, leaf in jax.tree_util.tree_leaves_with_path(record):
            field = _field_name(path[-1]) if path else None
            if field in GUARD_FIELDS:
                key = f"{name}/{field}"
                flags[key] = flags.get(key, jnp.zeros([], bool)) | jnp.any(leaf)
    return flags


# ----------------------------------------------------------------------------- training


def value_and_grad(model: Model, setting: Setting, params, x, y, mult):
    """The batch loss (times `mult`: NaN or a spike on injected steps) and its gradient.

    With `fp16_scale` (mixed precision with a fixed loss scale): forward and backward in
    float16 (params and inputs cast), the loss in float32 times the scale, the gradient
    unscaled in float32; cotangents above float16's 65504 overflow to inf."""
    if not setting.fp16_scale:
        return jax.value_and_grad(lambda p: model.loss(p, x, y) * mult)(params)
    half = lambda t: jax.tree.map(lambda a: a.astype(jnp.float16), t)
    x = half(x) if jnp.issubdtype(x.dtype, jnp.floating) else x

    def scaled(p):
        logits = model.apply(half(p), x).astype(jnp.float32)
        return cross_entropy(logits, y) * mult * setting.fp16_scale

    loss, grads = jax.value_and_grad(scaled)(params)
    return loss / setting.fp16_scale, jax.tree.map(lambda g: g / setting.fp16_scale, grads)


INJECT_MODES = {"nan": 1, "inputs": 2, "loss": 3}  # 0: nothing injected


def injections(setting: Setting, steps: int) -> np.ndarray:
    """bool (steps,): the steps on which the batch is corrupted or NaN."""
    hit = np.zeros(steps, bool)
    if setting.kind in ("corrupt", "nan") and setting.every:
        hit[setting.every - 1 :: setting.every] = True
    return hit


def group_key(setting: Setting) -> tuple:
    """Settings that differ only in per-lane values (learning rate, schedule, injections)
    train in one scan; the model, optimizer kind and float16 path are compiled in."""
    return setting.family, setting.model, setting.optimizer, setting.fp16_scale


def lane_values(sets: Sequence[Setting], seeds: int, steps: int) -> dict[str, jax.Array]:
    """Per-lane hyperparameters, lanes ordered (setting, seed)."""

    def mode(s: Setting) -> int:
        if s.kind == "nan":
            return INJECT_MODES["nan"]
        return INJECT_MODES[s.corrupt] if s.kind == "corrupt" else 0

    lanes = lambda f, dtype: jnp.asarray(np.repeat([f(s) for s in sets], seeds), dtype)
    return {
        "lr": lanes(lambda s: s.lr, jnp.float32),
        "warmup": lanes(lambda s: round(s.warmup * steps), jnp.float32),
        "decay": lanes(lambda s: s.schedule, bool),
        "every": lanes(lambda s: s.every if mode(s) else 0, jnp.int32),
        "mode": lanes(mode, jnp.int32),
    }


def batch_indices(n: int, batch: int, steps: int, seeds: int) -> np.ndarray:
    """int32 (steps, seeds, batch): `examples/data.py`'s `BatchOrder` per seed."""
    from examples.data import BatchOrder

    orders = [BatchOrder(n, batch, seed) for seed in range(seeds)]
    return np.stack([[o.indices(t) for o in orders] for t in range(steps)]).astype(np.int32)


def _inject(x, t, hp):
    """The batch's inputs (x1000 on a corrupt step) and loss multiplier (NaN or x1000)."""
    hit = (hp["every"] > 0) & ((t + 1) % jnp.maximum(hp["every"], 1) == 0)
    if jnp.issubdtype(x.dtype, jnp.floating):
        x = jnp.where(hit & (hp["mode"] == INJECT_MODES["inputs"]), x * CORRUPT_FACTOR, x)
    mult = jnp.where(hit & (hp["mode"] == INJECT_MODES["loss"]), CORRUPT_FACTOR, 1.0)
    return x, jnp.where(hit & (hp["mode"] == INJECT_MODES["nan"]), jnp.nan, mult)


def train_group(
    sets: Sequence[Setting], row: str, seeds: int, steps: int, record=guard_flags
) -> list[dict[str, np.ndarray]]:
    """Train `seeds` runs of each setting of one group (same `group_key`) in one row as lanes
    of one jitted scan. Per setting: per-step `loss` and one array per entry of
    `record(state)` (by default `guard_flags`: one per guard) `(steps, seeds)`, `injected`
    `(steps,)`, and per seed the final `quality` and whether params are `finite`."""
    first = sets[0]
    model = first.build()
    task = model.task
    x_train, y_train = jnp.asarray(task.x_train), jnp.asarray(task.y_train)
    x_test, y_test = jnp.asarray(task.x_test), jnp.asarray(task.y_test)
    idx = batch_indices(len(task.y_train), BATCH.get(first.family, 64), steps, seeds)
    seed_of = np.tile(np.arange(seeds), len(sets))
    make = lambda hp: build_row(
        row, base_optimizer(first.optimizer, schedule(hp["lr"], hp["warmup"], hp["decay"], steps))
    )

    def one(params, state, ib, t, hp):
        x, mult = _inject(x_train[ib], t, hp)
        loss, grads = value_and_grad(model, first, params, x, y_train[ib], mult)
        updates, state = make(hp).update(grads, state, params, loss=loss)
        return optax.apply_updates(params, updates), state, loss, record(state)

    def run(keys, idx, hp):
        params = jax.vmap(model.init)(keys)
        state = jax.vmap(lambda p, h: make(h).init(p))(params, hp)

        def step(carry, xs):
            ib, t = xs
            params, state, loss, flags = jax.vmap(one, (0, 0, 0, None, 0))(*carry, ib, t, hp)
            return (params, state), {"loss": loss, **flags}

        xs = (idx[:, seed_of], jnp.arange(steps))
        (params, _), per_step = jax.lax.scan(step, (params, state), xs)
        quality = jax.vmap(lambda p: model.quality(p, x_test, y_test))(params)
        finite = jax.vmap(lambda p: jnp.isfinite(gx.global_norm(p)))(params)
        return per_step, quality, finite

    keys = jax.random.split(jax.random.key(0, impl="rbg"), seeds)[seed_of]
    per_step, quality, finite = jax.jit(run)(
        keys, jnp.asarray(idx), lane_values(sets, seeds, steps)
    )
    out = {k: np.asarray(v) for k, v in per_step.items()}
    lanes = lambda i: slice(i * seeds, (i + 1) * seeds)
    return [
        {**{k: v[:, lanes(i)] for k, v in out.items()}, "injected": injections(s, steps),
         "quality": np.asarray(quality)[lanes(i)], "finite": np.asarray(finite)[lanes(i)]}
        for i, s in enumerate(sets)
    ]  # fmt: skip


def step_time(setting: Setting, reps: int) -> dict[str, float]:
    """Median seconds of one jitted training step of one run, `optax` vs `gx.stable`, the two
    timed alternately (`reps` each, after a compile and warm-up call)."""
    model = setting.build()
    task = model.task
    x, y = jnp.asarray(task.x_train[:64]), jnp.asarray(task.y_train[:64])
    params = model.init(jax.random.key(0))
    fns, states = {}, {}
    for row in ROWS:
        lr = schedule(setting.lr, round(setting.warmup * 1000), setting.schedule, 1000)
        tx = build_row(row, base_optimizer(setting.optimizer, lr))

        def train_step(p, s, tx=tx):
            loss, g = jax.value_and_grad(model.loss)(p, x, y)
            u, s = tx.update(g, s, p, loss=loss)
            return optax.apply_updates(p, u), s

        fns[row], states[row] = jax.jit(train_step), tx.init(params)
        jax.block_until_ready(fns[row](params, states[row]))  # compile
    times: dict[str, list[float]] = {row: [] for row in ROWS}
    for _ in range(reps):
        for row in ROWS:
            t0 = time.perf_counter()
            jax.block_until_ready(fns[row](params, states[row]))
            times[row].append(time.perf_counter() - t0)
    med = {row: float(np.median(times[row])) for row in ROWS}
    return {"optax_ms": 1e3 * med["optax"], "stable_ms": 1e3 * med["gx.stable"],
            "ratio": med["gx.stable"] / med["optax"]}  # fmt: skip


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


def _forward_fill(loss: np.ndarray, skip: np.ndarray) -> np.ndarray:
    """(seeds, steps) with the `skip` steps replaced by the previous step's value."""
    out = loss.copy()
    for t in np.flatnonzero(skip):
        out[:, t] = out[:, t - 1] if t else np.nanmedian(loss[:, 1:], axis=1)
    return out


def failures(setting: Setting, o: dict[str, np.ndarray], bound: float, metric: str) -> np.ndarray:
    """bool per seed: non-finite loss on a step without injection, non-finite params, or a
    final quality past `bound`."""
    clean = o["loss"][~o["injected"]]  # (clean steps, seeds)
    q = o["quality"]
    bad_quality = ~(q >= bound) if metric == "accuracy" else ~(q <= bound)
    return ~np.isfinite(clean).all(0) | ~o["finite"] | bad_quality


def gap(quality: np.ndarray, reference: np.ndarray, metric: str) -> np.ndarray:
    """Per seed, how much worse than the paired reference: accuracy points (x100), or percent
    of the reference loss. Positive is worse; NaN where a run has no finite quality."""
    with np.errstate(invalid="ignore"):
        if metric == "accuracy":
            return 100.0 * (reference - quality)
        return 100.0 * (quality - reference) / reference


def _mean(x: np.ndarray) -> float | None:
    x = np.asarray(x, float)
    return float(np.mean(x)) if x.size and np.isfinite(x).all() else None


def summarise(setting: Setting, row: str, o: dict, ref: dict | None, task) -> dict[str, Any]:
    """One table row from the arrays of one (setting, row); `ref`: the arrays of the
    reference healthy setting's `optax` row (None for a healthy setting's own optax row)."""
    failed = failures(setting, o, task.fail_bound, task.metric)
    loss = _forward_fill(o["loss"].T, o["injected"])
    guards = sorted(k for k in o if "/" in k)
    g = gap(o["quality"], ref["quality"], task.metric) if ref is not None else None
    within = None if g is None else bool(np.mean(g) <= 1.0 and not failed.any())
    return {
        "family": setting.family, "setting": setting.name, "kind": setting.kind,
        "split": setting.split, "row": row, "reference": setting.reference or setting.name,
        "metric": task.metric, "seeds": len(failed), "failures": int(failed.sum()),
        "quality": _mean(o["quality"]), "gap": None if g is None else _mean(g),
        "within_1": within, "spikes_per_run": float(loss_spikes(loss).mean()),
        "guard_rates": {k: float(o[k].mean()) for k in guards},
        "per_seed": {
            "failed": failed.astype(int).tolist(),
            "quality": [float(q) if math.isfinite(q) else None for q in o["quality"]],
            "gap": None if g is None else [float(v) if math.isfinite(v) else None for v in g],
        },
    }  # fmt: skip


def do_no_harm(setting: Setting, plain: dict, stable: dict, metric: str) -> dict[str, Any]:
    """Healthy setting: paired stable - optax quality (accuracy points or percent of the
    loss; positive = stable worse), its mean and the seed noise (std of optax's quality
    across seeds, same units)."""
    g = gap(stable["quality"], plain["quality"], metric)
    scale = 100.0 if metric == "accuracy" else 100.0 / np.mean(plain["quality"])
    noise = float(np.std(plain["quality"], ddof=1) * scale) if len(g) > 1 else None
    return {"family": setting.family, "setting": setting.name, "split": setting.split,
            "stable_worse_by": _mean(g), "optax_seed_std": noise,
            "stable_worse_per_seed": [float(v) for v in g]}  # fmt: skip


# ----------------------------------------------------------------------------- the suite


@dataclass
class Options:
    seeds: int = 4
    steps_scale: float = 1.0  # times the family's `STEPS`
    families: Sequence[str] | None = None  # None: all
    settings: Sequence[Setting] | None = None  # None: `SETTINGS`
    timing_reps: int = 30  # 0: no step timing
    reference_clip: bool = False  # also train `CLIP_ROW`

    @property
    def rows(self) -> tuple[str, ...]:
        return ROWS + ((CLIP_ROW,) if self.reference_clip else ())


def steps_for(family: str, scale: float) -> int:
    return max(2 * SPIKE_WINDOW, round(STEPS.get(family, 600) * scale))


def select(opts: Options) -> list[Setting]:
    """The settings to run; every unstable one brings its reference along."""
    sets = [
        s for s in (opts.settings or SETTINGS) if not opts.families or s.family in opts.families
    ]
    keys = {s.key for s in sets}
    missing = [s.key for s in sets if s.reference and f"{s.family}/{s.reference}" not in keys]
    if missing:
        raise ValueError(f"settings {missing} need their healthy reference in the run")
    return sets


def train_all(sets: list[Setting], opts: Options, log) -> dict[tuple[str, str], dict]:
    """Arrays of every (setting key, row): one scan per (group, row)."""
    groups: dict[tuple, list[Setting]] = {}
    for s in sets:
        groups.setdefault(group_key(s), []).append(s)
    results = {}
    for members in groups.values():
        steps = steps_for(members[0].family, opts.steps_scale)
        for row in opts.rows:
            t0 = time.perf_counter()
            outs = train_group(members, row, opts.seeds, steps)
            names = ", ".join(s.name for s in members)
            log(f"[{time.perf_counter() - t0:5.1f} s] {members[0].family} {row}: {names}")
            results.update({(s.key, row): o for s, o in zip(members, outs, strict=True)})
    return results


def summary(table: list[dict], harm: list[dict]) -> dict[str, Any]:
    """The issue's criteria for the `gx.stable` row, per split."""
    out = {}
    for split in ("tune", "held-out"):
        mine = [t for t in table if t["split"] == split and t["row"] == "gx.stable"]
        unstable = [t for t in mine if t["kind"] != "healthy"]
        healthy = [t for t in mine if t["kind"] == "healthy"]
        rates = [(r, g, t["family"] + "/" + t["setting"]) for t in healthy
                 for g, r in t["guard_rates"].items()]  # fmt: skip
        plain = [t for t in table if t["split"] == split and t["row"] == "optax"]
        out[split] = {
            "settings": len({(t["family"], t["setting"]) for t in mine}),
            "stable_failed_runs": sum(t["failures"] for t in unstable),
            "optax_failed_runs": sum(t["failures"] for t in plain if t["kind"] != "healthy"),
            "runs": sum(t["seeds"] for t in unstable),
            "stable_within_1": sum(bool(t["within_1"]) for t in unstable),
            "unstable_settings": len(unstable),
            "max_healthy_guard_rate": max(rates, default=None),
            "healthy_harm_beyond_noise": [
                f"{h['family']}/{h['setting']}" for h in harm if h["split"] == split
                and (h["stable_worse_by"] or 0) > max(1.0, h["optax_seed_std"] or 0)
            ],
        }  # fmt: skip
    return out


def run_benchmark(opts: Options, out: Path | None = None, log=print) -> dict[str, Any]:
    """Train every selected setting in both rows, summarise, time a step per family, and
    (with `out`) write `stability.json`, `.md` and `.png`."""
    start = time.perf_counter()
    sets = select(opts)
    results = train_all(sets, opts, log)
    table, harm = [], []
    for s in sets:
        task = s.build().task
        ref = results[f"{s.family}/{s.reference or s.name}", "optax"]
        table += [summarise(s, row, results[s.key, row], ref, task) for row in opts.rows]
        if s.kind == "healthy":
            harm.append(do_no_harm(s, results[s.key, "optax"], results[s.key, "gx.stable"],
                                   task.metric))  # fmt: skip
    timing = {}
    if opts.timing_reps:
        for family in dict.fromkeys(s.family for s in sets):
            first = next(s for s in sets if s.family == family and s.kind == "healthy")
            timing[family] = {"setting": first.name, **step_time(first, opts.timing_reps)}
            log(f"step time {family}: {timing[family]}")
    result = {
        "benchmark": "stability suite",
        "machine": machine.describe(("jax", "jaxlib", "optax", "numpy", "scikit-learn")),
        "options": {
            "seeds": opts.seeds,
            "steps_scale": opts.steps_scale,
            "steps": {s.family: steps_for(s.family, opts.steps_scale) for s in sets},
            "settings": [dataclasses.asdict(s) for s in sets],
        },
        "runtime_s": round(time.perf_counter() - start, 1),
        "summary": summary(table, harm),
        "rows": table,
        "healthy": harm,
        "step_time": timing,
    }
    if out is not None:
        write(result, out)
    return result


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "stability.json").write_text(json.dumps(result, indent=1))
    (out / "stability.md").write_text(markdown(result))
    plot_summary(result, out / "stability.png")


# ----------------------------------------------------------------------------- report


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def guard_names(table: list[dict]) -> list[str]:
    return sorted({g for t in table for g in t["guard_rates"]})


def table_rows(table: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the main table: one line per (setting, row)."""
    guards = guard_names(table)
    head = ["split", "setting", "kind", "row", "fail", "quality", "gap", "spikes", *guards]
    cells = []
    for t in table:
        q = _fmt(t["quality"], ".3f")
        g = _fmt(t["gap"], "+.1f") + ("" if t["metric"] == "accuracy" else "%")
        ok = {True: " ok", False: " !", None: ""}[t["within_1"]]
        rates = [_fmt(t["guard_rates"].get(n), ".1%") for n in guards]
        cells.append([t["split"], f"{t['family']}/{t['setting']}", t["kind"], t["row"],
                      f"{t['failures']}/{t['seeds']}", q, g + ok,
                      f"{t['spikes_per_run']:.1f}", *rates])  # fmt: skip
    return head, cells


def format_table(table: list[dict]) -> str:
    head, cells = table_rows(table)
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    line = lambda cs: "  ".join(c.ljust(w) for c, w in zip(cs, widths, strict=True)).rstrip()
    return "\n".join([line(head), *(line(c) for c in cells)])


def _md(head: list[str], cells: list[list[str]]) -> str:
    rows = [head, ["---"] * len(head), *cells]
    return "\n".join("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows)


def markdown(result: dict) -> str:
    """The report: criteria per split, do-no-harm, step time, then every (setting, row)."""
    s, m = result["summary"], result["machine"]
    crit = [[split, str(v["settings"]), f"{v['stable_failed_runs']}/{v['runs']}",
             f"{v['optax_failed_runs']}/{v['runs']}",
             f"{v['stable_within_1']}/{v['unstable_settings']}",
             "-" if v["max_healthy_guard_rate"] is None else
             "{:.1%} ({} on {})".format(*v["max_healthy_guard_rate"]),
             ", ".join(v["healthy_harm_beyond_noise"]) or "none"]
            for split, v in s.items()]  # fmt: skip
    harm = [[h["split"], f"{h['family']}/{h['setting']}", _fmt(h["stable_worse_by"], "+.2f"),
             _fmt(h["optax_seed_std"], ".2f")] for h in result["healthy"]]  # fmt: skip
    timing = [[f, t["setting"], f"{t['optax_ms']:.2f}", f"{t['stable_ms']:.2f}",
               f"{t['ratio']:.2f}"] for f, t in result["step_time"].items()]  # fmt: skip
    return "\n\n".join([
        f"# Stability suite\n\n{m['cpu']} ({m['cpu_count']} cores), load "
        f"{', '.join(f'{x:.1f}' for x in m['load_average'])} at the end, "
        f"gradxform {m['gradxform_commit']}, {result['options']['seeds']} seeds, "
        f"{result['runtime_s']} s.",
        "## gx.stable per split\n\n" + _md(
            ["split", "settings", "stable failed runs (unstable)", "optax failed runs",
             "stable within 1 point / 1%", "max guard rate on healthy", "healthy harm > noise"],
            crit),
        "## Healthy runs: stable - optax (accuracy points or % of loss, + = stable worse)\n\n"
        + _md(["split", "setting", "stable worse by", "optax seed std"], harm),
        "## Step time (one jitted step, one run, medians)\n\n"
        + _md(["family", "setting", "optax ms", "stable ms", "ratio"], timing),
        "## Every setting\n\ngap: paired, to the reference healthy optax run (points or % of "
        "loss, + = worse; ok / ! = within 1 / not). Guard columns: fraction of steps acted.\n\n"
        + _md(*table_rows(result["rows"])),
    ]) + "\n"  # fmt: skip


def plot_summary(result: dict, path: Path) -> None:
    """Left: gap to the healthy run per unstable setting, both rows, failures marked. Right:
    largest guard rate of `gx.stable` per setting (healthy settings: false interventions)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    table = result["rows"]
    names = list(dict.fromkeys(f"{t['family']}/{t['setting']}" for t in table))
    label = {n: n + (" *" if t["split"] == "held-out" else "")
             for t in table for n in [f"{t['family']}/{t['setting']}"]}  # fmt: skip
    fig = Figure(figsize=(10, 0.28 * len(names) + 1.6))
    fig.set_layout_engine("constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, sharey=True, width_ratios=(3, 2))
    y = {n: i for i, n in enumerate(names)}
    for k, (row, color) in enumerate((("optax", "tab:gray"), ("gx.stable", "tab:blue"))):
        mine = [t for t in table if t["row"] == row]
        ys = [y[f"{t['family']}/{t['setting']}"] + (k - 0.5) * 0.4 for t in mine]
        gaps = [min(t["gap"], 30.0) if t["gap"] is not None else 30.0 for t in mine]
        left.barh(ys, gaps, height=0.4, color=color, label=row)
        fails = [(yy, 30.0) for yy, t in zip(ys, mine, strict=True) if t["failures"]]
        if fails:
            left.plot(*zip(*[(x, yy) for yy, x in fails], strict=True), "rx", ms=6)
    left.axvline(1.0, color="k", lw=0.8, ls="--")
    left.set_xlabel("gap to healthy optax (points or % loss, capped at 30; x = failures)")
    left.legend(loc="lower right", fontsize=8)
    stable = [t for t in table if t["row"] == "gx.stable"]
    top = [max(t["guard_rates"].values(), default=0.0) for t in stable]
    right.barh([y[f"{t['family']}/{t['setting']}"] for t in stable], top, color="tab:orange")
    right.axvline(0.01, color="k", lw=0.8, ls="--")
    right.set_xlabel("gx.stable: largest guard rate")
    left.set_yticks(range(len(names)), [label[n] for n in names], fontsize=8)
    left.invert_yaxis()
    fig.suptitle("Stability suite (* = held out)", fontsize=10)
    fig.savefig(path, dpi=100)


# ----------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=None, help="default 4 (--quick: 2)")
    parser.add_argument("--quick", action="store_true", help="2 seeds, 1/3 of the steps")
    parser.add_argument("--families", nargs="+", default=None, help="default: all six")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--reference-clip", action="store_true", help=f"also train a `{CLIP_ROW}` row"
    )
    args = parser.parse_args(argv)
    opts = Options(families=args.families, reference_clip=args.reference_clip)
    if args.quick:
        opts = dataclasses.replace(opts, seeds=2, steps_scale=1 / 3, timing_reps=10)
    if args.seeds is not None:
        opts.seeds = args.seeds
    result = run_benchmark(opts, args.out, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_table(result["rows"]))
    print(json.dumps(result["summary"], indent=1))
    cpu, cores = result["machine"]["cpu"], result["machine"]["cpu_count"]
    print(f"\n{result['runtime_s']} s on {cpu} ({cores} cores)")
    return result


if __name__ == "__main__":
    main()
