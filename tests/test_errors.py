"""Bad input gets an error naming the argument, the expected range or structure, and the value."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradxform as gx

INVALID = [
    (gx.sgd, {"learning_rate": -0.1}, "learning_rate", "[0, inf)"),
    (gx.sgd, {"learning_rate": 0.1, "momentum": 1.0}, "decay", "[0, 1)"),
    (gx.adam, {"learning_rate": 1e-3, "b1": 1.0}, "b1", "[0, 1)"),
    (gx.adam, {"learning_rate": 1e-3, "b2": -0.1}, "b2", "[0, 1)"),
    (gx.adam, {"learning_rate": 1e-3, "eps": -1e-8}, "eps", "[0, inf)"),
    (gx.adamw, {"learning_rate": 1e-3, "weight_decay": -0.01}, "weight_decay", "[0, inf)"),
    (gx.clip_by_global_norm, {"max_norm": 0.0}, "max_norm", "(0, inf)"),
    (gx.clip_by_global_norm, {"max_norm": float("nan")}, "max_norm", "(0, inf)"),
    (gx.clip, {"max_delta": -1.0}, "max_delta", "(0, inf)"),
    (gx.clip_by_leaf_norm, {"max_norm": -2.0}, "max_norm", "(0, inf)"),
    (gx.clip_by_block_rms, {"threshold": 0.0}, "threshold", "(0, inf)"),
    (gx.adaptive_grad_clip, {"clipping": -0.1}, "clipping", "(0, inf)"),
    (gx.rmsprop, {"learning_rate": 0.1, "decay": 1.5}, "decay", "[0, 1)"),
    (
        gx.adagrad,
        {"learning_rate": 0.1, "initial_accumulator_value": -1.0},
        "initial_accumulator_value",
        "[0, inf)",
    ),
    (gx.add_noise, {"eta": -0.1, "gamma": 0.55, "key": 0}, "eta", "[0, inf)"),
    (gx.ema, {"decay": 1.0}, "decay", "[0, 1)"),
]


@pytest.mark.parametrize(
    "factory,kwargs,name,interval", INVALID, ids=[f"{f.__name__}-{n}" for f, _, n, _ in INVALID]
)
def test_invalid_hyperparameter_names_argument_range_and_value(factory, kwargs, name, interval):
    with pytest.raises(ValueError) as info:
        factory(**kwargs)
    message = str(info.value)
    assert f"`{name}`" in message
    assert interval in message
    bad = kwargs.get(name, kwargs.get("momentum"))
    assert repr(bad) in message


def test_hyperparameter_must_be_a_scalar():
    with pytest.raises(ValueError, match=re.escape("`max_norm` must be a scalar")):
        gx.clip_by_global_norm(jnp.ones(3))


def test_zero_dimensional_array_hyperparameter_is_checked_too():
    with pytest.raises(ValueError, match="`learning_rate`"):
        gx.adam(jnp.asarray(-1.0))


def test_updates_with_a_missing_leaf_name_the_path():
    tx = gx.adam(1e-3)
    params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
    grads = {"dense": {"kernel": jnp.ones((2, 2))}}
    with pytest.raises(ValueError, match=r"dense/bias.*missing") as info:
        tx.update(grads, tx.init(params), params)
    assert "`updates`" in str(info.value) and "`params`" in str(info.value)


def test_updates_with_a_wrong_shape_name_the_path_and_refuse_to_broadcast():
    tx = gx.add_decayed_weights(0.1)
    params = {"w": jnp.ones((3,))}
    with pytest.raises(ValueError, match=r"'w' has shape \(1,\).*\(3,\).*no broadcasting"):
        jax.jit(tx.update)({"w": jnp.ones((1,))}, tx.init(params), params)


def test_updates_not_matching_state_raise_without_params():
    tx = gx.scale_by_adam()
    state = tx.init({"a": jnp.ones(2), "b": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"`updates`.*`state.mu`.*\['b'\]"):
        tx.update({"a": jnp.ones(2)}, state)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_integer_or_boolean_gradients_are_refused(dtype):
    tx = gx.sgd(0.1)
    params = {"layer": {"w": jnp.ones(2)}}
    with pytest.raises(TypeError, match=r"`updates`.*'layer/w'.*dtype " + jnp.dtype(dtype).name):
        jax.jit(tx.update)({"layer": {"w": jnp.ones(2, dtype)}}, tx.init(params), params)


def test_float0_gradients_of_integer_inputs_are_refused():
    grads = jax.grad(lambda p: jnp.sum(p["w"]) * 1.0, allow_int=True)({"w": jnp.arange(3)})
    tx = gx.sgd(0.1)
    with pytest.raises(TypeError, match="float0"):
        tx.update(grads, tx.init({"w": jnp.zeros(3)}))


def test_integer_params_are_refused_at_init():
    with pytest.raises(TypeError, match=r"`params`.*'step'.*int32"):
        gx.adam(1e-3).init({"w": jnp.ones(2), "step": jnp.zeros([], jnp.int32)})


def test_transforms_that_need_params_say_so():
    for tx in (gx.adaptive_grad_clip(0.1), gx.add_decayed_weights(0.1)):
        with pytest.raises(ValueError, match="needs `params`"):
            tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.ones(2)}))


def test_traced_hyperparameters_are_not_checked_at_construction():
    # Under inject_hyperparams the factory is called with traced values inside `update`.
    tx = optax.inject_hyperparams(gx.sgd)(learning_rate=0.1, momentum=0.9)
    params = {"w": jnp.ones(2)}
    u, _ = jax.jit(tx.update)({"w": jnp.ones(2)}, tx.init(params), params)
    np.testing.assert_allclose(u["w"], -0.1)


def test_health_refuses_updates_shaped_unlike_its_init_tree():
    tx = gx.health()
    state = tx.init({"a": jnp.zeros(2), "b": jnp.zeros(3)})
    with pytest.raises(ValueError, match="`updates` do not match the tree `health`"):
        tx.update({"a": jnp.zeros(2), "c": jnp.zeros(3)}, state)


def test_agc_axis_out_of_range_is_refused_and_empty_units_are_fine():
    tx = gx.adaptive_grad_clip(0.1, axis=2)
    p = {"w": jnp.ones((4, 9000))}
    with pytest.raises(
        ValueError, match=r"`axis` 2 is out of range for a leaf of shape \(4, 9000\)"
    ):
        tx.update(p, tx.init(p), p)
    empty = {"w": jnp.ones((0, 100, 100))}
    agc = gx.adaptive_grad_clip(0.1)
    assert agc.update(empty, agc.init(empty), empty)[0]["w"].shape == (0, 100, 100)
