"""Guards: wrappers that refuse a bad step (skip) and scale losses for low precision. The
documented default guard, `stable(optimizer)`, lives in `gradxform.stable`.

A guard decides with `jnp.where` selects, never `lax.cond`, so it runs unchanged under `jit`,
`vmap`, `pmap` and `shard_map`. On a refused step the update is zero and the wrapped
transform's state is left exactly as it was, so non-finite gradients never reach the params
or the optimizer state.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradxform._base import (
    GradientTransformationExtraArgs,
    gradient_transformation,
    step_counter,
)
from gradxform._checks import (
    check_integer,
    check_positive,
    check_range,
    check_transform,
    scalar_loss,
)
from gradxform._moments import LOG_NORM_MIN_STD
from gradxform._records import telemetry_records
from gradxform._tree import global_norm, scale_leaf


def _zero_where(skip: jax.Array, updates: Any) -> Any:
    return jax.tree.map(lambda u: jnp.where(skip, jnp.zeros_like(u), u), updates)


def _window_z(window: jax.Array, count: jax.Array, x: jax.Array, min_std: jax.Array, warmup: int):
    """z-score of `x` against the valid entries of a ring buffer (0 before `warmup` entries)."""
    n = jnp.minimum(count, window.shape[0])
    valid = jnp.arange(window.shape[0]) < n
    nf = jnp.maximum(n, 1).astype(jnp.float32)
    mean = jnp.sum(jnp.where(valid, window, 0.0)) / nf
    var = jnp.sum(jnp.where(valid, (window - mean) ** 2, 0.0)) / nf
    z = (x - mean) / jnp.maximum(jnp.sqrt(var), min_std(mean))
    return jnp.where(n >= warmup, z, 0.0)


class SkipIfState(NamedTuple):
    record_kind = "skip"  # telemetry: read by `read_health` under this name
    count: jax.Array  # int32 steps seen (saturating)
    written: jax.Array  # int32 accepted steps written to the windows (saturating)
    norms: jax.Array  # float32[window] log global norms of recent accepted steps
    losses: jax.Array  # float32[window] losses of recent accepted steps (when `loss=` given)
    skipped: jax.Array  # bool, this step was skipped
    consecutive: jax.Array  # int32 consecutive skipped steps
    skipped_nonfinite: jax.Array  # int32 total steps skipped for NaN/inf gradient or loss
    skipped_norm: jax.Array  # int32 total steps skipped for a gradient-norm spike
    skipped_loss: jax.Array  # int32 total steps skipped for a loss spike
    inner: Any  # the guarded transform's state, unchanged on skipped steps


def skip_if(
    inner: GradientTransformationExtraArgs,
    *,
    nonfinite: bool = True,
    norm_z: float | None = 6.0,
    max_norm_ratio: float | None = 100.0,
    max_norm: float | None = None,
    loss_z: float | None = None,
    window: int = 100,
    warmup_steps: int = 20,
    give_up_after: int | None = None,
    check_updates: bool = False,
    axis_name: str | None = None,
) -> GradientTransformationExtraArgs:
    """Skip the step (zero update, `inner` state unchanged) when the gradient looks wrong.

    Reasons, each counted in the state:
      non-finite  any NaN/inf in the gradient or in `loss=` (with `check_updates=True`, also
                  in `inner`'s update)
      norm spike  z-score of log||g|| against the last `window` accepted steps > `norm_z`,
                  or ||g|| > `max_norm_ratio` x the largest norm in that window (active
                  from the second step, so spikes inside the z-score warm-up are caught too),
                  or ||g|| > `max_norm` (an absolute bound, off by default)
      loss spike  z-score of `loss` against the last `window` accepted losses > `loss_z`
    z-scores count once `warmup_steps` steps were accepted; their std is floored (0.25 in
    log-norm, 1% of the mean loss) so a flat history does not turn noise into spikes.

    With `give_up_after=N`, after N consecutive skips the next spike is accepted (the
    distribution has moved); non-finite steps are never accepted.

    With gradient accumulation, guard the accumulator from outside:
    `skip_if(optax.MultiSteps(opt, k))` refuses a bad micro-batch before it is accumulated.
    Inside it (`optax.MultiSteps(skip_if(opt), k)`) one NaN micro-batch makes the accumulated
    gradient non-finite for good and every later step is skipped; `assert_healthy` then
    raises `StalledTrainingError`.

    Args:
      inner: the transform to guard (typically the whole optimizer).
      nonfinite: skip non-finite steps.
      norm_z: z-score bound on log||g||, or `None` to disable.
      max_norm_ratio: bound on ||g|| relative to the window's largest accepted norm, > 1,
        or `None` to disable.
      max_norm: absolute bound on ||g||, or `None`.
      loss_z: z-score bound on the loss passed as `update(..., loss=loss)`, or `None`.
      window: size of the rolling windows (fixed-shape state).
      warmup_steps: accepted steps before z-scores count.
      give_up_after: optional number of consecutive skips after which spikes are accepted.
      check_updates: also skip when `inner` turns finite gradients into a non-finite update
        (e.g. Adam with `eps=0` on an all-zero gradient). Costs one more pass over the
        updates, which must then be materialised before the zeroing select.
      axis_name: `psum` the squared norm over this axis (parameters sharded across it).

    Examples:
      >>> import gradxform as gx, jax.numpy as jnp
      >>> tx = gx.skip_if(gx.sgd(0.1))
      >>> params = {"w": jnp.ones(2)}
      >>> u, state = tx.update({"w": jnp.array([1.0, jnp.nan])}, tx.init(params), params)
      >>> u["w"], int(state.skipped_nonfinite)
      (Array([0., 0.], dtype=float32), 1)
    """
    check_transform("inner", inner)
    bound = dict(finite=False, optional=True)  # a bound: None (or inf) turns it off
    check_positive("norm_z", norm_z, **bound)
    check_range("max_norm_ratio", max_norm_ratio, 1.0, low_open=True, **bound)
    check_positive("max_norm", max_norm, **bound)
    check_positive("loss_z", loss_z, **bound)
    check_integer("window", window, 1)
    check_integer("warmup_steps", warmup_steps, 1, window)
    check_integer("give_up_after", give_up_after, 1, optional=True)

    def init(params):
        c = step_counter  # every leaf its own buffer, so the state can be donated
        window_zeros = lambda: jnp.zeros([window], jnp.float32)
        return SkipIfState(
            c(), c(), window_zeros(), window_zeros(), jnp.zeros([], bool), c(), c(), c(), c(),
            inner.init(params),
        )  # fmt: skip

    def update(grads, state, params=None, **extra_args):
        updates, inner_state = inner.update(grads, state.inner, params, **extra_args)
        loss = extra_args.get("loss")
        norm = global_norm(grads, axis_name).astype(jnp.float32)  # x64: windows stay float32
        bad = ~jnp.isfinite(norm) if nonfinite else jnp.zeros([], bool)
        if check_updates:
            bad |= ~jnp.isfinite(global_norm(updates, axis_name))
        log_norm = jnp.log(jnp.maximum(norm, 1e-30))
        z_norm = jnp.zeros([], jnp.float32)
        if norm_z is not None:
            floor = lambda m: LOG_NORM_MIN_STD
            z_norm = _window_z(state.norms, state.written, log_norm, floor, warmup_steps)
        norm_spike = z_norm > (norm_z if norm_z is not None else jnp.inf)
        if max_norm_ratio is not None:
            recent = jnp.arange(window) < jnp.minimum(state.written, window)
            largest = jnp.max(jnp.where(recent, state.norms, -jnp.inf))
            norm_spike |= (state.written > 0) & (log_norm > largest + jnp.log(max_norm_ratio))
        if max_norm is not None:
            norm_spike |= norm > max_norm
        loss_spike = jnp.zeros([], bool)
        loss_value = jnp.zeros([], jnp.float32)
        if loss is not None:
            loss_value = scalar_loss(loss)
            if nonfinite:
                bad |= ~jnp.isfinite(loss_value)
            if loss_z is not None:
                floor = lambda m: 0.01 * jnp.abs(m) + 1e-8
                z_loss = _window_z(state.losses, state.written, loss_value, floor, warmup_steps)
                loss_spike = z_loss > loss_z
        spike = (norm_spike | loss_spike) & ~bad
        if give_up_after is not None:
            spike &= state.consecutive < give_up_after
        skip = bad | spike

        slot = state.written % window
        keep = lambda buf, x: buf.at[slot].set(jnp.where(skip, buf[slot], x))
        count_if = lambda total, cond: jnp.where(cond, optax.safe_increment(total), total)
        new_state = SkipIfState(
            count=optax.safe_increment(state.count),
            written=count_if(state.written, ~skip),
            norms=keep(state.norms, log_norm),
            losses=keep(state.losses, loss_value),
            skipped=skip,
            consecutive=jnp.where(skip, optax.safe_increment(state.consecutive), 0),
            skipped_nonfinite=count_if(state.skipped_nonfinite, bad),
            skipped_norm=count_if(state.skipped_norm, spike & norm_spike),
            skipped_loss=count_if(state.skipped_loss, spike & loss_spike & ~norm_spike),
            inner=optax.tree.where(skip, state.inner, inner_state),
        )
        return _zero_where(skip, updates), new_state

    return gradient_transformation(init, update, extra_args=True)


class DynamicLossScaleState(NamedTuple):
    record_kind = "loss_scale"  # telemetry: read by `read_health` under this name
    count: jax.Array  # int32 steps seen (saturating)
    scale: jax.Array  # float32 current loss scale
    good_steps: jax.Array  # int32 finite steps since the scale last changed
    skipped: jax.Array  # bool, this step was skipped (non-finite scaled gradient)
    skipped_total: jax.Array  # int32 total skipped steps
    inner: Any  # the wrapped optimizer's state, unchanged on skipped steps


def dynamic_loss_scale(
    inner: GradientTransformationExtraArgs,
    *,
    initial_scale: float = 2.0**15,
    growth_interval: int = 2000,
    growth_factor: float = 2.0,
    backoff_factor: float = 0.5,
    min_scale: float = 1.0,
) -> GradientTransformationExtraArgs:
    """Dynamic loss scaling for low-precision training (torch's GradScaler, Keras's
    LossScaleOptimizer), as a transform around the optimizer.

    Compute gradients of `scale_loss(loss, opt_state)`; this transform divides them by the
    scale (in float32), and then:
      all finite: apply `inner`; after `growth_interval` finite steps, scale *= growth_factor
      otherwise:  zero update, `inner` state unchanged, scale *= backoff_factor (>= min_scale)

    Args:
      inner: the optimizer to wrap.
      initial_scale: starting scale (Keras's 2**15; torch's GradScaler starts at 2**16).
      growth_interval: finite steps before the scale grows.
      growth_factor: > 1.
      backoff_factor: in (0, 1).
      min_scale: the scale never drops below this.

    Examples:
      >>> import gradxform as gx, jax, jax.numpy as jnp
      >>> tx = gx.dynamic_loss_scale(gx.sgd(0.1), initial_scale=1024.0)
      >>> params = jnp.ones(2, jnp.float16)
      >>> state = tx.init(params)
      >>> loss_fn = lambda p: gx.scale_loss(jnp.sum(p * p), state)
      >>> u, state = tx.update(jax.grad(loss_fn)(params), state, params)
      >>> u, float(gx.loss_scale(state))
      (Array([-0.2, -0.2], dtype=float16), 1024.0)

    Reference: Micikevicius et al., Mixed Precision Training, 2018.
    """
    check_transform("inner", inner)
    check_positive("initial_scale", initial_scale)
    check_integer("growth_interval", growth_interval, 1)
    check_range("growth_factor", growth_factor, 1.0, low_open=True)
    check_range("backoff_factor", backoff_factor, 0.0, 1.0, low_open=True, high_open=True)
    check_positive("min_scale", min_scale)

    def init(params):
        scale = jnp.asarray(initial_scale, jnp.float32)
        c = step_counter  # every leaf its own buffer, so the state can be donated
        return DynamicLossScaleState(c(), scale, c(), jnp.zeros([], bool), c(), inner.init(params))

    def update(scaled_grads, state, params=None, **extra_args):
        grads = jax.tree.map(lambda g: scale_leaf(g, 1.0 / state.scale), scaled_grads)
        finite = jnp.isfinite(global_norm(scaled_grads))
        updates, inner_state = inner.update(grads, state.inner, params, **extra_args)
        grow = finite & (state.good_steps + 1 >= growth_interval)
        scale = jnp.where(
            finite,
            jnp.where(grow, state.scale * growth_factor, state.scale),
            jnp.maximum(state.scale * backoff_factor, min_scale),
        )
        new_state = DynamicLossScaleState(
            count=optax.safe_increment(state.count),
            scale=scale,
            good_steps=jnp.where(finite & ~grow, optax.safe_increment(state.good_steps), 0),
            skipped=~finite,
            skipped_total=jnp.where(
                finite, state.skipped_total, optax.safe_increment(state.skipped_total)
            ),
            inner=optax.tree.where(finite, inner_state, state.inner),
        )
        return _zero_where(~finite, updates), new_state

    return gradient_transformation(init, update, extra_args=True)


def loss_scale(opt_state: Any) -> jax.Array:
    """The current scale of the (first) `dynamic_loss_scale` found in `opt_state`.

    Args:
      opt_state: any optimizer state containing a `DynamicLossScaleState`.

    Returns:
      The float32 scale; raises `ValueError` when there is none.
    """
    for _, record in telemetry_records(opt_state):
        if type(record).record_kind == "loss_scale":
            return record.scale
    raise ValueError("`opt_state` holds no `dynamic_loss_scale` state; wrap the optimizer in one.")


def scale_loss(loss: jax.Array, opt_state: Any) -> jax.Array:
    """`loss * loss_scale(opt_state)`, in the loss's dtype: differentiate this, not `loss`.

    Args:
      loss: the scalar loss.
      opt_state: the state of an optimizer wrapped in `dynamic_loss_scale`.

    Examples:
      >>> import gradxform as gx, jax.numpy as jnp
      >>> state = gx.dynamic_loss_scale(gx.sgd(0.1), initial_scale=8.0).init(jnp.zeros(1))
      >>> gx.scale_loss(jnp.float16(0.5), state)
      Array(4., dtype=float16)
    """
    return loss * loss_scale(opt_state).astype(jnp.result_type(loss))
