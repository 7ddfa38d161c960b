"""Optimizer-update benchmark: gradxform against optax and against the memory-bandwidth floor.

    python benchmarks/performance.py                   # 25M float32 parameters, all trees
    python benchmarks/performance.py --quick           # 1M parameters, few repeats (a minute)
    python benchmarks/performance.py --params 1e8 --repeats 30 --out benchmarks/results

For every parameter tree (1 leaf; ResNet-50-like, 161 leaves; 1000 leaves; a transformer with
stacked layers) and every chain (`sgd` with momentum, `clip_by_global_norm + adamw`, and the
stability chain once `gx.health`/`gx.stable` exist) it compiles one jitted step
`params, state = apply_updates(params, tx.update(grads, state, params))` per library, with
params and state donated, and reports:

- step time: median of `--repeats` timed steps after warm-up; gradxform, optax and a copy-kernel
  are run in rotating order inside every round, so a noisy machine slows all three alike;
- the bandwidth floor: the bytes the update must move (`BYTES_PER_PARAM`, below) divided by the
  in-place copy bandwidth measured in the same rounds, and the fraction of it each library
  achieves (floor / step time, the median of the per-round values);
- trace and compile time (`jit(...).lower(...)`, `.compile()`), `memory_analysis()` temporary
  bytes and optimizer-state bytes (also with bfloat16 moments);
- the overhead of telemetry on a full CNN training step, once `gx.health` exists.

It prints a table and writes `performance.json` and `performance.png` (step time against leaf
count) under `--out`.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gradxform as gx
from benchmarks import machine

# ----------------------------------------------------------------------------- parameter trees
#
# Each builder returns a nested dict of shapes holding about `n` parameters.


def single_leaf(n: int) -> dict:
    """One matrix of ~n entries (rows of 1024), e.g. a flat parameter buffer."""
    return {"w": (max(1, round(n / 1024)), 1024)}


def _resnet50(width: float) -> dict:
    """ResNet-50's 161 parameter leaves (HWIO kernels, BatchNorm scale/bias), widths x `width`."""
    ch = lambda c: max(1, round(c * width))
    conv_bn = lambda k, cin, cout: {
        "kernel": (k, k, cin, cout),
        "bn": {"scale": (cout,), "bias": (cout,)},
    }
    tree: dict[str, Any] = {"stem": conv_bn(7, 3, ch(64))}
    cin = ch(64)
    for s, (blocks, mid) in enumerate([(3, 64), (4, 128), (6, 256), (3, 512)]):
        mid, out = ch(mid), ch(4 * mid)
        for b in range(blocks):
            block = {
                "conv1": conv_bn(1, cin, mid),
                "conv2": conv_bn(3, mid, mid),
                "conv3": conv_bn(1, mid, out),
            }
            if b == 0:
                block["proj"] = conv_bn(1, cin, out)
            tree[f"stage{s + 1}_block{b}"] = block
            cin = out
    tree["head"] = {"kernel": (cin, 1000), "bias": (1000,)}
    return tree


def resnet_like(n: int) -> dict:
    """ResNet-50's shapes with every width scaled so the total is about n (25.6M at width 1)."""
    lo, hi = 1e-3, 64.0
    for _ in range(60):  # bisect on the width multiplier
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if count(_resnet50(mid)) < n else (lo, mid)
    return _resnet50(lo)


def many_leaves(n: int, leaves: int = 1000) -> dict:
    """`leaves // 2` dense layers, each a square kernel and a bias, ~n parameters in all."""
    layers = leaves // 2
    d = max(1, round((-1 + math.sqrt(1 + 4 * n / layers)) / 2))  # layers * (d*d + d) ~ n
    return {f"dense{i:04d}": {"kernel": (d, d), "bias": (d,)} for i in range(layers)}


def transformer_like(n: int, layers: int = 12) -> dict:
    """A decoder with its layers stacked on a leading axis (as under `nnx.scan`): 16 leaves."""

    def tree(d):
        stacked = {
            "ln1": {"scale": (layers, d), "bias": (layers, d)},
            "qkv": {"kernel": (layers, d, 3 * d), "bias": (layers, 3 * d)},
            "out": {"kernel": (layers, d, d), "bias": (layers, d)},
            "ln2": {"scale": (layers, d), "bias": (layers, d)},
            "mlp_in": {"kernel": (layers, d, 4 * d), "bias": (layers, 4 * d)},
            "mlp_out": {"kernel": (layers, 4 * d, d), "bias": (layers, d)},
        }
        return {
            "embed": (8 * d, d),  # a vocabulary of 8d tokens
            "layers": stacked,
            "ln_f": {"scale": (d,), "bias": (d,)},
        }

    d = 8
    while count(tree(d + 8)) <= n:
        d += 8
    return tree(d)


