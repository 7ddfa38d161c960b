"""Clipping: bound updates by value, by global norm, per leaf, per block RMS, per unit (AGC).

Every clipping transform keeps a `ClipRecord` in its state (the pre-clip statistic, the
threshold used and whether it clipped) so a training loop can watch clipping happen without a
second pass over the gradients. All norms are accumulated in float32.
"""

from __future__ import annotations

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
from gradxform._checks import check_positive
from gradxform._records import ClipRecord, check_slots, no_clip_record, stack_scalars
from gradxform._tree import (
    abs_sq,
    global_norm,
    is_sharded,
    scale_leaf,
    sum_of_squares,
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
        record = ClipRecord(peak, delta, peak > delta)
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
        record = ClipRecord(*(jnp.asarray(x, jnp.float32) for x in (norm, bound)), clipped)
        return updates, ClipState(optax.safe_increment(state.count), record)

    return gradient_transformation(init, update)


def _per_leaf_clip(name: str, statistic, threshold_name: str, threshold: ScalarOrSchedule):
    """A transform that scales each leaf by `min(1, threshold / statistic(leaf))`."""
    check_positive(threshold_name, threshold, finite=False)

    def init(params):
        return ClipState(step_counter(), no_clip_record(params))

    def update(updates, state, params=None):
        del params
        check_slots(state.record.leaves, updates, name)
        bound = _threshold(threshold, state.count)

        def leaf(g):
            s = statistic(g)
            return scale_leaf(g, jnp.where(s > bound, bound / s, 1.0)), s

        updates, stats = tree_map_unzip(leaf, updates, n=2, per_shape=False)
        norm = stack_scalars(jax.tree.leaves(stats), jnp.float32)
        record = ClipRecord(norm, bound, norm > bound, state.record.leaves)
        return updates, ClipState(optax.safe_increment(state.count), record)

    return gradient_transformation(init, update)


def clip_by_leaf_norm(max_norm: ScalarOrSchedule) -> GradientTransformationExtraArgs:
    """Rescale each leaf (tensor) separately so that its L2 norm is at most `max_norm`.

    u_t[l] = g_t[l] * min(1, max_norm / ||g_t[l]||)   for every leaf l (Keras `clipnorm`)

    Args:
      max_norm: positive per-tensor bound; a float, 0-d array or schedule.

    Examples:
      >>> import gradxform as gx, jax.numpy as jnp
      >>> tx = gx.clip_by_leaf_norm(1.0)
      >>> g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.1])}
      >>> u, _ = tx.update(g, tx.init(g))
      >>> u["a"], u["b"]
      (Array([0.6, 0.8], dtype=float32), Array([0.1], dtype=float32))
    """
    norm = lambda g: jnp.sqrt(sum_of_squares(g))
    return _per_leaf_clip("clip_by_leaf_norm", norm, "max_norm", max_norm)


def clip_by_block_rms(threshold: ScalarOrSchedule) -> GradientTransformationExtraArgs:
    """Rescale each leaf so that its root-mean-square is at most `threshold`.

    u_t[l] = g_t[l] / max(1, rms(g_t[l]) / threshold)

    Placed after an adaptive scaling (e.g. after `scale_by_adam`), this is Adafactor's update
    clipping (Shazeer & Stern, 2018), also used by StableAdamW.

    Args:
      threshold: positive bound on each leaf's RMS; a float, 0-d array or schedule.

    Examples:
      >>> import gradxform as gx, jax.numpy as jnp
      >>> tx = gx.clip_by_block_rms(1.0)
      >>> u, _ = tx.update({"w": jnp.array([2.0, -2.0])}, tx.init({"w": jnp.zeros(2)}))
      >>> u["w"]
      Array([ 1., -1.], dtype=float32)
    """

    def rms(g):
        return jnp.sqrt(sum_of_squares(g) / max(g.size, 1))

    return _per_leaf_clip("clip_by_block_rms", rms, "threshold", threshold)


class AdaptiveGradClipState(NamedTuple):
    record_kind = "agc"  # telemetry: read by `read_health` under this name
    count: jax.Array  # int32 step counter (saturating)
    record: ClipRecord  # per leaf: max over units of ||g_unit|| / max(||p_unit||, eps)


def unitwise_sum_of_squares(x: jax.Array, axis: Any = None) -> jax.Array:
    """Sum of squares per unit (keepdims, float32). Units follow optax's `unitwise_norm`.

    Scalars and vectors are one unit; rank 2-3 reduce axis 0 (inputs of a Dense or multi-head
    kernel); rank 4 reduces (0, 1, 2) (HWIO conv kernels); rank 5 reduces (0, 1, 2, 3).
    """
    if axis is None:
        if x.ndim <= 1 or sum(d > 1 for d in x.shape) <= 1:
            axis = tuple(range(x.ndim))
        elif x.ndim in (2, 3):
            axis = 0
        elif x.ndim in (4, 5):
            axis = tuple(range(x.ndim - 1))
        else:
            raise ValueError(
                f"`adaptive_grad_clip` has no default units for rank {x.ndim} (shape {x.shape}); "
                "pass `axis=` to name the reduction axes."
            )
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    axes = tuple(np.atleast_1d(axis).astype(int).tolist())
    if any(not -x.ndim <= a < x.ndim for a in axes):
        raise ValueError(f"`axis` {axis} is out of range for a leaf of shape {x.shape}.")
    axes = tuple(a % x.ndim for a in axes)
    rows, kept = math.prod(x.shape[: len(axes)]), x.shape[len(axes) :]
    leading = axes == tuple(range(len(axes)))
    if leading and math.prod(kept) >= 8192 and 1 <= rows <= 128 and not is_sharded(x):
        # A few rows of many units, e.g. a stacked (layers, d_in, d_out) kernel: XLA:CPU reduces
        # a leading axis element by element across the rows (7 ms for 12 x 196608 values); a
        # sum of the rows is one streaming pass (0.2 ms).
        flat = x.reshape(rows, *kept)
        return sum(abs_sq(flat[i]) for i in range(rows)).reshape((1,) * len(axes) + kept)
    return jnp.sum(abs_sq(x), axis=axis, keepdims=True)


def adaptive_grad_clip(
    clipping: ScalarOrSchedule, eps: float = 1e-3, axis: Any = None
) -> GradientTransformationExtraArgs:
    """Unit-wise adaptive gradient clipping (AGC): bound each unit's norm relative to its weights'.

    u = g * min(1, clipping * max(||p||, eps) / ||g||)   per unit (e.g. per output neuron)

    Before the optimizer it clips gradients (NFNets); after it (before the learning rate), it
    clips the *update* relative to the parameter norm, a trust-ratio style bound.

    Args:
      clipping: positive maximum ratio of unit update norm to unit parameter norm.
      eps: floor on the parameter norm, so zero-initialised units still move.
      axis: reduction axes defining a unit; `None` infers them from the rank like optax.

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

    def init(params):
        return AdaptiveGradClipState(step_counter(), no_clip_record(params))

    def leaf(g, p, bound):
        g_norm = jnp.sqrt(unitwise_sum_of_squares(g, axis))
        p_norm = jnp.maximum(jnp.sqrt(unitwise_sum_of_squares(p, axis)), eps)
        ratio = g_norm / p_norm
        u = scale_leaf(g, jnp.where(ratio > bound, bound / jnp.maximum(ratio, 1e-30), 1.0))
        return u, jnp.max(ratio)

    def update(updates, state, params=None):
        if params is None:
            raise ValueError(
                "`adaptive_grad_clip` needs `params`: call `update(g, state, params)`."
            )
        check_slots(state.record.leaves, updates, "adaptive_grad_clip")
        bound = _threshold(clipping, state.count)
        updates, peaks = tree_map_unzip(lambda g, p: leaf(g, p, bound), updates, params, n=2)
        peak = stack_scalars(jax.tree.leaves(peaks), jnp.float32)
        record = ClipRecord(peak, bound, peak > bound, state.record.leaves)
        return updates, AdaptiveGradClipState(optax.safe_increment(state.count), record)

    return gradient_transformation(init, update)
