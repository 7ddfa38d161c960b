"""Multi-device behaviour on 8 virtual CPU devices: `jit` with `NamedSharding` equals one
device, state sharding follows the params', replicas add identical noise, and data-parallel
`pmap` training equals one device (`axis_name` under `pmap` and `shard_map`:
tests/test_axis_name.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import gradxform as gx
from tests.cases import CASES, make

N = 8


@pytest.fixture(scope="module", autouse=True)
def eight_devices():
    assert jax.device_count() == N, "tests/conftest.py must set 8 virtual CPU devices"


def sharded_params():
    key = jax.random.key(0)
    # Sizes no state buffer of the test cases has (AutoClip's history is < 30).
    return {"w": jax.random.normal(key, (N * 5, 3)), "b": jnp.linspace(-1.0, 1.0, N * 6)}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_jit_with_named_sharding_equals_one_device_and_state_follows_params(case):
    mesh = Mesh(jax.devices(), ("data",))
    params = sharded_params()
    sharding = NamedSharding(mesh, P("data"))
    sharded = jax.device_put(params, sharding)
    tx, _ = make(case)

    step = jax.jit(tx.update)
    g = jax.tree.map(lambda x: 0.5 * x + 0.1, params)
    expected, _ = step(g, tx.init(params), params)
    state = tx.init(sharded)
    got, new_state = step(jax.device_put(g, sharding), state, sharded)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, expected)
    for s in (state, new_state):
        for leaf in jax.tree.leaves(s):
            if leaf.shape[:1] in ((N * 5,), (N * 6,)):  # per-parameter leaves
                assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), case.name


def test_replicas_add_identical_noise_under_pmap():
    tx = gx.add_noise(eta=1.0, gamma=0.55, key=42)
    grads = jnp.zeros((N, 5))
    state = jax.pmap(tx.init)(grads)
    noise, _ = jax.pmap(tx.update, axis_name="devices")(grads, state)
    assert float(jnp.std(noise)) > 0.1
    np.testing.assert_array_equal(noise, jnp.broadcast_to(noise[0], noise.shape))
    single, _ = tx.update(grads[0], tx.init(grads[0]))
    np.testing.assert_array_equal(noise[0], single)


def test_data_parallel_pmap_training_matches_one_device():
    """pmean-averaged gradients on replicated params == one device on the whole batch."""
    x = jax.random.normal(jax.random.key(1), (N * 4, 3))
    y = x @ jnp.array([1.0, -2.0, 0.5])
    loss = lambda w, x, y: jnp.mean((x @ w - y) ** 2)
    tx = gx.chain(gx.clip_by_global_norm(1.0), gx.adamw(0.05))
    w = jnp.zeros(3)

    def step(w, state, x, y, axis_name=None):
        g = jax.grad(loss)(w, x, y)
        if axis_name:
            g = jax.lax.pmean(g, axis_name)
        u, state = tx.update(g, state, w)
        return optax.apply_updates(w, u), state

    w1, s1 = w, tx.init(w)
    for _ in range(5):
        w1, s1 = jax.jit(step)(w1, s1, x, y)
    wp, sp = jax.tree.map(lambda a: jnp.broadcast_to(a, (N, *a.shape)), (w, tx.init(w)))
    pstep = jax.pmap(functools.partial(step, axis_name="batch"), axis_name="batch")
    for _ in range(5):
        wp, sp = pstep(wp, sp, x.reshape(N, 4, 3), y.reshape(N, 4))
    np.testing.assert_allclose(wp, jnp.broadcast_to(w1, wp.shape), rtol=1e-5, atol=1e-6)
