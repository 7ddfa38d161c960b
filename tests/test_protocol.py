"""The protocol every transform keeps: jit == eager, no recompilation, a state whose tree
structure, shapes and dtypes never change (so `lax.scan` and AOT compilation work), `vmap`
over an ensemble, abstract `init`, saturating counters and traced hyperparameters."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import gradxform as gx
from tests.cases import CASES, compiled_size, gradients_at, make, random_tree, run


def shape_dtype(tree):
    return jax.tree.map(lambda x: (x.shape, x.dtype), tree)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_init_on_shape_dtype_structs_and_aot_compiled_update_equal_eager(case):
    params = random_tree(0)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    tx, _ = make(case)
    assert shape_dtype(tx.init(abstract)) == shape_dtype(tx.init(params))  # abstract leaves
    abstract_state = jax.eval_shape(tx.init, abstract)
    compiled = jax.jit(tx.update).lower(abstract, abstract_state, abstract).compile()
    eager, p_eager, s_eager = run(tx, params, steps=3, jit=False)
    aot, p_aot, s_aot = run(tx, params, steps=3, update=compiled)  # the state keeps its types
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=case.rtol, atol=case.rtol)
    jax.tree.map(close, (eager, p_eager, s_eager), (aot, p_aot, s_aot))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_state_structure_shapes_and_dtypes_are_stable(case):
    params = random_tree(0, dtypes=(jnp.float32, jnp.bfloat16))
    tx, _ = make(case)
    state = tx.init(params)
    before = (jax.tree.structure(state), shape_dtype(state))
    for t in range(2):
        _, state = tx.update(gradients_at(params, t), state, params)
        assert (jax.tree.structure(state), shape_dtype(state)) == before


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_scan_over_steps_equals_python_loop(case):
    params = random_tree(0)
    tx, _ = make(case)
    grads = [gradients_at(params, t) for t in range(4)]

    def body(carry, g):
        p, s = carry
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

    (p_scan, _), _ = jax.lax.scan(
        body, (params, tx.init(params)), jax.tree.map(lambda *xs: jnp.stack(xs), *grads)
    )
    p_loop, state = params, tx.init(params)
    for g in grads:
        u, state = tx.update(g, state, p_loop)
        p_loop = optax.apply_updates(p_loop, u)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=case.rtol, atol=case.rtol),
        p_scan,
        p_loop,
    )


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_vmap_over_ensemble_equals_python_loop(case):
    members = [random_tree(seed) for seed in range(3)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *members)
    tx, _ = make(case)
    grads = jax.tree.map(lambda *xs: jnp.stack(xs), *[gradients_at(m, 0) for m in members])
    u_vmap, _ = jax.vmap(tx.update)(grads, jax.vmap(tx.init)(stacked), stacked)
    for i, member in enumerate(members):
        u_i, _ = tx.update(gradients_at(member, 0), tx.init(member), member)
        jax.tree.map(
            lambda a, b, i=i: np.testing.assert_allclose(a[i], b, rtol=1e-6, atol=1e-6), u_vmap, u_i
        )


def test_step_counter_saturates_instead_of_overflowing():
    tx = gx.adam(1e-3)
    params = {"w": jnp.ones(2)}
    state = tx.init(params)
    near_max = jnp.asarray(np.iinfo(np.int32).max - 1, jnp.int32)
    state = (state[0]._replace(count=near_max), *state[1:])
    for _ in range(3):
        u, state = tx.update({"w": jnp.ones(2)}, state, params)
    assert int(state[0].count) == np.iinfo(np.int32).max
    assert bool(jnp.all(jnp.isfinite(u["w"])))


def test_changing_an_injected_hyperparameter_does_not_recompile():
    tx = optax.inject_hyperparams(gx.adamw)(learning_rate=0.1, weight_decay=0.01)
    params = {"w": jnp.ones(3)}
    traces = []

    @jax.jit
    def step(params, state):
        traces.append(None)
        updates, state = tx.update({"w": jnp.ones(3)}, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    _, state = step(params, state)
    state.hyperparams["learning_rate"] = jnp.zeros([], jnp.float32)  # same aval, new value
    new_params, state = step(params, state)
    assert len(traces) == 1
    np.testing.assert_array_equal(new_params["w"], params["w"])  # lr 0: no move


# g = p = [3, -4] (norm 5) and the hyperparameter 0.5, each rule applied by hand.
HYPERPARAMETER_FORMS = [
    ("clip_by_global_norm", "max_norm", [0.3, -0.4]),  # g * 0.5 / 5
    ("clip", "max_delta", [0.5, -0.5]),
    ("clip_by_leaf_norm", "max_norm", [0.3, -0.4]),
    ("add_decayed_weights", "weight_decay", [4.5, -6.0]),  # g + 0.5 * p
    ("scale_by_learning_rate", "learning_rate", [-1.5, 2.0]),  # -0.5 * g
]


@pytest.mark.parametrize("name,argument,expected", HYPERPARAMETER_FORMS)
def test_hyperparameters_accept_float_array_and_schedule(name, argument, expected):
    params = {"w": jnp.array([3.0, -4.0])}
    grads = {"w": jnp.array([3.0, -4.0])}
    schedule = optax.linear_schedule(0.5, 1.0, transition_steps=1)  # 0.5 at step 0
    for value in (0.5, jnp.asarray(0.5), schedule):
        tx = getattr(gx, name)(**{argument: value})
        u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
        np.testing.assert_allclose(u["w"], expected, rtol=1e-6, err_msg=repr(value))


def test_extra_args_reach_a_chain_of_gradxform_transforms():
    seen = {}

    def probe_update(updates, state, params=None, **extra):
        seen.update(extra)
        return updates, state

    probe = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), probe_update)
    tx = gx.chain(gx.clip_by_global_norm(1.0), probe, gx.adam(1e-3))
    params = {"w": jnp.ones(2)}
    tx.update({"w": jnp.ones(2)}, tx.init(params), params, loss=jnp.asarray(1.5))
    assert float(seen["loss"]) == 1.5


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_donated_step_compiles_once(case):
    """Params and state can be donated: every state leaf is its own buffer (shared ones fail
    'donate the same buffer twice'); and the second and third calls do not recompile."""
    params = random_tree(0)
    tx, _ = make(case)
    traces = []

    def step(params, state, grads):
        traces.append(None)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    donated = jax.jit(step, donate_argnums=(0, 1))
    state = tx.init(params)
    p = jax.tree.map(jnp.copy, params)
    for t in range(3):
        p, state = donated(p, state, gradients_at(params, t))
    assert len(traces) == 1
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(p))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_compiled_program_grows_linearly_with_the_leaf_count(case):
    # XLA copies a cheap scalar chain (e.g. a max over all leaves) into every consumer; one
    # per leaf makes the program O(leaves**2): minutes of compilation at 1000 leaves.
    tx, _ = make(case)
    small, large = compiled_size(tx, 2), compiled_size(tx, 8)  # 4x the leaves
    assert large < 4.5 * small, (small, large)  # quadratic: up to 16x


# ------------------------------------------------------------------- the edges optax accepts


def _traced_steps(tx, params, grads_at, steps=3):
    """`steps` jitted updates; the state, the last updates and how often `update` was traced."""
    traces = []

    @jax.jit
    def step(grads, state, params):
        traces.append(None)
        return tx.update(grads, state, params)

    state = tx.init(params)
    before = (jax.tree.structure(state), shape_dtype(state))
    for t in range(steps):
        updates, state = step(grads_at(t), state, params)
        assert (jax.tree.structure(state), shape_dtype(state)) == before, t
    return state, updates, len(traces)


@pytest.mark.filterwarnings("error:scatter inputs have incompatible types")  # float64 into f32
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_float64_state_keeps_its_dtypes_under_x64(case):
    with jax.enable_x64(True):
        params = jax.tree.map(lambda x: x.astype(jnp.float64), random_tree(0))
        tx, _ = make(case)
        _, updates, traces = _traced_steps(tx, params, lambda t: gradients_at(params, t))
        assert {x.dtype for x in jax.tree.leaves(updates)} == {jnp.dtype(jnp.float64)}
        assert traces == 1


@pytest.mark.parametrize("case", [c for c in CASES if c.complex_ok], ids=lambda c: c.name)
def test_complex64_params_keep_state_and_update_dtypes(case):
    params = random_tree(0, dtypes=(jnp.complex64,))
    tx, _ = make(case)
    _, updates, traces = _traced_steps(tx, params, lambda t: gradients_at(params, t))
    assert {x.dtype for x in jax.tree.leaves(updates)} == {jnp.dtype(jnp.complex64)}
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(updates))
    assert traces == 1


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_scalar_leaves_and_integer_buffers_behave_like_the_arrays_they_stand_for(case):
    """Python and NumPy scalars are arrays; an int32 buffer with a None gradient is left out."""
    loose = {"a": 0.5, "b": np.float32(-1.5), "buffer": jnp.arange(3), "w": np.ones((2, 3))}
    loose["none"] = None  # a None leaf of the params (optax's empty subtree) stays None
    grads = lambda t: {
        "a": 0.25 + t,
        "b": np.float32(2.0),
        "buffer": None,
        "none": None,
        "w": np.full((2, 3), 0.5),
    }
    tx, _ = make(case)
    _, updates, traces = _traced_steps(tx, loose, grads)
    assert updates["buffer"] is None and updates["none"] is None and traces == 1
    arrays = {"a": jnp.float32(0.5), "b": jnp.float32(-1.5), "w": jnp.ones((2, 3))}
    same_grads = lambda t: {  # the arrays they stand for, without the buffer
        k: jnp.asarray(v, jnp.float32) for k, v in grads(t).items() if v is not None
    }
    _, expected, _ = _traced_steps(tx, arrays, same_grads)
    for key in arrays:
        np.testing.assert_allclose(updates[key], expected[key], rtol=1e-6)


def _explicit_mesh():
    return jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_every_transform_runs_under_explicit_sharding_and_state_inherits_it(case):
    P, NamedSharding = jax.sharding.PartitionSpec, jax.sharding.NamedSharding
    mesh = _explicit_mesh()
    with jax.set_mesh(mesh):
        put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
        params = {
            "kernel": put(jnp.linspace(-1, 1, 64).reshape(16, 4), P("x")),
            "bias": put(jnp.linspace(0.5, 1, 8), P("x")),  # small and sharded: no grouping
            "scale": put(jnp.float32(0.7), P()),
            "vector": put(jnp.linspace(-2, 2, 3), P()),
        }
        grads_at = lambda t: jax.tree.map(lambda p: 0.5 * p + 0.1 * (t + 1), params)
        tx, _ = make(case)
        state, updates, _ = _traced_steps(tx, params, grads_at, steps=2)
    shardings = {p.shape: p.sharding for p in jax.tree.leaves(params)}
    same = lambda x: x.sharding.is_equivalent_to(shardings[x.shape], x.ndim)
    for u in jax.tree.leaves(updates):
        assert same(u), (u.shape, u.sharding)
    for leaf in jax.tree.leaves(state):  # moments and buffers shaped like a sharded param
        if leaf.shape in ((16, 4), (8,)):
            assert same(leaf), (leaf.shape, leaf.sharding)


def test_add_noise_built_outside_a_mesh_makes_its_key_in_init():
    tx = gx.add_noise(0.1, 0.55, key=3)  # built before any mesh exists
    mesh = _explicit_mesh()
    with jax.set_mesh(mesh):
        params = {"w": jax.device_put(jnp.zeros(8), jax.sharding.NamedSharding(mesh, P("x")))}
        state = tx.init(params)
        assert state.key.sharding.mesh.shape == mesh.shape  # the key lives on the mesh
        updates, _ = jax.jit(tx.update)(params, state, params)
    expected = optax.add_noise(0.1, 0.55, key=3)
    theirs, _ = expected.update({"w": jnp.zeros(8)}, expected.init({"w": jnp.zeros(8)}))
    np.testing.assert_allclose(updates["w"], theirs["w"], rtol=1e-6)
