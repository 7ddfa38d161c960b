"""Draw the cookbook's telemetry pictures into docs/img/: `python docs/_ext/make_figures.py`.

Three small runs on synthetic data (seconds on a CPU), each logged with `gx.read_health` every
step and drawn with `plot_health`:

- exploding.png: a 4-layer ReLU MLP, SGD momentum 0.9 at a learning rate 10x too high;
- vanishing.png: a 10-layer sigmoid MLP, SGD momentum 0.9: the early layers hardly move;
- stable.png: the same ReLU MLP at a sane learning rate under `gx.stable`, with gradients x1000
  at step 60 and NaN at step 90 injected: both are refused, training goes on.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gradxform as gx
from gradxform.plots import plot_health

OUT = Path(__file__).resolve().parent.parent / "img"


def init_mlp(seed: int, sizes: list[int]) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {
            "kernel": jnp.asarray(rng.normal(size=(m, n)) * (2 / m) ** 0.5, jnp.float32),
            "bias": jnp.zeros(n),
        }
        for m, n in itertools.pairwise(sizes)
    ]


def mlp(params, x, activation):
    for layer in params[:-1]:
        x = activation(x @ layer["kernel"] + layer["bias"])
    return x @ params[-1]["kernel"] + params[-1]["bias"]


rng = np.random.default_rng(0)
X = jnp.asarray(rng.normal(size=(256, 16)), jnp.float32)
TEACHER = init_mlp(1, [16, 32, 4])
Y = jnp.argmax(mlp(TEACHER, X, jax.nn.relu), axis=-1)


def run(tx, params, steps, activation=jax.nn.relu, inject=None):
    """Train full-batch; `inject(t, grads)` may corrupt the gradients of step t."""

    def loss_fn(p):
        logits = mlp(p, X, activation)
        return optax.softmax_cross_entropy_with_integer_labels(logits, Y).mean()

    @jax.jit
    def step(p, s, factor):
        loss, g = jax.value_and_grad(loss_fn)(p)
        g = jax.tree.map(lambda x: x * factor, g)
        u, s = tx.update(g, s, p, loss=loss)
        return optax.apply_updates(p, u), s

    state, history = tx.init(params), []
    for t in range(steps):
        factor = jnp.asarray(1.0 if inject is None else inject(t), jnp.float32)
        params, state = step(params, state, factor)
        history.append(gx.read_health(state))
    return history


def main() -> None:
    OUT.mkdir(exist_ok=True)
    relu_net = init_mlp(0, [16, 64, 64, 64, 4])
    history = run(gx.health(gx.sgd(1.0, momentum=0.9)), relu_net, 30)
    plot_health(history, OUT / "exploding.png", title="exploding: SGD momentum at lr 1.0")

    sigmoid_net = init_mlp(0, [16] + [32] * 10 + [4])
    history = run(gx.health(gx.sgd(0.1, momentum=0.9)), sigmoid_net, 200, jax.nn.sigmoid)
    plot_health(history, OUT / "vanishing.png", title="vanishing: 10 sigmoid layers")

    spikes = lambda t: {60: 1000.0, 90: float("nan")}.get(t, 1.0)
    history = run(gx.stable(gx.sgd(0.1, momentum=0.9)), relu_net, 150, inject=spikes)
    plot_health(history, OUT / "stable.png", title="gx.stable: x1000 at step 60, NaN at step 90")
    print(f"wrote {', '.join(p.name for p in sorted(OUT.glob('*.png')))} in {OUT}")


if __name__ == "__main__":
    main()
