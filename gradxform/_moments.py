"""Running moments of a scalar statistic (a norm, its log): exact over a warm-up, exponential
after it; the z-scores the adaptive clips, guards and telemetry compare against."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class Moments(NamedTuple):
    """Running mean and variance of a scalar: exact over a warm-up, exponential after it."""

    n: jax.Array  # int32 observations absorbed (saturating)
    mean: jax.Array  # float32
    var: jax.Array  # float32 population variance


def moments_init() -> Moments:
    return Moments(jnp.zeros([], jnp.int32), jnp.zeros([], jnp.float32), jnp.zeros([], jnp.float32))


def moments_update(m: Moments, x: jax.Array, decay: float, warmup: int, accept=True) -> Moments:
    """Absorb `x` where `accept`: Welford's exact mean/variance for the first `warmup`
    observations, then the exponentially weighted mean and variance with rate `1 - decay`.

    Both are  mean += w * d;  var += w * ((1 - w) * d**2 - var),  d = x - mean,
    with w = 1/n during warm-up and w = 1 - decay after it.
    """
    n = optax.safe_increment(m.n)
    w = jnp.where(m.n < warmup, 1.0 / n.astype(jnp.float32), 1.0 - decay)
    d = x - m.mean
    new = Moments(n, m.mean + w * d, m.var + w * ((1 - w) * d * d - m.var))
    return optax.tree.where(accept, new, m)


# Floor on the spread of log||g|| in z-scores (`health`, `skip_if`): z > 4 then means at least
# e**1 (~2.7x) above the running level, however steady the history has been.
LOG_NORM_MIN_STD = 0.25


def moments_std(m: Moments, min_std: float = 1e-6) -> jax.Array:
    """`max(std, min_std)`: the spread z-scores divide by.

    `min_std` keeps a very steady history from turning a small wobble into a large z-score.
    """
    return jnp.maximum(jnp.sqrt(jnp.maximum(m.var, 0.0)), min_std)


def moments_zscore(m: Moments, x: jax.Array, warmup: int, min_std: float = 1e-6) -> jax.Array:
    """`(x - mean) / moments_std(m, min_std)`, or 0 before `warmup` observations (no basis)."""
    z = (x - m.mean) / moments_std(m, min_std)
    return jnp.where(m.n >= warmup, z, 0.0)
