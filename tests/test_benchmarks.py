"""The performance benchmark at toy size, and parity of the fast path it times.

The prototype (`benchmarks/fused_prototype.py`) must equal the unfused chain bit for bit under
`jit`; these parity tests move to `tests/test_fused.py` if it is integrated into the library.
"""

import functools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradxform as gx
from benchmarks.fused_prototype import clip_adamw, global_norm_grouped

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import performance

# ----------------------------------------------------------------------------- the benchmark


def test_benchmark_writes_json_with_sane_numbers(tmp_path):
    result = performance.main(
        [
            "--params", "2e4", "--repeats", "2", "--out", str(tmp_path), "--no-telemetry",
            "--trees", "1 leaf", "transformer (stacked)",
            "--chains", "clip+adamw",
        ]
    )  # fmt: skip
    saved = json.loads((tmp_path / "performance.json").read_text())
    assert saved["cases"] == json.loads(json.dumps(result["cases"]))
    assert (tmp_path / "performance.png").stat().st_size > 0
    meta = saved["meta"]
    for key in ("device", "jax", "jaxlib", "optax", "gradxform", "params_target", "repeats"):
        assert meta[key], key
    assert [(c["tree"], c["chain"]) for c in saved["cases"]] == [
        ("1 leaf", "clip+adamw"),
        ("transformer (stacked)", "clip+adamw"),
    ]
    for case in saved["cases"]:
        assert 0.4 * 2e4 <= case["params"] <= 1.1 * 2e4  # the stacked tree is coarse at toy size
        assert case["copy_bandwidth_gbps"] > 0 and case["floor_ms"] > 0
        assert case["step_ratio"] > 0 and case["compile_ratio"] > 0
        for lib in ("gradxform", "optax"):
            r = case[lib]
            assert 0 < r["step_ms_p10"] <= r["step_ms"] < 1e4
            assert r["floor_fraction"] > 0
            assert r["trace_s"] > 0 and r["compile_s"] > 0
            assert r["temp_bytes"] >= 0
            assert r["state_bytes"] >= 4 * case["params"]  # at least one float32 moment
    adamw = [c for c in saved["cases"] if c["chain"] == "clip+adamw"]
    assert all("gx-fused" in c for c in adamw)
    assert saved["state_dtypes"]["gradxform_bf16_ratio"] == pytest.approx(0.5, abs=1e-3)
    assert set(saved["goals"]["gradxform"]) >= {"step <= optax, every case", "temp bytes <= optax"}


def test_parameter_trees_have_the_advertised_leaves_and_sizes():
    n = 25_000_000
    for name, leaves in [("1 leaf", 1), ("resnet50-like", 161), ("1000 leaves", 1000)]:
        shapes = performance.TREES[name](n)
        assert len(performance._shape_leaves(shapes)) == leaves
        assert performance.count(shapes) == pytest.approx(n, rel=0.02)
    stacked = performance.transformer_like(n)
    assert performance.count(stacked) == pytest.approx(n, rel=0.05)
    assert stacked["layers"]["qkv"]["kernel"][0] == 12


# ----------------------------------------------------------------------------- fast-path parity


def _tree(key, dtype=jnp.float32):
    shapes = {"conv": (3, 3, 4, 8), "dense": {"kernel": (24, 16), "bias": (16,)}, "scale": ()}
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
    keys = jax.random.split(key, len(leaves))
    arrays = [
        jax.random.normal(k, s, jnp.float32).astype(dtype)
        for k, s in zip(keys, leaves, strict=True)
    ]
    return treedef.unflatten(arrays)


def _run(tx, params, steps, key):
    """`steps` jitted updates; returns every step's (updates, state) and the final params."""
    state = tx.init(params)
    update = jax.jit(tx.update)
    dtype = params["conv"].dtype
    history = []
    for t in range(steps):
        # spikes every third step so that the clip is sometimes active, sometimes not
        scale = 30.0 if t % 3 == 0 else 0.01
        grads = jax.tree.map(
            functools.partial(jnp.multiply, scale), _tree(jax.random.fold_in(key, t), dtype)
        )
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        history.append((updates, state))
    return history, params


