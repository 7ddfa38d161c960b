"""gx.lbfgs against optax.lbfgs iterate by iterate; its line search, records and dtypes;
gx.minimize's loop, fields, compilation cache and extra arguments."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cases import assert_trees_close, random_tree

import gradxform as gx

# ----------------------------------------------------------------------------- problems


def rosenbrock(w):
    x = w["x"]
    return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


def quadratic(w):
    """A random ill-conditioned (condition ~1e3) quadratic on the mixed-shape test tree."""
    leaves = jax.tree.leaves(w)
    x = jnp.concatenate([leaf.reshape(-1) for leaf in leaves])
    n = x.shape[0]
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    a = jnp.asarray((q * np.logspace(0, 3, n)) @ q.T, x.dtype)
    return 0.5 * x @ (a @ x) - jnp.sum(x)


def logistic(w, x, y):
    logits = x @ w["kernel"] + w["bias"][None, :]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y)) + 1e-3 * jnp.sum(
        w["kernel"] ** 2
    )


def logistic_data(dtype):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 12))
    y = (x[:, :3].argmax(1) + (rng.uniform(size=200) < 0.2)) % 3
    params = {"kernel": jnp.zeros((12, 3), dtype), "bias": jnp.zeros((3,), dtype)}
    return params, {"x": jnp.asarray(x, dtype), "y": jnp.asarray(y)}


def problem(name, dtype):
    """(value_fn, initial params, keyword data for value_fn)."""
    if name == "rosenbrock":
        return rosenbrock, {"x": jnp.asarray(np.linspace(-1.2, 1.0, 8), dtype)}, {}
    if name == "quadratic":
        return quadratic, random_tree(3, (dtype,)), {}
    params, data = logistic_data(dtype)
    return logistic, params, data


def iterates(tx, fn, params, steps, **data):
    """optax's documented loop (`lbfgs` docstring), jitted step; the params after each step."""
    state, out = tx.init(params), []
    cached = optax.tree.get(state, "value") is not None  # a line search keeps value and grad
    value_and_grad = optax.value_and_grad_from_state(fn) if cached else _stateless(fn)

    @jax.jit
    def step(params, state):
        value, grad = value_and_grad(params, **data, state=state)
        updates, state = tx.update(grad, state, params, value=value, grad=grad, value_fn=fn, **data)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
        out.append(params)
    return out, state


def _stateless(fn):
    return lambda params, state, **data: jax.value_and_grad(fn)(params, **data)


# ----------------------------------------------------------------------------- parity


# Every problem in float32; float64 (x64, where the match is to 1e-12) on the cheapest one: the
# dtype does not change the code path, and each compile of the line search costs seconds. On the
# quadratic (condition 1e3) the two float32 runs part by one ulp at step 2 and the curvature
# amplifies it: 6e-6 after 15 steps, so 2e-5 there (a wrong step is off by 1e-1 or more).
@pytest.mark.parametrize(
    ("name", "dtype", "rtol"),
    [
        ("rosenbrock", "float32", 2e-6),
        ("quadratic", "float32", 2e-5),
        ("logistic", "float32", 2e-6),
        ("rosenbrock", "float64", 1e-12),
    ],
)
def test_lbfgs_matches_optax_iterate_by_iterate(name, dtype, rtol):
    with jax.enable_x64(dtype == "float64"):
        fn, params, data = problem(name, jnp.dtype(dtype))
        ours, _ = iterates(gx.lbfgs(), fn, params, 15, **data)
        theirs, _ = iterates(optax.lbfgs(), fn, params, 15, **data)
        for a, b in zip(ours, theirs, strict=True):
            assert_trees_close(a, b, rtol=rtol, atol=rtol)
        assert all(x.dtype == jnp.dtype(dtype) for x in jax.tree.leaves(ours[-1]))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"memory_size": 3, "scale_init_precond": False},  # both change every step
        {"learning_rate": 0.5, "linesearch": None},
        {"learning_rate": optax.linear_schedule(0.1, 0.01, 10), "linesearch": None},
    ],
)
def test_lbfgs_options_match_optax(kwargs):
    fn, params, data = problem("logistic", jnp.float32)
    ours, _ = iterates(gx.lbfgs(**kwargs), fn, params, 12, **data)
    theirs, _ = iterates(optax.lbfgs(**kwargs), fn, params, 12, **data)
    for a, b in zip(ours, theirs, strict=True):
        assert_trees_close(a, b, rtol=2e-6, atol=2e-6)


