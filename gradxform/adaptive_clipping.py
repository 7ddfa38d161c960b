"""Adaptive clipping: thresholds learned from the history of the gradients themselves.

AutoClip clips the global norm to a percentile of the norms seen so far; ZClip clips norms
whose z-score against running moments is too high; SPAM clips each coordinate against Adam's
own second moment. All keep fixed-size state and ignore non-finite values when learning.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradxform._base import GradientTransformationExtraArgs, gradient_transformation, step_counter
from gradxform._checks import (
    check_decay,
    check_dtype,
    check_integer,
    check_nonnegative,
    check_positive,
    check_range,
    check_same_structure,
)
from gradxform._moments import Moments, moments_init, moments_update, moments_zscore
from gradxform._records import ClipRecord, no_clip_record
from gradxform._tree import abs_sq, global_norm, moment_square, tree_map_unzip
from gradxform.clipping import clip_to_norm


class AutoClipState(NamedTuple):
    record_kind = "autoclip"  # telemetry: read by `read_health` under this name
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

    Examples:
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
    check_integer("history", history, 1)

    def init(params):
        del params
        norms = jnp.zeros([history], jnp.float32)
        return AutoClipState(step_counter(), step_counter(), norms, no_clip_record())

    def update(updates, state, params=None):
        del params
        norm = global_norm(updates, axis_name).astype(jnp.float32)  # x64: keep state float32
        finite = jnp.isfinite(norm)
        slot = state.written % history
        norms = state.norms.at[slot].set(jnp.where(finite, norm, state.norms[slot]))
        written = jnp.where(finite, optax.safe_increment(state.written), state.written)
        n = jnp.minimum(written, history)
        ordered = jnp.sort(jnp.where(jnp.arange(history) < n, norms, jnp.inf))
        position = percentile / 100.0 * (jnp.maximum(n, 1) - 1).astype(jnp.float32)
        lo = jnp.floor(position).astype(jnp.int32)
        hi = jnp.minimum(lo + 1, jnp.maximum(n - 1, 0))
        threshold = ordered[lo] + (ordered[hi] - ordered[lo]) * (position - lo)
        threshold = jnp.where(n > 0, threshold, jnp.inf)
        updates, clipped = clip_to_norm(updates, norm, threshold)
        record = state.record.next(norm, threshold, clipped)
        return updates, AutoClipState(optax.safe_increment(state.count), written, norms, record)

    return gradient_transformation(init, update)


class ZClipState(NamedTuple):
    record_kind = "zclip"  # telemetry: read by `read_health` under this name
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
      alpha: moment decay in [0, 1].
      z_thresh: positive z-score above which a norm is a spike.
      warmup_steps: steps of exact moments before z-scores count.
      max_norm: absolute cap on the threshold, or `None`.
      mode: `"adaptive_scaling"` (the paper's default) or `"mean"`.
      axis_name: `psum` the squared norm over this axis (parameters sharded across it).

    Examples:
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
    check_positive("z_thresh", z_thresh, finite=False)
    check_integer("warmup_steps", warmup_steps, 0)
    check_positive("max_norm", max_norm, finite=False, optional=True)
    if mode not in ("adaptive_scaling", "mean"):
        raise ValueError(f"`mode` must be 'adaptive_scaling' or 'mean', got {mode!r}.")

    def init(params):
        del params
        return ZClipState(step_counter(), moments_init(), no_clip_record())

    def update(updates, state, params=None):
        del params
        norm = global_norm(updates, axis_name).astype(jnp.float32)  # x64: keep state float32
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
        updates, clipped = clip_to_norm(updates, norm, threshold)
        absorbed = jnp.minimum(norm, threshold)
        moments = moments_update(m, absorbed, alpha, warmup_steps, jnp.isfinite(norm))
        record = state.record.next(norm, threshold, clipped)
        return updates, ZClipState(optax.safe_increment(state.count), moments, record)

    return gradient_transformation(init, update)


class ScaleBySpamState(NamedTuple):
    record_kind = "spam"  # telemetry: read by `read_health` under this name
    count: jax.Array  # int32 steps seen (saturating)
    since_reset: jax.Array  # int32 steps since the moments were last reset
    mu: Any  # first moment, dtype `mu_dtype`
    nu: Any  # second moment, dtype `nu_dtype`
    spikes: jax.Array  # int32 coordinates clipped as spikes this step


def scale_by_spam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    reset_interval: int = 500,
    spike_threshold: float = 5000.0,
    warmup_steps: int = 150,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
) -> GradientTransformationExtraArgs:
    """SPAM: Adam with momentum reset, spike-aware per-coordinate clipping, and a cosine
    warm-up after each reset.

    every `reset_interval` steps:  mu, nu <- 0;  k counts steps since the reset (from 1)
    spike clipping (k > 1):        g <- sign(g) * sqrt(theta * nu)  where  g**2 > theta * nu
                                   (nu is the raw, not debiased, second moment, as in the paper)
    Adam on the clipped g, debiased with k:   u = m_hat / (sqrt(v_hat) + eps)
    after a reset:                 u <- u * (1 - cos(pi * min(k / warmup_steps, 1))) / 2

    Differences from the paper's code: bias corrections restart with the moments (they are
    new estimates), and the first step after a reset is not spike-clipped (nu is empty).

    Args:
      b1: Adam's first-moment decay, in [0, 1].
      b2: Adam's second-moment decay, in [0, 1].
      eps: Adam's eps, >= 0.
      reset_interval: steps between moment resets (>= 1).
      spike_threshold: theta, > 0; a coordinate is a spike when g**2 > theta * nu.
      warmup_steps: length of the cosine warm-up after each reset (0 disables it).
      mu_dtype: dtype of the first moment.
      nu_dtype: dtype of the second moment.

    Examples:
      >>> import gradxform as gx, jax.numpy as jnp
      >>> tx = gx.scale_by_spam()
      >>> state = tx.init(jnp.zeros(2))
      >>> for g in ([1.0, 1.0], [1.0, 1.0], [1.0, 1000.0]):
      ...     u, state = tx.update(jnp.array(g), state)
      >>> int(state.spikes)  # the 1000 was clipped to sqrt(5000 * nu)
      1

    Reference: Huang et al., SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM
    Training, 2025.
    """
    check_decay("b1", b1)
    check_decay("b2", b2)
    check_nonnegative("eps", eps)
    check_integer("reset_interval", reset_interval, 1)
    check_positive("spike_threshold", spike_threshold, finite=False)
    check_integer("warmup_steps", warmup_steps, 0)
    mu_dtype, nu_dtype = check_dtype("mu_dtype", mu_dtype), check_dtype("nu_dtype", nu_dtype)

    def init(params):
        c = step_counter  # every leaf its own buffer, so the state can be donated
        return ScaleBySpamState(
            c(),
            c(),
            optax.tree.zeros_like(params, mu_dtype),
            optax.tree.zeros_like(params, nu_dtype),
            c(),
        )

    def update(updates, state, params=None):
        del params
        check_same_structure(updates, state.mu, "updates", "state.mu")
        reset = (state.count > 0) & (state.count % reset_interval == 0)
        since = jnp.where(reset, 0, state.since_reset)
        k = optax.safe_increment(since)
        ramp = jnp.minimum(k / jnp.maximum(warmup_steps, 1), 1.0)
        warm = jnp.where(
            (state.count >= reset_interval) & (warmup_steps > 0),
            0.5 * (1 - jnp.cos(jnp.pi * ramp)),
            1.0,
        )

        def leaf(g, mu_prev, nu_prev):
            mu_prev = jnp.where(reset, jnp.zeros_like(mu_prev), mu_prev)
            nu_prev = jnp.where(reset, jnp.zeros_like(nu_prev), nu_prev)
            bound = spike_threshold * nu_prev
            spike = (abs_sq(g) > bound) & (since > 0)
            g = jnp.where(spike, jnp.sign(g) * jnp.sqrt(bound), g).astype(g.dtype)
            mu = (1 - b1) * g + b1 * mu_prev
            nu = (1 - b2) * moment_square(g, nu_prev) + b2 * nu_prev
            m_hat = mu / (1 - b1**k).astype(mu.dtype)
            v_hat = nu / (1 - b2**k).astype(nu.dtype)
            u = warm * m_hat / (jnp.sqrt(v_hat) + eps)
            n_spikes = jnp.sum(spike, dtype=jnp.int32)
            return u.astype(g.dtype), mu.astype(mu_prev.dtype), nu.astype(nu_prev.dtype), n_spikes

        out, mu, nu, spikes = tree_map_unzip(leaf, updates, state.mu, state.nu, n=4)
        total = sum(jax.tree.leaves(spikes), jnp.zeros([], jnp.int32))
        return out, ScaleBySpamState(optax.safe_increment(state.count), k, mu, nu, total)

    return gradient_transformation(init, update)
