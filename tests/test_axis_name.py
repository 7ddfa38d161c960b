"""Every transform that takes `axis_name`, under `pmap` and under `shard_map` on 8 virtual
devices, with the parameters sharded over the axis: updates and state equal those of the same
transform on the whole, unsharded tree, step after step (spikes and a NaN in one shard
included), and every replica agrees."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import gradxform as gx

N = 8
ROWS = {"w": N * 5, "b": N * 6}  # per-parameter state leaves are recognised by these lengths

FACTORIES = {
    "clip_by_global_norm": lambda **kw: gx.clip_by_global_norm(2.0, **kw),
    "autoclip": lambda **kw: gx.autoclip(percentile=50.0, history=16, **kw),
    "zclip": lambda **kw: gx.zclip(warmup_steps=3, max_norm=None, **kw),
    "skip_if": lambda **kw: gx.skip_if(gx.sgd(0.1, momentum=0.9), warmup_steps=3, **kw),
    "health": lambda **kw: gx.health(gx.sgd(0.1), warmup_steps=3, patience=2, **kw),
}
SCALES = [1.0, 1.2, 0.9, 1.1, 50.0, 1.0, np.nan, 1.0]  # a spike at step 5, a NaN at step 7


def params():
    key = jax.random.key(0)
    return {"w": jax.random.normal(key, (ROWS["w"], 3)), "b": jnp.linspace(-1.0, 1.0, ROWS["b"])}


def grads_at(step):
    g = jax.tree.map(lambda x: 0.5 * x + 0.1 * step, params())
    g = jax.tree.map(lambda x: x * SCALES[step] if np.isfinite(SCALES[step]) else x, g)
    if np.isnan(SCALES[step]):  # one value in the last shard only
        g["w"] = g["w"].at[-1, 0].set(jnp.nan)
    if step == 2:  # a gradient that is exactly zero in the first shard
        g["b"] = g["b"].at[: ROWS["b"] // N].set(0.0)
    return g


def split(tree):
    return jax.tree.map(lambda x: x.reshape(N, x.shape[0] // N, *x.shape[1:]), tree)


def join(tree):
    return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), tree)


def whole_run(name):
    tx, p = FACTORIES[name](), params()
    state, out = tx.init(p), []
    for step in range(len(SCALES)):
        u, state = jax.jit(tx.update)(grads_at(step), state, p)
        out.append((u, state))
    return out


def assert_state_matches(got, expected, name, step):
    """`got`: one per device along axis 0, sharded or replicated; `expected`: whole."""
    for path, g, e in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(got), jax.tree.leaves(expected),
        strict=True,
    ):  # fmt: skip
        where = f"{name}, step {step}, state leaf {jax.tree_util.keystr(path[0])}"
        g, e = np.asarray(g), np.asarray(e)
        if e.shape[:1] in {(n,) for n in ROWS.values()}:  # sharded like the params
            g = g.reshape(-1, *g.shape[2:])
        else:  # replicated: every device holds the whole-tree value
            assert ((g == g[:1]) | (np.isnan(g) & np.isnan(g[:1]))).all(), where
            g = g[0]
        np.testing.assert_allclose(g, e, rtol=2e-6, atol=1e-6, err_msg=where)


def check_run(name, sharded_update, init_state):
    state = init_state
    for step, (expected_u, expected_state) in enumerate(whole_run(name)):
        u, state = sharded_update(split(grads_at(step)), state, split(params()))
        np.testing.assert_allclose(join(u)["w"], expected_u["w"], rtol=2e-6, atol=1e-6)
        np.testing.assert_allclose(join(u)["b"], expected_u["b"], rtol=2e-6, atol=1e-6)
        assert_state_matches(state, expected_state, name, step)


@pytest.mark.parametrize("name", FACTORIES)
def test_pmap_with_axis_name_equals_the_whole_tree(name):
    tx = FACTORIES[name](axis_name="devices")
    init_state = jax.pmap(tx.init)(split(params()))
    check_run(name, jax.pmap(tx.update, axis_name="devices"), init_state)


@pytest.mark.parametrize("name", FACTORIES)
def test_shard_map_with_axis_name_equals_the_whole_tree(name):
    tx = FACTORIES[name](axis_name="data")
    mesh = Mesh(jax.devices(), ("data",))
    # Each device's state is stacked along a leading device axis, as under pmap.
    sharded = functools.partial(jax.shard_map, mesh=mesh, out_specs=P("data"), check_vma=False)
    add_axis = lambda tree: jax.tree.map(lambda x: x[None], tree)
    drop_axis = lambda tree: jax.tree.map(lambda x: x[0], tree)

    @functools.partial(sharded, in_specs=(P("data"),))
    def init(p):
        return add_axis(tx.init(drop_axis(p)))

    @functools.partial(sharded, in_specs=(P("data"), P("data"), P("data")))
    def update(g, state, p):
        u, state = tx.update(drop_axis(g), drop_axis(state), drop_axis(p))
        return add_axis(u), add_axis(state)

    check_run(name, jax.jit(update), jax.jit(init)(split(params())))


def test_without_axis_name_each_shard_sees_only_its_own_norm():
    """The comparison above can fail: without `axis_name` the shards disagree."""
    tx = FACTORIES["clip_by_global_norm"]()
    state = jax.pmap(tx.init)(split(params()))
    with pytest.raises(AssertionError):
        check_run("clip_by_global_norm", jax.pmap(tx.update, axis_name="devices"), state)
