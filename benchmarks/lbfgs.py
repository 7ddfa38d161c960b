"""L-BFGS benchmark: `gx.minimize` against scipy's L-BFGS-B and optax's documented loop.

    python benchmarks/lbfgs.py            # full sizes (about 2 minutes on 2 CPU cores)
    python benchmarks/lbfgs.py --quick    # toy sizes, seconds (the test runs this)

Problems (float64, the precision scipy works in):
  rosenbrock   the Rosenbrock function in 100-D from (-1.2, 1, -1.2, 1, ...)
  logistic     full-batch multinomial logistic regression (L2 1e-3) on scikit-learn's bundled
               digits (1797 x 64, pixels / 16), weights and biases as a pytree
  mlp          a 64-32-10 tanh MLP (L2 1e-4) on the same digits, full batch, fixed init

Solvers, each with memory 10 and the same gradient-norm tolerance, up to `max_steps` steps:
  gx.minimize  `gx.minimize(f, params, args=data, tx=gx.lbfgs())`: one `jax.jit` of a
               `lax.while_loop`
  scipy        `scipy.optimize.minimize(method="L-BFGS-B", jac=True)` on a jitted
               `value_and_grad` of the flattened params, stopping on the same rule (gradient
               L2 norm <= tol, by a callback; scipy's `gtol` and `ftol` off); BLAS is
               held to one thread (threaded BLAS on these small vectors made scipy 30-100x
               slower on a loaded 2-core machine)
  optax loop   the loop of `optax.lbfgs`'s docstring with the step jitted: a Python for-loop,
               `value_and_grad_from_state`, stopping on the state's gradient norm

Reported per (problem, solver): final value, iterations, function evaluations, compile time
(first call minus a steady call), steady-state wall time (median over `--repeats` calls in the
same process, solvers alternating) and the evaluation floor: f evals times the time of one
`grad(f)` among many chained in a compiled loop, the least time any solver making that many
evaluations needs. Goals: the same final value (relative difference <= 1e-6 from scipy's, or
lower), gx.minimize's steady time <= scipy's and <= 0.5x optax's loop. Writes `lbfgs.json`
and `lbfgs.md` (the table) under `--out`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.optimize
from jax.flatten_util import ravel_pytree
from sklearn.datasets import load_digits
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gradxform as gx
from benchmarks import machine

SOLVERS = ("gx.minimize", "scipy L-BFGS-B", "optax loop")
COLUMNS = (
    "problem", "solver", "value", "iterations", "fun_evals", "compile_s", "steady_ms",
    "eval_floor_ms",
)  # fmt: skip


# ----------------------------------------------------------------------------- problems


def rosenbrock(w):
    x = w["x"]
    return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


def logistic(w, x, y):
    logits = x @ w["kernel"] + w["bias"][None, :]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.mean(loss) + 1e-3 * jnp.sum(w["kernel"] ** 2)


def mlp(w, x, y):
    hidden = jnp.tanh(x @ w["w1"] + w["b1"][None, :])
    logits = hidden @ w["w2"] + w["b2"][None, :]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.mean(loss) + 1e-4 * (jnp.sum(w["w1"] ** 2) + jnp.sum(w["w2"] ** 2))


def problems(quick: bool) -> dict[str, tuple[Callable, Any, tuple]]:
    """name -> (f(params, *data), initial params, data)."""
    digits = load_digits()
    n = 300 if quick else len(digits.target)
    x, y = jnp.asarray(digits.data[:n] / 16.0), jnp.asarray(digits.target[:n])
    dim, hidden = (10, 8) if quick else (100, 32)
    rng = np.random.default_rng(0)
    return {
        "rosenbrock": (rosenbrock, {"x": jnp.asarray(np.tile([-1.2, 1.0], dim // 2))}, ()),
        "logistic": (logistic, {"kernel": jnp.zeros((64, 10)), "bias": jnp.zeros(10)}, (x, y)),
        "mlp": (
            mlp,
            {
                "w1": jnp.asarray(rng.normal(size=(64, hidden)) / 8.0),
                "b1": jnp.zeros(hidden),
                "w2": jnp.asarray(rng.normal(size=(hidden, 10)) / np.sqrt(hidden)),
                "b2": jnp.zeros(10),
            },
            (x, y),
        ),
    }


# ----------------------------------------------------------------------------- solvers


def gx_solver(f, params, max_steps, tol):
    tx = gx.lbfgs()

    def solve(params, data):
        r = gx.minimize(f, params, args=data, tx=tx, max_steps=max_steps, tol=tol)
        r = jax.block_until_ready(r)
        return float(r.value), int(r.steps), int(r.fun_evals)

    return solve


def scipy_solver(f, params, max_steps, tol):
    _, unravel = ravel_pytree(params)  # once: a new `unravel` would mean a new compile

    @jax.jit
    def value_and_grad(flat, data):
        return jax.value_and_grad(lambda v: f(unravel(v), *data))(flat)

    def solve(params, data):
        last_grad_norm = [np.inf]

        def fun(v):
            value, grad = value_and_grad(jnp.asarray(v), data)
            grad = np.asarray(grad)
            last_grad_norm[0] = float(np.linalg.norm(grad))
            return float(value), grad

        def stop_like_the_others(intermediate_result):
            del intermediate_result  # the last point evaluated is the accepted one
            if last_grad_norm[0] <= tol:
                raise StopIteration

        options = {"maxiter": max_steps, "gtol": 0.0, "ftol": 0.0, "maxcor": 10}
        x0 = np.asarray(ravel_pytree(params)[0])
        with threadpool_limits(1):  # threaded BLAS on tiny vectors is 30-100x slower here
            r = scipy.optimize.minimize(
                fun, x0, jac=True, method="L-BFGS-B", options=options,
                callback=stop_like_the_others,
            )  # fmt: skip
        return float(r.fun), int(r.nit), int(r.nfev)

    return solve


def optax_solver(f, params, max_steps, tol):
    """The loop of `optax.lbfgs`'s docstring, step jitted, stopping on the gradient norm."""
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(f)

    @jax.jit
    def step(params, state, data):
        value, grad = value_and_grad(params, *data, state=state)
        updates, state = opt.update(
            grad, state, params, value=value, grad=grad, value_fn=lambda p: f(p, *data)
        )
        params = optax.apply_updates(params, updates)
        evals = optax.tree.get(state, "num_linesearch_steps")
        return params, state, evals, optax.tree.norm(optax.tree.get(state, "grad"))

    def solve(params, data):
        state, evals, steps = opt.init(params), 1, 0
        for steps in range(1, max_steps + 1):  # noqa: B007
            params, state, n, grad_norm = step(params, state, data)
            evals += int(n)
            if float(grad_norm) <= tol:
                break
        return float(optax.tree.get(state, "value")), steps, evals

    return solve


