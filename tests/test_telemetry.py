"""Gradient-health telemetry: exact statistics, flags that fire when they should and not
otherwise, readable records anywhere in a nested state, and assertions naming step and layer."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.experimental import checkify

import gradxform as gx


def feed(tx, grads_seq, params):
    state = tx.init(params)
    update = jax.jit(tx.update)
    for g in grads_seq:
        _, state = update(g, state, params)
    return state


def noisy(step, scale=1.0, shapes=((8, 4), (4,))):
    keys = jax.random.split(jax.random.key(step), len(shapes))
    return {f"layer{i}": {"w": scale * jax.random.normal(k, s)} for i, (k, s) in
            enumerate(zip(keys, shapes, strict=True))}  # fmt: skip


PARAMS = jax.tree.map(jnp.ones_like, noisy(0))


def test_statistics_are_exact():
    g = {"a": jnp.array([3.0, 0.0, 4.0]), "b": jnp.array([[0.0, 12.0]])}
    params = {"a": jnp.full(3, 2.0), "b": jnp.full((1, 2), 1.0)}
    tx = gx.health(gx.scale(-0.5))
    _, s = tx.update(g, tx.init(params), params)
    np.testing.assert_allclose(s.global_norm, 13.0, rtol=1e-6)
    np.testing.assert_allclose(s.per_leaf("leaf_norms")["a"], 5.0, rtol=1e-6)
    np.testing.assert_allclose(s.per_leaf("update_ratios")["a"], 2.5 / np.sqrt(12), rtol=1e-6)
    np.testing.assert_allclose(s.per_leaf("update_ratios")["b"], 6.0 / np.sqrt(2), rtol=1e-6)
    assert int(s.nonfinite) == 0
    np.testing.assert_allclose(s.zero_fraction, 2 / 5)


def test_wrapping_leaves_the_inner_updates_untouched():
    params = PARAMS
    tx, ref = gx.health(gx.adam(1e-2)), gx.adam(1e-2)
    s, r = tx.init(params), ref.init(params)
    for t in range(3):
        u, s = tx.update(noisy(t), s, params)
        v, r = ref.update(noisy(t), r, params)
        jax.tree.map(np.testing.assert_array_equal, u, v)


def test_no_flag_on_steady_noise_then_explosion_flagged_before_overflow():
    tx = gx.health(warmup_steps=10)
    state = tx.init(PARAMS)
    update = jax.jit(tx.update)
    for t in range(60):
        _, state = update(noisy(t, scale=float(np.exp(0.2 * np.sin(t)))), state, PARAMS)
        assert not bool(state.exploding), t
    first_flag = None
    for t in range(60, 200):  # norm grows x1.5 per step until float32 overflows
        g = noisy(t, scale=1.5 ** (t - 59))
        _, state = update(g, state, PARAMS)
        if bool(state.exploding) and first_flag is None:
            first_flag = t
        if not np.isfinite(float(state.global_norm)):
            break
    assert first_flag is not None and first_flag < t - 50, (first_flag, t)


def test_absolute_bound_flags_explosion_from_the_first_step():
    state = feed(gx.health(max_norm=10.0), [noisy(0, scale=100.0)], PARAMS)
    assert bool(state.exploding)


def test_nonfinite_leaves_are_counted_and_flagged():
    g = noisy(0)
    g["layer1"]["w"] = g["layer1"]["w"].at[0].set(jnp.nan).at[1].set(jnp.inf)
    g["layer0"]["w"] = g["layer0"]["w"].at[0, 0].set(jnp.inf)
    state = feed(gx.health(), [g], PARAMS)
    assert int(state.nonfinite) == 2 and bool(state.exploding)  # two leaves hold NaN/inf
    assert not np.isfinite(state.per_leaf("leaf_norms")["layer1"]["w"])


def test_vanishing_flagged_after_patience_and_not_before():
    def grads(t):
        g = noisy(t)
        g["layer0"]["w"] = g["layer0"]["w"] * 1e-7  # early layer: negligible gradient
        return g

    tx = gx.health(patience=5)
    state = tx.init(PARAMS)
    for t in range(5):
        _, state = tx.update(grads(t), state, PARAMS)
        assert bool(state.vanishing) == (t == 4), t
    assert bool(state.per_leaf("vanishing_leaves")["layer0"]["w"]) and not bool(
        state.per_leaf("vanishing_leaves")["layer1"]["w"]
    )
    healthy = feed(gx.health(patience=5), [noisy(t) for t in range(10)], PARAMS)
    assert not bool(healthy.vanishing)


def test_read_health_finds_records_in_nested_wrappers():
    inner = gx.chain(gx.clip_by_global_norm(1.0), gx.zclip(), gx.adam(1e-3))
    tx = optax.MultiSteps(optax.inject_hyperparams(gx.health)(inner=gx.skip_if(inner)), 1)
    state = feed(tx, [noisy(0, 5.0)], PARAMS)
    metrics = gx.read_health(state)
    assert metrics["health/global_norm"] > 0
    assert metrics["health/grad_norm/layer0/w"] > 0
    assert metrics["clip/clipped"] == 1.0 and metrics["clip/threshold"] == 1.0
    assert "zclip/norm" in metrics and "skip/skipped" in metrics
    assert all(isinstance(v, float) for v in metrics.values())


def test_read_health_names_every_leaf_of_per_leaf_clip_records():
    tx = gx.chain(gx.clip_by_leaf_norm(1.0), gx.adaptive_grad_clip(0.01), gx.health())
    g = noisy(0, 5.0)
    metrics = gx.read_health(feed(tx, [g], PARAMS))
    for layer in ("layer0", "layer1"):
        norm = float(np.linalg.norm(np.asarray(g[layer]["w"], np.float64)))
        assert metrics[f"clip/norm/{layer}/w"] == pytest.approx(norm, rel=1e-6)
        assert metrics[f"clip/clipped/{layer}/w"] == 1.0 and metrics["clip/threshold"] == 1.0
        assert metrics[f"agc/clipped/{layer}/w"] == 1.0  # unit norms 1/sqrt(n) >> 0.01 x 1
    assert metrics["agc/threshold"] == pytest.approx(0.01)


def test_per_leaf_records_hold_a_fixed_number_of_buffers_whatever_the_leaf_count():
    """Per-leaf statistics are vectors named by buffer-free `Leaf` nodes: a state with a
    buffer per leaf and field costs a kernel, a copy and a transfer per leaf and field."""
    tx = gx.health(gx.chain(gx.clip_by_leaf_norm(1.0), gx.adaptive_grad_clip(0.01)))
    buffers = [len(jax.tree.leaves(tx.init({f"l{i}": jnp.ones(3) for i in range(n)})))
               for n in (2, 20)]  # fmt: skip
    assert buffers[0] == buffers[1], buffers


def test_health_scalars_are_packed_and_read_by_name():
    """18 scalar buffers cost XLA:CPU ~45 kernels a step (one per output, copies of donated
    ones); packed, the state is a handful of buffers whatever the statistics."""
    tx = gx.health(gx.sgd(0.1))
    state = feed(tx, [noisy(0), noisy(1)], PARAMS)
    assert len(jax.tree.leaves(state)) <= 6, jax.tree.structure(state)
    assert int(state.count) == 2 and state.count.dtype == jnp.int32
    assert state.exploding.dtype == bool and state.vanishing.dtype == bool
    assert state.global_norm.dtype == jnp.float32 and float(state.z_bound) == 6.0
    assert int(state.log_norm.n) == 2 and state.baseline.mean.dtype == jnp.float32
    with pytest.raises(AttributeError, match="no_such"):
        _ = state.no_such


def test_read_health_on_a_flax_optimizer_strips_variable_suffixes():
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, gx.health(gx.sgd(0.1)), wrt=nnx.Param)
    grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((1, 3)))))(model)
    optimizer.update(model, grads)
    names = set(gx.read_health(optimizer.opt_state))
    assert {"health/grad_norm/kernel", "health/grad_norm/bias"} <= names


def test_read_health_on_pmap_replicated_state_takes_one_replica():
    tx = gx.health()
    g = jnp.ones((8, 4))
    state = jax.pmap(tx.init)(g)
    _, state = jax.pmap(tx.update, axis_name="d")(g, state)
    assert gx.read_health(state)["health/global_norm"] == pytest.approx(2.0)


def test_assert_healthy_names_step_leaf_value_and_bound():
    g = noisy(0)
    g["layer1"]["w"] = g["layer1"]["w"].at[2].set(jnp.nan)
    state = feed(gx.health(), [noisy(1), g], PARAMS)
    with pytest.raises(gx.NonFiniteGradientError, match=r"step 2: NaN/inf in 1 leaves, layer1/w"):
        gx.assert_healthy(state)

    state = feed(gx.health(max_norm=5.0), [noisy(0, 100.0)], PARAMS)
    with pytest.raises(gx.GradientExplosionError) as info:
        gx.assert_healthy(state)
    message = str(info.value)
    assert re.search(r"step 1: global norm \d+", message) and "> bound 5" in message
    assert "layer0/w (norm" in message and "gx.clip_by_global_norm" in message


def test_assert_healthy_reports_vanishing_layers():
    def grads(t):
        g = noisy(t)
        g["layer0"]["w"] = g["layer0"]["w"] * 1e-8
        return g

    state = feed(gx.health(patience=3), [grads(t) for t in range(3)], PARAMS)
    with pytest.raises(gx.VanishingGradientError, match=r"step 3: 1 leaves \(layer0/w\)"):
        gx.assert_healthy(state)
    gx.assert_healthy(state, check_vanishing=False)  # opt-out works


def test_check_healthy_inside_jit_with_checkify_and_chexify():
    tx = gx.health()

    def step(g, s):
        _, s = tx.update(g, s, PARAMS)
        gx.check_healthy(s)
        return s

    bad = noisy(0)
    bad["layer0"]["w"] = bad["layer0"]["w"].at[0, 0].set(jnp.inf)
    err, _ = checkify.checkify(jax.jit(step))(bad, tx.init(PARAMS))
    assert "Non-finite gradient at step 1" in err.get()
    err, _ = checkify.checkify(jax.jit(step))(noisy(0), tx.init(PARAMS))
    assert err.get() is None
    with pytest.raises(Exception, match="Non-finite gradient at step 1"):
        chex.chexify(jax.jit(step), async_check=False)(bad, tx.init(PARAMS))


def test_steady_geometric_climb_is_flagged_by_growth_long_before_overflow():
    """A steady climb keeps the z-score near constant; the slow baseline catches it."""
    tx = gx.health(warmup_steps=10)
    state = tx.init(PARAMS)
    update = jax.jit(tx.update)
    for t in range(40):
        _, state = update(noisy(t), state, PARAMS)
    flagged_at, z_scores = None, []
    for k in range(1, 1000):  # +10% a step: overflow after ~900 steps
        _, state = update(noisy(40 + k, scale=1.1**k), state, PARAMS)
        z_scores.append(float(state.z_score))
        if bool(state.exploding):
            flagged_at = k
            break
    assert flagged_at is not None and flagged_at < 120, flagged_at
    assert max(z_scores) < float(state.z_bound)  # the z-score alone would have missed it
    with pytest.raises(gx.GradientExplosionError, match=r"x its running baseline > 100x"):
        gx.assert_healthy(state)


@pytest.mark.parametrize("size", [4096 * 3 + 17, 4096 * 250])
def test_one_pass_statistics_of_a_large_leaf_match_float64(size):
    g = np.random.default_rng(0).normal(size=size).astype(np.float32)
    g[:100] = 0.0
    p = np.linspace(-2.0, 2.0, size, dtype=np.float32)
    tx = gx.health(gx.scale(-0.5))
    _, s = jax.jit(tx.update)({"w": jnp.asarray(g)}, tx.init({"w": p}), {"w": jnp.asarray(p)})
    g64, p64 = g.astype(np.float64), p.astype(np.float64)
    np.testing.assert_allclose(s.global_norm, np.linalg.norm(g64), rtol=1e-6)
    ratio = 0.5 * np.linalg.norm(g64) / np.linalg.norm(p64)
    np.testing.assert_allclose(s.per_leaf("update_ratios")["w"], ratio, rtol=1e-6)
    np.testing.assert_allclose(s.zero_fraction, 100 / size, rtol=1e-6)
    g[5], g[-1] = np.nan, -np.inf  # the first and the last of the leaf
    _, s = tx.update({"w": jnp.asarray(g)}, tx.init({"w": p}), {"w": jnp.asarray(p)})
    assert int(s.nonfinite) == 1  # the one leaf holding them


def test_a_small_wobble_after_a_very_steady_history_is_not_an_explosion():
    tx = gx.health(warmup_steps=10)
    state = tx.init(PARAMS)
    for _ in range(50):
        _, state = tx.update(noisy(0), state, PARAMS)  # identical norms: std ~ 0
    _, wobble = tx.update(noisy(0, scale=1.5), state, PARAMS)
    assert not bool(wobble.exploding)  # the std floor: 1.5x is z ~ 1.6, not z ~ 1e5
    _, jump = tx.update(noisy(0, scale=10.0), state, PARAMS)
    assert bool(jump.exploding)


def test_skipped_steps_do_not_count_as_vanishing():
    tx = gx.health(gx.skip_if(gx.sgd(0.1)), patience=3)
    state = tx.init(PARAMS)
    for t in range(6):
        _, state = tx.update(jax.tree.map(lambda x: x * jnp.nan, noisy(t)), state, PARAMS)
    assert int(state.inner.skipped_nonfinite) == 6
    assert int(state.vanishing_streak) == 0 and not bool(state.vanishing)


def test_assert_healthy_can_leave_nonfinite_steps_to_the_caller():
    g = noisy(0)
    g["layer0"]["w"] = g["layer0"]["w"] * jnp.nan
    state = feed(gx.health(), [g], PARAMS)
    gx.assert_healthy(state, check_nonfinite=False)  # neither non-finite nor "explosion"
    with pytest.raises(gx.NonFiniteGradientError):
        gx.assert_healthy(state)


def test_state_dtypes_hold_under_x64_so_scan_carries_it():
    with jax.enable_x64(True):
        params = {"w": jnp.ones(3, jnp.float32), "b": jnp.ones(2, jnp.float64)}
        for tx in (gx.health(), gx.health(gx.sgd(0.1))):
            state = tx.init(params)
            step = lambda s, _, tx=tx: (tx.update(params, s, params)[1], None)
            final, _ = jax.lax.scan(step, state, None, length=2)
            assert jax.tree.map(lambda x: x.dtype, final) == jax.tree.map(lambda x: x.dtype, state)
