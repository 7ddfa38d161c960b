"""Parity: every transform sharing a name with optax computes the same updates and params;
the others match a float64 reference written out by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradxform as gx
from tests.cases import (
    CASES,
    KINDS,
    REFERENCED,
    TWINNED,
    assert_trees_close,
    gradients_at,
    make,
    random_tree,
    reference_run,
    run,
)

WRAPPERS = ("guard", "telemetry")  # take a transformation; no numbers of their own


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("case", TWINNED, ids=lambda c: c.name)
def test_matches_optax_float32(case, seed):
    params = random_tree(seed)
    tx, kwargs = make(case, seed)
    ours, our_params, _ = run(tx, params, steps=20)
    theirs, their_params, _ = run(case.twin(**kwargs), params, steps=20)
    tol = {"rtol": case.rtol, "atol": case.rtol / 2}
    for step, (u, v) in enumerate(zip(ours, theirs, strict=True)):
        assert jax.tree.map(lambda x: x.dtype, u) == jax.tree.map(lambda x: x.dtype, v), step
        assert_trees_close(u, v, **tol)
    assert_trees_close(our_params, their_params, **tol)


@pytest.mark.parametrize("case", TWINNED, ids=lambda c: c.name)
def test_matches_optax_with_bfloat16_leaves(case):
    params = random_tree(3, dtypes=(jnp.float32, jnp.bfloat16))
    tx, kwargs = make(case, 3)
    ours, our_params, _ = run(tx, params, steps=20)
    _, their_params, _ = run(case.twin(**kwargs), params, steps=20)
    # Updates keep the gradient's dtype, whatever the state's.
    grads = gradients_at(params, 0)
    assert jax.tree.map(lambda x: x.dtype, ours[0]) == jax.tree.map(lambda x: x.dtype, grads)
    assert_trees_close(our_params, their_params, rtol=3e-2, atol=3e-2)


# ------------------------------------------------------------------- float64 references


def test_every_case_is_checked_against_optax_or_a_float64_reference():
    """A new row of the table must say what its numbers are checked against (wrappers are
    checked by behaviour in test_guards.py and test_telemetry.py)."""
    for case in CASES:
        assert case.kind in KINDS, case.name
        assert (case.twin is None) != (case.reference is None) or case.kind in WRAPPERS, case.name
        assert bool(case.tuned) == (case.kind == "optimizer"), case.name


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("case", REFERENCED, ids=lambda c: c.name)
def test_matches_float64_reference(case, seed):
    params = random_tree(seed)
    tx, kwargs = make(case, seed)
    _, ours, _ = run(tx, params, steps=20)
    assert_trees_close(ours, reference_run(case, kwargs, params), rtol=1e-5, atol=1e-6)


def test_leaf_norm_clipping_actually_clips():
    tx = gx.clip_by_leaf_norm(1.0)
    g = {"big": jnp.full((4,), 10.0), "small": jnp.full((4,), 0.1)}
    u, state = tx.update(g, tx.init(g))
    np.testing.assert_allclose(np.linalg.norm(u["big"]), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(u["small"], g["small"])
    clipped, norm = state.record.per_leaf("clipped"), state.record.per_leaf("norm")
    assert bool(clipped["big"]) and not bool(clipped["small"])
    np.testing.assert_allclose(norm["big"], 20.0, rtol=1e-6)


# ------------------------------------------------------------------- float32 accumulation


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_global_norm_of_low_precision_gradient_does_not_overflow(dtype):
    g = {"w": jnp.ones((10**6,), dtype)}
    tx = gx.clip_by_global_norm(1.0)
    u, state = tx.update(g, tx.init(g))
    assert u["w"].dtype == dtype
    np.testing.assert_allclose(np.asarray(u["w"], np.float32), 1e-3, rtol=1e-2)
    np.testing.assert_allclose(state.record.norm, 1000.0, rtol=1e-6)
    assert state.record.norm.dtype == jnp.float32


def test_float16_clipping_matches_optax_on_the_float32_gradient_where_optax_overflows():
    """Why gradxform accumulates in float32: optax squares float16 leaves in float16, so the
    norm of 1e6 ones overflows to inf and the clipped update is zero. gradxform's is optax's
    own answer for the same gradient in float32, cast back to float16."""
    g = {"w": jnp.linspace(0.5, 1.5, 10**6).astype(jnp.float16)}
    wide = {"w": g["w"].astype(jnp.float32)}
    clip16, clip32 = optax.clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)
    theirs16, _ = clip16.update(g, clip16.init(g))
    theirs32, _ = clip32.update(wide, clip32.init(wide))
    ours, _ = gx.clip_by_global_norm(1.0).update(g, gx.clip_by_global_norm(1.0).init(g))
    assert float(jnp.max(jnp.abs(theirs16["w"]))) == 0.0  # the failure gradxform avoids
    assert ours["w"].dtype == jnp.float16
    np.testing.assert_array_equal(ours["w"], theirs32["w"].astype(jnp.float16))


@pytest.mark.parametrize("name", ["clip_by_block_rms", "clip_by_leaf_norm"])
def test_per_leaf_norms_accumulate_in_float32(name):
    g = {"w": jnp.full((10**5,), 300.0, jnp.float16)}  # sum of squares 9e9 overflows float16
    tx = getattr(gx, name)(1.0)
    u, state = tx.update(g, tx.init(g))
    assert bool(jnp.all(jnp.isfinite(u["w"]))) and float(jnp.max(u["w"])) > 0
    assert np.isfinite(float(state.record.per_leaf("norm")["w"]))


@pytest.mark.parametrize("moment_dtype", [jnp.float32, jnp.bfloat16])
def test_moment_dtypes_are_chosen_separately(moment_dtype):
    params = random_tree(0, dtypes=(jnp.bfloat16,))
    tx = gx.adam(1e-3, mu_dtype=moment_dtype, nu_dtype=jnp.float32)
    _, new_params, state = run(tx, params, steps=3)
    adam_state = state[0]
    assert {x.dtype for x in jax.tree.leaves(adam_state.mu)} == {jnp.dtype(moment_dtype)}
    assert {x.dtype for x in jax.tree.leaves(adam_state.nu)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(new_params)} == {jnp.dtype(jnp.bfloat16)}


def test_bfloat16_params_with_float32_moments_track_float32_training():
    params32 = random_tree(0)
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params32)
    _, p32, _ = run(gx.adam(1e-2), params32, steps=10)
    _, p16, _ = run(gx.adam(1e-2, mu_dtype=jnp.float32, nu_dtype=jnp.float32), params16, steps=10)
    assert_trees_close(p16, p32, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_add_noise_keeps_the_key_implementation_and_matches_jax(impl):
    key = jax.random.key(7, impl=impl)
    tx = gx.add_noise(eta=1.0, gamma=0.0, key=key)
    u, state = tx.update({"w": jnp.zeros(4)}, tx.init({"w": jnp.zeros(4)}))
    _, sample = jax.random.split(key)
    expected = optax.tree.random_like(sample, {"w": jnp.zeros(4)}, jax.random.normal)
    np.testing.assert_array_equal(u["w"], expected["w"])
    assert state.key.shape == jax.random.key_data(key).shape


# ------------------------------------------------------------------- the edges optax accepts


@pytest.mark.parametrize("case", [c for c in TWINNED if c.complex_ok], ids=lambda c: c.name)
def test_matches_optax_on_complex64_params(case):
    params = random_tree(4, dtypes=(jnp.complex64,))
    tx, kwargs = make(case, 4)
    ours, our_params, _ = run(tx, params, steps=10)
    theirs, their_params, _ = run(case.twin(**kwargs), params, steps=10)
    for u, v in zip(ours, theirs, strict=True):
        assert jax.tree.map(lambda x: x.dtype, u) == jax.tree.map(lambda x: x.dtype, v)
        assert_trees_close(u, v, rtol=10 * case.rtol, atol=5 * case.rtol)
    assert_trees_close(our_params, their_params, rtol=10 * case.rtol, atol=5 * case.rtol)


@pytest.mark.parametrize("name", ["adam", "rmsprop", "clip_by_global_norm", "scale_by_stddev"])
def test_matches_optax_on_complex128_params_under_x64(name):
    case = next(c for c in TWINNED if c.name == name)
    with jax.enable_x64(True):
        params = random_tree(5, dtypes=(jnp.complex128,))
        tx, kwargs = make(case, 5)
        ours, _, _ = run(tx, params, steps=5)
        theirs, _, _ = run(case.twin(**kwargs), params, steps=5)
        for u, v in zip(ours, theirs, strict=True):
            assert {x.dtype for x in jax.tree.leaves(u)} == {jnp.dtype(jnp.complex128)}
            assert_trees_close(u, v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", TWINNED, ids=lambda c: c.name)
def test_python_and_numpy_scalar_leaves_match_optax_on_arrays(case):
    """optax takes such leaves in some transforms (`adam`) and not in others (`clip_by_global_norm`
    raises AttributeError); gradxform takes them everywhere, as the arrays they stand for."""
    tx, kwargs = make(case, 6)
    twin = case.twin(**kwargs)
    params = {"a": 0.5, "b": np.float32(-1.5), "c": np.array([1.0, 2.0], np.float32)}
    grads = {"a": 0.25, "b": np.float32(2.0), "c": np.array([-1.0, 3.0], np.float32)}
    ours, state = tx.update(grads, tx.init(params), params)
    arrays = lambda tree: jax.tree.map(jnp.asarray, tree)
    theirs, _ = twin.update(arrays(grads), twin.init(arrays(params)), arrays(params))
    assert jax.tree.map(lambda x: x.dtype, ours) == jax.tree.map(lambda x: x.dtype, theirs)
    assert_trees_close(ours, theirs, rtol=case.rtol, atol=case.rtol)
    assert jax.tree.structure(tx.update(grads, state, params)[1]) == jax.tree.structure(state)


@pytest.mark.parametrize("case", TWINNED, ids=lambda c: c.name)
def test_integer_buffer_with_none_gradient_passes_through(case):
    """An Equinox-style tree: an int32 buffer whose gradient is None. optax passes it through
    in most transforms (`adam` raises a pytree structure error); gradxform in all, and the
    float leaves get the update optax gives them without the buffer."""
    params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "step": jnp.arange(3)}
    grads = {"w": jnp.linspace(0.5, -0.5, 6).reshape(2, 3), "step": None}
    tx, kwargs = make(case, 7)
    twin = case.twin(**kwargs)
    ours, state = tx.update(grads, tx.init(params), params)
    floats = {"w": params["w"]}
    theirs, _ = twin.update({"w": grads["w"]}, twin.init(floats), floats)
    assert ours["step"] is None
    assert_trees_close(ours["w"], theirs["w"], rtol=case.rtol, atol=case.rtol)
    again, state = jax.jit(tx.update)(grads, state, params)  # and the state goes round again
    assert again["step"] is None


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd", "rmsprop", "adagrad", "nadam"])
def test_learning_rate_none_means_no_scaling_like_optax(name):
    case = next(c for c in TWINNED if c.name == name)
    kwargs = {**case.draw(np.random.default_rng(8)), "learning_rate": None}
    params = random_tree(8)
    ours, _, _ = run(getattr(gx, name)(**kwargs), params, steps=5)
    theirs, _, _ = run(case.twin(**kwargs), params, steps=5)
    for u, v in zip(ours, theirs, strict=True):
        assert_trees_close(u, v, rtol=case.rtol, atol=case.rtol)


@pytest.mark.parametrize("nesterov", [True, False])
def test_nadam_takes_nesterov_like_optax(nesterov):
    params = random_tree(9)
    ours, _, _ = run(gx.nadam(0.01, nesterov=nesterov), params, steps=5)
    theirs, _, _ = run(optax.nadam(0.01, nesterov=nesterov), params, steps=5)
    assert_trees_close(ours, theirs, rtol=2e-6, atol=1e-6)
    plain, _, _ = run(gx.adam(0.01), params, steps=5)
    same = jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), ours, plain))
    assert same == (not nesterov)


@pytest.mark.parametrize("name", ["trace", "ema"])
def test_decay_one_is_a_valid_accumulator_like_optax(name):
    params = random_tree(10)
    kwargs = {"decay": 1.0, **({"debias": False} if name == "ema" else {})}
    ours, _, _ = run(getattr(gx, name)(**kwargs), params, steps=5)
    theirs, _, _ = run(getattr(optax, name)(**kwargs), params, steps=5)
    assert_trees_close(ours, theirs, rtol=2e-6, atol=1e-6)


def test_add_noise_key_is_optional_and_seed_is_optax_spelling():
    params = {"w": jnp.zeros(4)}
    outputs = []
    for tx in (
        gx.add_noise(1.0, 0.55),
        gx.add_noise(1.0, 0.55, seed=0),
        gx.add_noise(1.0, 0.55, 0),
    ):
        outputs.append(tx.update(params, tx.init(params))[0]["w"])
    expected = optax.add_noise(1.0, 0.55, key=0)
    theirs = expected.update(params, expected.init(params))[0]["w"]
    for u in outputs:
        np.testing.assert_array_equal(u, theirs)


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd", "rmsprop"])
def test_injected_hyperparameters_cast_to_bfloat16_params(name):
    """optax.inject_hyperparams casts the hyperparameters to the params' dtype."""
    params = random_tree(11, dtypes=(jnp.bfloat16,))
    kwargs = {"learning_rate": 1e-2, **({"momentum": 0.9} if name == "sgd" else {})}
    ours = optax.inject_hyperparams(getattr(gx, name))(**kwargs)
    theirs = optax.inject_hyperparams(getattr(optax, name))(**kwargs)
    _, our_params, _ = run(ours, params, steps=5)
    _, their_params, _ = run(theirs, params, steps=5)
    assert_trees_close(our_params, their_params, rtol=2e-2, atol=2e-2)


def test_bfloat16_hyperparameters_are_accepted():
    b2 = jnp.asarray(0.95, jnp.bfloat16)
    params = random_tree(12)
    ours, _, _ = run(gx.scale_by_adam(b2=b2), params, steps=3)
    theirs, _, _ = run(optax.scale_by_adam(b2=b2), params, steps=3)
    assert_trees_close(ours, theirs, rtol=2e-6, atol=1e-6)
