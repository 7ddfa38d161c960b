"""`stable(optimizer)`: the documented default guard. One pass over the gradient feeds both its
decisions and its telemetry; on a healthy run it does nothing.

Top of the module graph: it composes `telemetry` (the health record and its statistics) and
`clipping` (an opt-in trust ratio); nothing imports it but the package.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradxform._base import GradientTransformationExtraArgs, chain, gradient_transformation
from gradxform._checks import (
    Stacked,
    check_integer,
    check_positive,
    check_range,
    check_stacked,
    check_transform,
    scalar_loss,
)
from gradxform._moments import LOG_NORM_MIN_STD, moments_std
from gradxform._records import leaf_layers
from gradxform._stats import LeafStats, leaf_statistics
from gradxform._tree import once_per_shape, scale_leaf
from gradxform.clipping import adaptive_grad_clip
from gradxform.telemetry import (
    HealthRule,
    HealthState,
    explosion,
    health_rule,
    init_health,
    next_health,
)

MIN_STEP_SCALE = 2.0**-4  # the step scale's floor: a learning rate 16x too high, no lower
RECENT = 10  # a second finite clip or skip within this many steps is a trend: back off
SUSTAINED = 5  # steps clipped in a row: a sustained excess, a trend's evidence at any bound


class StableState(NamedTuple):
    """What `stable` did on its last step, its health record, and the optimizer's state."""

    record_kind = "stable"  # telemetry: read by `read_health` under this name
    skipped: jax.Array  # bool: this step's update was zero (non-finite or spike)
    clipped: jax.Array  # bool: this step's gradient was scaled down to `threshold`
    skipped_total: jax.Array  # int32 steps skipped so far (saturating)
    clipped_total: jax.Array  # int32 steps clipped so far (saturating)
    consecutive: jax.Array  # int32 consecutive skipped steps (a stall shows here)
    clip_run: jax.Array  # int32 consecutive clipped steps (a sustained excess shows here)
    calm: jax.Array  # int32 steps since the guard last clipped or skipped a finite step
    threshold: jax.Array  # float32 clip threshold on ||g|| in force (inf before warm-up)
    step_scale: jax.Array  # float32 factor on the update: 1, lowered after spikes, recovering
    health: HealthState  # the health record: its running moments are the guard's statistics
    inner: Any  # the optimizer's state


class _Rule(NamedTuple):
    norm_z: float
    max_norm_ratio: float | None
    max_norm: float | None
    z_thresh: float
    backoff: float | None
    recovery_steps: int
    health: HealthRule


class _Decision(NamedTuple):
    skip: jax.Array  # bool: zero update, zero gradient to the optimizer
    alarm: jax.Array  # bool: a finite step past the usual bounds (a trend's evidence)
    factor: jax.Array  # float32 gradient scale (1: not clipped)
    threshold: jax.Array  # float32 clip threshold on ||g||
    absorbed: jax.Array  # float32 log-norm the running moments take in (clipped)