def test_scale_by_lbfgs_reduces_in_float32_for_bfloat16():
    """bf16 params and gradients: the direction matches a float64 run on the same bf16 values
    to bf16 rounding; the memory weights and record are float32."""
    rng = np.random.default_rng(0)
    a = np.diag(np.logspace(0, 2, 512))
    ws = [rng.normal(size=512) * 3.0**-t for t in range(6)]
    tx = gx.scale_by_lbfgs(memory_size=4)
    state, update = tx.init(jnp.zeros(512, jnp.bfloat16)), jax.jit(tx.update)
    directions = []
    for w in ws:
        d, state = update(jnp.asarray(a @ w, jnp.bfloat16), state, jnp.asarray(w, jnp.bfloat16))
        directions.append(d)
    assert state.weights_memory.dtype == state.record.curvature.dtype == jnp.float32
    assert directions[-1].dtype == jnp.bfloat16
    with jax.enable_x64(True):
        ref_tx = optax.scale_by_lbfgs(memory_size=4)
        ref_state = ref_tx.init(jnp.zeros(512))
        for w, d in zip(ws, directions, strict=True):
            w16, g16 = (jnp.asarray(v, jnp.bfloat16).astype(jnp.float64) for v in (w, a @ w))
            ref, ref_state = ref_tx.update(g16, ref_state, w16)
            err = np.linalg.norm(np.asarray(d, np.float64) - ref) / np.linalg.norm(ref)
            assert err < 1e-2, err  # bf16 output rounding is 2**-8 ~ 4e-3


# ----------------------------------------------------------------------------- line search


@jax.custom_jvp
def _nan_slope_beyond_one(w):
    return jnp.zeros((), w.dtype)


@_nan_slope_beyond_one.defjvp
def _(primals, tangents):
    (w,), (dw,) = primals, tangents
    return _nan_slope_beyond_one(w), jnp.sum(jnp.where(w > 1.0, jnp.nan, 0.0) * dw)


def finite_value_nan_grad(w):
    """(w - 3)^2 summed, whose gradient is NaN wherever some w > 1 (the value stays finite)."""
    return jnp.sum((w - 3.0) ** 2) + _nan_slope_beyond_one(w)


def test_linesearch_rejects_a_finite_value_with_a_nan_gradient():
    kwargs = {"initial_guess_strategy": "one", "approx_dec_rtol": None}
    w0 = jnp.zeros(2)
    theirs, _ = iterates(
        optax.lbfgs(linesearch=optax.scale_by_zoom_linesearch(20, **kwargs)),
        finite_value_nan_grad, w0, 3,
    )  # fmt: skip
    assert not np.isfinite(theirs[-1]).all()  # the problem this guards against
    ours, state = iterates(
        gx.lbfgs(linesearch=gx.scale_by_finite_zoom_linesearch(20, **kwargs)),
        finite_value_nan_grad, w0, 3,
    )  # fmt: skip
    assert np.isfinite(ours[-1]).all() and (ours[-1] <= 1.0).all() and (ours[-1] > 0.99).all()
    assert np.isfinite(optax.tree.get(state, "grad")).all()


