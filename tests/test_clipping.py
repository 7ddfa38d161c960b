"""Clipping placements and records beyond parity: update-relative clipping after the optimizer
(AGC as a trust ratio, block RMS as Adafactor/StableAdamW update clipping)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradxform as gx


def test_agc_after_the_optimizer_bounds_each_units_step_relative_to_its_weights():
    params = {"w": jnp.array([[1.0, 0.01], [1.0, 0.01]])}  # column 1 has tiny weights
    grads = {"w": jnp.ones((2, 2))}
    tx = gx.chain(gx.scale_by_adam(), gx.adaptive_grad_clip(0.1, eps=1e-6),
                  gx.scale_by_learning_rate(1.0))  # fmt: skip
    u, state = tx.update(grads, tx.init(params), params)
    step_norm = np.linalg.norm(np.asarray(u["w"]), axis=0)
    param_norm = np.linalg.norm(np.asarray(params["w"]), axis=0)
    np.testing.assert_allclose(step_norm / param_norm, 0.1, rtol=1e-5)  # Adam alone: ~1 and ~100
    assert bool(state[1].record.per_leaf("clipped")["w"])


def test_block_rms_after_adam_caps_the_update_rms():
    params = {"w": jnp.zeros(100)}
    tx = gx.chain(gx.scale_by_adam(), gx.clip_by_block_rms(0.5))
    u, _ = tx.update({"w": jnp.ones(100)}, tx.init(params), params)  # Adam's first step: rms 1
    np.testing.assert_allclose(np.sqrt(np.mean(np.square(u["w"]))), 0.5, rtol=1e-5)


def test_clip_records_show_what_happened_without_a_second_pass():
    tx = gx.chain(gx.clip(0.5), gx.clip_by_global_norm(1.0))
    g = {"a": jnp.array([3.0, -0.2]), "b": jnp.array([0.1])}
    _, state = jax.jit(tx.update)(g, tx.init(g))
    by_value, by_norm = state
    assert float(by_value.record.norm) == 3.0 and bool(by_value.record.clipped)
    np.testing.assert_allclose(by_norm.record.norm, np.linalg.norm([0.5, -0.2, 0.1]), rtol=1e-6)
    assert not bool(by_norm.record.clipped)
    metrics = gx.read_health(state)
    assert metrics["clip/clipped"] == 1.0 and metrics["clip_1/clipped"] == 0.0


def test_threshold_schedule_is_evaluated_at_the_step_count():
    tx = gx.clip_by_global_norm(optax.linear_schedule(1.0, 3.0, transition_steps=2))
    g = {"w": jnp.array([10.0])}
    state = tx.init(g)
    norms = []
    for _ in range(3):
        u, state = tx.update(g, state)
        norms.append(float(u["w"][0]))
    assert norms == [1.0, 2.0, 3.0]


@pytest.mark.parametrize(
    "shape,axis",
    [((3, 128, 96), None), ((2, 2, 2, 8192), None), ((2, 3, 64, 160), (0, 1)), ((4, 8192), -2)],
)
def test_agc_units_of_few_rows_and_many_columns_match_optax(shape, axis):
    # these take the sum-of-rows path of `unitwise_sum_of_squares` (>= 8192 units, <= 128 rows)
    key_g, key_p = jax.random.split(jax.random.key(0))
    params = {"w": jax.random.normal(key_p, shape)}
    grads = {"w": 5.0 * jax.random.normal(key_g, shape)}
    tx = gx.adaptive_grad_clip(0.05, axis=axis)
    got, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    if axis is None:
        expected, _ = optax.adaptive_grad_clip(0.05).update(grads, optax.EmptyState(), params)
    else:
        norm = lambda x: jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
        scale = jnp.minimum(1.0, 0.05 * jnp.maximum(norm(params["w"]), 1e-3) / norm(grads["w"]))
        expected = {"w": grads["w"] * scale}
    np.testing.assert_allclose(got["w"], expected["w"], rtol=2e-6, atol=1e-7)
