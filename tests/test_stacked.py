"""Stacked (scanned) layers: `stacked=` marks leaves whose axis 0 is a layer axis; each layer is
then a unit of its own in the per-unit clips and their records (`layers/w[7]`)."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

import gradxform as gx
from gradxform._records import (
    Layer,
    Leaf,
    check_slots,
    leaf_slots,
    slots_structure,
    unflatten_vector,
    unit_names,
)

LAYERS = 4
# per-layer shapes: Dense kernel, bias, multi-head kernel, HWIO conv, scalar gain, and a
# (3, 8192) kernel whose unstacked units take AGC's sum-of-rows path
SHAPES = {"kernel": (6, 5), "bias": (5,), "heads": (3, 4, 2), "conv": (3, 3, 2, 4), "gain": ()}


def _tree(seed: int, dtypes=(jnp.float32, jnp.bfloat16, jnp.float32, jnp.float16, jnp.float32)):
    """Params with a stacked `layers` subtree (leading axis LAYERS) and unstacked leaves."""
    keys = iter(jax.random.split(jax.random.key(seed), 16))
    draw = lambda shape, dtype=jnp.float32: jax.random.normal(next(keys), shape).astype(dtype)
    layers = {
        name: draw((LAYERS, *shape), dtype)
        for (name, shape), dtype in zip(SHAPES.items(), dtypes, strict=True)
    }
    layers["wide"] = draw((LAYERS, 3, 8192))
    return {"embed": draw((7, 6)), "layers": layers, "head": [draw((6, 2)), draw((2,))]}


def _grads(seed: int):
    """Gradients whose layers span four orders of magnitude: some clipped, some not."""
    scale = jnp.array([1e-3, 1e-1, 1.0, 10.0])
    tree = _tree(seed)
    by_layer = lambda x: (x * scale.reshape(-1, *[1] * (x.ndim - 1))).astype(x.dtype)
    return {**tree, "layers": jax.tree.map(by_layer, tree["layers"])}


def _unstacked(tree):
    """`tree` with each stacked leaf replaced by a tuple of its layers: the same values as
    separate leaves, in the same flatten order as the stacked leaf's units."""
    split = lambda x: tuple(x[i] for i in range(x.shape[0]))
    return {**tree, "layers": jax.tree.map(split, tree["layers"])}


CLIPS = [
    ("adaptive_grad_clip", lambda **kw: gx.adaptive_grad_clip(0.05, **kw)),
    ("clip_by_leaf_norm", lambda **kw: gx.clip_by_leaf_norm(3.0, **kw)),
    ("clip_by_block_rms", lambda **kw: gx.clip_by_block_rms(0.8, **kw)),
]


@pytest.mark.parametrize("name,factory", CLIPS, ids=[c[0] for c in CLIPS])
@pytest.mark.parametrize("stacked", ["layers", lambda name, leaf: name.startswith("layers/")])
def test_a_stacked_leaf_is_clipped_like_its_layers_as_separate_leaves(name, factory, stacked):
    params, grads = _tree(0), _grads(1)
    tx, ref = factory(stacked=stacked), factory()
    got, state = jax.jit(tx.update)(grads, tx.init(params), params)
    split_p, split_g = _unstacked(params), _unstacked(grads)
    want, ref_state = jax.jit(ref.update)(split_g, ref.init(split_p), split_p)
    for a, b in zip(jax.tree.leaves(_unstacked(got)), jax.tree.leaves(want), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=1e-6, atol=1e-7)
    record, ref_record = state.record, ref_state.record
    np.testing.assert_allclose(record.norm, ref_record.norm, rtol=1e-6)
    np.testing.assert_array_equal(record.clipped, ref_record.clipped)
    layers = record.clipped[3:]  # the stacked units, after embed and head
    assert layers.any() and not layers.all()  # the bounds bite on some layers
    names = unit_names(record.leaves)
    assert len(names) == record.norm.shape[0] == 3 + LAYERS * (len(SHAPES) + 1)
    assert names[:2] == ["embed", "head/0"] and "layers/kernel[3]" in names


def test_agc_never_reduces_the_layer_axis_of_a_stacked_leaf():
    # one layer's gradient is huge: stacked, only that layer is clipped; as one leaf, the
    # layer axis is the unit axis of a (layers, units) matrix and every layer is scaled.
    params = {"layers": {"w": jnp.ones((LAYERS, 8))}}
    grads = {"layers": {"w": jnp.full((LAYERS, 8), 1e-3).at[2].set(100.0)}}
    tx = gx.adaptive_grad_clip(0.01, stacked="layers")
    u, state = tx.update(grads, tx.init(params), params)
    u, g = np.asarray(u["layers"]["w"]), np.asarray(grads["layers"]["w"])
    np.testing.assert_array_equal(u[[0, 1, 3]], g[[0, 1, 3]])
    np.testing.assert_allclose(np.linalg.norm(u[2]), 0.01 * np.sqrt(8), rtol=1e-6)
    np.testing.assert_array_equal(state.record.clipped, [False, False, True, False])