FACTORIES = dict(zip(SOLVERS, (gx_solver, scipy_solver, optax_solver), strict=True))


# ----------------------------------------------------------------------------- measuring


def timed(fn: Callable, *args) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def evaluation_ms(f, params, data, n: int = 50, repeats: int = 5) -> float:
    """Median time of one `grad(f)` among `n` chained in one compiled loop: the floor any
    solver pays per function evaluation, with no loop or dispatch overhead."""

    def descend(_, p):
        return jax.tree.map(lambda w, g: w - 1e-12 * g, p, jax.grad(f)(p, *data))

    compiled = jax.jit(lambda p: jax.lax.fori_loop(0, n, descend, p))

    def run(p):
        return jax.block_until_ready(compiled(p))

    run(params)
    return 1e3 * float(np.median([timed(run, params)[0] for _ in range(repeats)])) / n


def run_problem(name, f, params, data, *, max_steps, tol, repeats, log) -> list[dict]:
    eval_ms = evaluation_ms(f, params, data)
    solvers = {s: FACTORIES[s](f, params, max_steps, tol) for s in SOLVERS}
    first = {s: timed(solve, params, data) for s, solve in solvers.items()}
    steady: dict[str, list[float]] = {s: [] for s in SOLVERS}
    for _ in range(repeats):  # alternate the solvers, same process
        for s, solve in solvers.items():
            steady[s].append(timed(solve, params, data)[0])
    rows = []
    for s in SOLVERS:
        value, iterations, evals = first[s][1]
        median = float(np.median(steady[s]))
        rows.append(
            dict(zip(COLUMNS, (name, s, value, iterations, evals), strict=False))
            | {"compile_s": round(max(first[s][0] - median, 0.0), 3)}
            | {"steady_ms": round(1e3 * median, 2), "steady_ms_all": [1e3 * t for t in steady[s]]}
            | {"eval_floor_ms": round(evals * eval_ms, 2)}
        )
        log(f"{name:11s} {s:15s} value {value:.10g} it {iterations} evals {evals} "
            f"steady {1e3 * median:.1f} ms")  # fmt: skip
    return rows


