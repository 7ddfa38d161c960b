"""Momentum: a heavy-ball / Nesterov trace and an exponential moving average of the updates.

`trace` sums past updates (`m = decay * m + g`), `ema` averages them
(`m = decay * m + (1 - decay) * g`); the two differ by the factor `1 - decay`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

from gradxform._base import GradientTransformationExtraArgs, gradient_transformation, step_counter
from gradxform._checks import check_dtype, check_range, check_same_structure
from gradxform._tree import tree_map_unzip


class TraceState(NamedTuple):
    trace: Any  # the momentum buffer m_t, dtype `accumulator_dtype` (default: the params')


def trace(
    decay: float, nesterov: bool = False, accumulator_dtype: Any = None
) -> GradientTransformationExtraArgs:
    """Heavy-ball or Nesterov momentum: a decaying sum of past updates.

    m_t = g_t + decay * m_{t-1};   u_t = m_t  (heavy ball)   or   g_t + decay * m_t  (Nesterov)

    Args:
      decay: momentum coefficient in [0, 1] (1: a plain running sum, as in optax).
      nesterov: use Nesterov's look-ahead form.
      accumulator_dtype: dtype of the buffer (e.g. `jnp.float32` for bfloat16 params).

    Examples:
      >>> import gradxform as gx, jax.numpy as jnp
      >>> tx = gx.trace(0.9)
      >>> state = tx.init(jnp.zeros(2))
      >>> u, state = tx.update(jnp.ones(2), state)
      >>> u, state = tx.update(jnp.ones(2), state)
      >>> u
      Array([1.9, 1.9], dtype=float32)

    Reference: Polyak, 1964; Sutskever et al., On the importance of initialization and momentum
    in deep learning, 2013.
    """
    check_range("decay", decay, 0.0, 1.0)
    accumulator_dtype = check_dtype("accumulator_dtype", accumulator_dtype)

    def init(params):
        return TraceState(optax.tree.zeros_like(params, accumulator_dtype))

    def leaf(g, m_prev):
        m = g + decay * m_prev
        u = g + decay * m if nesterov else m
        return u.astype(g.dtype), m.astype(m_prev.dtype)

    def update(updates, state, params=None):
        del params
        check_same_structure(updates, state.trace, "updates", "state.trace")
        updates, new_trace = tree_map_unzip(leaf, updates, state.trace, n=2, per_shape=False)
        return updates, TraceState(new_trace)

    return gradient_transformation(init, update)


class EmaState(NamedTuple):
    count: jax.Array  # int32 step counter (saturating), for the debiasing
    ema: Any  # the running average, dtype `accumulator_dtype` (default: the params')


def ema(
    decay: float, debias: bool = True, accumulator_dtype: Any = None
) -> GradientTransformationExtraArgs:
    """Exponential moving average of the updates, optionally debiased.

    m_t = decay * m_{t-1} + (1 - decay) * g_t;   u_t = m_t / (1 - decay**t)  if debias else m_t

    Args:
      decay: averaging coefficient in [0, 1] (as in optax; 1 never moves the average).
      debias: divide by `1 - decay**t` so early averages are not biased towards zero.
      accumulator_dtype: dtype of the running average.

    Examples:
      >>> import gradxform as gx, jax.numpy as jnp
      >>> tx = gx.ema(0.9)
      >>> u, _ = tx.update(jnp.full(2, 4.0), tx.init(jnp.zeros(2)))
      >>> u
      Array([4., 4.], dtype=float32)

    Reference: Kingma & Ba, Adam: A Method for Stochastic Optimization, 2015 (debiasing).
    """
    check_range("decay", decay, 0.0, 1.0)
    accumulator_dtype = check_dtype("accumulator_dtype", accumulator_dtype)

    def init(params):
        return EmaState(step_counter(), optax.tree.zeros_like(params, accumulator_dtype))

    def update(updates, state, params=None):
        del params
        check_same_structure(updates, state.ema, "updates", "state.ema")
        count = optax.safe_increment(state.count)
        correction = 1 - decay**count  # float32: decay**t rounds to 1 in low precision

        def leaf(g, m_prev):
            m = (1 - decay) * g + decay * m_prev
            u = m / correction.astype(m.dtype) if debias else m
            return u.astype(g.dtype), m.astype(m_prev.dtype)

        updates, new_ema = tree_map_unzip(leaf, updates, state.ema, n=2, per_shape=False)
        return updates, EmaState(count, new_ema)

    return gradient_transformation(init, update)
