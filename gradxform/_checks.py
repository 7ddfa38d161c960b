"""Argument checks: hyperparameters at construction (errors name the argument the user typed)
and trees at trace time (errors name the leaf path)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any


def _interval(low, high, low_open, high_open) -> str:
    lo = "-inf" if low is None else f"{low:g}"
    hi = "inf" if high is None else f"{high:g}"
    left = "(" if low_open or low is None else "["
    right = ")" if high_open or high is None else "]"
    return f"{left}{lo}, {hi}{right}"


def check_range(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    finite: bool = True,
    optional: bool = False,
) -> None:
    """Raise `ValueError` naming `name` unless `value` is a real scalar in the interval.

    Any real dtype is accepted (Python and NumPy numbers, 0-d arrays, bfloat16). With `finite`,
    +-inf is refused even where the interval is open-ended; with `optional`, `None` is
    accepted (it then means "off"). Schedules (callables) and traced values (e.g. under
    `optax.inject_hyperparams`) are not checked: their value is unknown at construction.
    """
    if callable(value) or isinstance(value, jax.core.Tracer) or (optional and value is None):
        return
    v = np.asarray(value)
    if v.ndim != 0:
        raise ValueError(f"`{name}` must be a scalar (float or 0-d array), got shape {v.shape}.")
    real = jnp.issubdtype(v.dtype, jnp.floating) or jnp.issubdtype(v.dtype, jnp.integer)
    if not real or v.dtype == np.bool_:
        raise ValueError(f"`{name}` must be a real number, got {value!r}.")
    x = float(v)
    ok = not math.isnan(x) and (math.isfinite(x) or not finite)
    if low is not None:
        ok &= x > low if low_open else x >= low
    if high is not None:
        ok &= x < high if high_open else x <= high
    if not ok:
        kind = "finite and " if finite and high is None else ""
        raise ValueError(
            f"`{name}` must be {kind}in {_interval(low, high, low_open, high_open)}, got {value!r}."
        )


def check_decay(name: str, value: Any, **kwargs: Any) -> None:
    """A decay rate or beta: in [0, 1]. 1 (never forget) is degenerate for a debiased moment
    but valid in optax, and it is what 0.999 becomes when `optax.inject_hyperparams` casts
    it to bfloat16 params."""
    check_range(name, value, 0.0, 1.0, **kwargs)


def check_nonnegative(name: str, value: Any, **kwargs: Any) -> None:
    check_range(name, value, 0.0, **kwargs)


def check_positive(name: str, value: Any, **kwargs: Any) -> None:
    check_range(name, value, 0.0, low_open=True, **kwargs)


def check_integer(name: str, value: Any, low: int, high: Any = None, *, optional=False) -> None:
    """Raise `ValueError` naming `name` unless `value` is an integer in [low, high]: a Python or
    NumPy int or a 0-d integer array (as `optax.inject_hyperparams` passes it), not a bool.
    Traced values are not checked."""
    if (optional and value is None) or isinstance(value, jax.core.Tracer):
        return
    dtype = np.asarray(value).dtype if hasattr(value, "dtype") else None
    integral = isinstance(value, int) and not isinstance(value, bool)
    if dtype is not None and np.ndim(value) == 0:
        integral = jnp.issubdtype(dtype, jnp.integer)
    in_range = integral and low <= int(value) and (high is None or int(value) <= high)
    if not in_range:
        upper = "" if high is None else f" and <= {high!r}"
        raise ValueError(f"`{name}` must be an integer >= {low}{upper}, got {value!r}.")


def check_dtype(name: str, dtype: Any) -> Any:
    """The canonical dtype named by `dtype` (None stays None), or `ValueError` naming `name`
    unless it is a real floating dtype (a moment stored as int or bool truncates to 0)."""
    if dtype is None:
        return None
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or not jnp.issubdtype(resolved, jnp.floating):
        raise ValueError(
            f"`{name}` must be None or a real floating dtype such as `jnp.float32` or "
            f"`jnp.bfloat16`, got {dtype!r}."
        )
    return jax.dtypes.canonicalize_dtype(resolved)


def check_transform(name: str, value: Any) -> None:
    """Raise `TypeError` naming `name` unless `value` is a gradient transformation."""
    if isinstance(value, optax.GradientTransformation):
        return
    if callable(getattr(value, "init", None)) and callable(getattr(value, "update", None)):
        return
    hint = " Call the factory first, e.g. `gx.sgd(0.1)`, not `gx.sgd`." if callable(value) else ""
    raise TypeError(
        f"`{name}` must be a gradient transformation (an object with `init` and `update`, "
        f"e.g. `gx.adam(1e-3)`), got {value!r}.{hint}"
    )


Stacked = str | Callable[[str, Any], bool] | None  # a regex on leaf names, a predicate or None


def check_stacked(name: str, value: Stacked) -> Callable[[str, Any], bool] | None:
    """`value` as a predicate `(leaf_name, leaf) -> bool` marking the leaves whose axis 0 is a
    layer axis (None stays None), or an error naming `name`.

    A string is a regular expression searched in the leaf name (`"layers"` matches every leaf
    under `layers`); a callable is used as it is.
    """
    if value is None or callable(value):
        return value
    if not isinstance(value, str):
        raise TypeError(
            f"`{name}` must be None, a regular expression searched in the leaf names (e.g. "
            f'`"layers"`) or a predicate `(name, leaf) -> bool`, got {value!r}.'
        )
    try:
        pattern = re.compile(value)
    except re.error as e:
        raise ValueError(
            f'`{name}` must be a valid regular expression on the leaf names (e.g. `"layers"`), '
            f"got {value!r}: {e}."
        ) from None
    return lambda leaf_name, leaf: pattern.search(leaf_name) is not None


def path_name(path: Sequence[Any]) -> str:
    """`Dense_0/kernel` for the key path of a leaf (`<root>` for a bare array)."""
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/") or "<root>"


def leaf_name(path: Sequence[Any]) -> str:
    """`path_name` without the `value` attribute that wraps a leaf in a Flax NNX `Variable`, so
    a leaf (and a record) reads the same under `nnx.Optimizer` as in a plain pytree: `kernel`,
    not `kernel/value`. Only an attribute is dropped: a dict key named `value` stays."""
    path = tuple(path)
    while path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    return path_name(path) if path else ""


def _leaf_dtype(leaf: Any) -> np.dtype:
    """A leaf's dtype: an array's own, or the one JAX gives a Python or NumPy scalar."""
    return np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else jnp.result_type(leaf)


def is_inexact(leaf: Any) -> bool:
    """A real or complex floating leaf: one that has a gradient update."""
    return bool(jnp.issubdtype(_leaf_dtype(leaf), jnp.inexact))


def check_floating(tree: PyTree, name: str) -> None:
    """Raise `TypeError` naming the first leaf of `tree` that is not a floating array."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        dtype = _leaf_dtype(leaf)
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"`{name}` must hold floating-point arrays, but leaf {path_name(path)!r} has "
                f"dtype {dtype}. Integer and boolean leaves have no gradient update: give them "
                "a `None` gradient (they then pass through untouched, as in optax), keep them "
                "out of the optimized tree (e.g. `optax.masked` or a Flax filter) or cast "
                "them to a float dtype."
            )