def test_linesearch_backtracks_from_nan_values_and_stays_put_when_all_fail():
    def nan_beyond(w):
        return jnp.where(jnp.any(jnp.abs(w) > 1.0), jnp.nan, jnp.sum((w - 3.0) ** 2))

    ours, state = iterates(gx.lbfgs(), nan_beyond, jnp.zeros(2), 3)
    assert np.isfinite(ours[-1]).all() and (ours[-1] <= 1.0).all()

    def nan_everywhere_but_zero(w):
        return jnp.where(jnp.any(w != 0.0), jnp.nan, jnp.sum((w - 3.0) ** 2))

    ours, state = iterates(gx.lbfgs(), nan_everywhere_but_zero, jnp.zeros(2), 2)
    np.testing.assert_array_equal(ours[-1], jnp.zeros(2))
    assert gx.read_health(state)["linesearch/step_size"] == 0.0
    result = gx.minimize(nan_everywhere_but_zero, jnp.zeros(2), max_steps=50)
    assert result.steps == 1 and not result.converged  # stalled: stops instead of retrying
    np.testing.assert_array_equal(result.params, jnp.zeros(2))


def test_records_are_read_by_read_health():
    fn, params, data = problem("logistic", jnp.float32)
    out, state = iterates(gx.lbfgs(), fn, params, 3, **data)
    h = gx.read_health(state)
    assert h["linesearch/steps"] >= 1 and h["linesearch/step_size"] > 0
    assert h["linesearch/decrease_error"] == 0.0 and h["lbfgs/pair_skipped"] == 0.0
    # the pair of the third step: s = w2 - w1, y = g(w2) - g(w1)
    s = jax.tree.map(
        lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64), *out[1::-1]
    )
    grads = [jax.grad(fn)(w, **data) for w in out[1::-1]]
    y = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64), *grads)
    sy = sum(np.vdot(a, b) for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(y), strict=True))
    assert h["lbfgs/curvature"] == pytest.approx(sy, rel=1e-4)
    yy = sum(np.vdot(b, b) for b in jax.tree.leaves(y))
    assert h["lbfgs/identity_scale"] == pytest.approx(sy / yy, rel=1e-4)


def test_pair_with_zero_curvature_is_recorded_as_skipped():
    tx = gx.scale_by_lbfgs()
    w, g = jnp.ones(3), jnp.arange(3.0)
    state = tx.init(w)
    _, state = tx.update(g, state, w)
    assert not state.record.pair_skipped  # first step: no pair yet
    _, state = tx.update(g, state, w)  # same point: s = y = 0
    assert state.record.pair_skipped and state.weights_memory[0] == 0.0
    _, state = tx.update(g + 1.0, state, w + 1.0)
    assert not state.record.pair_skipped and state.record.curvature == pytest.approx(3.0)


def test_data_that_value_fn_does_not_take_is_a_clear_error():
    fn, params, data = problem("logistic", jnp.float32)
    tx = gx.lbfgs()
    value, grad = jax.value_and_grad(fn)(params, **data)
    with pytest.raises(TypeError, match=r"\['z'\].*`value_fn`"):
        tx.update(grad, tx.init(params), params, value=value, grad=grad, value_fn=fn, z=1, **data)


# ----------------------------------------------------------------------------- state