def stable(
    optimizer: GradientTransformationExtraArgs,
    *,
    norm_z: float = 6.0,
    max_norm_ratio: float | None = 100.0,
    max_norm: float | None = None,
    z_thresh: float = 4.0,
    backoff: float | None = 0.5,
    recovery_steps: int = 200,
    max_update_ratio: float | None = None,
    warmup_steps: int = 20,
    telemetry: bool = True,
    stacked: Stacked = None,
) -> GradientTransformationExtraArgs:
    """The documented default guard for any optimizer (SGD and Adam families alike).

    One pass over the gradient (and the params, for telemetry) gives each leaf's squared norm,
    which also tells whether it holds NaN/inf. From the running moments of log ||g|| (mean m,
    std s >= 0.25, exact over a warm-up of `warmup_steps`, then with a 10-step memory (decay
    0.9), so that a norm drifting down over training does not inflate the spread and hide a
    spike), each step:

      skip   if g (or `loss=`, when passed to `update`) holds NaN/inf, or
             z = (log||g|| - m) / s > norm_z, or ||g|| > max_norm_ratio * e**m (from the
             second step on: a spike during the warm-up), or ||g|| > max_norm:
             the update is zero and the optimizer is fed a zero gradient;
      clip   g <- g * min(1, e**(m + z_thresh * s) / ||g||)  (after warm-up);
      scale  the update by `step_scale`: halved (`backoff`) when the guard clips or skips a
             finite step for the second time within 10 steps (a trend: a learning rate too
             high), and doubling back to 1 over `recovery_steps` accepted steps; a lone spike
             (a bad batch) leaves it alone, and on a healthy run it stays 1;
      while  backing off (step_scale < 1) the spread is not trusted, as the instability
             itself inflates it: the clip bound is e**(m + z_thresh * 0.25) (2.7x the
             running level at the default), a finite spike is clipped to it rather than
             skipped (`max_norm` aside), and the moments take in at most that bound, so
             (after the warm-up) their level rises at most e**0.1 a step instead of running
             up with a diverging norm and letting it through unclipped; such a clip counts
             toward a trend only when the usual bounds would have acted too, or 5 steps in
             a row (a divergence), so a noisy run still recovers its scale.

    The moments take in the clipped log-norm of every finite step, so a lasting change of
    scale is followed (a few dozen steps) rather than skipped for ever. `health`'s record
    (`read_health(state)["health/..."]`) is computed from the same statistics, and the guard's
    own record reads `stable/skipped`, `stable/clipped`, their totals, `stable/threshold` and
    `stable/step_scale`.

    What it costs and when not to use it: on a healthy run it leaves every step as it was
    (the thresholds come from the run's own norms, so no init scale, zero-initialised leaf or
    learning rate trips them: `benchmarks/stability.py` measures how often each acts). The
    step adds one read of the gradient and params to the optimizer's
    (`benchmarks/guard_cost.py`, 25M params: 1.02-1.31x the step of
    `chain(clip_by_global_norm, adamw)` on a CPU, 1.04-1.29x on an H200, and 1.5-1.7x its
    compile time at 1000 leaves, medians of 5 compiles; with `telemetry=False`, which leaves
    the params unread, 1.25-1.4x). A skipped step feeds the
    optimizer a zero gradient instead of restoring its state: its moments decay for one step
    (Adam's `mu` by `b1`), which keeps the guard free of a copy of the optimizer state; use
    `gx.skip_if` when the state must come back bitwise. It does not cure vanishing
    gradients (it never enlarges a step) and does not replace a warm-up for a learning rate
    that is too high for good: the step scale only buys time. With gradient accumulation put
    the guard outside, `gx.stable(optax.MultiSteps(opt, k))`.

    Args:
      optimizer: any gradient transformation, e.g. `gx.adamw(1e-3)`.
      norm_z: z-score of log ||g|| above which a step is skipped.
      max_norm_ratio: skip when ||g|| exceeds this multiple of its running level, or `None`.
      max_norm: absolute bound on ||g|| above which a step is skipped, or `None`.
      z_thresh: z-score of log ||g|| above which the gradient is clipped to that level.
      backoff: factor on the step scale on a trend (a second finite clip or skip within 10
        steps), in (0, 1), or `None` (never scale).
      recovery_steps: accepted steps over which the step scale doubles back, up to 1.
      max_update_ratio: opt-in per-unit trust ratio after the optimizer
        (`adaptive_grad_clip(max_update_ratio)`), or `None`. It bounds every step of a
        zero-initialised leaf: leave it off unless that is what you want.
      warmup_steps: accepted steps before the z-scores and the clip count.
      telemetry: read the params too, for the record's non-finite-params check (`False`
        saves that read; the gradient's statistics are recorded either way).
      stacked: marks the leaves whose axis 0 is a layer axis (scanned layers): a regex
        searched in the leaf name (`"layers"`) or a predicate `(name, leaf) -> bool`. The
        health record then has per-layer entries (`health/grad_norm/layers/w[7]`) and the
        trust ratio treats each layer as its own leaf (see `adaptive_grad_clip`).

    Examples:
      >>> import gradxform as gx, jax.numpy as jnp
      >>> tx = gx.stable(gx.adam(1e-3))
      >>> params = {"w": jnp.ones(2)}
      >>> u, state = tx.update({"w": jnp.array([jnp.inf, 1.0])}, tx.init(params), params)
      >>> u["w"], gx.read_health(state)["stable/skipped"]
      (Array([0., 0.], dtype=float32), 1.0)

    References: Kumar et al., ZClip: Adaptive Spike Mitigation for LLM Pre-Training, 2025
    (z-score clipping); Chowdhery et al., PaLM, 2022 (skipping spikes).
    """
    check_transform("optimizer", optimizer)
    check_positive("norm_z", norm_z, finite=False)
    check_range("max_norm_ratio", max_norm_ratio, 1.0, low_open=True, finite=False, optional=True)
    check_positive("max_norm", max_norm, finite=False, optional=True)
    check_positive("z_thresh", z_thresh, finite=False)
    check_range("backoff", backoff, 0.0, 1.0, low_open=True, high_open=True, optional=True)
    check_integer("recovery_steps", recovery_steps, 1)
    check_positive("max_update_ratio", max_update_ratio, finite=False, optional=True)
    check_stacked("stacked", stacked)
    rule = _Rule(
        norm_z, max_norm_ratio, max_norm, z_thresh, backoff, recovery_steps,
        health_rule(
            z_threshold=norm_z, max_norm=max_norm, max_growth=max_norm_ratio,
            warmup_steps=warmup_steps, decay=0.9, baseline_decay=0.999,
            vanishing_fraction=1e-3, ratio_floor=0.0, patience=20, dead_after=3, stacked=stacked,
        ),
    )  # fmt: skip
    if max_update_ratio is not None:
        optimizer = chain(optimizer, adaptive_grad_clip(max_update_ratio, stacked=stacked))

    def init(params):
        zero = lambda dtype: jnp.zeros([], dtype)
        return StableState(
            zero(bool), zero(bool), zero(jnp.int32), zero(jnp.int32), zero(jnp.int32),
            zero(jnp.int32), jnp.full([], RECENT, jnp.int32),
            jnp.asarray(jnp.inf, jnp.float32), jnp.ones([], jnp.float32),
            init_health(params, rule.health, None), optimizer.init(params),
        )  # fmt: skip

    def update(grads, state, params=None, **extra_args):
        leaves, treedef = jax.tree.flatten(grads)
        with_params = telemetry and params is not None
        p = treedef.flatten_up_to(params) if with_params else None
        layers = leaf_layers(state.health.leaves)
        stats = leaf_statistics(leaves, p, zeros=False, layers=layers)
        backing_off = state.step_scale < 1
        decision = _decide(state.health, stats, extra_args.get("loss"), rule, backing_off)
        skip = decision.skip
        zeroed = once_per_shape(_zero_or_scale, leaves)  # traced once per leaf shape
        grads = jax.tree.map(lambda g: zeroed(g, skip, decision.factor), grads)
        updates, inner_state = optimizer.update(grads, state.inner, params, **extra_args)
        clipped = (decision.factor < 1) & ~skip
        # past the usual bounds, or clipped (at the tight bound, while backing off) SUSTAINED
        # steps in a row: a divergence, not the noise of a run that is still settling
        acted = decision.alarm | (clipped & (state.clip_run >= SUSTAINED - 1))
        step_scale = _step_scale(state.step_scale, acted & (state.calm < RECENT), skip, rule)
        scale = step_scale
        if with_params:
            # `* one` (exactly 1) makes the update depend on the params' sums: XLA then reads
            # the params before `apply_updates` overwrites them in place, instead of copying.
            scale *= 1.0 + 0.0 * jnp.isfinite(jnp.sum(stats.p_sq)).astype(jnp.float32)
        # `/ one` (exactly 1: calm >= 0): XLA's fusion copies a chain of cheap scalar ops into
        # every consumer, so the step scale's ~60 ops went into each leaf's kernel (1000
        # leaves: 148k HLO instructions against the chain's 63k). A division is "expensive"
        # to it: the chain is computed once and each kernel reads the one scalar (82k).
        scale = scale / (state.calm >= 0).astype(jnp.float32)
        updates = jax.tree.map(lambda u: zeroed(u, skip, scale), updates)
        accepted = stats.finite & jnp.isfinite(decision.absorbed)
        count_if = lambda total, cond: jnp.where(cond, optax.safe_increment(total), total)
        new_state = StableState(
            skipped=skip,
            clipped=clipped,
            skipped_total=count_if(state.skipped_total, skip),
            clipped_total=count_if(state.clipped_total, clipped),
            consecutive=count_if(state.consecutive, skip) * skip,
            clip_run=count_if(state.clip_run, clipped) * clipped,
            calm=jnp.where(acted, 0, jnp.minimum(state.calm + 1, RECENT)),
            threshold=decision.threshold,
            step_scale=step_scale,
            health=next_health(state.health, stats, rule.health, (accepted, decision.absorbed)),
            inner=inner_state,
        )
        return updates, new_state

    return gradient_transformation(init, update, extra_args=True)


