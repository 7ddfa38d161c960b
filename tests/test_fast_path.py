"""The fast path every transform takes: grouped small-leaf norms, per-shape tracing."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradxform as gx
from gradxform import _stats as stats
from gradxform import _tree as tree_maths

# The modules whose globals the grouping reads: the tree maths (global_norm) and health.
NORMS, HEALTH = tree_maths, stats
once_per_shape = tree_maths.once_per_shape


def _reductions(fn, *args) -> int:
    jaxpr = jax.make_jaxpr(fn)(*args)
    return sum(e.primitive.name in ("reduce_sum", "dot_general") for e in jaxpr.jaxpr.eqns)


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


# Reductions of `_tree`'s 7 leaves: the defaults group all but `big`; leaves of <= 100 elements
# in groups of <= 300 leave `bf16`, `bias` and `scale` together; (0, 1) groups nothing.
@pytest.mark.parametrize(
    "small_leaf,small_group,reductions", [(1 << 14, 1 << 20, 2), (100, 300, 5), (0, 1, 7)]
)
def test_grouped_global_norm_matches_float64(monkeypatch, small_leaf, small_group, reductions):
    monkeypatch.setattr(NORMS, "SMALL_LEAF", small_leaf)
    monkeypatch.setattr(NORMS, "SMALL_GROUP", small_group)
    tree = _tree(jax.random.key(2))
    assert _reductions(lambda t: gx.global_norm(t), tree) == reductions  # the setting took
    expected = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree)))
    for norm in (gx.global_norm(tree), jax.jit(lambda t: gx.global_norm(t))(tree)):  # a fresh trace
        assert norm.dtype == jnp.float32
        np.testing.assert_allclose(norm, expected, rtol=1e-6)
    assert float(gx.global_norm({})) == 0.0


def test_grouped_global_norm_sums_over_a_mapped_axis():
    x = jnp.arange(8.0).reshape(2, 4)
    norms = jax.vmap(lambda row: gx.global_norm({"a": row}, axis_name="i"), axis_name="i")(x)
    np.testing.assert_allclose(norms, jnp.full(2, jnp.linalg.norm(x)), rtol=1e-6)


def test_small_leaves_share_one_reduction():
    tree = {f"b{i}": jnp.ones(10) for i in range(40)} | {"w": jnp.ones((200, 100))}
    assert _reductions(lambda t: gx.global_norm(t), tree) == 2  # 40 biases together, matrix alone


def test_leaf_rules_are_traced_once_per_shape_under_jit_and_run_eagerly_otherwise():
    calls = []

    def rule(g, m):
        calls.append(g.shape)
        return g * 2 + m

    tree = {f"w{i}": jnp.ones((4, 4)) for i in range(20)} | {"b": jnp.ones(3)}
    expected = jax.tree.map(rule, tree, tree)
    calls.clear()
    map_rule = lambda t: jax.tree.map(once_per_shape(rule, jax.tree.leaves(t)), t, t)
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


def test_per_shape_tracing_only_when_staged():
    rule = lambda g: g * 2
    seen = []

    def probe(tree):
        seen.append(once_per_shape(rule, jax.tree.leaves(tree)))
        return tree

    jax.vmap(probe)(jnp.ones((3, 2)))  # eager vmap: a fresh jit here would compile every step
    jax.grad(lambda x: jnp.sum(probe(x)))(jnp.ones(2))
    assert seen == [rule, rule]
    jax.jit(probe)(jnp.ones(2))
    assert seen[-1] is not rule


@pytest.mark.parametrize("small_group", [1, 7, 50, 1 << 20])
def test_health_statistics_with_grouped_and_blocked_leaves_match_float64(monkeypatch, small_group):
    monkeypatch.setattr(HEALTH, "SMALL_GROUP", small_group)
    sizes = [0, 1, 3, 3, 17, 64, 4096, 4097, 9000, 20000]
    rng = np.random.default_rng(0)
    grads = {f"l{i}": rng.normal(size=n).astype(np.float32) for i, n in enumerate(sizes)}
    grads["l5"][:10] = 0.0
    params = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in grads.items()}
    tx = gx.health(gx.scale(-0.5))
    state = tx.init(params)
    _, s = jax.jit(lambda g, s, p: tx.update(g, s, p))(grads, state, params)
    norms, ratios = s.per_leaf("leaf_norms"), s.per_leaf("update_ratios")
    for k, g in grads.items():
        g64, p64 = g.astype(np.float64), params[k].astype(np.float64)
        np.testing.assert_allclose(norms[k], np.linalg.norm(g64), rtol=1e-6)
        expected = 0.5 * np.linalg.norm(g64) / max(np.linalg.norm(p64), 1e-30)
        np.testing.assert_allclose(ratios[k], expected, rtol=1e-6)
    assert round(float(s.zero_fraction) * sum(sizes)) == 10  # the padding is not counted


def test_health_reads_params_before_the_in_place_parameter_write():
    """health's reductions read the params; unless the update depends on them, XLA cannot
    order those reads before `apply_updates` overwrites the donated params, and copies them."""
    params = {"w": jnp.ones((256, 64))}
    tx = gx.health(gx.adamw(1e-3))

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params).compile()
    copies = [
        line
        for line in compiled.as_text().splitlines()
        if "f32[256,64]" in line and " copy(" in line
    ]
    assert not copies, copies