def test_read_health_names_each_layer_of_a_stacked_leaf():
    params, grads = _tree(0), jax.tree.map(lambda x: 4 * x, _tree(1))
    tx = gx.chain(
        gx.clip_by_leaf_norm(3.0, stacked="layers"),
        gx.adaptive_grad_clip(0.05, stacked="layers"),
    )
    _, state = jax.jit(tx.update)(grads, tx.init(params), params)
    metrics = gx.read_health(state)
    for i in range(LAYERS):
        norm = np.linalg.norm(np.asarray(grads["layers"]["kernel"][i], np.float64))
        assert metrics[f"clip/norm/layers/kernel[{i}]"] == pytest.approx(norm, rel=1e-6)
        clipped = float(norm > 3.0)
        assert metrics[f"clip/clipped/layers/kernel[{i}]"] == clipped
        assert f"agc/clipped/layers/conv[{i}]" in metrics
    assert "clip/norm/layers/kernel" not in metrics and "clip/norm/embed" in metrics
    per_layer = state[0].record.per_leaf("norm")["layers"]["kernel"]
    assert isinstance(per_layer, tuple) and len(per_layer) == LAYERS


def test_slots_name_layers_and_keep_the_params_structure():
    params = _tree(0)
    slots = leaf_slots(params, "layers")
    assert slots["layers"]["kernel"] == (Layer(),) * LAYERS and slots["embed"] == Leaf()
    assert jax.tree.leaves(slots) == []  # no buffer
    assert slots_structure(slots) == jax.tree.structure(params)
    check_slots(slots, params, "test")
    values = jnp.arange(len(unit_names(slots)), dtype=jnp.float32)
    tree = unflatten_vector(slots, values)
    assert [float(x) for x in tree["layers"]["bias"]] == [3.0, 4.0, 5.0, 6.0]  # after 3 leaves
    with pytest.raises(ValueError, match="do not match the tree `test`"):
        check_slots(leaf_slots(params), _unstacked(params), "test")


def test_stacked_records_keep_structure_and_dtypes_and_survive_serialization_and_scan():
    params, grads = _tree(0), _tree(1)
    tx = gx.chain(
        gx.clip_by_block_rms(0.8, stacked="layers"),
        gx.adaptive_grad_clip(0.05, stacked="layers"),
    )
    init = tx.init(params)
    update = jax.jit(tx.update)
    _, state = update(grads, init, params)
    assert jax.tree.structure(state) == jax.tree.structure(init)
    assert [x.dtype for x in jax.tree.leaves(state)] == [x.dtype for x in jax.tree.leaves(init)]
    restored = serialization.from_bytes(tx.init(params), serialization.to_bytes(state))
    assert gx.read_health(restored) == gx.read_health(state)

    def body(s, _):
        return update(grads, s, params)[1], None

    scanned, _ = jax.lax.scan(body, init, None, length=2)
    assert jax.tree.structure(scanned) == jax.tree.structure(init)
    update(grads, state, params)
    assert update._cache_size() == 1  # the second call did not recompile


def test_stacked_is_checked_at_construction_and_at_init():
    for _, factory in CLIPS:
        with pytest.raises(TypeError, match=r"`stacked` must be None, a regular expression"):
            factory(stacked=3)
        with pytest.raises(ValueError, match=r"`stacked` must be a valid regular expression.*'\('"):
            factory(stacked="(")
        tx = factory(stacked="gain")
        with pytest.raises(ValueError, match=r"leaf 'gain'.*shape is \(\)"):
            tx.init({"gain": jnp.ones(()), "w": jnp.ones((2, 3))})
    with pytest.raises(TypeError, match="`stacked`"):
        gx.stable(gx.sgd(0.1), stacked=1.5)


def test_a_rank_6_leaf_error_names_arguments_of_the_function_called():
    params = {"layers": {"w": jnp.ones((LAYERS, 2, 3, 3, 2, 4))}}  # a stacked 5-d kernel
    for factory in (gx.stable, gx.adaptive_grad_clip):
        make = lambda factory=factory, **kw: (
            gx.stable(gx.sgd(0.1), max_update_ratio=0.05, **kw)
            if factory is gx.stable
            else factory(0.05, **kw)
        )
        with pytest.raises(ValueError, match=r"leaf 'layers/w'.*rank 6.*`stacked=`"):
            make().init(params)
        assert "stacked" in inspect.signature(factory).parameters  # the argument it names
        tx = make(stacked="layers")
        u, _ = tx.update(params, tx.init(params), params)
        assert u["layers"]["w"].shape == params["layers"]["w"].shape


def test_stable_with_stacked_clips_each_layer_like_separate_leaves():
    params, grads = _tree(0, (jnp.float32,) * 5), _tree(1, (jnp.float32,) * 5)
    tx = gx.stable(gx.adam(1e-2), max_update_ratio=0.01, stacked="layers")
    ref = gx.stable(gx.adam(1e-2), max_update_ratio=0.01)
    s, r = tx.init(params), ref.init(_unstacked(params))
    for _ in range(3):
        u, s = jax.jit(tx.update)(grads, s, params)
        v, r = jax.jit(ref.update)(_unstacked(grads), r, _unstacked(params))
    for a, b in zip(jax.tree.leaves(_unstacked(u)), jax.tree.leaves(v), strict=True):
        np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=1e-5, atol=1e-7)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
    assert float(gx.global_norm(u)) > 0


