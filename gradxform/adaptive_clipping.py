"""Adaptive clipping: global-norm thresholds learned from the history of gradient norms.

AutoClip clips to a percentile of the norms seen so far; ZClip clips norms whose z-score
against running moments is too high. Both keep fixed-size state (a ring buffer, a pair of
moments), ignore non-finite norms when learning, and record what they did in a `ClipRecord`.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from gradxform._base import (
    ClipRecord,
    GradientTransformationExtraArgs,
    Moments,
    check_decay,
    check_positive,
    check_range,
    global_norm,
    gradient_transformation,
    moments_init,
    moments_update,
    moments_zscore,
    no_clip_record,
    safe_increment,
    scale_leaf,
    step_counter,
)


def _clip_to(updates, norm, threshold):
    clipped = norm > threshold
    factor = jnp.where(clipped, threshold / norm, 1.0)
    return jax.tree.map(lambda g: scale_leaf(g, factor), updates), clipped


class AutoClipState(NamedTuple):
    count: jax.Array  # int32 steps seen (saturating)
    written: jax.Array  # int32 finite norms written to the ring buffer (saturating)
    norms: jax.Array  # float32[history] ring buffer of past finite global norms
    record: ClipRecord  # this step's norm, the percentile threshold, whether it clipped


def autoclip(
    percentile: float = 10.0, history: int = 1000, *, axis_name: str | None = None
) -> GradientTransformationExtraArgs:
    """AutoClip: clip the global norm to a percentile of the norms observed so far.

    threshold_t = percentile_p({||g_s|| : s <= t, last `history` finite norms})
    u_t = g_t * min(1, threshold_t / ||g_t||)

    The current norm is included in the history before the percentile is taken (so the first
    step is never clipped). Percentiles interpolate linearly, like `numpy.percentile`.

    Args:
      percentile: in (0, 100]; 10 clips roughly nine steps in ten, as in the paper.
      history: size of the ring buffer of past norms (fixed-shape state).
      axis_name: `psum` the squared norm over this axis (parameters sharded across it).

    Example:
      >>> import gradxform as gx, jax.numpy as jnp
      >>> tx = gx.autoclip(percentile=50.0, history=4)
      >>> state = tx.init(jnp.zeros(1))
      >>> for g in (1.0, 3.0, 100.0):
      ...     u, state = tx.update(jnp.array([g]), state)
      >>> u  # clipped to the median of (1, 3, 100)
      Array([3.], dtype=float32)

    Reference: Seetharaman et al., AutoClip: Adaptive Gradient Clipping for Source
    Separation Networks, 2020.
    """
    check_range("percentile", percentile, 0.0, 100.0, low_open=True)
    check_range("history", history, 1)

    def init(params):
        del params
        norms = jnp.zeros([history], jnp.float32)
        return AutoClipState(step_counter(), step_counter(), norms, no_clip_record())

    def update(updates, state, params=None):
        del params
        norm = global_norm(updates, axis_name)
        finite = jnp.isfinite(norm)
        slot = state.written % history
        norms = state.norms.at[slot].set(jnp.where(finite, norm, state.norms[slot]))
        written = jnp.where(finite, safe_increment(state.written), state.written)
        n = jnp.minimum(written, history)
        ordered = jnp.sort(jnp.where(jnp.arange(history) < n, norms, jnp.inf))
        position = percentile / 100.0 * (jnp.maximum(n, 1) - 1).astype(jnp.float32)
        lo = jnp.floor(position).astype(jnp.int32)
        hi = jnp.minimum(lo + 1, jnp.maximum(n - 1, 0))
        threshold = ordered[lo] + (ordered[hi] - ordered[lo]) * (position - lo)
        threshold = jnp.where(n > 0, threshold, jnp.inf)
        updates, clipped = _clip_to(updates, norm, threshold)
        record = ClipRecord(norm, threshold, clipped)
        return updates, AutoClipState(safe_increment(state.count), written, norms, record)

    return gradient_transformation(init, update)


class ZClipState(NamedTuple):
    count: jax.Array  # int32 steps seen (saturating)
    moments: Moments  # running mean/variance of the (clipped) global norm
    record: ClipRecord  # this step's norm, the threshold in force, whether it clipped


def zclip(
    alpha: float = 0.97,
    z_thresh: float = 2.5,
    warmup_steps: int = 25,
    max_norm: float | None = 1.0,
    mode: Literal["adaptive_scaling", "mean"] = "adaptive_scaling",
    *,
    axis_name: str | None = None,
) -> GradientTransformationExtraArgs:
    """ZClip: clip global norms whose z-score against running moments exceeds `z_thresh`.

    During the first `warmup_steps` the moments are the exact mean and population variance of
    the norms seen; after it, exponential moments with rate `1 - alpha`. With
    z = (||g|| - mean) / std:
      threshold = mean + z_thresh**2 * std / z   if z > z_thresh   ("adaptive_scaling")
                = mean                          if z > z_thresh   ("mean")
                = inf                           otherwise (and throughout warm-up)
    then capped at `max_norm`; the moments absorb the clipped norm (non-finite norms are not
    absorbed).

    Keep the `max_norm` cap on unless you have a reason: without it a blow-up during warm-up is
    not clipped at all. `None` disables it.

    Args:
      alpha: moment decay in [0, 1).
      z_thresh: positive z-score above which a norm is a spike.
      warmup_steps: steps of exact moments before z-scores count.
      max_norm: absolute cap on the threshold, or `None`.
      mode: `"adaptive_scaling"` (the paper's default) or `"mean"`.
      axis_name: `psum` the squared norm over this axis (parameters sharded across it).

    Example:
      >>> import gradxform as gx, jax.numpy as jnp
      >>> tx = gx.zclip(warmup_steps=3, max_norm=None, mode="mean")
      >>> state = tx.init(jnp.zeros(1))
      >>> for g in (1.0, 2.0, 3.0, 50.0):
      ...     u, state = tx.update(jnp.array([g]), state)
      >>> u  # a spike after warm-up is clipped to the running mean
      Array([2.], dtype=float32)

    Reference: Kumar et al., ZClip: Adaptive Spike Mitigation for LLM Pre-Training, 2025.
    """
    check_decay("alpha", alpha)
    check_positive("z_thresh", z_thresh)
    check_range("warmup_steps", warmup_steps, 0)
    check_range("max_norm", max_norm, 0.0, low_open=True)
    if mode not in ("adaptive_scaling", "mean"):
        raise ValueError(f"`mode` must be 'adaptive_scaling' or 'mean', got {mode!r}.")

    def init(params):
        del params
        return ZClipState(step_counter(), moments_init(), no_clip_record())

    def update(updates, state, params=None):
        del params
        norm = global_norm(updates, axis_name)
        m = state.moments
        z = moments_zscore(m, norm, warmup_steps)
        std = jnp.sqrt(jnp.maximum(m.var, 0.0))
        if mode == "mean":
            spike_threshold = m.mean
        else:
            spike_threshold = m.mean + z_thresh**2 * std / jnp.maximum(z, 1e-12)
        threshold = jnp.where(z > z_thresh, spike_threshold, jnp.inf)
        if max_norm is not None:
            threshold = jnp.minimum(threshold, max_norm)
        updates, clipped = _clip_to(updates, norm, threshold)
        absorbed = jnp.minimum(norm, threshold)
        moments = moments_update(m, absorbed, alpha, warmup_steps, jnp.isfinite(norm))
        record = ClipRecord(norm, threshold, clipped)
        return updates, ZClipState(safe_increment(state.count), moments, record)

    return gradient_transformation(init, update)
