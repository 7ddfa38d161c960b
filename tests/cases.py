"""The table that drives most tests: every public transform, how to draw valid
hyperparameters for it, its family, and what it is checked against: its optax twin, or a
float64 reference where optax has none."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gradxform as gx

Tree = Any
# A float64 reference: built from the case's kwargs, it maps (gradient, params, step) to the
# update, in float64 NumPy, holding whatever state it needs in its closure.
ReferenceStep = Callable[[Tree, Tree, int], Tree]
KINDS = (
    "clip",
    "decay",
    "momentum",
    "adaptive",
    "noise",
    "learning_rate",
    "optimizer",
    "guard",
    "telemetry",
)


class Tuned(NamedTuple):
    """Hyperparameters an optimizer converges with in tests/test_convergence.py."""

    label: str  # test id
    quadratic: dict[str, Any]  # 2000 steps on an ill-conditioned quadratic
    rosenbrock: dict[str, Any]  # step sizes the valley tolerates
    rosenbrock_steps: int = 3000


class Case(NamedTuple):
    name: str
    draw: Callable[[np.random.Generator], dict[str, Any]]  # valid hyperparameters
    twin: Callable[..., optax.GradientTransformation] | None  # optax factory, same kwargs
    kind: str  # its family, one of KINDS: "optimizer" cases are the named chains
    rtol: float = 2e-6  # float32 parity tolerance over a 20-step trajectory
    complex_ok: bool = True  # takes complex params (optax's `clip` refuses them: so does ours)
    reference: Callable[[dict[str, Any]], ReferenceStep] | None = None  # where twin is None
    tuned: tuple[Tuned, ...] = ()  # optimizers: convergence settings, one test per entry


def _beta(rng, low=0.5, high=0.999):
    return float(rng.uniform(low, high))


def _lr(rng):
    return float(10 ** rng.uniform(-3, -1))


def _adam(rng):
    return {"b1": _beta(rng, 0.0, 0.95), "b2": _beta(rng, 0.9, 0.9999), "eps": 1e-8}


def _schedule(rng):
    return optax.warmup_cosine_decay_schedule(0.0, _lr(rng), 5, 30)


# ------------------------------------------------------------------- float64 references


def _norm(tree) -> float:
    return float(np.sqrt(sum(np.sum(x**2) for x in jax.tree.leaves(tree))))


def _scaled(tree, factor: float):
    return jax.tree.map(lambda x: x * factor, tree)


def _leaf_norm_reference(kw) -> ReferenceStep:
    """u = g * min(1, max_norm / ||g||) per leaf."""
    clip = lambda x: x * min(1.0, kw["max_norm"] / max(np.linalg.norm(x), 1e-300))
    return lambda g, p, t: jax.tree.map(clip, g)


def _l1_decay_reference(kw) -> ReferenceStep:
    """u = g + weight_decay * sign(p)."""
    return lambda g, p, t: jax.tree.map(lambda x, w: x + kw["weight_decay"] * np.sign(w), g, p)


def _autoclip_reference(kw) -> ReferenceStep:
    """u = g * min(1, percentile(last `history` norms) / ||g||)."""
    norms = []

    def step(g, p, t):
        norms.append(_norm(g))
        threshold = np.percentile(norms[-kw["history"] :], kw["percentile"])
        return _scaled(g, min(1.0, threshold / norms[-1]))

    return step


def _zclip_reference(kw) -> ReferenceStep:
    """Past warm-up, a norm with z-score z > z_thresh is cut to mean + z_thresh**2 * std / z
    (mode "mean": to the mean); the moments (plain averages in warm-up, then EMAs with weight
    1 - alpha) absorb the clipped norm; `max_norm` caps every step."""
    warmup, alpha, z_thresh = kw["warmup_steps"], kw["alpha"], kw["z_thresh"]
    mean = var = 0.0

    def step(g, p, t):
        nonlocal mean, var
        norm, threshold = _norm(g), np.inf
        if t >= warmup:
            std = np.sqrt(var)
            z = (norm - mean) / max(std, 1e-6)
            if z > z_thresh:
                threshold = mean if kw["mode"] == "mean" else mean + z_thresh**2 * std / z
        if kw["max_norm"] is not None:
            threshold = min(threshold, kw["max_norm"])
        w = 1.0 / (t + 1) if t < warmup else 1.0 - alpha
        d = min(norm, threshold) - mean
        mean, var = mean + w * d, var + w * ((1 - w) * d * d - var)
        return _scaled(g, min(1.0, threshold / norm))

    return step


def _spam_reference(kw) -> ReferenceStep:
    """Adam whose moments reset every `reset_interval` steps; after a reset, g**2 above
    theta * nu is clipped to sqrt(theta * nu) and the step is ramped up by a cosine warm-up."""
    b1, b2, eps, theta = kw["b1"], kw["b2"], kw["eps"], kw["spike_threshold"]
    interval, warmup = kw["reset_interval"], kw["warmup_steps"]
    mu = nu = None
    k = 0  # steps since the last reset

    def step(g, p, t):
        nonlocal mu, nu, k
        if t % interval == 0:
            mu, nu, k = jax.tree.map(np.zeros_like, g), jax.tree.map(np.zeros_like, g), 0
        k += 1
        if k > 1:
            cap = lambda x, v: np.where(x**2 > theta * v, np.sign(x) * np.sqrt(theta * v), x)
            g = jax.tree.map(cap, g, nu)
        mu = jax.tree.map(lambda m, x: b1 * m + (1 - b1) * x, mu, g)
        nu = jax.tree.map(lambda v, x: b2 * v + (1 - b2) * x**2, nu, g)
        ramp = min(k / warmup, 1.0) if warmup else 1.0
        w = 0.5 * (1 - np.cos(np.pi * ramp)) if t >= interval else 1.0
        adam = lambda m, v: w * (m / (1 - b1**k)) / (np.sqrt(v / (1 - b2**k)) + eps)
        return jax.tree.map(adam, mu, nu)

    return step


# ------------------------------------------------------------------- convergence settings


def _cosine(peak: float, steps: int = 3000):
    return optax.cosine_decay_schedule(peak, steps)


def _tuned(label, quadratic, rosenbrock, steps=3000, **both):
    return Tuned(label, {**quadratic, **both}, {**rosenbrock, **both}, steps)


CASES = [
    Case(
        "clip",
        lambda r: {"max_delta": float(r.uniform(0.1, 1.0))},
        optax.clip,
        "clip",
        complex_ok=False,
    ),
    Case(
        "clip_by_global_norm",
        lambda r: {"max_norm": float(r.uniform(0.5, 3))},
        optax.clip_by_global_norm,
        "clip",
    ),
    Case(
        "clip_by_block_rms",
        lambda r: {"threshold": float(r.uniform(0.1, 1.0))},
        optax.clip_by_block_rms,
        "clip",
    ),
    Case(
        "adaptive_grad_clip",
        lambda r: {"clipping": float(r.uniform(0.01, 0.2))},
        optax.adaptive_grad_clip,
        "clip",
    ),
    Case(
        "clip_by_leaf_norm",
        lambda r: {"max_norm": float(r.uniform(0.5, 2))},
        None,
        "clip",
        reference=_leaf_norm_reference,
    ),
    Case(
        "add_decayed_weights",
        lambda r: {"weight_decay": float(r.uniform(0, 0.1))},
        optax.add_decayed_weights,
        "decay",
    ),
    Case(
        "add_l1_decay",
        lambda r: {"weight_decay": float(r.uniform(0, 0.1))},
        None,
        "decay",
        reference=_l1_decay_reference,
    ),
    Case(
        "trace",
        lambda r: {"decay": _beta(r, 0.0), "nesterov": bool(r.integers(2))},
        optax.trace,
        "momentum",
    ),
    Case(
        "ema",
        lambda r: {"decay": _beta(r, 0.0), "debias": bool(r.integers(2))},
        optax.ema,
        "momentum",
    ),
    Case(
        "scale_by_rss",
        lambda r: {"initial_accumulator_value": float(r.uniform(0, 0.5))},
        optax.scale_by_rss,
        "adaptive",
    ),
    Case(
        "scale_by_rms",
        lambda r: {
            "decay": _beta(r),
            "eps_in_sqrt": bool(r.integers(2)),
            "bias_correction": bool(r.integers(2)),
        },
        optax.scale_by_rms,
        "adaptive",
    ),
    # var = nu - mu**2 cancels (exactly g**2 - g**2 at step 1 with bias correction), so a
    # one-ulp difference in how XLA fuses it grows over 20 unscaled steps: eps must dominate
    # the cancellation, and the trajectory gets a looser bound (single steps match exactly).
    Case(
        "scale_by_stddev",
        lambda r: {"decay": _beta(r), "eps": 0.05, "bias_correction": bool(r.integers(2))},
        optax.scale_by_stddev,
        "adaptive",
        rtol=2e-5,
    ),
    Case(
        "scale_by_adam",
        lambda r: {**_adam(r), "nesterov": bool(r.integers(2))},
        optax.scale_by_adam,
        "adaptive",
    ),
    Case("scale_by_amsgrad", _adam, optax.scale_by_amsgrad, "adaptive"),
    Case("scale_by_adamax", _adam, optax.scale_by_adamax, "adaptive"),
    Case(
        "add_noise",
        lambda r: {"eta": float(r.uniform(0, 1)), "gamma": 0.55, "key": int(r.integers(1000))},
        optax.add_noise,
        "noise",
    ),
    Case("scale", lambda r: {"step_size": float(r.uniform(-1, 1))}, optax.scale, "learning_rate"),
    Case(
        "scale_by_learning_rate",
        lambda r: {"learning_rate": _lr(r)},
        optax.scale_by_learning_rate,
        "learning_rate",
    ),
    Case(
        "scale_by_schedule",
        lambda r: {"step_size_fn": _schedule(r)},
        optax.scale_by_schedule,
        "learning_rate",
    ),
    Case(
        "sgd",
        lambda r: {
            "learning_rate": _schedule(r) if r.integers(2) else _lr(r),
            "momentum": _beta(r, 0.0),
            "nesterov": bool(r.integers(2)),
        },
        optax.sgd,
        "optimizer",
        tuned=(
            _tuned("sgd", {"learning_rate": 0.1}, {"learning_rate": _cosine(1e-3)}, momentum=0.9),
            _tuned(
                "sgd_nesterov",
                {"learning_rate": 0.1},
                {"learning_rate": _cosine(1e-3)},
                momentum=0.9,
                nesterov=True,
            ),
        ),
    ),
    # Adagrad's step shrinks as 1/sqrt(t): the valley needs more steps.
    Case(
        "adagrad",
        lambda r: {"learning_rate": _lr(r)},
        optax.adagrad,
        "optimizer",
        tuned=(_tuned("adagrad", {}, {}, 20000, learning_rate=0.5),),
    ),
    Case(
        "rmsprop",
        lambda r: {
            "learning_rate": _lr(r),
            "decay": _beta(r),
            "eps": 1e-6,
            "centered": bool(r.integers(2)),
            "momentum": _beta(r, 0.0),
            "nesterov": bool(r.integers(2)),
        },
        optax.rmsprop,
        "optimizer",
        tuned=(
            _tuned(
                "rmsprop",
                {"learning_rate": 0.01, "momentum": 0.9},
                {"learning_rate": _cosine(3e-3)},
            ),
            _tuned(
                "rmsprop_centered",
                {"learning_rate": 0.01},
                {"learning_rate": _cosine(3e-3)},
                centered=True,
            ),
        ),
    ),
    Case(
        "adam",
        lambda r: {"learning_rate": _lr(r), **_adam(r)},
        optax.adam,
        "optimizer",
        tuned=(_tuned("adam", {"learning_rate": 0.05}, {"learning_rate": _cosine(0.02)}),),
    ),
    Case(
        "adamw",
        lambda r: {"learning_rate": _lr(r), **_adam(r), "weight_decay": float(r.uniform(0, 0.1))},
        optax.adamw,
        "optimizer",
        tuned=(
            _tuned(
                "adamw",
                {"learning_rate": 0.05, "weight_decay": 1e-4},
                {"learning_rate": _cosine(0.02), "weight_decay": 0.0},
            ),
        ),
    ),
    Case(
        "nadam",
        lambda r: {"learning_rate": _lr(r), **_adam(r)},
        optax.nadam,
        "optimizer",
        tuned=(_tuned("nadam", {"learning_rate": 0.05}, {"learning_rate": _cosine(0.02)}),),
    ),
    # AMSGrad's nu_max remembers the steep start of the valley: a longer, slower schedule.
    Case(
        "amsgrad",
        lambda r: {"learning_rate": _lr(r), **_adam(r)},
        optax.amsgrad,
        "optimizer",
        tuned=(
            _tuned(
                "amsgrad", {"learning_rate": 0.05}, {"learning_rate": _cosine(0.02, 10000)}, 10000
            ),
        ),
    ),
    Case(
        "adamax",
        lambda r: {"learning_rate": _lr(r), **_adam(r)},
        optax.adamax,
        "optimizer",
        tuned=(_tuned("adamax", {"learning_rate": 0.05}, {"learning_rate": _cosine(0.05)}),),
    ),
    # Stability toolkit: no optax twins.
    Case(
        "autoclip",
        lambda r: {"percentile": float(r.uniform(5, 90)), "history": int(r.integers(3, 30))},
        None,
        "clip",
        reference=_autoclip_reference,
    ),
    Case(
        "zclip",
        lambda r: {
            "alpha": _beta(r, 0.8, 0.99),
            "z_thresh": float(r.uniform(0.5, 3)),
            "warmup_steps": int(r.integers(2, 8)),
            "max_norm": None if r.integers(2) else float(r.uniform(2, 20)),
            "mode": ["adaptive_scaling", "mean"][int(r.integers(2))],
        },
        None,
        "clip",
        reference=_zclip_reference,
    ),
    Case(
        "scale_by_spam",
        lambda r: {
            **_adam(r),
            "reset_interval": int(r.integers(3, 8)),
            "spike_threshold": float(r.uniform(2, 50)),
            "warmup_steps": int(r.integers(0, 4)),
        },
        None,
        "adaptive",
        reference=_spam_reference,
    ),
    # Wrappers: checked by behaviour in tests/test_telemetry.py and tests/test_guards.py.
    Case(
        "health",
        lambda r: {"inner": gx.adam(_lr(r)), "warmup_steps": int(r.integers(2, 8))},
        None,
        "telemetry",
    ),
    Case(
        "skip_if",
        lambda r: {
            "inner": gx.sgd(_lr(r), momentum=0.9),
            "norm_z": 1.0,
            "warmup_steps": int(r.integers(2, 8)),
            "window": 10,
        },
        None,
        "guard",
    ),
    Case(
        "dynamic_loss_scale",
        lambda r: {
            "inner": gx.adam(_lr(r)),
            "growth_interval": 3,
            "initial_scale": 2.0 ** int(r.integers(0, 4)),
        },
        None,
        "guard",
    ),
    Case("stable", lambda r: {"optimizer": gx.sgd(_lr(r), momentum=0.9)}, None, "guard"),
]
CASE_NAMES = [c.name for c in CASES]
TWINNED = [c for c in CASES if c.twin is not None]
REFERENCED = [c for c in CASES if c.reference is not None]
OPTIMIZERS = [c for c in CASES if c.kind == "optimizer"]


def make(case: Case, seed: int = 0) -> tuple[optax.GradientTransformation, dict[str, Any]]:
    kwargs = case.draw(np.random.default_rng(seed))
    return getattr(gx, case.name)(**kwargs), kwargs


def random_tree(seed: int, dtypes=(jnp.float32,)) -> dict:
    """A pytree with dict/list/tuple nesting and 0-d, 1-d, 2-d and 4-d leaves (complex dtypes:
    independent real and imaginary parts). Five leaves: most tests compile one program per
    case, and XLA's compile time grows with the leaf count."""
    keys = iter(jax.random.split(jax.random.key(seed), 8))
    dtype = iter(dtypes * 8)

    def leaf(shape):
        key, kind = next(keys), jnp.dtype(next(dtype))
        if jnp.issubdtype(kind, jnp.complexfloating):
            re, im = jax.random.normal(key, (2, *shape), kind.type(0).real.dtype)
            return (re + 1j * im).astype(kind)
        return jax.random.normal(key, shape).astype(kind)

    return {
        "scalar": leaf(()),
        "dense": [leaf((5, 3)), leaf((3,))],
        "conv": (leaf((3, 3, 2, 4)), {"bias": leaf((4,))}),
    }