KWARGS = [
    {},
    {"weight_decay": 0.0, "eps_root": 1e-12},
    {"b1": 0.5, "b2": 0.95, "eps": 1e-6, "mu_dtype": jnp.bfloat16, "nu_dtype": jnp.bfloat16},
    {"weight_decay": optax.linear_schedule(0.1, 0.0, 10)},
]
LEARNING_RATES = [3e-3, optax.warmup_cosine_decay_schedule(0.0, 1e-2, 3, 20)]


@pytest.mark.parametrize("kwargs", KWARGS)
@pytest.mark.parametrize("lr", LEARNING_RATES)
@pytest.mark.parametrize("max_norm", [1.0, optax.linear_schedule(2.0, 0.5, 5)])
def test_fused_clip_adamw_equals_unfused_chain_bitwise_under_jit(kwargs, lr, max_norm):
    key = jax.random.key(0)
    params = _tree(jax.random.fold_in(key, 99))
    unfused = gx.chain(gx.clip_by_global_norm(max_norm), gx.adamw(lr, **kwargs))
    fused = clip_adamw(max_norm, lr, **kwargs)
    expected, p_expected = _run(unfused, params, 6, key)
    got, p_got = _run(fused, params, 6, key)
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for t, (a, b) in enumerate(zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"leaf {t}")
    for a, b in zip(jax.tree.leaves(p_expected), jax.tree.leaves(p_got), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert bool(expected[0][1][0].record.clipped)  # the spike was clipped...
    assert not bool(expected[1][1][0].record.clipped)  # ...and the next step was not


def test_fused_clip_adamw_bfloat16_gradients_match_unfused_bitwise():
    key = jax.random.key(1)
    params = _tree(jax.random.fold_in(key, 5), jnp.bfloat16)
    expected, _ = _run(gx.chain(gx.clip_by_global_norm(1.0), gx.adamw(1e-2)), params, 4, key)
    got, _ = _run(clip_adamw(1.0, 1e-2), params, 4, key)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.parametrize("small_leaf,small_total", [(1 << 14, 1 << 20), (100, 300), (0, 1)])
def test_global_norm_grouped_matches_global_norm(small_leaf, small_total):
    key = jax.random.key(2)
    tree = {
        "f32": _tree(key),
        "bf16": _tree(jax.random.fold_in(key, 1), jnp.bfloat16),
        "f16_big": jnp.full((300,), 60.0, jnp.float16),  # 300 * 60**2 overflows a float16 sum
        "big": jax.random.normal(jax.random.fold_in(key, 2), (200, 130)),
    }
    norm = functools.partial(global_norm_grouped, small_leaf=small_leaf, small_total=small_total)
    expected = gx.global_norm(tree)
    np.testing.assert_allclose(jax.jit(norm)(tree), expected, rtol=2e-7)
    np.testing.assert_allclose(norm(tree), expected, rtol=2e-7)
    assert norm(tree).dtype == jnp.float32
    assert float(norm({})) == 0.0


def test_global_norm_grouped_sums_over_a_mapped_axis():
    x = jnp.arange(8.0).reshape(2, 4)
    norms = jax.vmap(lambda row: global_norm_grouped({"a": row}, axis_name="i"), axis_name="i")(x)
    np.testing.assert_allclose(norms, jnp.full(2, jnp.linalg.norm(x)), rtol=1e-6)


def test_fused_with_grouped_norm_tracks_unfused_chain():
    key = jax.random.key(3)
    params = _tree(jax.random.fold_in(key, 7))
    _, p1 = _run(gx.chain(gx.clip_by_global_norm(1.0), gx.adamw(1e-2)), params, 8, key)
    _, p2 = _run(clip_adamw(1.0, 1e-2, norm=global_norm_grouped), params, 8, key)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_fused_clip_adamw_traces_each_leaf_shape_once():
    tx = clip_adamw(1.0, 1e-3)
    params = {f"w{i}": jnp.zeros((4, 4)) for i in range(50)} | {"b": jnp.zeros(3)}
    jaxpr = jax.make_jaxpr(tx.update)(params, tx.init(params), params)
    calls = [e for e in jaxpr.jaxpr.eqns if e.params.get("name") == "leaf"]
    assert len(calls) == 51  # one call per leaf, of a rule traced once per (shape, dtype)
    assert len({id(e.params["jaxpr"]) for e in calls}) == 2