TREES: dict[str, Callable[[int], dict]] = {
    "1 leaf": single_leaf,
    "transformer (stacked)": transformer_like,
    "resnet50-like": resnet_like,
    "1000 leaves": many_leaves,
}


def _shape_leaves(shapes: dict) -> list[tuple]:
    return jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple))


def count(shapes: dict) -> int:
    return sum(math.prod(s) for s in _shape_leaves(shapes))


def materialize(shapes: dict, seed: int, scale: float) -> dict:
    """Float32 normal(0, scale) arrays with the given shapes."""
    key = jax.random.key(seed)
    out, i = {}, 0

    def fill(node):
        nonlocal i
        if isinstance(node, tuple):
            i += 1
            return scale * jax.random.normal(jax.random.fold_in(key, i), node, jnp.float32)
        return {k: fill(v) for k, v in node.items()}

    out = fill(shapes)
    return jax.block_until_ready(out)


# ----------------------------------------------------------------------------- chains


class Chain(NamedTuple):
    gx: Callable[..., optax.GradientTransformation]  # kwargs: mu_dtype/nu_dtype where useful
    optax: Callable[..., optax.GradientTransformation]
    bytes_per_param: int  # float32 bytes an ideal update must read + write per parameter
    byte_model: str


LR, WD, MAX_NORM = 1e-3, 1e-4, 1.0


CHAINS: dict[str, Chain] = {
    "sgd(momentum)": Chain(
        lambda **kw: gx.sgd(LR, momentum=0.9, **kw),
        lambda: optax.sgd(LR, momentum=0.9),
        20,
        "read g, p, m; write p, m",
    ),
    "clip+adamw": Chain(
        lambda **kw: gx.chain(
            gx.clip_by_global_norm(MAX_NORM), gx.adamw(LR, weight_decay=WD, **kw)
        ),
        lambda **kw: optax.chain(
            optax.clip_by_global_norm(MAX_NORM), optax.adamw(LR, weight_decay=WD, **kw)
        ),
        32,
        "read g twice (norm, update), p, mu, nu; write p, mu, nu",
    ),
}
# gx.stable: telemetry, a skip guard, z-score clipping and a step-scale backoff around adamw.
# optax has no telemetry and no z-score clipping; its nearest composite is a non-finite guard
# around clip+adamw. `benchmarks/guard_cost.py` compares it with gradxform's own clip+adamw.
CHAINS["stable(adamw)"] = Chain(
    lambda **kw: gx.stable(gx.adamw(LR, weight_decay=WD, **kw)),
    lambda: optax.apply_if_finite(
        optax.chain(optax.clip_by_global_norm(MAX_NORM), optax.adamw(LR, weight_decay=WD)),
        max_consecutive_errors=5,
    ),
    32,
    "as clip+adamw, and read p once (telemetry): the guard feeds the optimizer, no select",
)

# ----------------------------------------------------------------------------- measuring


def make_step(tx: optax.GradientTransformation, donate: bool = True) -> Callable:
    """The jitted update step, params (0) and optimizer state (1) donated unless told not."""

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def compile_step(tx: optax.GradientTransformation, donate: bool, *args) -> tuple[Any, float, float]:
    """`make_step(tx, donate)` compiled for `args` (params, state, grads), with the seconds it
    took to trace and lower, and to compile."""
    start = time.perf_counter()
    lowered = make_step(tx, donate).lower(*args)
    traced = time.perf_counter()
    compiled = lowered.compile()
    return compiled, traced - start, time.perf_counter() - traced


def tree_bytes(tree: Any) -> int:
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def distinct_buffers(state: Any) -> Any:
    """`state` with every leaf in its own buffer, so that all of it can be donated.

    (`gx.skip_if` and `gx.scale_by_amsgrad` build some state leaves from one shared array, and
    XLA refuses to donate one buffer twice.)
    """
    return jax.tree.map(jnp.copy, state)


