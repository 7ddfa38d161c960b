"""Clipping: bound updates by value, by global norm, per leaf, per block RMS, per unit (AGC).

Every clipping transform keeps a `ClipRecord` in its state (the pre-clip statistic, the
threshold used and whether it clipped) so a training loop can watch clipping happen without a
second pass over the gradients. All norms are accumulated in float32.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradxform._base import (
    GradientTransformationExtraArgs,
    ScalarOrSchedule,
    gradient_transformation,
    resolve,
    step_counter,
)
from gradxform._checks import Stacked, check_positive, check_stacked, leaf_name
from gradxform._records import (
    ClipRecord,
    Leaf,
    check_slots,
    leaf_layers,
    no_clip_record,
    stack_units,
)
from gradxform._tree import (
    abs_sq,
    global_norm,
    is_sharded,
    once_per_shape,
    scale_leaf,
    tree_map_unzip,
)


class ClipState(NamedTuple):
    record_kind = "clip"  # telemetry: read by `read_health` under this name
    count: jax.Array  # int32 step counter (saturating); drives a threshold schedule
    record: ClipRecord  # last step's statistic, threshold and clipped flag


def _threshold(value: ScalarOrSchedule, count: jax.Array) -> jax.Array:
    return jnp.asarray(resolve(value, count), jnp.float32)


def clip_to_norm(updates: Any, norm: jax.Array, threshold: jax.Array) -> tuple[Any, jax.Array]:
    """Scale `updates`, whose global norm is `norm`, down to `threshold` if above it."""
    clipped = norm > threshold
    factor = jnp.where(clipped, threshold / norm, 1.0)
    return jax.tree.map(lambda g: scale_leaf(g, factor), updates), clipped


def clip(max_delta: ScalarOrSchedule) -> GradientTransformationExtraArgs:
    """Clip every element of the updates to `[-max_delta, max_delta]` (Keras `clipvalue`).

    u_t = clip(g_t, -max_delta, max_delta)

    The record holds the largest |g| seen (float32) and whether any element was clipped.

    Args:
      max_delta: positive bound; a float, 0-d array or schedule of the step.

    Examples:
      >>> import gradxform as gx, jax.numpy as jnp
      >>> tx = gx.clip(1.0)
      >>> u, _ = tx.update({"w": jnp.array([-3.0, 0.5, 2.0])}, tx.init({"w": jnp.zeros(3)}))
      >>> u["w"]
      Array([-1. ,  0.5,  1. ], dtype=float32)
    """
    check_positive("max_delta", max_delta, finite=False)

    def init(params):
        del params
        return ClipState(step_counter(), no_clip_record())

    def update(updates, state, params=None):
        del params
        delta = _threshold(max_delta, state.count)
        leaves = jax.tree.leaves(updates)
        if any(jnp.iscomplexobj(g) for g in leaves):
            raise TypeError(
                "`clip` bounds each real value and complex numbers have no order (optax's "
                "`clip` refuses them too); use `clip_by_global_norm` or `clip_by_leaf_norm`."
            )
        peak = jnp.zeros([], jnp.float32)
        for g in leaves:
            peak = jnp.maximum(peak, jnp.max(jnp.abs(g), initial=0).astype(jnp.float32))
        updates = jax.tree.map(
            lambda g: jnp.clip(g, -delta.astype(g.dtype), delta.astype(g.dtype)), updates
        )
        record = state.record.next(peak, delta, peak > delta)
        return updates, ClipState(optax.safe_increment(state.count), record)

    return gradient_transformation(init, update)


def clip_by_global_norm(
    max_norm: ScalarOrSchedule, *, axis_name: str | None = None
) -> GradientTransformationExtraArgs:
    """Rescale the updates so that their global L2 norm is at most `max_norm`.

    u_t = g_t * min(1, max_norm / ||g_t||),  ||g|| over all leaves, accumulated in float32

    Unlike optax 0.2.8, the norm of float16 gradients does not overflow: 10^6 ones clip to
    ones / 1000, not zeros.

    Args:
      max_norm: positive bound on the global norm; a float, 0-d array or schedule.
      axis_name: under `pmap`/`shard_map` with parameters sharded over this axis, the norm is
        `psum`-ed over it, giving the norm of the whole model rather than of the shard.

    Examples:
      >>> import gradxform as gx, jax.numpy as jnp
      >>> tx = gx.clip_by_global_norm(1.0)
      >>> u, state = tx.update({"w": jnp.array([3.0, 4.0])}, tx.init({"w": jnp.zeros(2)}))
      >>> u["w"], state.record.norm
      (Array([0.6, 0.8], dtype=float32), Array(5., dtype=float32))

    Reference: Pascanu et al., On the difficulty of training recurrent neural networks, 2013.
    """
    check_positive("max_norm", max_norm, finite=False)

    def init(params):
        del params
        return ClipState(step_counter(), no_clip_record())

    def update(updates, state, params=None):
        del params
        bound = resolve(max_norm, state.count)  # unrounded: float64 updates clip in float64
        norm = global_norm(updates, axis_name)
        updates, clipped = clip_to_norm(updates, norm, bound)
        record = state.record.next(norm, bound, clipped)
        return updates, ClipState(optax.safe_increment(state.count), record)

    return gradient_transformation(init, update)


def _layer_sum_of_squares(g: jax.Array, stacked: bool) -> tuple[jax.Array, int]:
    """`sum(|g|**2)` in float32 over the whole leaf, or per layer (over axes 1..) of a stacked
    leaf; and the number of values each sum covers."""
    axes = tuple(range(1 if stacked else 0, g.ndim))
    wide = g.astype(jnp.promote_types(g.dtype, jnp.float32))
    return jnp.sum(abs_sq(wide), axis=axes), math.prod(g.shape[1:] if stacked else g.shape)


def _per_leaf_clip(
    name: str, statistic, threshold_name: str, threshold: ScalarOrSchedule, stacked: Stacked
):
    """A transform that scales each leaf (each layer of a stacked leaf) by
    `min(1, threshold / statistic)`, `statistic(sum_of_squares, size)` of that leaf or layer."""
    check_positive(threshold_name, threshold, finite=False)
    check_stacked("stacked", stacked)

    def init(params):
        return ClipState(step_counter(), no_clip_record(params, stacked))

    def update(updates, state, params=None):
        del params
        check_slots(state.record.leaves, updates, name)
        bound = _threshold(threshold, state.count)

        def leaf(g, slot):
            layered = not isinstance(slot, Leaf)
            s = statistic(*_layer_sum_of_squares(g, layered))
            factor = jnp.where(s > bound, bound / s, 1.0)  # () or, per layer, (L,)
            factor = jnp.reshape(factor, factor.shape + (1,) * (g.ndim - factor.ndim))
            return scale_leaf(g, factor), s

        updates, stats = tree_map_unzip(leaf, updates, state.record.leaves, n=2, per_shape=False)
        norm = stack_units(jax.tree.leaves(stats), jnp.float32)
        record = state.record.next(norm, bound, norm > bound)
        return updates, ClipState(optax.safe_increment(state.count), record)

    return gradient_transformation(init, update)


def clip_by_leaf_norm(
    max_norm: ScalarOrSchedule, *, stacked: Stacked = None
) -> GradientTransformationExtraArgs:
    """Rescale each leaf (tensor) separately so that its L2 norm is at most `max_norm`.

    u_t[l] = g_t[l] * min(1, max_norm / ||g_t[l]||)   for every leaf l (Keras `clipnorm`),
    and for every layer l of a `stacked` leaf

    Args:
      max_norm: positive per-tensor bound; a float, 0-d array or schedule.
      stacked: marks the leaves whose axis 0 is a layer axis (scanned layers): a regex
        searched in the leaf name (`"layers"` matches every leaf under `layers`) or a
        predicate `(name, leaf) -> bool`; each layer of such a leaf is clipped on its own
        norm and gets its own record entry (`read_health` names it `layers/w[7]`).

    Examples:
      >>> import gradxform as gx, jax.numpy as jnp
      >>> tx = gx.clip_by_leaf_norm(1.0)
      >>> g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.1])}
      >>> u, _ = tx.update(g, tx.init(g))
      >>> u["a"], u["b"]
      (Array([0.6, 0.8], dtype=float32), Array([0.1], dtype=float32))
      >>> tx = gx.clip_by_leaf_norm(1.0, stacked="layers")  # each of 2 layers on its own
      >>> g = {"layers": jnp.array([[3.0, 4.0], [0.3, 0.4]])}
      >>> u, _ = tx.update(g, tx.init(g))
      >>> u["layers"]
      Array([[0.6, 0.8],
             [0.3, 0.4]], dtype=float32)
    """
    norm = lambda sum_sq, size: jnp.sqrt(sum_sq)
    return _per_leaf_clip("clip_by_leaf_norm", norm, "max_norm", max_norm, stacked)


def clip_by_block_rms(
    threshold: ScalarOrSchedule, *, stacked: Stacked = None
) -> GradientTransformationExtraArgs:
    """Rescale each leaf so that its root-mean-square is at most `threshold`.

    u_t[l] = g_t[l] / max(1, rms(g_t[l]) / threshold)   for every leaf l, and for every
    layer l of a `stacked` leaf

    Placed after an adaptive scaling (e.g. after `scale_by_adam`), this is Adafactor's update
    clipping (Shazeer & Stern, 2018), also used by StableAdamW.

    Args:
      threshold: positive bound on each leaf's RMS; a float, 0-d array or schedule.
      stacked: marks the leaves whose axis 0 is a layer axis (scanned layers): a regex
        searched in the leaf name or a predicate `(name, leaf) -> bool`; each layer of such a
        leaf is clipped on its own RMS and gets its own record entry.

    Examples:
      >>> import gradxform as gx, jax.numpy as jnp
      >>> tx = gx.clip_by_block_rms(1.0)
      >>> u, _ = tx.update({"w": jnp.array([2.0, -2.0])}, tx.init({"w": jnp.zeros(2)}))
      >>> u["w"]
      Array([ 1., -1.], dtype=float32)
    """
    rms = lambda sum_sq, size: jnp.sqrt(sum_sq / max(size, 1))
    return _per_leaf_clip("clip_by_block_rms", rms, "threshold", threshold, stacked)


class AdaptiveGradClipState(NamedTuple):
    record_kind = "agc"  # telemetry: read by `read_health` under this name
    count: jax.Array  # int32 step counter (saturating)
    record: ClipRecord  # per leaf: max over units of ||g_unit|| / max(||p_unit||, eps)


def unit_axes(shape: tuple[int, ...], axis: Any = None, leaf: str = "") -> tuple[int, ...]:
    """The axes reduced within one unit of an array of `shape`: `axis`, or optax's
    `unitwise_norm` units when it is None. Scalars and vectors are one unit; rank 2-3 reduce
    axis 0 (inputs of a Dense or multi-head kernel); rank 4 reduces (0, 1, 2) (HWIO conv
    kernels); rank 5 reduces (0, 1, 2, 3). `leaf` names the leaf in errors."""
    ndim, where = (
        len(shape),
        f"leaf {leaf!r} of shape {shape}" if leaf else f"a leaf of shape {shape}",
    )
    if axis is None:
        if ndim <= 1 or sum(d > 1 for d in shape) <= 1:
            return tuple(range(ndim))
        if ndim in (2, 3):
            return (0,)
        if ndim in (4, 5):
            return tuple(range(ndim - 1))
        raise ValueError(
            f"`adaptive_grad_clip` has no default units for {where} (rank {ndim}; units are "
            "inferred for ranks 0-5). If its axis 0 is a layer axis (scanned layers), mark it "
            'with `stacked=` (e.g. `stacked="layers"`), an argument of `adaptive_grad_clip` '
            "and of `gx.stable`; otherwise pass a unit's reduction axes as "
            "`adaptive_grad_clip(..., axis=...)`."
        )
    axes = tuple(np.atleast_1d(axis).astype(int).tolist())
    if any(not -ndim <= a < ndim for a in axes):
        raise ValueError(f"`axis` {axis} is out of range for {where}.")
    return tuple(a % ndim for a in axes)


def unitwise_sum_of_squares(x: jax.Array, axis: Any = None) -> jax.Array:
    """Sum of squares per unit (keepdims, float32); `axis` as in `unit_axes`."""
    axes = unit_axes(x.shape, axis)
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    rows, kept = math.prod(x.shape[: len(axes)]), x.shape[len(axes) :]
    leading = axes == tuple(range(len(axes)))
    if leading and math.prod(kept) >= 8192 and 1 <= rows <= 128 and not is_sharded(x):
        # A few rows of many units, e.g. a stacked (layers, d_in, d_out) kernel: XLA:CPU reduces
        # a leading axis element by element across the rows (7 ms for 12 x 196608 values); a
        # sum of the rows is one streaming pass (0.2 ms).
        flat = x.reshape(rows, *kept)
        return sum(abs_sq(flat[i]) for i in range(rows)).reshape((1,) * len(axes) + kept)
    return jnp.sum(abs_sq(x), axis=axes, keepdims=True)


def _agc_axes(tree: Any, slots: Any, axis: Any) -> list[tuple[int, ...]]:
    """Per leaf of `tree`, the axes of its units: inferred from the leaf's shape, or from the
    per-layer shape (`leaf.shape[1:]`) and shifted by one for a stacked leaf, so the layer
    axis is never reduced."""
    named = jax.tree_util.tree_leaves_with_path(tree)
    out = []
    for (path, x), layers in zip(named, leaf_layers(slots), strict=True):
        name = leaf_name(path) or "<root>"
        if layers is None:
            out.append(unit_axes(np.shape(x), axis, name))
        else:
            out.append(tuple(a + 1 for a in unit_axes(np.shape(x)[1:], axis, f"{name}[i]")))
    return out


def adaptive_grad_clip(
    clipping: ScalarOrSchedule, eps: float = 1e-3, axis: Any = None, *, stacked: Stacked = None
) -> GradientTransformationExtraArgs:
    """Unit-wise adaptive gradient clipping (AGC): bound each unit's norm relative to its weights'.

    u = g * min(1, clipping * max(||p||, eps) / ||g||)   per unit (e.g. per output neuron)

    Before the optimizer it clips gradients (NFNets); after it (before the learning rate), it
    clips the *update* relative to the parameter norm, a trust-ratio style bound. The record
    holds, per leaf (per layer of a stacked leaf), the largest ratio ||g_unit|| / ||p_unit||.

    Args:
      clipping: positive maximum ratio of unit update norm to unit parameter norm.
      eps: floor on the parameter norm, so zero-initialised units still move.
      axis: reduction axes defining a unit; `None` infers them from the rank like optax. For
        a stacked leaf they are axes of one layer (`leaf.shape[1:]`).
      stacked: marks the leaves whose axis 0 is a layer axis (scanned layers): a regex
        searched in the leaf name (`"layers"` matches every leaf under `layers`) or a
        predicate `(name, leaf) -> bool`. Each layer's units are those of `leaf[i]` alone,
        so the layer axis is never reduced, and each layer gets its own record entry.

    Examples:
      >>> import gradxform as gx, jax.numpy as jnp
      >>> tx = gx.adaptive_grad_clip(0.1)
      >>> p = {"w": jnp.array([1.0, 0.0])}
      >>> u, _ = tx.update({"w": jnp.array([0.0, 1.0])}, tx.init(p), p)
      >>> u["w"]
      Array([0. , 0.1], dtype=float32)

    Reference: Brock et al., High-Performance Large-Scale Image Recognition Without
    Normalization, 2021.
    """
    check_positive("clipping", clipping, finite=False)
    check_positive("eps", eps)
    check_stacked("stacked", stacked)

    def init(params):
        record = no_clip_record(params, stacked)
        _agc_axes(params, record.leaves, axis)  # a leaf without default units: say so now
        return AdaptiveGradClipState(step_counter(), record)

    def leaf(g, p, bound, *, axes, layered):
        g_norm = jnp.sqrt(unitwise_sum_of_squares(g, axes))
        p_norm = jnp.maximum(jnp.sqrt(unitwise_sum_of_squares(p, axes)), eps)
        ratio = g_norm / p_norm
        u = scale_leaf(g, jnp.where(ratio > bound, bound / jnp.maximum(ratio, 1e-30), 1.0))
        return u, jnp.max(ratio, axis=tuple(range(1 if layered else 0, ratio.ndim)))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError(
                "`adaptive_grad_clip` needs `params`: call `update(g, state, params)`."
            )
        slots = state.record.leaves
        check_slots(slots, updates, "adaptive_grad_clip")
        bound = _threshold(clipping, state.count)
        g_leaves, treedef = jax.tree.flatten(updates)
        p_leaves = treedef.flatten_up_to(params)
        rules = {}  # one rule per kind of unit, traced once per leaf shape (`once_per_shape`)
        outs = []
        for g, p, axes, layers in zip(
            g_leaves, p_leaves, _agc_axes(updates, slots, axis), leaf_layers(slots), strict=True
        ):
            key = (axes, layers is not None)
            if key not in rules:
                rule = functools.partial(leaf, axes=axes, layered=layers is not None)
                rules[key] = once_per_shape(rule, g_leaves)
            outs.append(rules[key](g, p, bound))
        peak = stack_units([r for _, r in outs], jnp.float32)
        record = state.record.next(peak, bound, peak > bound)
        updates = treedef.unflatten([u for u, _ in outs])
        return updates, AdaptiveGradClipState(optax.safe_increment(state.count), record)

    return gradient_transformation(init, update)