def test_stacked_records_survive_an_orbax_round_trip(tmp_path):
    import orbax.checkpoint as ocp  # the dev extra installs it: a missing one fails, not skips

    params = _tree(0)
    tx = gx.chain(gx.clip_by_leaf_norm(3.0, stacked="layers"), gx.adaptive_grad_clip(0.05))
    _, state = jax.jit(tx.update)(_grads(1), tx.init(params), params)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "state", state)
        checkpointer.wait_until_finished()
        restored = checkpointer.restore(tmp_path / "state", tx.init(params))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert gx.read_health(restored) == gx.read_health(state)


# ----------------------------------------------------------------------------- health


def _health_pair(**kwargs):
    """(per-layer record of the stacked tree, record of its layers as separate leaves)."""
    params, grads = _tree(0, (jnp.float32,) * 5), _grads(1)
    grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
    grads["layers"]["bias"] = grads["layers"]["bias"].at[1].set(0.0)  # a layer of zeros
    tx, ref = gx.health(gx.sgd(0.1), stacked="layers", **kwargs), gx.health(gx.sgd(0.1), **kwargs)
    _, state = jax.jit(tx.update)(grads, tx.init(params), params)
    split = _unstacked(params)
    _, ref_state = jax.jit(ref.update)(_unstacked(grads), ref.init(split), split)
    return state, ref_state, grads


def test_health_of_a_stacked_leaf_is_that_of_its_layers_as_separate_leaves():
    state, ref, grads = _health_pair()
    for field in ("leaf_norms", "update_ratios"):
        np.testing.assert_allclose(getattr(state, field), getattr(ref, field), rtol=1e-6)
    np.testing.assert_array_equal(state.vanishing_leaves, ref.vanishing_leaves)
    assert state.vanishing_leaves.any() and not state.vanishing_leaves.all()  # the zero layer
    np.testing.assert_allclose(state.floats, ref.floats, rtol=1e-6)
    np.testing.assert_array_equal(state.ints, ref.ints)
    per_layer = np.linalg.norm(np.asarray(grads["layers"]["wide"], np.float64), axis=(1, 2))
    np.testing.assert_allclose(state.per_leaf("leaf_norms")["layers"]["wide"], per_layer, rtol=1e-6)


def test_read_health_names_the_layers_of_a_stacked_leaf():
    state, ref, _ = _health_pair()
    metrics, split = gx.read_health(state), gx.read_health(ref)
    for i in range(LAYERS):
        for stat in ("grad_norm", "update_ratio"):
            name = f"health/{stat}/layers/kernel[{i}]"
            assert metrics[name] == pytest.approx(split[f"health/{stat}/layers/kernel/{i}"])
    assert "health/grad_norm/layers/kernel" not in metrics


def test_a_nonfinite_layer_is_counted_and_named_by_assert_healthy():
    params = {"layers": {"w": jnp.ones((LAYERS, 3, 5))}, "out": jnp.ones(5)}
    grads = {"layers": {"w": jnp.ones((LAYERS, 3, 5)).at[2, 0, 0].set(jnp.nan)}, "out": jnp.ones(5)}
    tx = gx.health(stacked="layers")
    _, state = tx.update(grads, tx.init(params), params)
    assert int(state.nonfinite) == 1 and bool(state.exploding)
    with pytest.raises(gx.NonFiniteGradientError, match=r"layers/w\[2\]") as error:
        gx.assert_healthy(state)
    assert "w[0]" not in str(error.value)


def test_stable_with_stacked_records_per_layer_health():
    params, grads = _tree(0, (jnp.float32,) * 5), _grads(1)
    tx = gx.stable(gx.adam(1e-3), stacked="layers")
    _, state = jax.jit(tx.update)(grads, tx.init(params), params)
    metrics = gx.read_health(state)
    norm = np.linalg.norm(np.asarray(grads["layers"]["conv"][3], np.float64))
    assert metrics["health/grad_norm/layers/conv[3]"] == pytest.approx(norm, rel=1e-6)


def test_stacked_states_keep_their_dtypes_under_x64_so_scan_carries_them():
    with jax.enable_x64(True):
        params = {"layers": {"w": jnp.ones((LAYERS, 3, 5))}, "b": jnp.ones(5)}
        grads = jax.tree.map(lambda x: 2.0 * x, params)
        tx = gx.health(
            gx.chain(gx.adaptive_grad_clip(0.1, stacked="layers"), gx.sgd(0.1)),
            stacked="layers",
        )
        init = tx.init(params)
        carried, _ = jax.lax.scan(lambda s, _: (tx.update(grads, s, params)[1], None), init,
                                  None, length=2)  # fmt: skip
        dtypes = lambda s: [x.dtype for x in jax.tree.leaves(s)]
        assert dtypes(carried) == dtypes(init)
        assert jax.tree.structure(carried) == jax.tree.structure(init)
        assert carried.leaf_norms.shape == (LAYERS + 1,)
