"""What each stability layer adds to a bare optimizer update, beside optax's guard.

`python benchmarks/guard_cost.py [--params 4e6]`: one float32 leaf, params and state donated,
same process; prints the median step time of 10 steps after warm-up and XLA's temporary bytes
(in multiples of the parameter count) for each chain.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gradxform as gx


def chains() -> dict[str, optax.GradientTransformation]:
    return {
        "gx.adamw": gx.adamw(1e-3),
        "zclip + adamw": gx.chain(gx.zclip(max_norm=None), gx.adamw(1e-3)),
        "health(adamw)": gx.health(gx.adamw(1e-3)),
        "skip_if(adamw)": gx.skip_if(gx.adamw(1e-3)),
        "stable(adamw)": gx.stable(gx.adamw(1e-3)),
        "optax apply_if_finite(clip + adamw)": optax.apply_if_finite(
            optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)), 5
        ),
    }


def measure(tx: optax.GradientTransformation, n: int, repeats: int = 10) -> tuple[float, float]:
    params = {"w": jnp.ones((n,), jnp.float32)}
    grads = {"w": jnp.full((n,), 0.01, jnp.float32)}

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    step = jax.jit(step, donate_argnums=(0, 1))
    temp = step.lower(params, tx.init(params), grads).compile().memory_analysis().temp_size_in_bytes
    p, s = step(jax.tree.map(jnp.copy, params), tx.init(params), grads)
    jax.block_until_ready(p)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        p, s = step(p, s, grads)
        jax.block_until_ready(p)
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times)), temp / (4 * n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=4e6)
    n = int(parser.parse_args().params)
    print(f"{'chain':40s} {'step ms':>8s} {'temp x params':>14s}   ({jax.devices()[0]}, n={n})")
    for name, tx in chains().items():
        ms, temp = measure(tx, n)
        print(f"{name:40s} {ms:8.1f} {temp:14.2f}")


if __name__ == "__main__":
    main()