@pytest.mark.parametrize("x64", [False, True])
def test_state_structure_and_dtypes_hold_through_a_jitted_scan(x64):
    with jax.enable_x64(x64):
        params = {"a": jnp.ones(4, jnp.bfloat16), "b": jnp.ones((2, 3), jnp.float32)}
        tx = gx.lbfgs()

        def fn(w):
            return sum(jnp.sum((x.astype(jnp.float32) - 2.0) ** 2) for x in jax.tree.leaves(w))

        def step(carry, _):
            w, state = carry
            value, grad = jax.value_and_grad(fn)(w)
            u, state = tx.update(grad, state, w, value=value, grad=grad, value_fn=fn)
            return (optax.apply_updates(w, u), state), None

        state = tx.init(params)
        (w, final), _ = jax.jit(lambda c: jax.lax.scan(step, c, None, length=3))((params, state))
        assert jax.tree.structure(final) == jax.tree.structure(state)
        assert jax.tree.map(lambda x: x.dtype, final) == jax.tree.map(lambda x: x.dtype, state)
        assert gx.global_norm(jax.grad(fn)(w)) < 0.05


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="`memory_size`"):
        gx.lbfgs(memory_size=0)
    with pytest.raises(TypeError, match=r"`memory_size`.*2.5"):
        gx.scale_by_lbfgs(memory_size=2.5)
    with pytest.raises(TypeError, match=r"`linesearch`.*str"):
        gx.lbfgs(linesearch="zoom")
    with pytest.raises(TypeError, match="`scale_init_precond`"):
        gx.lbfgs(scale_init_precond=1)
    with pytest.raises(ValueError, match="`max_linesearch_steps`"):
        gx.scale_by_finite_zoom_linesearch(0)
    with pytest.raises(ValueError, match=r"`max_steps`.*-1"):
        gx.minimize(rosenbrock, {"x": jnp.zeros(2)}, max_steps=-1)
    with pytest.raises(ValueError, match="`tol`"):
        gx.minimize(rosenbrock, {"x": jnp.zeros(2)}, tol=-1.0)
    with pytest.raises(TypeError, match="`args`"):
        gx.minimize(rosenbrock, {"x": jnp.zeros(2)}, args=[1])
    with pytest.raises(TypeError, match="`tx`"):
        gx.minimize(rosenbrock, {"x": jnp.zeros(2)}, tx=optax.adam)


# ----------------------------------------------------------------------------- minimize


def test_minimize_solves_rosenbrock_and_reports_its_fields():
    result = gx.minimize(rosenbrock, {"x": jnp.zeros(8)}, max_steps=200, tol=1e-4)
    assert set(result._fields) >= {"params", "value", "grad_norm", "steps", "converged"}
    np.testing.assert_allclose(result.params["x"], np.ones(8), atol=1e-3)
    assert bool(result.converged) and result.grad_norm <= 1e-4 and 10 < result.steps < 200
    assert result.grad_norm == pytest.approx(
        float(gx.global_norm(jax.grad(rosenbrock)(result.params)))
    )
    assert result.value == pytest.approx(float(rosenbrock(result.params)), abs=1e-9)
    assert result.steps.dtype == result.fun_evals.dtype == jnp.int32
    assert result.grad_norm.dtype == jnp.float32 and result.converged.dtype == bool
    assert gx.read_health(result.state)["linesearch/steps"] >= 1


def test_minimize_takes_the_same_iterates_as_optaxs_loop():
    fn, params, data = problem("logistic", jnp.float32)
    theirs, _ = iterates(gx.lbfgs(), fn, params, 7, **data)
    result = gx.minimize(fn, params, args=(data["x"], data["y"]), max_steps=7, tol=0.0)
    assert result.steps == 7
    assert_trees_close(result.params, theirs[-1], rtol=2e-6, atol=2e-6)


def test_minimize_counts_every_evaluation_and_repeats_none():
    calls = []

    def fn(w):
        jax.debug.callback(lambda: calls.append(1))
        return rosenbrock(w)

    result = gx.minimize(fn, {"x": jnp.zeros(4)}, max_steps=12, tol=0.0)
    jax.block_until_ready(result)
    assert result.fun_evals == len(calls) > result.steps == 12  # line searches included
    by_hand = len(calls)
    calls.clear()
    jax.block_until_ready(iterates(gx.lbfgs(), fn, {"x": jnp.zeros(4)}, 12))
    assert len(calls) == by_hand  # optax's documented loop evaluates as often