def _zero_or_scale(x: jax.Array, skip: jax.Array, factor: jax.Array) -> jax.Array:
    """0 on a skipped step (NaN included), else `x * factor` (in float32, one rounding)."""
    return jnp.where(skip, jnp.zeros_like(x), scale_leaf(x, factor))


def _decide(
    record: HealthState, stats: LeafStats, loss: Any, rule: _Rule, backing_off: jax.Array
) -> _Decision:
    """Skip, clip and what the moments absorb, from this step's norm and the running moments.

    While `backing_off` (step scale below 1: a trend was seen) the spread is not trusted, as
    the instability itself inflates it: a finite step is clipped at `_tight_bound`, not
    skipped as a spike (`max_norm` aside), and the moments take in at most that bound. Only
    a step past the usual bounds raises the `alarm` that the trend counts: the tight clip is
    a precaution, so a run noisier than 2.7x still recovers its step scale.
    """
    norm, finite = stats.norm, stats.finite
    if loss is not None:
        finite &= jnp.isfinite(scalar_loss(loss))
    log_norm = jnp.log(jnp.maximum(norm, 1e-30))
    z, _, _ = explosion(record, norm, finite, rule.health)
    moments = record.log_norm
    spike = z > rule.norm_z
    ratio_bound = jnp.inf
    if rule.max_norm_ratio is not None:
        above = moments.mean + jnp.log(rule.max_norm_ratio)
        ratio_bound = jnp.where(moments.n >= 1, above, jnp.inf)
        spike |= log_norm > ratio_bound
    std = moments_std(moments, LOG_NORM_MIN_STD)
    warm = moments.n >= rule.health.warmup_steps
    usual_bound = jnp.where(warm, moments.mean + rule.z_thresh * std, jnp.inf)
    alarm = finite & (spike | (log_norm > usual_bound))  # what the trend and `calm` count
    spike &= ~backing_off
    if rule.max_norm is not None:
        spike |= norm > rule.max_norm
    spike &= finite
    tight = jnp.where(moments.n >= 1, _tight_bound(moments.mean, rule), jnp.inf)
    log_bound = jnp.where(backing_off, jnp.minimum(usual_bound, tight), usual_bound)
    factor = jnp.where(finite, jnp.exp(jnp.minimum(log_bound - log_norm, 0.0)), 1.0)
    # A spike in the warm-up enters the moments at the ratio bound: a lasting jump is followed.
    absorbed = jnp.minimum(log_norm, jnp.minimum(log_bound, ratio_bound))
    absorbed = jnp.where(finite, absorbed, jnp.nan)
    alarm |= spike  # `max_norm`
    return _Decision(~finite | spike, alarm, factor, jnp.exp(log_bound), absorbed)