class Contender:
    """One library's compiled step, with its own params and state, ready to be timed."""

    def __init__(
        self, tx: optax.GradientTransformation, shapes: dict, grads: Any, seed: int,
        donate: bool = True,
    ):  # fmt: skip
        self.grads = grads
        self.params = materialize(shapes, seed, 0.02)
        self.state = jax.block_until_ready(distinct_buffers(tx.init(self.params)))
        self.state_bytes = tree_bytes(self.state)
        self.compiled, self.trace_s, self.compile_s = compile_step(
            tx, donate, self.params, self.state, grads
        )
        self.temp_bytes = int(self.compiled.memory_analysis().temp_size_in_bytes)
        self.times: list[float] = []

    def __call__(self) -> float:
        start = time.perf_counter()
        self.params, self.state = self.compiled(self.params, self.state, self.grads)
        jax.block_until_ready((self.params, self.state))
        return time.perf_counter() - start


class Copy:
    """In-place `x * c` on n float32 values (x donated): 8 bytes per value, read + write."""

    def __init__(self, n: int):
        self.x = jnp.ones((n,), jnp.float32)
        self.c = jnp.asarray(1.0, jnp.float32)  # an argument, so XLA cannot fold `x * 1`
        self.compiled = (
            jax.jit(lambda x, c: x * c, donate_argnums=0).lower(self.x, self.c).compile()
        )
        self.bytes = 8 * n
        self.times: list[float] = []

    def __call__(self) -> float:
        start = time.perf_counter()
        self.x = self.compiled(self.x, self.c)
        self.x.block_until_ready()
        return time.perf_counter() - start


def run_rounds(contenders: dict[str, Any], repeats: int, warmup: int = 2) -> None:
    """Warm up, then time each contender once per round, in an order rotated every round."""
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            contenders[name].times.append(contenders[name]())


def measure_case(tree_name: str, chain_name: str, n: int, repeats: int, *, flip: bool) -> dict:
    chain = CHAINS[chain_name]
    shapes = TREES[tree_name](n)
    params_count = count(shapes)
    grads = materialize(shapes, seed=1, scale=1e-3)
    contenders: dict[str, Any] = {}
    # Compile in alternating order so neither library always benefits from warm JAX caches.
    libs = [("gradxform", chain.gx), ("optax", chain.optax)]
    if flip:
        libs = libs[::-1]
    for lib, factory in libs:
        contenders[lib] = Contender(factory(), shapes, grads, seed=2)
    copy = Copy(params_count)
    run_rounds({**contenders, "copy": copy}, repeats)

    floor = [chain.bytes_per_param / 8 * t for t in copy.times]  # copy moves 8 bytes/param
    result: dict[str, Any] = {
        "tree": tree_name,
        "leaves": len(_shape_leaves(shapes)),
        "params": params_count,
        "chain": chain_name,
        "bytes_per_param": chain.bytes_per_param,
        "byte_model": chain.byte_model,
        "copy_bandwidth_gbps": copy.bytes / statistics.median(copy.times) / 1e9,
        "floor_ms": 1e3 * statistics.median(floor),
    }
    for lib, c in sorted(contenders.items()):
        result[lib] = {
            "step_ms": 1e3 * statistics.median(c.times),
            "step_ms_p10": 1e3 * float(np.percentile(c.times, 10)),
            "floor_fraction": statistics.median(f / t for f, t in zip(floor, c.times, strict=True)),
            "trace_s": c.trace_s,
            "compile_s": c.compile_s,
            "temp_bytes": c.temp_bytes,
            "state_bytes": c.state_bytes,
        }
    gxr, oxr = result["gradxform"], result["optax"]
    paired = [
        a / b for a, b in zip(contenders["gradxform"].times, contenders["optax"].times, strict=True)
    ]
    result["step_ratio"] = gxr["step_ms"] / oxr["step_ms"]
    result["step_ratio_paired"] = statistics.median(paired)
    result["compile_ratio"] = (gxr["trace_s"] + gxr["compile_s"]) / (
        oxr["trace_s"] + oxr["compile_s"]
    )
    del contenders, copy, grads
    gc.collect()
    return result