def test_minimize_compiles_once_for_new_data():
    traces = []

    def fn(w, x, y):
        traces.append(1)
        return logistic(w, x, y)

    params, data = logistic_data(jnp.float32)
    tx = gx.lbfgs()
    first = gx.minimize(fn, params, args=(data["x"], data["y"]), tx=tx, max_steps=20)
    n = len(traces)
    second = gx.minimize(
        fn, params, args=(2.0 * data["x"], data["y"]), tx=tx, max_steps=25, tol=1e-7
    )
    assert len(traces) == n  # no retrace (so no recompile) for new data, max_steps, tol
    assert not np.allclose(first.params["kernel"], second.params["kernel"])
    expected = gx.minimize(
        logistic, params, args=(2.0 * data["x"], data["y"]), tx=tx, max_steps=25, tol=1e-7
    )
    assert_trees_close(second.params, expected.params, rtol=1e-6, atol=1e-6)


def test_minimize_runs_first_order_optimizers_and_stops_at_max_steps():
    fn, params, data = problem("logistic", jnp.float32)
    args = (data["x"], data["y"])
    result = gx.minimize(fn, params, args=args, tx=gx.adam(1e-2), max_steps=50)
    assert result.steps == 50 and result.fun_evals == 51 and not result.converged
    w, tx = params, gx.adam(1e-2)
    state = tx.init(w)
    for _ in range(50):
        u, state = tx.update(jax.grad(fn)(w, *args), state, w)
        w = optax.apply_updates(w, u)
    assert_trees_close(result.params, w, rtol=1e-5, atol=1e-6)
    assert gx.minimize(fn, params, args=args, max_steps=0).steps == 0


def test_minimize_keeps_bfloat16_params_and_converges():
    target = jnp.linspace(-1.0, 1.0, 16)

    def fn(w):
        return jnp.sum((w.astype(jnp.float32) - target) ** 2 * jnp.logspace(0, 2, 16))

    result = gx.minimize(fn, jnp.zeros(16, jnp.bfloat16), max_steps=50, tol=1e-2)
    assert result.params.dtype == jnp.bfloat16 and result.value.dtype == jnp.float32
    # to bfloat16's resolution (2**-7 near 1): steps below half of it round away
    np.testing.assert_allclose(np.asarray(result.params, np.float32), target, atol=3 * 2**-7)
    assert result.value < 1e-3 * fn(jnp.zeros(16))


def test_minimize_works_inside_vmap():
    targets = jnp.arange(6.0).reshape(3, 2)
    solve = jax.vmap(
        lambda c: (
            gx.minimize(
                lambda w, c: jnp.sum((w - c) ** 4), jnp.zeros(2), args=(c,), tol=1e-6
            ).params
        )
    )
    np.testing.assert_allclose(solve(targets), targets, atol=2e-2)


# ----------------------------------------------------------------------------- benchmark


def test_benchmark_quick_mode_writes_the_claimed_columns(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import lbfgs as bench

    argv = ["--quick", "--problems", "rosenbrock", "--repeats", "1", "--out", str(tmp_path)]
    result = bench.main(argv)
    saved = json.loads((tmp_path / "lbfgs.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert [r["solver"] for r in saved["rows"]] == ["gx.minimize", "scipy L-BFGS-B", "optax loop"]
    for row in saved["rows"]:
        assert set(bench.COLUMNS) <= set(row)
        assert (
            row["value"] < 1e-8 and row["iterations"] > 10 and row["fun_evals"] >= row["iterations"]
        )
        assert row["compile_s"] >= 0 and row["steady_ms"] > 0 and row["eval_floor_ms"] > 0
    ours, _, theirs = saved["rows"]
    # Same maths, same points: the evaluation counts agree exactly. The minima themselves sit at
    # the rounding floor (~1e-16), where an FMA more or less in the compiled program decides.
    assert ours["value"] == pytest.approx(theirs["value"], rel=1e-9, abs=1e-12)
    assert ours["fun_evals"] == theirs["fun_evals"]
    assert len(saved["goals"]) == 3 and saved["machine"]["scipy"]
    table = (tmp_path / "lbfgs.md").read_text()
    assert table.startswith("| problem | solver | final value | iterations | f evals |")
    assert not jax.config.jax_enable_x64  # the benchmark's float64 is scoped