def _tight_bound(log_level: jax.Array, rule: _Rule) -> jax.Array:
    """The log clip bound while backing off: the running level times e**(z_thresh * 0.25)
    (2.7x at the default), the floor spread in place of the measured one. The moments then
    take in at most this, so after the warm-up their level rises at most e**0.1 per step
    (decay 0.9) and a divergence cannot drag the bound up after it, while a lasting change
    of scale is still followed (e-fold in ten steps)."""
    return log_level + rule.z_thresh * LOG_NORM_MIN_STD


def _step_scale(scale: jax.Array, trend: jax.Array, skip: jax.Array, rule: _Rule) -> jax.Array:
    """The factor on the update: times `backoff` when the guard acts on a finite step for the
    second time within `RECENT` steps (a trend, as from a learning rate that is too high; a
    lone spike is a bad batch and leaves it alone), else doubling back over `recovery_steps`
    accepted steps to at most 1 (exactly 1 on a run without such trends)."""
    if rule.backoff is None:
        return scale
    recovered = jnp.minimum(scale * 2.0 ** (1.0 / rule.recovery_steps), 1.0)
    held = jnp.where(skip, scale, recovered)  # a skipped step is no evidence of calm
    return jnp.maximum(jnp.where(trend, scale * rule.backoff, held), MIN_STEP_SCALE)