def gradients_at(params, step: int):
    """Deterministic gradients of a noisy quadratic: g = params + noise(step)."""
    complex_dtypes = [x.dtype for x in jax.tree.leaves(params) if jnp.iscomplexobj(x)]
    noise = _noise(step, jnp.dtype(complex_dtypes[0] if complex_dtypes else jnp.float32))
    return jax.tree.map(lambda p, n: p + (0.5 * n).astype(p.dtype), params, noise)


@functools.cache
def _noise(step: int, dtype: np.dtype) -> dict:
    """`random_tree(1000 + step)`, drawn once per process: a fifth of a parity test's time
    went to drawing the same noise again (never handed out: callers get a new tree)."""
    return random_tree(1000 + step, (dtype,))


def run(tx, params, steps: int = 20, jit: bool = True, update=None):
    """Apply `tx` for `steps` steps; return the list of updates and the final params/state.
    `update` replaces `tx.update` (e.g. with an ahead-of-time compiled one)."""
    update = update or (jax.jit(tx.update) if jit else tx.update)
    state = tx.init(params)
    history = []
    for t in range(steps):
        updates, state = update(gradients_at(params, t), state, params)
        params = optax.apply_updates(params, updates)
        history.append(updates)
    return history, params, state


def reference_run(case: Case, kwargs: dict[str, Any], params, steps: int = 20):
    """Final params of `steps` float64 reference updates, the gradients drawn as in `run` (at
    the float32 cast of the float64 params)."""
    step = case.reference(kwargs)
    wide = lambda tree: jax.tree.map(lambda x: np.asarray(x, np.float64), tree)
    p = wide(params)
    for t in range(steps):
        p = jax.tree.map(np.add, p, step(wide(gradients_at(params, t)), p, t))
        params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), p)
    return p


def assert_trees_close(actual, expected, rtol, atol):
    """Elementwise `rtol`, plus `atol` relative to each leaf's largest magnitude (so elements
    that are tiny next to their tensor are not held to a tighter bound than the tensor)."""

    def check(a, e):
        wide = np.complex128 if np.iscomplexobj(a) or np.iscomplexobj(e) else np.float64
        a, e = np.asarray(a, wide), np.asarray(e, wide)
        scale = max(float(np.max(np.abs(e), initial=0.0)), 1.0)
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol * scale)

    jax.tree.map(check, actual, expected)


def compiled_size(tx, leaves: int) -> int:
    """Instructions in the optimized HLO of one jitted update on `leaves` small leaves."""
    shape = lambda i: jax.ShapeDtypeStruct((4, 3) if i % 2 else (5,), jnp.float32)
    params = {f"layer{i:03d}": shape(i) for i in range(leaves)}
    state = jax.eval_shape(tx.init, params)
    text = jax.jit(tx.update).lower(params, state, params).compile().as_text()
    return sum(" = " in line for line in text.splitlines())
