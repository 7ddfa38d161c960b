"""Learning rates: a constant scale, or a schedule of the step (use optax's schedules)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradxform._base import (
    EmptyState,
    GradientTransformationExtraArgs,
    ScalarOrSchedule,
    gradient_transformation,
    step_counter,
)
from gradxform._checks import check_nonnegative, check_range


def scale(step_size: float | jax.Array) -> GradientTransformationExtraArgs:
    """Multiply the updates by a constant.

    u_t = step_size * g_t

    Args:
      step_size: any finite real factor (negative for descent); a float or 0-d array.

    Examples:
      >>> import gradxform as gx, jax.numpy as jnp
      >>> tx = gx.scale(-0.5)
      >>> tx.update(jnp.array([2.0]), tx.init(jnp.zeros(1)))[0]
      Array([-1.], dtype=float32)
    """
    check_range("step_size", step_size)
    if callable(step_size):
        raise ValueError(
            f"`step_size` must be a number, got the callable {step_size!r}: use "
            "`gx.scale_by_schedule` for a schedule."
        )

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda g: (step_size * g).astype(g.dtype), updates), state

    return gradient_transformation(lambda params: EmptyState(), update)


class ScaleByScheduleState(NamedTuple):
    count: jax.Array  # int32 step counter (saturating), the schedule's argument


def scale_by_schedule(
    step_size_fn: Callable[[jax.Array], jax.Array],
) -> GradientTransformationExtraArgs:
    """Multiply the updates by `step_size_fn(t)`, `t` counting calls from 0.

    u_t = step_size_fn(t) * g_t

    Args:
      step_size_fn: a function of the int32 step count, e.g. an optax schedule.

    Examples:
      >>> import gradxform as gx, jax.numpy as jnp, optax
      >>> tx = gx.scale_by_schedule(optax.linear_schedule(1.0, 0.0, transition_steps=4))
      >>> state = tx.init(jnp.zeros(1))
      >>> _, state = tx.update(jnp.ones(1), state)
      >>> tx.update(jnp.ones(1), state)[0]
      Array([0.75], dtype=float32)
    """
    if not callable(step_size_fn):
        raise TypeError(
            "`step_size_fn` must be a function of the step count (e.g. an optax schedule), got "
            f"{step_size_fn!r}; for a constant use `gx.scale`."
        )

    def init(params):
        del params
        return ScaleByScheduleState(step_counter())

    def update(updates, state, params=None):
        del params
        step_size = step_size_fn(state.count)
        updates = jax.tree.map(lambda g: jnp.asarray(step_size, g.dtype) * g, updates)
        return updates, ScaleByScheduleState(optax.safe_increment(state.count))

    return gradient_transformation(init, update)


def scale_by_learning_rate(
    learning_rate: ScalarOrSchedule | None, *, flip_sign: bool = True
) -> GradientTransformationExtraArgs:
    """Multiply by `-learning_rate` (descent), a constant or a schedule of the step.

    u_t = -lr(t) * g_t   (`+lr(t) * g_t` with `flip_sign=False`;  u_t = g_t  if lr is None)

    Args:
      learning_rate: >= 0 and finite; a float, a 0-d array or a schedule such as
        `optax.warmup_cosine_decay_schedule(...)`; `None` means no scaling at all (not even
        the sign flip), as in optax.
      flip_sign: negate, so that `optax.apply_updates` descends.

    Examples:
      >>> import gradxform as gx, jax.numpy as jnp
      >>> tx = gx.scale_by_learning_rate(0.1)
      >>> tx.update(jnp.array([2.0]), tx.init(jnp.zeros(1)))[0]
      Array([-0.2], dtype=float32)
    """
    check_nonnegative("learning_rate", learning_rate, optional=True)
    if learning_rate is None:
        return gradient_transformation(lambda params: EmptyState(), lambda u, s, p=None: (u, s))
    sign = -1 if flip_sign else 1
    if callable(learning_rate):
        return scale_by_schedule(lambda count: sign * learning_rate(count))
    return scale(sign * learning_rate)
