"""Annealed Gaussian gradient noise."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradxform._base import GradientTransformationExtraArgs, gradient_transformation, step_counter
from gradxform._checks import check_integer, check_nonnegative


class AddNoiseState(NamedTuple):
    count: jax.Array  # int32 step counter (saturating), drives the annealing
    key: jax.Array  # raw uint32 PRNG key data (checkpoint-friendly), split once per step


def _key_data(key: Any) -> tuple[jax.Array, Any]:
    """(raw key data, implementation) of a typed key, a raw `PRNGKey` array or a seed."""
    if isinstance(key, int | np.integer) and not isinstance(key, bool):
        key = jax.random.key(key)
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)  # a raw PRNGKey array: the default implementation
    return jax.random.key_data(key), jax.random.key_impl(key)


def add_noise(
    eta: float, gamma: float, key: jax.Array | int | None = None, *, seed: int | None = None
) -> GradientTransformationExtraArgs:
    """Add Gaussian noise whose variance decays with the step: `eta / (1 + t)**gamma`.

    u_t = g_t + sqrt(eta / (1 + t)**gamma) * n_t,   n_t ~ N(0, I),   t = 0, 1, ...

    The key lives in the state, so the same seed gives the same noise, and replicas under
    `pmap` (which hold replicated state) add identical noise. The noise matches
    `optax.add_noise` bit for bit for the same key. A seed becomes a key in `init`, so it is
    placed like the rest of the state (e.g. under the `jax.set_mesh` in force there).

    Args:
      eta: base variance, >= 0 and finite (the paper uses 0.01, 0.3 or 1.0).
      gamma: annealing exponent, >= 0 (the paper uses 0.55).
      key: a PRNG key of any implementation (`jax.random.key(0, impl="rbg")`), a raw
        `jax.random.PRNGKey(0)`, or an integer seed; `None` (the default) means seed 0.
      seed: an integer seed, optax's older spelling of `key=seed` (give one of the two).

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
    if seed is not None and key is not None:
        raise ValueError("Give one of `key` and `seed`, not both.")
    check_integer("seed", seed, 0, optional=True)
    key = seed if key is None else key
    key = 0 if key is None else key
    is_seed = isinstance(key, int | np.integer) and not isinstance(key, bool)
    dtype = getattr(key, "dtype", None)
    is_key = dtype is not None and (
        jnp.issubdtype(dtype, jax.dtypes.prng_key) or jnp.issubdtype(dtype, jnp.uint32)
    )
    if not (is_seed or is_key):
        raise TypeError(
            "`key` must be a PRNG key (`jax.random.key(0)`), a raw `jax.random.PRNGKey(0)` or "
            f"an integer seed, got {key!r}."
        )
    impl = _key_data(key)[1] if not is_seed else None  # seeds: the default implementation

    def init(params):
        del params
        return AddNoiseState(step_counter(), _key_data(key)[0])

    def update(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        std = jnp.sqrt(eta / count**gamma)
        next_key, sample_key = jax.random.split(jax.random.wrap_key_data(state.key, impl=impl))
        noise = optax.tree.random_like(sample_key, updates, jax.random.normal)
        updates = jax.tree.map(lambda g, n: (g + std * n).astype(g.dtype), updates, noise)
        return updates, AddNoiseState(count, jax.random.key_data(next_key))

    return gradient_transformation(init, update)