def state_dtypes(n: int) -> dict:
    """Optimizer-state bytes of clip+adamw, float32 vs bfloat16 moments (no compilation)."""
    shapes = resnet_like(n)
    params = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s, jnp.float32),
        shapes,
        is_leaf=lambda x: isinstance(x, tuple),
    )
    chain = CHAINS["clip+adamw"]
    size = lambda tx: tree_bytes(jax.eval_shape(tx.init, params))
    bf16 = jnp.bfloat16
    out = {
        "tree": "resnet50-like",
        "params": count(shapes),
        "gradxform_f32": size(chain.gx()),
        "gradxform_bf16": size(chain.gx(mu_dtype=bf16, nu_dtype=bf16)),
        "optax_f32": size(chain.optax()),
        "optax_bf16_mu": size(chain.optax(mu_dtype=bf16)),  # optax 0.2.8 has no nu_dtype
    }
    out["gradxform_bf16_ratio"] = out["gradxform_bf16"] / out["gradxform_f32"]
    return out


class TrainStep:
    """A jitted CNN training step (forward, backward, update), params and state donated."""

    def __init__(self, tx, image_shape: tuple[int, int, int], batch: int, seed: int = 0):
        from flax import nnx

        from examples.models import CNN  # the example's CNN, with its default widths

        model = CNN(image_shape, 10, rngs=nnx.Rngs(seed))
        graphdef, self.params = nnx.split(model)
        self.state = distinct_buffers(tx.init(self.params))
        rng = np.random.default_rng(seed)
        self.x = jnp.asarray(rng.normal(size=(batch, *image_shape)), jnp.float32)
        self.y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)

        def loss_fn(params, x, y):
            logits = nnx.merge(graphdef, params)(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        def step(params, state, x, y):
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            updates, state = tx.update(grads, state, params, loss=loss)
            return optax.apply_updates(params, updates), state

        self.compiled = (
            jax.jit(step, donate_argnums=(0, 1))
            .lower(self.params, self.state, self.x, self.y)
            .compile()
        )
        self.times: list[float] = []

    def __call__(self) -> float:
        start = time.perf_counter()
        self.params, self.state = self.compiled(self.params, self.state, self.x, self.y)
        jax.block_until_ready((self.params, self.state))
        return time.perf_counter() - start


TELEMETRY_INPUTS = {"digits 8x8 (example default)": (8, 8, 1), "MNIST 28x28": (28, 28, 1)}
TELEMETRY_SECONDS = 20.0  # of alternating rounds per input size


def telemetry_overhead(repeats: int, batch: int = 128, seconds: float = TELEMETRY_SECONDS) -> dict:
    """Full training step of the example CNN with `gx.health(opt)` against `opt` alone."""
    opt = lambda: gx.chain(gx.clip_by_global_norm(MAX_NORM), gx.adamw(LR, weight_decay=WD))
    out = {}
    for name, shape in TELEMETRY_INPUTS.items():
        steps = {
            "without": TrainStep(opt(), shape, batch),
            "with health": TrainStep(gx.health(opt()), shape, batch),
        }
        run_rounds(steps, repeats, warmup=3)
        # A 4 ms step differs by tenths of a millisecond: sample for `seconds` in all.
        per_round = sum(statistics.median(s.times) for s in steps.values())
        run_rounds(steps, max(0, int(seconds / per_round) - repeats), warmup=0)
        without, with_ = (statistics.median(steps[k].times) for k in ("without", "with health"))
        paired = [
            a / b for a, b in zip(steps["with health"].times, steps["without"].times, strict=True)
        ]
        out[name] = {
            "batch": batch,
            "rounds": len(paired),
            "params": count_tree(steps["without"].params),
            "step_ms_without": 1e3 * without,
            "step_ms_with_health": 1e3 * with_,
            "overhead": with_ / without - 1,
            "overhead_paired": statistics.median(paired) - 1,
        }
    return out


def count_tree(tree: Any) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- report


def _mb(b: float) -> str:
    return f"{b / 2**20:.1f}"


# (header, width, value of a case) for the printed table; `g`/`o`: gradxform/optax results
COLUMNS = [
    ("tree", -22, lambda c, g, o: c["tree"]),
    ("leaves", 6, lambda c, g, o: c["leaves"]),
    ("chain", -14, lambda c, g, o: c["chain"]),
    ("| gx ms", 9, lambda c, g, o: f"{g['step_ms']:.2f}"),
    ("optax ms", 8, lambda c, g, o: f"{o['step_ms']:.2f}"),
    ("ratio", 5, lambda c, g, o: f"{g['step_ms'] / o['step_ms']:.2f}"),
    ("| floor ms", 10, lambda c, g, o: f"{c['floor_ms']:.2f}"),
    ("gx %fl", 6, lambda c, g, o: f"{100 * g['floor_fraction']:.0f}%"),
    ("ox %fl", 6, lambda c, g, o: f"{100 * o['floor_fraction']:.0f}%"),
    ("| gx cmp s", 10, lambda c, g, o: f"{g['trace_s'] + g['compile_s']:.2f}"),
    ("ox cmp s", 8, lambda c, g, o: f"{o['trace_s'] + o['compile_s']:.2f}"),
    (
        "ratio",
        5,
        lambda c, g, o: f"{(g['trace_s'] + g['compile_s']) / (o['trace_s'] + o['compile_s']):.2f}",
    ),
    ("| gx tmp MB", 11, lambda c, g, o: _mb(g["temp_bytes"])),
    ("ox tmp MB", 9, lambda c, g, o: _mb(o["temp_bytes"])),
    ("| state MB", 10, lambda c, g, o: _mb(g["state_bytes"])),
]


def _row(values: list) -> str:
    return " ".join(
        f"{v:<{-w}}" if w < 0 else f"{v:>{w}}" for v, (_, w, _) in zip(values, COLUMNS, strict=True)
    )


def table(cases: list[dict]) -> str:
    """One row per case."""
    head = _row([h for h, _, _ in COLUMNS])
    lines = [head, "-" * len(head)]
    for c in cases:
        g, o = c["gradxform"], c["optax"]
        lines.append(_row([f(c, g, o) for _, _, f in COLUMNS]))
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """The results as a Markdown table (for docs/benchmarks-performance.md)."""
    libs = ("gradxform", "optax")
    lines = [
        "| tree | leaves | chain | step ms: gx / optax | gx / optax | floor ms |"
        " % of floor: gx / optax | trace+compile s: gx / optax | temp MiB: gx / optax |",
        "|---|--:|---|--:|--:|--:|--:|--:|--:|",
    ]

    def per_lib(case: dict, value: Callable[[dict], str]) -> str:
        return " / ".join(value(case[lib]) for lib in libs)

    for c in result["cases"]:
        step = per_lib(c, lambda r: f"{r['step_ms']:.1f}")
        floor = per_lib(c, lambda r: f"{100 * r['floor_fraction']:.0f}")
        compile_s = per_lib(c, lambda r: f"{r['trace_s'] + r['compile_s']:.1f}")
        temp = f"{_mb(c['gradxform']['temp_bytes'])} / {_mb(c['optax']['temp_bytes'])}"
        lines.append(
            f"| {c['tree']} | {c['leaves']} | {c['chain']} | {step} | {c['step_ratio']:.2f}"
            f" | {c['floor_ms']:.1f} | {floor} | {compile_s} | {temp} |"
        )
    return "\n".join(lines) + "\n"


def plot(cases: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chains = sorted({c["chain"] for c in cases})
    fig, axes = plt.subplots(1, len(chains), figsize=(5.5 * len(chains), 4), squeeze=False)
    for ax, chain in zip(axes[0], chains, strict=True):
        rows = sorted((c for c in cases if c["chain"] == chain), key=lambda c: c["leaves"])
        x = [c["leaves"] for c in rows]
        for lib, style in (("gradxform", "o-"), ("optax", "s--")):
            ax.plot(x, [c[lib]["step_ms"] for c in rows], style, label=lib)
        ax.plot(x, [c["floor_ms"] for c in rows], "k-", lw=0.8, label="bandwidth floor")
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("parameter leaves")
        ax.set_ylabel("update step (ms, median)")
        ax.set_title(f"{chain}, {rows[0]['params'] / 1e6:.1f}M float32 params")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def goals(cases: list[dict], dtypes: dict, telemetry: dict) -> dict:
    """The issue's targets for gradxform, each with the numbers that decide it."""
    rows, lib = cases, "gradxform"
    ratio = lambda c: c[lib]["step_ms"] / c["optax"]["step_ms"]
    compile_ratio = lambda c: (
        (c[lib]["trace_s"] + c[lib]["compile_s"])
        / (c["optax"]["trace_s"] + c["optax"]["compile_s"])
    )
    label = lambda c: f"{c['chain']} @ {c['leaves']} leaves"
    out = {}

    def goal(name, values, ok):
        out[name] = {"met": bool(values) and all(ok(v) for v in values.values()), "values": values}

    goal(
        "step <= optax, every case",
        {label(c): round(ratio(c), 3) for c in rows},
        lambda r: r <= 1.0,
    )
    goal(
        "step <= 0.8x optax, >= 160 leaves",
        {label(c): round(ratio(c), 3) for c in rows if c["leaves"] >= 160},
        lambda r: r <= 0.8,
    )
    goal(
        ">= 70% of the bandwidth floor, adamw chain",
        {label(c): round(c[lib]["floor_fraction"], 3) for c in rows if c["chain"] == "clip+adamw"},
        lambda f: f >= 0.7,
    )
    goal(
        "trace+compile <= 0.5x optax, 1000 leaves",
        {label(c): round(compile_ratio(c), 3) for c in rows if c["leaves"] >= 1000},
        lambda r: r <= 0.5,
    )
    goal(
        "temp bytes <= optax",
        {label(c): [c[lib]["temp_bytes"], c["optax"]["temp_bytes"]] for c in rows},
        lambda v: v[0] <= v[1],
    )
    goal(
        "bf16 moments halve the state",
        {"state bytes bf16 / f32": round(dtypes["gradxform_bf16_ratio"], 6)},
        lambda r: r <= 0.5 + 1e-3,
    )
    if "note" not in telemetry:
        goal(
            "telemetry <= 5% of a training step",
            {name: round(t["overhead"], 4) for name, t in telemetry.items()},
            lambda o: o <= 0.05,
        )
    return out


def print_goals(all_goals: dict) -> None:
    for lib, lib_goals in all_goals.items():
        print(f"\ngoals ({lib}):")
        for name, g in lib_goals.items():
            print(f"  [{'met' if g['met'] else 'NOT met'}] {name}: {g['values']}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=25e6, help="total parameters per tree")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per contender")
    parser.add_argument("--quick", action="store_true", help="1M parameters, 5 repeats")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--trees", nargs="*", default=list(TREES), choices=list(TREES))
    parser.add_argument("--chains", nargs="*", default=list(CHAINS), choices=list(CHAINS))
    parser.add_argument("--no-telemetry", action="store_true", help="skip the CNN step")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument(
        "--merge", action="store_true", help="keep the other cases of an existing JSON in --out"
    )
    args = parser.parse_args(argv)
    n = int(1e6 if args.quick else args.params)
    repeats = 5 if args.quick else args.repeats

    meta = {**machine.describe(), "params_target": n, "repeats": repeats}
    print(", ".join(f"{k}={v}" for k, v in meta.items()), flush=True)
    path = args.out / "performance.json"
    previous = json.loads(path.read_text()) if args.merge and path.exists() else {}
    cases = []
    for i, tree_name in enumerate(args.trees):
        for chain_name in args.chains:
            case = measure_case(tree_name, chain_name, n, repeats, flip=bool(i % 2))
            cases.append(case)
            print(table([case]).splitlines()[2], flush=True)
    done = {(c["tree"], c["chain"]) for c in cases}
    cases = [c for c in previous.get("cases", []) if (c["tree"], c["chain"]) not in done] + cases
    order = {name: i for i, name in enumerate([*TREES, *CHAINS])}
    cases.sort(key=lambda c: (order.get(c["tree"], 99), order.get(c["chain"], 99)))
    dtypes = state_dtypes(n)
    if args.no_telemetry:
        telemetry = previous.get("telemetry", {"note": "not measured (--no-telemetry)"})
    else:
        seconds = 2.0 if args.quick else TELEMETRY_SECONDS
        telemetry = telemetry_overhead(max(repeats, 10), seconds=seconds)
    all_goals = {"gradxform": goals(cases, dtypes, telemetry)}
    result = {
        "meta": meta,
        "cases": cases,
        "state_dtypes": dtypes,
        "telemetry": telemetry,
        "goals": all_goals,
    }
    print()
    print(table(cases))
    print(
        f"\nstate bytes ({dtypes['tree']}, {dtypes['params']} params): "
        + ", ".join(f"{k}={v}" for k, v in dtypes.items() if k not in ("tree", "params"))
    )
    for name, t in telemetry.items():
        print(f"telemetry, {name}: {t}" if name != "note" else f"telemetry: {t}")
    print_goals(all_goals)
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    (args.out / "performance.md").write_text(markdown(result))
    if not args.no_plot:
        plot(cases, args.out / "performance.png")
    print(f"\nwrote {path}")
    return result


if __name__ == "__main__":
    main()
