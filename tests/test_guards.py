"""Guards: skipped steps leave no trace, spikes are caught, loss scaling behaves like torch's
GradScaler, and `stable` keeps non-finite gradients out of params and state."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import gradxform as gx

PARAMS = {"w": jnp.linspace(-1.0, 1.0, 6), "b": jnp.zeros(2)}


def grads(t, scale=1.0):
    k1, k2 = jax.random.split(jax.random.key(t))
    return {"w": scale * jax.random.normal(k1, (6,)), "b": scale * jax.random.normal(k2, (2,))}


def close_to_scale(a, b):
    """Equal to float32 rounding: 1e-6 of the leaf's largest element (the guard's select may
    change which operations XLA fuses into an FMA, moving a tiny element by an ulp of the big)."""
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * float(np.max(np.abs(b))))


def test_healthy_steps_pass_through_unchanged():
    tx, ref = gx.skip_if(gx.adam(1e-2), warmup_steps=5), gx.adam(1e-2)
    s, r = tx.init(PARAMS), ref.init(PARAMS)
    for t in range(30):
        u, s = jax.jit(tx.update)(grads(t), s, PARAMS)
        v, r = jax.jit(ref.update)(grads(t), r, PARAMS)
        jax.tree.map(close_to_scale, u, v)
    assert int(s.skipped_nonfinite + s.skipped_norm + s.skipped_loss) == 0


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
def test_nonfinite_step_is_zero_and_leaves_inner_state_bitwise_unchanged(bad):
    tx = gx.skip_if(gx.adam(1e-2))
    s = tx.init(PARAMS)
    for t in range(3):
        _, s = tx.update(grads(t), s, PARAMS)
    g = grads(3)
    g["w"] = g["w"].at[1].set(bad)
    u, s2 = jax.jit(tx.update)(g, s, PARAMS)
    assert all(float(jnp.max(jnp.abs(x))) == 0 for x in jax.tree.leaves(u))
    jax.tree.map(np.testing.assert_array_equal, s2.inner, s.inner)
    assert bool(s2.skipped) and int(s2.skipped_nonfinite) == 1 and int(s2.consecutive) == 1


def test_norm_spike_after_warmup_is_skipped_but_not_during_it():
    tx = gx.skip_if(gx.sgd(0.1), warmup_steps=10, norm_z=6.0, window=15)
    s = tx.init(PARAMS)
    _, s = tx.update(grads(0, 1000.0), s, PARAMS)  # during warm-up: accepted
    assert not bool(s.skipped)
    for t in range(1, 20):
        _, s = tx.update(grads(t), s, PARAMS)
    _, s = tx.update(grads(20, 1000.0), s, PARAMS)  # the warm-up spike has left the window
    assert bool(s.skipped) and int(s.skipped_norm) == 1
    _, s = tx.update(grads(21), s, PARAMS)
    assert not bool(s.skipped) and int(s.consecutive) == 0


def test_loss_spike_is_skipped_with_rolling_window():
    tx = gx.skip_if(gx.sgd(0.1), norm_z=None, loss_z=4.0, warmup_steps=10, window=20)
    s = tx.init(PARAMS)
    for t in range(30):
        _, s = tx.update(grads(t), s, PARAMS, loss=1.0 + 0.05 * np.sin(t))
    assert not bool(s.skipped)
    _, s = tx.update(grads(30), s, PARAMS, loss=5.0)
    assert bool(s.skipped) and int(s.skipped_loss) == 1
    _, s = tx.update(grads(31), s, PARAMS, loss=jnp.nan)
    assert int(s.skipped_nonfinite) == 1


def test_give_up_after_consecutive_spikes_accepts_the_new_regime():
    tx = gx.skip_if(gx.sgd(0.1), warmup_steps=5, give_up_after=3)
    s = tx.init(PARAMS)
    for t in range(10):
        _, s = tx.update(grads(t), s, PARAMS)
    skipped = []
    for t in range(10, 15):
        _, s = tx.update(grads(t, 1e4), s, PARAMS)
        skipped.append(bool(s.skipped))
    assert skipped[:3] == [True] * 3 and skipped[3] is False


def test_nonfinite_is_never_accepted_even_after_giving_up():
    tx = gx.skip_if(gx.sgd(0.1), give_up_after=1)
    s = tx.init(PARAMS)
    for t in range(4):
        _, s = tx.update(jax.tree.map(lambda x: x * jnp.nan, grads(t)), s, PARAMS)
        assert bool(s.skipped)


def test_skip_if_works_under_shard_map():
    mesh = Mesh(jax.devices(), ("data",))
    tx = gx.skip_if(gx.sgd(0.1), axis_name="data")
    g = {"w": jnp.ones(16).at[3].set(jnp.nan)}  # one shard holds the NaN

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=P("data"), out_specs=P("data"),
                       check_vma=False)  # fmt: skip
    def step(g):
        u, _ = tx.update(g, tx.init(g))
        return u

    u = jax.jit(step)(g)
    np.testing.assert_array_equal(u["w"], 0.0)  # every shard skipped, not just the NaN one


def test_dynamic_loss_scale_backs_off_on_overflow_and_grows_after_interval():
    tx = gx.dynamic_loss_scale(gx.sgd(0.1), initial_scale=2.0**15, growth_interval=3)
    params = {"w": jnp.ones(4, jnp.float16)}
    s = tx.init(params)

    def step(s, x):
        loss_fn = lambda p: gx.scale_loss(jnp.sum(p["w"] * x), s)
        return tx.update(jax.grad(loss_fn)(params), s, params)

    u, s = step(s, jnp.float16(1000.0))  # 1000 * 32768 overflows float16
    assert float(gx.loss_scale(s)) == 2.0**14 and bool(s.skipped)
    np.testing.assert_array_equal(u["w"], 0)
    for _ in range(3):
        u, s = step(s, jnp.float16(1.0))
    np.testing.assert_allclose(u["w"].astype(np.float32), -0.1, rtol=1e-3)  # unscaled exactly
    assert float(gx.loss_scale(s)) == 2.0**15 and int(s.skipped_total) == 1


def test_loss_scale_helper_explains_a_missing_wrapper():
    with pytest.raises(ValueError, match="no `dynamic_loss_scale`"):
        gx.loss_scale(gx.adam(1e-3).init(PARAMS))


@pytest.mark.parametrize(
    "optimizer", [gx.sgd(0.05, momentum=0.9), gx.adam(1e-3)], ids=["sgd", "adam"]
)
def test_stable_keeps_nan_and_spikes_out_of_params_and_state(optimizer):
    tx = gx.stable(optimizer)
    params = PARAMS

    @jax.jit
    def step(params, state, g):
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state

    state = tx.init(params)
    for t in range(60):
        g = grads(t)
        if t % 7 == 6:
            g = jax.tree.map(lambda x: x * jnp.nan, g)
        elif t % 11 == 10:
            g = jax.tree.map(lambda x: x * 1e4, g)
        params, state = step(params, state, g)
        # The health record reports the NaN step (that is its job); the optimizer's state,
        # the guard's moments and the params never see a NaN.
        kept = (params, state.inner, state.health.log_norm, state.health.baseline, state.step_scale)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(kept))
        assert float(jnp.max(jnp.abs(params["w"]))) < 10
        assert bool(state.skipped) == (t % 7 == 6 or t % 11 == 10)
    metrics = gx.read_health(state)
    assert metrics["stable/skipped_total"] == 8 + 5  # every NaN step and every x1e4 spike


def test_spike_inside_the_zscore_warmup_is_caught_by_the_ratio_bound():
    tx = gx.skip_if(gx.sgd(0.1), warmup_steps=20, max_norm_ratio=100.0)
    s = tx.init(PARAMS)
    for t in range(3):
        _, s = tx.update(grads(t), s, PARAMS)
    _, s = tx.update(grads(3, 1e3), s, PARAMS)
    assert bool(s.skipped) and int(s.skipped_norm) == 1
    _, s = tx.update(grads(4, 5.0), s, PARAMS)  # a 5x rise is not a spike
    assert not bool(s.skipped)


def test_absolute_norm_bound_skips_from_the_first_step():
    tx = gx.skip_if(gx.sgd(0.1), max_norm=5.0)
    s = tx.init(PARAMS)
    _, s = tx.update(grads(0, 10.0), s, PARAMS)
    assert bool(s.skipped) and int(s.skipped_norm) == 1
    _, s = tx.update(grads(1), s, PARAMS)
    assert not bool(s.skipped)


def test_stable_takes_an_absolute_bound_for_guard_and_telemetry():
    tx = gx.stable(gx.sgd(0.1), max_norm=5.0)
    state = tx.init(PARAMS)
    u, state = tx.update(grads(0, 100.0), state, PARAMS)
    assert all(float(jnp.max(jnp.abs(x))) == 0 for x in jax.tree.leaves(u))
    metrics = gx.read_health(state)
    assert metrics["stable/skipped"] == 1.0 and metrics["health/exploding"] == 1.0


# ------------------------------------------------------------------- low precision, wrappers


def test_float16_squares_are_formed_in_the_float32_moment():
    """g = 1e-4 squares to 1e-8, below float16's smallest subnormal: a float32 `nu` must get
    it, or Adam divides by eps alone (a 1e4 step instead of ~1)."""
    g = jnp.full(3, 1e-4, jnp.float16)
    tx = gx.scale_by_adam(mu_dtype=jnp.float32, nu_dtype=jnp.float32)
    u, state = tx.update(g, tx.init(g))
    np.testing.assert_allclose(np.asarray(state.nu, np.float64), 1e-3 * 1e-8, rtol=1e-3)
    np.testing.assert_allclose(np.asarray(u, np.float32), 1.0, rtol=1e-2)
    assert u.dtype == jnp.float16


def test_float16_training_with_dynamic_loss_scaling_converges():
    """Least squares in float16 params, gradients of the scaled float16 loss, Adam moments in
    float32: the loss falls and nothing goes non-finite."""
    x = jax.random.normal(jax.random.key(0), (64, 4)).astype(jnp.float16)
    y = x @ jnp.asarray([0.5, -1.0, 2.0, 0.25], jnp.float16)
    params = {"w": jnp.zeros(4, jnp.float16)}
    tx = gx.dynamic_loss_scale(gx.adam(0.05, mu_dtype=jnp.float32, nu_dtype=jnp.float32))
    loss = lambda p: jnp.mean((x @ p["w"] - y) ** 2)

    @jax.jit
    def step(params, state):
        scaled = jax.grad(lambda p: gx.scale_loss(loss(p), state))(params)
        updates, state = tx.update(scaled, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    first = float(loss(params))
    for _ in range(200):
        params, state = step(params, state)
    assert params["w"].dtype == jnp.float16
    assert bool(jnp.all(jnp.isfinite(params["w"])))
    assert float(loss(params)) < 1e-2 * first
    assert int(state.skipped_total) < 5


def _accumulate(tx, bad_step=2, steps=10):
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    for t in range(steps):
        g = {"w": jnp.full(3, jnp.nan if t == bad_step else 0.1)}
        u, state = tx.update(g, state, params)
        params = optax.apply_updates(params, u)
    return params, state


def test_guard_inside_multisteps_is_loud_not_silent():
    """One NaN micro-batch poisons MultiSteps' accumulator for good; a guard inside it then
    skips every later step. read_health and assert_healthy say so."""
    _, state = _accumulate(optax.MultiSteps(gx.stable(gx.adam(1e-2)), 2))
    assert gx.read_health(state)["stable/stalled"] == 1.0
    with pytest.raises(gx.StalledTrainingError, match=r"gx.skip_if\(optax.MultiSteps"):
        gx.assert_healthy(state)


def test_guard_outside_multisteps_recovers_from_a_nan_micro_batch():
    params, state = _accumulate(gx.health(gx.skip_if(optax.MultiSteps(gx.adam(1e-2), 2))))
    read = gx.read_health(state)
    assert read["skip/stalled"] == 0.0 and read["skip/skipped_nonfinite"] == 1.0
    assert float(params["w"][0]) < 0.97  # kept training: 4 accepted Adam steps of ~1e-2
    gx.assert_healthy(state)


def test_a_whole_window_of_skipped_steps_is_reported():
    tx = gx.health(gx.skip_if(gx.sgd(0.1), window=4, warmup_steps=2))
    params = {"w": jnp.ones(2)}
    state = tx.init(params)
    for _ in range(4):
        _, state = tx.update({"w": jnp.full(2, jnp.inf)}, state, params)
    assert gx.read_health(state)["skip/stalled"] == 1.0
    with pytest.raises(gx.StalledTrainingError, match="4 consecutive steps skipped"):
        gx.assert_healthy(state)
    with pytest.raises(gx.NonFiniteGradientError):  # not stalled, but the last step was inf
        gx.assert_healthy(state, check_stalled=False)
