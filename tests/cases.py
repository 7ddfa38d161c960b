"""The table that drives most tests: every public transform, how to draw valid
hyperparameters for it, and its optax twin (None where optax has none)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gradxform as gx


class Case(NamedTuple):
    name: str
    draw: Callable[[np.random.Generator], dict[str, Any]]  # valid hyperparameters
    twin: Callable[..., optax.GradientTransformation] | None  # optax factory, same kwargs
    rtol: float = 2e-6  # float32 parity tolerance over a 20-step trajectory
    complex_ok: bool = True  # takes complex params (optax's `clip` refuses them: so does ours)


def _beta(rng, low=0.5, high=0.999):
    return float(rng.uniform(low, high))


def _lr(rng):
    return float(10 ** rng.uniform(-3, -1))


def _adam(rng):
    return {"b1": _beta(rng, 0.0, 0.95), "b2": _beta(rng, 0.9, 0.9999), "eps": 1e-8}


def _schedule(rng):
    return optax.warmup_cosine_decay_schedule(0.0, _lr(rng), 5, 30)


CASES = [
    Case("clip", lambda r: {"max_delta": float(r.uniform(0.1, 1.0))}, optax.clip, complex_ok=False),
    Case(
        "clip_by_global_norm",
        lambda r: {"max_norm": float(r.uniform(0.5, 3))},
        optax.clip_by_global_norm,
    ),
    Case(
        "clip_by_block_rms",
        lambda r: {"threshold": float(r.uniform(0.1, 1.0))},
        optax.clip_by_block_rms,
    ),
    Case(
        "adaptive_grad_clip",
        lambda r: {"clipping": float(r.uniform(0.01, 0.2))},
        optax.adaptive_grad_clip,
    ),
    Case("clip_by_leaf_norm", lambda r: {"max_norm": float(r.uniform(0.5, 2))}, None),
    Case(
        "add_decayed_weights",
        lambda r: {"weight_decay": float(r.uniform(0, 0.1))},
        optax.add_decayed_weights,
    ),
    Case("add_l1_decay", lambda r: {"weight_decay": float(r.uniform(0, 0.1))}, None),
    Case("trace", lambda r: {"decay": _beta(r, 0.0), "nesterov": bool(r.integers(2))}, optax.trace),
    Case("ema", lambda r: {"decay": _beta(r, 0.0), "debias": bool(r.integers(2))}, optax.ema),
    Case(
        "scale_by_rss",
        lambda r: {"initial_accumulator_value": float(r.uniform(0, 0.5))},
        optax.scale_by_rss,
    ),
    Case(
        "scale_by_rms",
        lambda r: {
            "decay": _beta(r),
            "eps_in_sqrt": bool(r.integers(2)),
            "bias_correction": bool(r.integers(2)),
        },
        optax.scale_by_rms,
    ),
    # var = nu - mu**2 cancels (exactly g**2 - g**2 at step 1 with bias correction), so a
    # one-ulp difference in how XLA fuses it grows over 20 unscaled steps: eps must dominate
    # the cancellation, and the trajectory gets a looser bound (single steps match exactly).
    Case(
        "scale_by_stddev",
        lambda r: {"decay": _beta(r), "eps": 0.05, "bias_correction": bool(r.integers(2))},
        optax.scale_by_stddev,
        rtol=2e-5,
    ),
    Case(
        "scale_by_adam",
        lambda r: {**_adam(r), "nesterov": bool(r.integers(2))},
        optax.scale_by_adam,
    ),
    Case("scale_by_amsgrad", _adam, optax.scale_by_amsgrad),
    Case("scale_by_adamax", _adam, optax.scale_by_adamax),
    Case(
        "add_noise",
        lambda r: {"eta": float(r.uniform(0, 1)), "gamma": 0.55, "key": int(r.integers(1000))},
        optax.add_noise,
    ),
    Case("scale", lambda r: {"step_size": float(r.uniform(-1, 1))}, optax.scale),
    Case(
        "scale_by_learning_rate", lambda r: {"learning_rate": _lr(r)}, optax.scale_by_learning_rate
    ),
    Case("scale_by_schedule", lambda r: {"step_size_fn": _schedule(r)}, optax.scale_by_schedule),
    Case(
        "sgd",
        lambda r: {
            "learning_rate": _schedule(r) if r.integers(2) else _lr(r),
            "momentum": _beta(r, 0.0),
            "nesterov": bool(r.integers(2)),
        },
        optax.sgd,
    ),
    Case("adagrad", lambda r: {"learning_rate": _lr(r)}, optax.adagrad),
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
    ),
    Case("adam", lambda r: {"learning_rate": _lr(r), **_adam(r)}, optax.adam),
    Case(
        "adamw",
        lambda r: {"learning_rate": _lr(r), **_adam(r), "weight_decay": float(r.uniform(0, 0.1))},
        optax.adamw,
    ),
    Case("nadam", lambda r: {"learning_rate": _lr(r), **_adam(r)}, optax.nadam),
    Case("amsgrad", lambda r: {"learning_rate": _lr(r), **_adam(r)}, optax.amsgrad),
    Case("adamax", lambda r: {"learning_rate": _lr(r), **_adam(r)}, optax.adamax),
    # Stability toolkit: no optax twins.
    Case(
        "autoclip",
        lambda r: {"percentile": float(r.uniform(5, 90)), "history": int(r.integers(3, 30))},
        None,
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
    ),
    Case(
        "health", lambda r: {"inner": gx.adam(_lr(r)), "warmup_steps": int(r.integers(2, 8))}, None
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
    ),
    Case(
        "dynamic_loss_scale",
        lambda r: {
            "inner": gx.adam(_lr(r)),
            "growth_interval": 3,
            "initial_scale": 2.0 ** int(r.integers(0, 4)),
        },
        None,
    ),
    Case("stable", lambda r: {"optimizer": gx.sgd(_lr(r), momentum=0.9)}, None),
]
CASE_NAMES = [c.name for c in CASES]
TWINNED = [c for c in CASES if c.twin is not None]
# Twin-less transforms with a float64 reference in tests/test_parity.py.
REFERENCED = [
    c
    for c in CASES
    if c.name in {"clip_by_leaf_norm", "add_l1_decay", "autoclip", "zclip", "scale_by_spam"}
]


def make(case: Case, seed: int = 0) -> tuple[optax.GradientTransformation, dict[str, Any]]:
    kwargs = case.draw(np.random.default_rng(seed))
    return getattr(gx, case.name)(**kwargs), kwargs


def random_tree(seed: int, dtypes=(jnp.float32,)) -> dict:
    """A pytree with dict/list/tuple nesting and 0-d, 1-d, 2-d and 4-d leaves (complex dtypes:
    independent real and imaginary parts)."""
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
        "vector": leaf((7,)),
    }


def gradients_at(params, step: int):
    """Deterministic gradients of a noisy quadratic: g = params + noise(step)."""
    complex_dtypes = [x.dtype for x in jax.tree.leaves(params) if jnp.iscomplexobj(x)]
    noise = random_tree(1000 + step, tuple(complex_dtypes[:1]) or (jnp.float32,))
    return jax.tree.map(lambda p, n: p + (0.5 * n).astype(p.dtype), params, noise)


def run(tx, params, steps: int = 20, jit: bool = True):
    """Apply `tx` for `steps` steps; return the list of updates and the final params/state."""
    update = jax.jit(tx.update) if jit else tx.update
    state = tx.init(params)
    history = []
    for t in range(steps):
        updates, state = update(gradients_at(params, t), state, params)
        params = optax.apply_updates(params, updates)
        history.append(updates)
    return history, params, state


def assert_trees_close(actual, expected, rtol, atol):
    """Elementwise `rtol`, plus `atol` relative to each leaf's largest magnitude (so elements
    that are tiny next to their tensor are not held to a tighter bound than the tensor)."""

    def check(a, e):
        wide = np.complex128 if np.iscomplexobj(a) or np.iscomplexobj(e) else np.float64
        a, e = np.asarray(a, wide), np.asarray(e, wide)
        scale = max(float(np.max(np.abs(e), initial=0.0)), 1.0)
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol * scale)

    jax.tree.map(check, actual, expected)