def check_same_structure(tree: PyTree, ref: PyTree, name: str, ref_name: str) -> None:
    """Raise `ValueError` unless `tree` has exactly `ref`'s structure and leaf shapes."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    ref_leaves, ref_treedef = jax.tree_util.tree_flatten_with_path(ref)
    if treedef != ref_treedef:
        paths = {path_name(p) for p, _ in leaves}
        ref_paths = {path_name(p) for p, _ in ref_leaves}
        extra, missing = sorted(paths - ref_paths), sorted(ref_paths - paths)
        if extra or missing:
            detail = "; ".join(
                part
                for part in (
                    f"leaves {extra} are not in `{ref_name}`" if extra else "",
                    f"leaves {missing} of `{ref_name}` are missing" if missing else "",
                )
                if part
            )
        else:
            detail = f"same leaf paths but different containers:\n  {treedef}\nvs\n  {ref_treedef}"
        raise ValueError(f"`{name}` does not match the tree structure of `{ref_name}`: {detail}.")
    for (path, leaf), (_, ref_leaf) in zip(leaves, ref_leaves, strict=True):
        if np.shape(leaf) != np.shape(ref_leaf):
            raise ValueError(
                f"`{name}` leaf {path_name(path)!r} has shape {np.shape(leaf)} but `{ref_name}` "
                f"has {np.shape(ref_leaf)}; shapes must match exactly (no broadcasting)."
            )


def scalar_loss(loss: Any) -> jax.Array:
    """The `loss=` a guard's `update` was given, as a float32 scalar; an error names `loss`
    unless it is one value (the step's mean loss)."""
    if np.shape(loss) != ():
        raise ValueError(
            f"`loss` must be a scalar (the mean loss of the step), got shape {np.shape(loss)}."
        )
    return jnp.asarray(loss, jnp.float32)
