"""Annealed Gaussian gradient noise."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradxform._base import (
    GradientTransformationExtraArgs,
    check_nonnegative,
    gradient_transformation,
    safe_increment,
    step_counter,
)


class AddNoiseState(NamedTuple):
    count: jax.Array  # int32 step counter (saturating), drives the annealing
    key: jax.Array  # raw uint32 PRNG key data (checkpoint-friendly), split once per step


def add_noise(eta: float, gamma: float, key: jax.Array | int) -> GradientTransformationExtraArgs:
    """Add Gaussian noise whose variance decays with the step: `eta / (1 + t)**gamma`.

    u_t = g_t + sqrt(eta / (1 + t)**gamma) * n_t,   n_t ~ N(0, I),   t = 0, 1, ...

    The key lives in the state, so the same seed gives the same noise, and replicas under
    `pmap` (which hold replicated state) add identical noise. The noise matches
    `optax.add_noise` bit for bit for the same key.

    Args:
      eta: base variance, >= 0 (the paper uses 0.01, 0.3 or 1.0).
      gamma: annealing exponent, >= 0 (the paper uses 0.55).
      key: a PRNG key of any implementation (`jax.random.key(0, impl="rbg")`), a raw
        `jax.random.PRNGKey(0)`, or an integer seed.

    Examples:
      >>> import gradxform as gx, jax.numpy as jnp
      >>> tx = gx.add_noise(eta=0.0, gamma=0.55, key=0)
      >>> u, _ = tx.update(jnp.ones(3), tx.init(jnp.zeros(3)))
      >>> u
      Array([1., 1., 1.], dtype=float32)

    Reference: Neelakantan et al., Adding Gradient Noise Improves Learning for Very Deep
    Networks, 2015.
    """
    check_nonnegative("eta", eta)
    check_nonnegative("gamma", gamma)
    if isinstance(key, int):
        key = jax.random.key(key)
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)  # a raw PRNGKey array: the default implementation
    impl = jax.random.key_impl(key)  # kept, so e.g. an "rbg" key stays an "rbg" key
    key = jax.random.key_data(key)

    def init(params):
        del params
        return AddNoiseState(step_counter(), jnp.asarray(key))

    def update(updates, state, params=None):
        del params
        count = safe_increment(state.count)
        std = jnp.sqrt(eta / count**gamma)
        next_key, sample_key = jax.random.split(jax.random.wrap_key_data(state.key, impl=impl))
        noise = optax.tree.random_like(sample_key, updates, jax.random.normal)
        updates = jax.tree.map(lambda g, n: (g + std * n).astype(g.dtype), updates, noise)
        return updates, AddNoiseState(count, jax.random.key_data(next_key))

    return gradient_transformation(init, update)
