"""`health`'s flags on the runs the issue names: a net killed without a NaN, a blow-up from
init, NaN already in the params, and states with nothing to read."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradxform as gx


def _mlp_loss(params, x, y):
    h = jax.nn.relu(x @ params["w1"] + params["b1"][None, :])
    logits = h @ params["w2"] + params["b2"][None, :]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def test_a_net_whose_relus_all_died_is_flagged_within_a_few_steps():
    """A brief explosion pushes every hidden unit below zero: the loss sits at chance with no
    NaN, and every hidden leaf's gradient is exactly zero. Flagged on the third such step."""
    x = jax.random.normal(jax.random.key(0), (64, 8))
    y = jax.random.randint(jax.random.key(1), (64,), 0, 3)
    keys = jax.random.split(jax.random.key(2), 2)
    params = {"w1": jax.random.normal(keys[0], (8, 16)) / 3, "b1": jnp.zeros(16),
              "w2": jax.random.normal(keys[1], (16, 3)) / 4, "b2": jnp.zeros(3)}  # fmt: skip
    tx = gx.health(gx.sgd(0.1))
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(jax.grad(_mlp_loss)(p, x, y), s, p))
    flags = []
    for t in range(40):
        if t == 20:  # the explosion: one step that drives every pre-activation negative
            params = {**params, "b1": params["b1"] - 1e3}
        u, state = step(params, state)
        params = optax.apply_updates(params, u)
        flags.append(bool(state.vanishing))
    assert not any(flags[:20])
    assert flags[20:].index(True) == 2  # the third step with dead leaves
    assert int(state.dead_leaves) == 3  # w1, b1, w2; b2 still learns the class prior
    with pytest.raises(gx.VanishingGradientError, match="exactly zero"):
        gx.assert_healthy(state)


def test_a_leaf_that_was_always_zero_is_not_dead():
    """LoRA's A has a zero gradient while B = 0: never alive, so never flagged dead."""
    tx = gx.health()
    state = tx.init({"A": jnp.ones(3), "B": jnp.zeros(3)})
    for _ in range(10):
        _, state = tx.update({"A": jnp.zeros(3), "B": jnp.ones(3)}, state)
    assert int(state.dead_leaves) == 0 and not bool(state.vanishing)


def test_a_blow_up_from_init_is_flagged_well_before_the_first_nan():
    """SGD at 4x the stable step on a quadratic: the norm triples every step from the first.
    There is no warm-up history, yet `exploding` comes dozens of steps before overflow
    (the old flag, counted after a 20-step warm-up, came with the first inf)."""
    loss = lambda p: 0.5 * jnp.sum(jnp.array([1.0, 10.0]) * p["w"] ** 2)
    tx = gx.health(gx.sgd(0.4))
    params = {"w": jnp.ones(2)}
    state = tx.init(params)
    first_flag = first_nonfinite = None
    for t in range(200):
        u, state = tx.update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, u)
        if first_flag is None and bool(state.exploding):
            first_flag = t
        if not np.isfinite(float(state.global_norm)):
            first_nonfinite = t
            break
    assert first_nonfinite is not None and first_flag is not None
    assert first_flag < 10 and first_nonfinite - first_flag > 20  # (||g||**2 overflows at 1e19)


def test_nan_in_the_params_is_flagged():
    tx = gx.health(gx.sgd(0.1))
    params = {"w": jnp.array([1.0, jnp.nan]), "b": jnp.ones(2)}
    _, state = tx.update({"w": jnp.ones(2), "b": jnp.ones(2)}, tx.init(params), params)
    assert int(state.nonfinite_params) == 1 and int(state.nonfinite) == 0
    with pytest.raises(gx.NonFiniteParameterError, match="step 1: 1 params leaves"):
        gx.assert_healthy(state)
    assert gx.read_health(state)["health/nonfinite_params"] == 1.0


@pytest.mark.parametrize(
    "read", [gx.read_health, gx.assert_healthy, gx.check_healthy], ids=lambda f: f.__name__
)
def test_a_state_without_a_health_record_is_an_error_not_a_pass(read):
    params = {"w": jnp.ones(2)}
    tx = gx.adam(1e-3)  # no record at all
    with pytest.raises(ValueError, match=r"holds no (telemetry|health) record.*gx.stable"):
        read(tx.init(params))


def test_assert_healthy_needs_a_health_record_beside_a_clip():
    state = gx.chain(gx.clip_by_global_norm(1.0), gx.sgd(0.1)).init({"w": jnp.ones(2)})
    assert set(gx.read_health(state)) == {
        "clip/norm",
        "clip/threshold",
        "clip/clipped",
        "clip/clipped_total",
    }
    with pytest.raises(ValueError, match=r"no health record \(it holds only clip records"):
        gx.assert_healthy(state)


@pytest.mark.parametrize(
    "tx, kind",
    [
        (gx.clip(1.0), "clip"),
        (gx.clip_by_global_norm(1.0), "clip"),
        (gx.clip_by_leaf_norm(1.0), "clip"),
        (gx.clip_by_block_rms(1.0), "clip"),
        (gx.adaptive_grad_clip(0.5), "agc"),
    ],
    ids=["value", "global_norm", "leaf_norm", "block_rms", "agc"],
)
def test_every_clip_records_each_step_it_acted_and_its_total(tx, kind):
    """Per step `<kind>/clipped` (per leaf for per-leaf clips), and `<kind>/clipped_total`
    counting the steps on which anything was clipped."""
    params = {"a": jnp.ones(3), "b": jnp.ones(2)}
    state, totals = tx.init(params), []
    for t in range(5):
        scale = 10.0 if t in (1, 3) else 0.01
        _, state = tx.update(jax.tree.map(lambda p, s=scale: s * p, params), state, params)
        read = gx.read_health(state)
        acted = any(v for k, v in read.items() if k.startswith(f"{kind}/clipped/") or
                    k == f"{kind}/clipped")  # fmt: skip
        assert acted == (t in (1, 3)), (t, read)
        totals.append(read[f"{kind}/clipped_total"])
    assert totals == [0.0, 1.0, 1.0, 2.0, 2.0]
