"""The fast path every transform takes: grouped small-leaf norms, per-shape tracing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradxform as gx
from gradxform import _base


def _tree(key):
    keys = jax.random.split(key, 4)
    return {
        "conv": jax.random.normal(keys[0], (3, 3, 4, 8)),
        "dense": {"kernel": jax.random.normal(keys[1], (24, 16)), "bias": jnp.ones(16)},
        "bf16": jax.random.normal(keys[2], (7, 5)).astype(jnp.bfloat16),
        "f16_big": jnp.full((300,), 60.0, jnp.float16),  # 300 * 60**2 overflows a float16 sum
        "big": jax.random.normal(keys[3], (200, 130)),
        "scale": jnp.asarray(2.0),
    }


@pytest.mark.parametrize("small_leaf,small_group", [(1 << 14, 1 << 20), (100, 300), (0, 1)])
def test_grouped_global_norm_matches_float64(monkeypatch, small_leaf, small_group):
    monkeypatch.setattr(_base, "SMALL_LEAF", small_leaf)
    monkeypatch.setattr(_base, "SMALL_GROUP", small_group)
    tree = _tree(jax.random.key(2))
    expected = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree)))
    for norm in (gx.global_norm(tree), jax.jit(gx.global_norm)(tree)):
        assert norm.dtype == jnp.float32
        np.testing.assert_allclose(norm, expected, rtol=1e-6)
    assert float(gx.global_norm({})) == 0.0


def test_grouped_global_norm_sums_over_a_mapped_axis():
    x = jnp.arange(8.0).reshape(2, 4)
    norms = jax.vmap(lambda row: gx.global_norm({"a": row}, axis_name="i"), axis_name="i")(x)
    np.testing.assert_allclose(norms, jnp.full(2, jnp.linalg.norm(x)), rtol=1e-6)


def test_small_leaves_share_one_reduction():
    tree = {f"b{i}": jnp.ones(10) for i in range(40)} | {"w": jnp.ones((200, 100))}
    jaxpr = jax.make_jaxpr(gx.global_norm)(tree)
    reductions = [e for e in jaxpr.jaxpr.eqns if e.primitive.name in ("reduce_sum", "dot_general")]
    assert len(reductions) == 2  # the 40 biases together, the matrix alone


def test_leaf_rules_are_traced_once_per_shape_under_jit_and_run_eagerly_otherwise():
    calls = []

    def rule(g, m):
        calls.append(g.shape)
        return g * 2 + m

    tree = {f"w{i}": jnp.ones((4, 4)) for i in range(20)} | {"b": jnp.ones(3)}
    expected = jax.tree.map(rule, tree, tree)
    calls.clear()
    map_rule = lambda t: jax.tree.map(_base.once_per_shape(rule, jax.tree.leaves(t)), t, t)
    got = jax.jit(map_rule)(tree)
    assert sorted(calls) == [(3,), (4, 4)]
    jax.tree.map(np.testing.assert_array_equal, got, expected)
    calls.clear()
    map_rule(tree)
    assert len(calls) == 21  # eagerly: no jit of a fresh closure, so no compilation per step


def test_adam_traces_its_rule_once_per_leaf_shape():
    tx = gx.chain(gx.clip_by_global_norm(1.0), gx.adamw(1e-3))
    params = {f"w{i}": jnp.zeros((4, 4)) for i in range(50)} | {"b": jnp.zeros(3)}
    jaxpr = jax.make_jaxpr(tx.update)(params, tx.init(params), params)
    calls = [e for e in jaxpr.jaxpr.eqns if e.primitive.name in ("jit", "pjit")]
    per_leaf = [e for e in calls if e.params["name"] == "leaf"]
    assert len(per_leaf) == 51  # one call per leaf, of a rule traced once per (shape, dtype)
    assert len({id(e.params["jaxpr"]) for e in per_leaf}) == 2
