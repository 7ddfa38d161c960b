"""What `gx.stable` costs beside the chain it guards: `stable(adamw)` against
`gx.chain(clip_by_global_norm(1), adamw)`, issue 11's goals.

    python benchmarks/guard_cost.py                 # 25M float32 params, 15 timed rounds
    python benchmarks/guard_cost.py --params 4e6 --repeats 9

For each parameter tree (1 leaf, ResNet-50-like ~160 leaves, 1000 leaves), with the params and
optimizer state donated and without, both steps are compiled (in alternating order) and timed
in rotating order inside every round, so a noisy machine slows both alike. Reported: median step
times and their ratio (and the median of the per-round ratios), trace + compile time (the
median of `--compile-repeats` compiles from cold caches, alternated) and its ratio, and XLA's
temporary bytes as a fraction of the params' bytes. Goals (issue 11): step <= 1.25x, trace +
compile <= 1.5x at 1000 leaves, temporaries <= 10% of the params.

Writes `guard_cost.json` and `guard_cost.md` under `--out`.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax

import gradxform as gx
from benchmarks import machine
from benchmarks.performance import (
    LR,
    MAX_NORM,
    TREES,
    WD,
    Contender,
    compile_step,
    count,
    materialize,
    run_rounds,
)

GOALS = {"step_ratio": 1.25, "compile_ratio": 1.5, "temp_fraction": 0.10}
CASES = ("1 leaf", "resnet50-like", "1000 leaves")


def contenders(telemetry: bool = True) -> dict:
    return {
        "stable(adamw)": lambda: gx.stable(gx.adamw(LR, weight_decay=WD), telemetry=telemetry),
        "clip+adamw": lambda: gx.chain(
            gx.clip_by_global_norm(MAX_NORM), gx.adamw(LR, weight_decay=WD)
        ),
    }


def trace_and_compile(tx, built: Contender, donate: bool) -> float:
    """Seconds to trace, lower and compile `tx`'s step again, from cold caches."""
    jax.clear_caches()
    _, trace_s, compile_s = compile_step(tx, donate, built.params, built.state, built.grads)
    return trace_s + compile_s


def measure(
    tree: str, n: int, repeats: int, donate: bool, flip: bool, telemetry: bool = True,
    compile_repeats: int = 3,
) -> dict:  # fmt: skip
    shapes = TREES[tree](n)
    grads = materialize(shapes, seed=1, scale=1e-3)
    made = list(contenders(telemetry).items())
    built = {
        name: Contender(make(), shapes, grads, seed=2, donate=donate)
        for name, make in (made[::-1] if flip else made)
    }
    run_rounds(built, repeats)
    guard, base = built["stable(adamw)"], built["clip+adamw"]
    compiles = {k: [c.trace_s + c.compile_s] for k, c in built.items()}
    for r in range(compile_repeats - 1):
        for name, make in made[::-1] if (r + flip) % 2 == 0 else made:
            compiles[name].append(trace_and_compile(make(), built[name], donate))
    compile_s = {k: statistics.median(v) for k, v in compiles.items()}
    result = {
        "tree": tree,
        "params": count(shapes),
        "leaves": len(jax.tree.leaves(grads)),
        "donate": donate,
        "step_ms": {k: 1e3 * statistics.median(c.times) for k, c in built.items()},
        "compile_s": compile_s,
        "compile_s_all": compiles,
        "temp_bytes": {k: c.temp_bytes for k, c in built.items()},
        "step_ratio": statistics.median(guard.times) / statistics.median(base.times),
        "step_ratio_paired": statistics.median(
            a / b for a, b in zip(guard.times, base.times, strict=True)
        ),
        "compile_ratio": compile_s["stable(adamw)"] / compile_s["clip+adamw"],
        "temp_fraction": guard.temp_bytes / (4 * count(shapes)),
    }
    del built, grads
    gc.collect()
    return result


def _where(m: dict) -> str:
    load = ", ".join(f"{x:.1f}" for x in m["load_average"])
    return f"{m['cpu']} ({m['cpu_count']} cores), {m['device']}, load {load}, jax {m['jax']}"


def markdown(cases: list[dict], meta: dict) -> str:
    lines = [
        f"`stable(adamw{'' if meta.get('telemetry', True) else ', telemetry=False'})` vs "
        f"`gx.chain(clip_by_global_norm(1), adamw)`, {meta['params']:.3g} "
        f"float32 params, step: medians of {meta['repeats']} rotating rounds, compile: medians "
        f"of {meta.get('compile_repeats', 1)} alternated compiles; {_where(meta['machine'])}.",
        "",
        "| tree | leaves | donated | stable ms | clip+adamw ms | step ratio (paired) "
        "| compile s (stable / base) | compile ratio | temp / params |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cases:
        ms, cs = c["step_ms"], c["compile_s"]
        lines.append(
            f"| {c['tree']} | {c['leaves']} | {'yes' if c['donate'] else 'no'} "
            f"| {ms['stable(adamw)']:.1f} | {ms['clip+adamw']:.1f} "
            f"| {c['step_ratio']:.2f} ({c['step_ratio_paired']:.2f}) "
            f"| {cs['stable(adamw)']:.1f} / {cs['clip+adamw']:.1f} | {c['compile_ratio']:.2f} "
            f"| {100 * c['temp_fraction']:.1f}% |"
        )
    return "\n".join(lines) + "\n"


def goals(cases: list[dict]) -> dict:
    """Each goal against the worst case it applies to (`met` is None when none was run)."""
    worst_step = max(c["step_ratio"] for c in cases)
    compile_1000 = max(
        (c["compile_ratio"] for c in cases if c["tree"] == "1000 leaves"), default=None
    )
    temp = max(c["temp_fraction"] for c in cases)
    met = lambda value, goal: {
        "value": value, "goal": goal, "met": None if value is None else value <= goal
    }  # fmt: skip
    return {
        "step_ratio": met(worst_step, GOALS["step_ratio"]),
        "compile_ratio_1000_leaves": met(compile_1000, GOALS["compile_ratio"]),
        "temp_fraction": met(temp, GOALS["temp_fraction"]),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=25e6)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument(
        "--compile-repeats", type=int, default=3, help="compiles per step, alternated: median"
    )
    parser.add_argument("--trees", nargs="*", default=list(CASES), choices=list(TREES))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--no-telemetry", action="store_true", help="stable(..., telemetry=False): no params read"
    )
    args = parser.parse_args(argv)
    telemetry = not args.no_telemetry
    n = int(args.params)
    cases = []
    for i, tree in enumerate(args.trees):
        for j, donate in enumerate((True, False)):
            flip = (i + j) % 2 == 1
            cases.append(
                measure(tree, n, args.repeats, donate, flip, telemetry, args.compile_repeats)
            )
            c = cases[-1]
            print(
                f"{tree:15s} donate={donate!s:5s} step x{c['step_ratio']:.2f} "
                f"(paired x{c['step_ratio_paired']:.2f}) compile x{c['compile_ratio']:.2f} "
                f"temp {100 * c['temp_fraction']:.1f}%",
                flush=True,
            )
    meta = {
        "params": n, "repeats": args.repeats, "compile_repeats": args.compile_repeats,
        "telemetry": telemetry,
        "machine": machine.describe(),
    }  # fmt: skip
    result = {"meta": meta, "cases": cases, "goals": goals(cases)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "guard_cost.json").write_text(json.dumps(result, indent=1, default=str))
    (args.out / "guard_cost.md").write_text(markdown(cases, meta))
    print(json.dumps(result["goals"], indent=1))
    return result


if __name__ == "__main__":
    main()