def goals(rows: list[dict]) -> dict[str, bool]:
    by = {(r["problem"], r["solver"]): r for r in rows}
    out = {}
    for problem in dict.fromkeys(r["problem"] for r in rows):
        ours, sp, ox = (by[problem, s] for s in SOLVERS)
        same = ours["value"] <= sp["value"] + 1e-6 * max(abs(sp["value"]), 1e-12)
        out[f"{problem}: value <= scipy's (+1e-6 rel)"] = bool(same)
        out[f"{problem}: steady <= scipy"] = ours["steady_ms"] <= sp["steady_ms"]
        out[f"{problem}: steady <= 0.5x optax loop"] = ours["steady_ms"] <= 0.5 * ox["steady_ms"]
    return out


def markdown(rows: list[dict]) -> str:
    head = "| problem | solver | final value | iterations | f evals | compile s | steady ms "
    lines = [head + "| eval floor ms |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(
            f"| {r['problem']} | {r['solver']} | {r['value']:.10g} | {r['iterations']} | "
            f"{r['fun_evals']} | {r['compile_s']:.2f} | {r['steady_ms']:.1f} | "
            f"{r['eval_floor_ms']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes, 2 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="steady calls (default 7)")
    parser.add_argument("--max-steps", type=int, default=1000)
    parser.add_argument("--tol", type=float, default=1e-6, help="gradient-norm tolerance")
    parser.add_argument("--problems", nargs="+", default=["rosenbrock", "logistic", "mlp"])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 7)
    start = time.perf_counter()
    rows = []
    with jax.enable_x64(True):  # scoped: importing this module changes no global setting
        for name in args.problems:
            f, params, data = problems(args.quick)[name]
            rows += run_problem(
                name, f, params, data, max_steps=args.max_steps, tol=args.tol, repeats=repeats,
                log=lambda m: print(m, file=sys.stderr, flush=True),
            )  # fmt: skip
    result = {
        "machine": machine.describe(("jax", "jaxlib", "optax", "numpy", "scipy")),
        "settings": {k: getattr(args, k) for k in ("quick", "problems", "max_steps", "tol")}
        | {"repeats": repeats, "dtype": "float64"},
        "goals": goals(rows),
        "rows": rows,
        "runtime_s": round(time.perf_counter() - start, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lbfgs.json").write_text(json.dumps(result, indent=1))
    (args.out / "lbfgs.md").write_text(markdown(rows) + "\n")
    print(markdown(rows))
    print(json.dumps(result["goals"], indent=1))
    print(f"\n{result['runtime_s']} s on {result['machine']['cpu']}")
    return result


if __name__ == "__main__":
    main()
