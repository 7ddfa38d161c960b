"""Bad input gets an error naming the argument, the expected range or structure, and the value."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradxform as gx

INF = float("inf")
INVALID = [
    (gx.sgd, {"learning_rate": -0.1}, "learning_rate", "[0, inf)"),
    (gx.sgd, {"learning_rate": INF}, "learning_rate", "finite"),
    (gx.sgd, {"learning_rate": 0.1, "momentum": 1.5}, "momentum", "[0, 1]"),
    (gx.rmsprop, {"learning_rate": 0.1, "momentum": -0.5}, "momentum", "[0, 1]"),
    (gx.adam, {"learning_rate": 1e-3, "b1": 1.5}, "b1", "[0, 1]"),
    (gx.adam, {"learning_rate": 1e-3, "b2": -0.1}, "b2", "[0, 1]"),
    (gx.adam, {"learning_rate": 1e-3, "eps": -1e-8}, "eps", "[0, inf)"),
    (gx.adam, {"learning_rate": 1e-3, "eps": INF}, "eps", "finite"),
    (gx.adam, {"learning_rate": 1e-3, "eps_root": INF}, "eps_root", "finite"),
    (gx.adamw, {"learning_rate": 1e-3, "weight_decay": -0.01}, "weight_decay", "[0, inf)"),
    (gx.adamw, {"learning_rate": 1e-3, "weight_decay": INF}, "weight_decay", "finite"),
    (gx.clip_by_global_norm, {"max_norm": 0.0}, "max_norm", "(0, inf)"),
    (gx.clip_by_global_norm, {"max_norm": float("nan")}, "max_norm", "(0, inf)"),
    (gx.clip, {"max_delta": -1.0}, "max_delta", "(0, inf)"),
    (gx.clip_by_leaf_norm, {"max_norm": -2.0}, "max_norm", "(0, inf)"),
    (gx.clip_by_block_rms, {"threshold": 0.0}, "threshold", "(0, inf)"),
    (gx.adaptive_grad_clip, {"clipping": -0.1}, "clipping", "(0, inf)"),
    (gx.rmsprop, {"learning_rate": 0.1, "decay": 1.5}, "decay", "[0, 1]"),
    (gx.rmsprop, {"learning_rate": 0.1, "initial_scale": INF}, "initial_scale", "finite"),
    (
        gx.adagrad,
        {"learning_rate": 0.1, "initial_accumulator_value": -1.0},
        "initial_accumulator_value",
        "[0, inf)",
    ),
    (
        gx.adagrad,
        {"learning_rate": 0.1, "initial_accumulator_value": INF},
        "initial_accumulator_value",
        "finite",
    ),
    (gx.add_noise, {"eta": -0.1, "gamma": 0.55, "key": 0}, "eta", "[0, inf)"),
    (gx.add_noise, {"eta": INF, "gamma": 0.55, "key": 0}, "eta", "finite"),
    (gx.ema, {"decay": 1.5}, "decay", "[0, 1]"),
    (gx.trace, {"decay": -0.1}, "decay", "[0, 1]"),
    (
        gx.dynamic_loss_scale,
        {"inner": gx.sgd(0.1), "initial_scale": INF},
        "initial_scale",
        "finite",
    ),
    (
        gx.dynamic_loss_scale,
        {"inner": gx.sgd(0.1), "growth_factor": INF},
        "growth_factor",
        "finite",
    ),
    (gx.dynamic_loss_scale, {"inner": gx.sgd(0.1), "min_scale": INF}, "min_scale", "finite"),
    (gx.scale, {"step_size": float("nan")}, "step_size", "(-inf, inf)"),
    (gx.scale, {"step_size": -INF}, "step_size", "(-inf, inf)"),
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
    assert repr(kwargs[name]) in message


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


def test_integer_params_hold_no_state_but_their_gradient_must_be_none():
    params = {"w": jnp.ones(2), "step": jnp.zeros([], jnp.int32)}
    tx = gx.adam(1e-3)
    state = tx.init(params)  # accepted, as in optax: the buffer gets no moments
    assert state[0].mu["step"] is None
    with pytest.raises(TypeError, match=r"`updates`.*'step'.*int32"):
        tx.update({"w": jnp.ones(2), "step": jnp.zeros([], jnp.int32)}, state, params)
    with pytest.raises(ValueError, match=r"\['step'\] are not in `params`"):
        tx.update({"w": jnp.ones(2), "step": jnp.zeros([])}, state, params)


def test_none_for_a_required_float_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"`b1` must be a real number, got None"):
        gx.adam(1e-3, b1=None)


DTYPE_ARGUMENTS = [
    (gx.adam, {"learning_rate": 0.1}, "mu_dtype"),
    (gx.adam, {"learning_rate": 0.1}, "nu_dtype"),
    (gx.sgd, {"learning_rate": 0.1, "momentum": 0.9}, "accumulator_dtype"),
    (gx.scale_by_rms, {}, "nu_dtype"),
    (gx.ema, {"decay": 0.9}, "accumulator_dtype"),
    (gx.scale_by_spam, {}, "mu_dtype"),
]


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.complex64, "float99"])
@pytest.mark.parametrize("factory,first,argument", DTYPE_ARGUMENTS)
def test_dtype_arguments_must_be_real_floating(factory, first, argument, dtype):
    with pytest.raises(ValueError) as info:
        factory(**first, **{argument: dtype})
    assert f"`{argument}`" in str(info.value) and repr(dtype) in str(info.value)


def _skip_if(**kw):
    return gx.skip_if(gx.sgd(0.1), **kw)


def _loss_scale(**kw):
    return gx.dynamic_loss_scale(gx.sgd(0.1), **kw)


FRACTIONS = [2.5, float("inf"), True]
INTEGER_ARGUMENTS = [
    (_skip_if, "window", [*FRACTIONS, 0]),
    (_skip_if, "warmup_steps", [*FRACTIONS, 0, 101]),
    (_skip_if, "give_up_after", [*FRACTIONS, 0]),
    (gx.autoclip, "history", [*FRACTIONS, 0]),
    (gx.health, "patience", [*FRACTIONS, 0]),
    (gx.health, "warmup_steps", [*FRACTIONS, -1]),
    (_loss_scale, "growth_interval", [*FRACTIONS, 0]),
    (gx.scale_by_spam, "reset_interval", [*FRACTIONS, 0]),
    (gx.zclip, "warmup_steps", [*FRACTIONS, -1]),
]


@pytest.mark.parametrize(
    "factory,argument,value",
    [(f, a, v) for f, a, values in INTEGER_ARGUMENTS for v in values],
    ids=lambda x: getattr(x, "__name__", repr(x)),
)
def test_integer_arguments_refuse_fractions_infinity_bools_and_out_of_range(
    factory, argument, value
):
    with pytest.raises(ValueError) as info:
        factory(**{argument: value})
    message = str(info.value)
    assert f"`{argument}` must be an integer" in message and repr(value) in message


TRANSFORM_ARGUMENTS = [
    (gx.skip_if, "inner", [42, "adam", gx.sgd, None]),
    (gx.dynamic_loss_scale, "inner", [42, "adam", gx.sgd, None]),
    (gx.health, "inner", [42, "adam", gx.sgd]),  # health() alone is valid
    (gx.stable, "optimizer", [42, "adam", gx.sgd, None]),
]


@pytest.mark.parametrize(
    "factory,argument,bad",
    [(f, a, v) for f, a, values in TRANSFORM_ARGUMENTS for v in values],
    ids=lambda x: getattr(x, "__name__", repr(x)),
)
def test_transform_arguments_must_be_transforms(factory, argument, bad):
    with pytest.raises(TypeError, match=f"`{argument}` must be a gradient transformation") as info:
        factory(bad)
    if bad is gx.sgd:
        assert "gx.sgd(0.1)" in str(info.value)


@pytest.mark.parametrize("step_size", [jnp.ones(3), 1 + 2j, True, jnp.asarray(True)])
def test_scale_refuses_arrays_complex_and_bool(step_size):
    with pytest.raises(ValueError, match="`step_size`"):
        gx.scale(step_size)


def test_scale_by_schedule_needs_a_function_at_construction():
    with pytest.raises(TypeError, match="`step_size_fn` must be a function"):
        gx.scale_by_schedule(0.1)


def test_add_noise_refuses_a_key_that_is_not_a_key():
    with pytest.raises(TypeError, match=r"`key` must be a PRNG key.*'abc'"):
        gx.add_noise(0.1, 0.55, key="abc")
    with pytest.raises(ValueError, match="one of `key` and `seed`"):
        gx.add_noise(0.1, 0.55, key=0, seed=1)


def test_a_vector_loss_is_refused_naming_loss():
    tx = gx.skip_if(gx.sgd(0.1), loss_z=3.0)
    params = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match=r"`loss` must be a scalar.*\(4,\)"):
        tx.update(params, tx.init(params), params, loss=jnp.ones(4))


def test_spam_refuses_updates_shaped_unlike_its_state():
    tx = gx.scale_by_spam()
    with pytest.raises(ValueError, match=r"`updates` leaf '<root>' has shape \(3, 1\)"):
        tx.update(jnp.ones((3, 1)), tx.init(jnp.ones(3)))


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
        ValueError, match=r"`axis` 2 is out of range for leaf 'w' of shape \(4, 9000\)"
    ):
        tx.update(p, tx.init(p), p)
    empty = {"w": jnp.ones((0, 100, 100))}
    agc = gx.adaptive_grad_clip(0.1)
    assert agc.update(empty, agc.init(empty), empty)[0]["w"].shape == (0, 100, 100)


def test_clip_refuses_complex_updates_like_optax_and_says_what_to_use():
    g = {"w": jnp.ones(2, jnp.complex64)}
    tx = gx.clip(1.0)
    with pytest.raises(TypeError, match="`clip_by_global_norm`"):
        tx.update(g, tx.init(g))
    with pytest.raises(ValueError, match="complex"):  # optax's own refusal
        optax.clip(1.0).update(g, optax.EmptyState())
