"""Each optimizer of the case table converges on a quadratic and on the Rosenbrock function,
with the settings its row gives (`Case.tuned`)."""

import jax
import jax.numpy as jnp
import optax
import pytest

import gradxform as gx
from tests.cases import OPTIMIZERS

TUNED = [(case.name, tuned) for case in OPTIMIZERS for tuned in case.tuned]
IDS = [tuned.label for _, tuned in TUNED]


def minimise(f, tx, x0, steps):
    def body(carry, _):
        x, state = carry
        u, state = tx.update(jax.grad(f)(x), state, x)
        return (optax.apply_updates(x, u), state), None

    (x, _), _ = jax.lax.scan(body, (x0, tx.init(x0)), None, length=steps)
    return x


@pytest.mark.parametrize("name,tuned", TUNED, ids=IDS)
def test_converges_on_an_ill_conditioned_quadratic(name, tuned):
    scales = jnp.array([1.0, 4.0, 0.5])
    target = jnp.array([1.0, -2.0, 3.0])
    f = lambda x: 0.5 * jnp.sum(scales * (x - target) ** 2)
    x = minimise(f, getattr(gx, name)(**tuned.quadratic), jnp.zeros(3), 2000)
    assert float(f(x)) < 1e-4, (tuned.label, x)


@pytest.mark.parametrize("name,tuned", TUNED, ids=IDS)
def test_converges_on_rosenbrock(name, tuned):
    f = lambda x: (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2
    tx = getattr(gx, name)(**tuned.rosenbrock)
    x = minimise(f, tx, jnp.array([-1.0, 1.0]), tuned.rosenbrock_steps)
    assert float(jnp.max(jnp.abs(x - 1.0))) < 0.05, (tuned.label, x)
