"""Could the run's own statistics tell a failing run from a healthy one, early enough?

    python benchmarks/stability_signals.py                  # 2 seeds, every family (75 s, 2 cores)
    python benchmarks/stability_signals.py --families mlp lora --seeds 4

The stability suite's settings without injected batches (healthy, too-high learning rate, no
warm-up, exploding recurrent gradients) train with the plain optimizer under `gx.health` with
`stable`'s running moments (decay 0.9, 20-step warm-up): the statistics a guard would see,
recorded, changing nothing. Three candidate signals of a step that is too large, per run:

  norm z   z-score of log ||g|| against its running moments, spread at least 0.25
           (`health/z_score`: what `gx.stable` clips at 4 and skips at 6)
  climb    how far the norm has climbed: exp(running level - ~1000-step baseline) of log ||g||
           (`health/log_norm_mean` - `health/baseline_mean`)
  loss z   the same z-score as `norm z`, of the log loss against its own running moments

For each signal: the largest value after the warm-up and the first step past a bound (4 for
the z-scores, 4x for the climb). A signal could drive a default guard only if the failing
runs pass the largest value that healthy runs reach, and early. Writes `signals.json` and
`signals.md` under `--out`, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gradxform as gx
from benchmarks import machine
from benchmarks import stability as suite
from benchmarks.suite_models import SETTINGS, Setting
from gradxform._moments import LOG_NORM_MIN_STD, moments_init, moments_update, moments_zscore

KINDS = ("healthy", "lr", "warmup", "recurrent")  # no injected batches: a guard's easy cases
SIGNALS = {"norm_z": 4.0, "climb": 4.0, "loss_z": 4.0}  # signal: the bound of "first past"
WARMUP, DECAY = 20, 0.9  # `stable`'s running moments


def health_signals(state: Any) -> dict[str, jax.Array]:
    """Per step, from the `gx.health` record in `state`: `norm_z` and `climb`."""
    record = dict(gx.telemetry_records(state))["health"]
    return {
        "norm_z": record.z_score,
        "climb": jnp.exp(record.log_norm.mean - record.baseline.mean),
    }


@jax.jit
def loss_zscores(loss: jax.Array) -> jax.Array:
    """float32 (steps, runs): z-score of each step's log loss against the running moments of
    the steps before it (as `health/z_score` is of log ||g||: 0 during the warm-up, non-finite
    losses not absorbed)."""

    def step(moments, row):
        x = jnp.log(jnp.maximum(row, 1e-30))
        z = jax.vmap(lambda m, x: moments_zscore(m, x, WARMUP, LOG_NORM_MIN_STD))(moments, x)
        absorb = jax.vmap(lambda m, x, ok: moments_update(m, x, DECAY, WARMUP, ok))
        return absorb(moments, x, jnp.isfinite(row)), z

    runs = loss.shape[1]
    start = jax.tree.map(lambda a: jnp.broadcast_to(a, (runs,)), moments_init())
    return jax.lax.scan(step, start, loss.astype(jnp.float32))[1]


def _after_warmup(x: np.ndarray) -> np.ndarray:
    """`x` from the end of the warm-up on, NaN (no value: a non-finite step) read as 0."""
    return np.nan_to_num(x[WARMUP:], nan=0.0, posinf=np.inf)


def first_past(x: np.ndarray, bound: float) -> int | None:
    """The first step after the warm-up at which `x` exceeds `bound` (None: never)."""
    past = np.flatnonzero(_after_warmup(x) > bound)
    return int(past[0]) + WARMUP if past.size else None


def describe_run(series: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per signal: the largest value after the warm-up and the first step past its bound."""
    return {name: {"max": float(_after_warmup(series[name]).max()),
                   "first": first_past(series[name], bound)}
            for name, bound in SIGNALS.items()}  # fmt: skip


def run_setting(setting: Setting, seeds: int, steps_scale: float = 1.0) -> dict[str, Any]:
    """Train `seeds` runs of `setting` under `HEALTH_ROW`: its quality, the signals' series
    (`(steps, seeds)` per signal) and their summary per run."""
    steps = suite.steps_for(setting.family, steps_scale)
    out = suite.train_group([setting], suite.HEALTH_ROW, seeds, steps, health_signals)[0]
    out["loss_z"] = np.asarray(loss_zscores(jnp.asarray(out["loss"])))
    series = {name: out[name] for name in SIGNALS}
    runs = [describe_run({k: v[:, i] for k, v in series.items()}) for i in range(seeds)]
    return {"setting": setting.key, "kind": setting.kind, "split": setting.split,
            "quality": out["quality"].tolist(), "runs": runs, "series": series}  # fmt: skip


def healthy_maxima(rows: list[dict]) -> dict[str, float]:
    """The largest value of each signal on any healthy run: what a default must stay above."""
    healthy = [r for row in rows if row["kind"] == "healthy" for r in row["runs"]]
    return {name: max(r[name]["max"] for r in healthy) for name in SIGNALS} if healthy else {}


def mark_past_healthy(rows: list[dict], top: dict[str, float]) -> None:
    """On each unstable run, the first step past the healthy maximum (`past_healthy`), the
    earliest a guard that leaves healthy runs alone could act on the signal."""
    for row in rows:
        if row["kind"] == "healthy":
            continue
        for i, run in enumerate(row["runs"]):
            for name in top:
                run[name]["past_healthy"] = first_past(row["series"][name][:, i], top[name])


def _cell(runs: list[dict], name: str) -> str:
    """`max (first; past_healthy)` of each run, comma-separated (`-`: never)."""
    step = lambda x: "-" if x is None else str(x)
    past = lambda r: f"; {step(r['past_healthy'])}" if "past_healthy" in r else ""
    return ", ".join(f"{r[name]['max']:.1f} ({step(r[name]['first'])}{past(r[name])})"
                     for r in runs)  # fmt: skip


def markdown(result: dict) -> str:
    top = result["healthy_max"]
    head = ["setting", "kind", "quality"] + [
        f"{n}: max (first > {b:g}; > healthy max)" for n, b in SIGNALS.items()
    ]
    lines = ["# Signals of a step that is too large", "",
             f"{result['machine']['cpu']}, {result['seeds']} seeds, {result['runtime_s']} s.",
             "Largest on healthy runs: " + ", ".join(f"{n} {v:.1f}" for n, v in top.items())
             + ". Steps: first past the bound, and (unstable runs) first past that largest"
             " healthy value; - never.", ""]  # fmt: skip
    cells = [[row["setting"], row["kind"], ", ".join(f"{q:.3f}" for q in row["quality"])]
             + [_cell(row["runs"], n) for n in SIGNALS] for row in result["rows"]]  # fmt: skip
    return "\n".join([*lines, suite._md(head, cells), ""])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--families", nargs="+", default=None, help="default: all six")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    chosen = [s for s in SETTINGS if s.kind in KINDS
              and (not args.families or s.family in args.families)]  # fmt: skip
    rows = []
    for setting in chosen:
        rows.append(run_setting(setting, args.seeds))
        print(f"[{time.perf_counter() - start:6.1f} s] {setting.key}", file=sys.stderr, flush=True)
    top = healthy_maxima(rows)
    mark_past_healthy(rows, top)
    for row in rows:
        del row["series"]
    result = {"benchmark": "stability signals", "machine": machine.describe(), "seeds": args.seeds,
              "runtime_s": round(time.perf_counter() - start, 1), "rows": rows,
              "healthy_max": top}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "signals.json").write_text(json.dumps(result, indent=1))
    (args.out / "signals.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
