"""gradxform inside the clients users put it in: optax's combinators and wrappers, Flax NNX's
`Optimizer`, Flax's `TrainState`, and a checkpoint round trip."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, serialization
from flax.training import train_state

import gradxform as gx
from tests.cases import (
    CASES,
    OPTIMIZERS,
    assert_trees_close,
    gradients_at,
    make,
    random_tree,
    run,
)


def assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_chains_mix_both_ways():
    params = random_tree(0)
    mixed_a = optax.chain(gx.clip(0.5), optax.adam(1e-3))
    mixed_b = gx.chain(optax.clip(0.5), gx.adam(1e-3))
    pure = optax.chain(optax.clip(0.5), optax.adam(1e-3))
    _, p_a, _ = run(mixed_a, params, steps=5)
    _, p_b, _ = run(mixed_b, params, steps=5)
    _, p_ref, _ = run(pure, params, steps=5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), p_a, p_ref)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), p_b, p_ref)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_checkpoint_round_trip_continues_bitwise(case):
    params = random_tree(0)
    tx, _ = make(case)
    update = jax.jit(tx.update)
    state = tx.init(params)
    for t in range(2):
        _, state = update(gradients_at(params, t), state, params)
    restored = serialization.from_bytes(tx.init(params), serialization.to_bytes(state))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert_trees_equal(restored, state)
    g = gradients_at(params, 2)
    assert_trees_equal(update(g, restored, params), update(g, state, params))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_multisteps_accumulates_then_applies(case):
    params = random_tree(0)
    tx, _ = make(case)
    multi = optax.MultiSteps(tx, every_k_schedule=2)
    g0, g1 = gradients_at(params, 0), gradients_at(params, 1)
    state, update = multi.init(params), jax.jit(multi.update)  # one compile for both steps
    u0, state = update(g0, state, params)
    assert all(float(jnp.max(jnp.abs(x))) == 0 for x in jax.tree.leaves(u0))
    u1, _ = update(g1, state, params)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g0, g1)
    expected, _ = tx.update(mean, tx.init(params), params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), u1, expected)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_inject_hyperparams_wraps_every_factory(case):
    params = random_tree(0)
    _, kwargs = make(case)
    numeric = lambda v: isinstance(v, int | float) and not isinstance(v, bool)
    static = [k for k, v in kwargs.items() if not numeric(v) or k in ("key", "history", "window")]
    factory = getattr(gx, case.name)
    injected = optax.inject_hyperparams(factory, static_args=static)(**kwargs)
    ours, _, _ = run(factory(**kwargs), params, steps=3)
    theirs, _, state = run(injected, params, steps=3)
    assert_trees_close(ours, theirs, rtol=max(case.rtol, 1e-6), atol=max(case.rtol, 1e-6))
    assert set(kwargs) - set(static) <= set(state.hyperparams)  # defaults are injected too


def test_masked_leaves_pass_through_untouched():
    params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
    grads = {"kernel": jnp.full((2, 2), 3.0), "bias": jnp.full(2, 3.0)}
    tx = optax.masked(gx.clip(1.0), {"kernel": True, "bias": False})
    u, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(u["kernel"], 1.0)
    np.testing.assert_array_equal(u["bias"], 3.0)


def test_weight_decay_mask_skips_biases():
    params = {"Dense_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
    zeros = jax.tree.map(jnp.zeros_like, params)
    tx = gx.add_decayed_weights(0.5, mask=gx.weight_decay_mask)
    u, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_array_equal(u["Dense_0"]["kernel"], 0.5)
    np.testing.assert_array_equal(u["Dense_0"]["bias"], 0.0)


def test_multi_transform_routes_labels_to_gradxform_transforms():
    params = {"encoder": {"w": jnp.ones(3)}, "head": {"w": jnp.ones(3)}}
    tx = optax.multi_transform(
        {"slow": gx.sgd(0.01), "fast": gx.adam(0.1)},
        {"encoder": "slow", "head": "fast"},
    )
    grads = jax.tree.map(jnp.ones_like, params)
    u, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(u["encoder"]["w"], -0.01, rtol=1e-6)
    np.testing.assert_allclose(u["head"]["w"], -0.1, rtol=1e-5)


class Tiny(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(4, 8, rngs=rngs)
        self.out = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))


def _loss(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


@pytest.mark.parametrize("case", OPTIMIZERS, ids=lambda c: c.name)
def test_flax_nnx_optimizer_matches_optax_twin(case):
    x = jax.random.normal(jax.random.key(0), (16, 4))
    y = jnp.sum(x, axis=1, keepdims=True)
    tx, kwargs = make(case)
    results = []
    for transformation in (tx, case.twin(**kwargs)):
        model = Tiny(nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, transformation, wrt=nnx.Param)

        @nnx.jit
        def step(model, optimizer):
            loss, grads = nnx.value_and_grad(_loss)(model, x, y)
            optimizer.update(model, grads)
            return loss

        losses = [float(step(model, optimizer)) for _ in range(5)]
        results.append((losses, nnx.state(model, nnx.Param)))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        results[0][1],
        results[1][1],
    )


@pytest.mark.parametrize("case", OPTIMIZERS, ids=lambda c: c.name)
def test_flax_train_state_applies_gradxform_updates(case):
    tx, _ = make(case)
    params = random_tree(0)
    state = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
    apply = jax.jit(lambda s, g: s.apply_gradients(grads=g))
    expected_params, opt_state = params, tx.init(params)
    for t in range(3):
        g = gradients_at(params, t)
        state = apply(state, g)
        u, opt_state = tx.update(g, opt_state, expected_params)
        expected_params = optax.apply_updates(expected_params, u)
    assert int(state.step) == 3
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
        state.params,
        expected_params,
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _EqxDense:
    """An Equinox-style module: a dataclass pytree whose unused fields are None."""

    kernel: jax.Array
    bias: jax.Array
    activation_state: None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _EqxTiny:
    hidden: _EqxDense
    out: _EqxDense
    dropout: None = None


def _guarded_chain():
    inner = gx.chain(gx.clip_by_global_norm(1.0), gx.zclip(), gx.clip_by_leaf_norm(0.5),
                     gx.sgd(0.1))  # fmt: skip
    return gx.health(gx.skip_if(inner))


def _half_square(tree):
    """0.5 ||params||^2, whose gradient is the params: the same under every client."""
    return 0.5 * sum(jnp.sum(x**2) for x in jax.tree.leaves(tree))


def _read_plain(params, steps):
    tx = _guarded_chain()
    state = tx.init(params)
    for _ in range(steps):
        updates, state = tx.update(jax.grad(_half_square)(params), state, params)
        params = optax.apply_updates(params, updates)
    return gx.read_health(state)


def _read_nnx(model, steps):
    optimizer = nnx.Optimizer(model, _guarded_chain(), wrt=nnx.Param)
    loss = lambda m: _half_square(nnx.state(m, nnx.Param))
    for _ in range(steps):
        optimizer.update(model, nnx.grad(loss)(model))
    return gx.read_health(optimizer.opt_state)


def _read_train_state(params, steps):
    state = train_state.TrainState.create(apply_fn=None, params=params, tx=_guarded_chain())
    for _ in range(steps):
        state = state.apply_gradients(grads=jax.grad(_half_square)(state.params))
    return gx.read_health(state.opt_state)


def test_read_health_names_are_identical_under_every_client():
    model = Tiny(nnx.Rngs(0))
    plain = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    eqx = _EqxTiny(*(_EqxDense(plain[k]["kernel"], plain[k]["bias"]) for k in ("hidden", "out")))
    read = {
        "plain": _read_plain(plain, 3),
        "nnx.Optimizer": _read_nnx(model, 3),
        "TrainState": _read_train_state(plain, 3),
        "equinox-style": _read_plain(eqx, 3),
    }
    expected = read["plain"]
    documented = {"clip/norm", "clip/threshold", "zclip/norm", "skip/skipped", "health/count"}
    assert documented | {"clip_1/norm/hidden/kernel", "health/grad_norm/out/bias"} <= set(expected)
    for client, metrics in read.items():
        assert metrics.keys() == expected.keys(), client  # (the order follows each tree's)
        values = [metrics[k] for k in expected]
        np.testing.assert_allclose(values, list(expected.values()), rtol=1e-6, err_msg=client)
