"""Adaptive scaling: per-coordinate step sizes from gradient statistics (Adagrad to Adam).

Each rule is written for one array and lifted to pytrees once. Moments are computed in the
promoted dtype of gradient and moment, stored in `mu_dtype` / `nu_dtype` (default: the
params' dtype), and the returned update has the gradient's dtype. Bias corrections
`1 - beta**t` are computed in float32, where `beta**t` does not round to 1.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradxform._base import GradientTransformationExtraArgs, gradient_transformation, step_counter
from gradxform._checks import check_decay, check_dtype, check_nonnegative, check_same_structure
from gradxform._tree import abs_sq, moment_square, tree_map_unzip


def _full_like(params: Any, value: float, dtype: Any) -> Any:
    return jax.tree.map(lambda p: jnp.full_like(p, value, dtype=dtype), params)


def _debias(moment: jax.Array, decay: float, count: jax.Array) -> jax.Array:
    return moment / (1 - decay**count).astype(moment.dtype)


class ScaleByRssState(NamedTuple):
    sum_of_squares: Any  # running sum of g**2 (Adagrad accumulator)


def scale_by_rss(
    initial_accumulator_value: float = 0.1, eps: float = 1e-7
) -> GradientTransformationExtraArgs:
    """Adagrad's scaling: divide by the root of the running sum of squared gradients.

    s_t = s_{t-1} + g_t**2;   u_t = g_t / sqrt(s_t + eps)   (0 where s_t = 0)

    Args:
      initial_accumulator_value: starting value of `s`, >= 0.
      eps: >= 0, added inside the root.

    Examples:
      >>> import gradxform as gx, jax.numpy as jnp
      >>> tx = gx.scale_by_rss(initial_accumulator_value=0.0, eps=0.0)
      >>> u, _ = tx.update(jnp.array([2.0, -3.0]), tx.init(jnp.zeros(2)))
      >>> u
      Array([ 1., -1.], dtype=float32)

    Reference: Duchi et al., Adaptive Subgradient Methods for Online Learning and Stochastic
    Optimization, 2011.
    """
    check_nonnegative("initial_accumulator_value", initial_accumulator_value)
    check_nonnegative("eps", eps)

    def init(params):
        return ScaleByRssState(_full_like(params, initial_accumulator_value, None))

    def leaf(g, s_prev):
        s = moment_square(g, s_prev) + s_prev
        u = jnp.where(s > 0, jax.lax.rsqrt(s + eps), 0.0) * g
        return u.astype(g.dtype), s.astype(s_prev.dtype)

    def update(updates, state, params=None):
        del params
        check_same_structure(updates, state.sum_of_squares, "updates", "state.sum_of_squares")
        updates, s = tree_map_unzip(leaf, updates, state.sum_of_squares, n=2)
        return updates, ScaleByRssState(s)

    return gradient_transformation(init, update)


class ScaleByRmsState(NamedTuple):
    count: jax.Array  # int32 step counter (saturating), for the optional bias correction
    nu: Any  # EMA of squared gradients, dtype `nu_dtype`


def scale_by_rms(
    decay: float = 0.9,
    eps: float = 1e-8,
    initial_scale: float = 0.0,
    eps_in_sqrt: bool = True,
    bias_correction: bool = False,
    *,
    nu_dtype: Any = None,
) -> GradientTransformationExtraArgs:
    """RMSprop's scaling: divide by the root of an EMA of squared gradients.

    nu_t = decay * nu_{t-1} + (1 - decay) * g_t**2
    u_t = g_t / sqrt(nu_t + eps)   (or g_t / (sqrt(nu_t) + eps) with `eps_in_sqrt=False`)

    Args:
      decay: EMA rate in [0, 1].
      eps: >= 0, added to the denominator.
      initial_scale: starting value of `nu`, >= 0.
      eps_in_sqrt: add `eps` inside the root (optax's and TF's convention) or outside.
      bias_correction: divide `nu` by `1 - decay**t`.
      nu_dtype: dtype of `nu` (default: the params').

    Examples:
      >>> import gradxform as gx, jax.numpy as jnp
      >>> tx = gx.scale_by_rms(decay=0.0, eps=0.0)
      >>> u, _ = tx.update(jnp.array([2.0, -3.0]), tx.init(jnp.zeros(2)))
      >>> u
      Array([ 1., -1.], dtype=float32)

    Reference: Tieleman & Hinton, Lecture 6.5 - RMSProp, COURSERA, 2012.
    """
    return _scale_by_root_of_ema(
        decay, eps, initial_scale, eps_in_sqrt, bias_correction, None, nu_dtype, centered=False
    )


class ScaleByStddevState(NamedTuple):
    count: jax.Array  # int32 step counter (saturating), for the optional bias correction
    mu: Any  # EMA of gradients, dtype `mu_dtype`
    nu: Any  # EMA of squared gradients, dtype `nu_dtype`


def scale_by_stddev(
    decay: float = 0.9,
    eps: float = 1e-8,
    initial_scale: float = 0.0,
    eps_in_sqrt: bool = True,
    bias_correction: bool = False,
    *,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
) -> GradientTransformationExtraArgs:
    """Centered RMSprop's scaling: divide by a running estimate of the gradients' stddev.

    mu_t = decay * mu_{t-1} + (1 - decay) * g_t;   nu_t = decay * nu_{t-1} + (1 - decay) * g_t**2
    u_t = g_t / sqrt(nu_t - mu_t**2 + eps)

    Args:
      decay: EMA rate in [0, 1].
      eps: >= 0, added to the denominator.
      initial_scale: starting value of `nu`, >= 0.
      eps_in_sqrt: add `eps` inside the root or outside.
      bias_correction: debias both moments by `1 - decay**t`.
      mu_dtype: dtype of `mu` (default: the params').
      nu_dtype: dtype of `nu` (default: the params').

    Examples:
      >>> import gradxform as gx, jax.numpy as jnp
      >>> tx = gx.scale_by_stddev(decay=0.5, eps=0.0)
      >>> u, _ = tx.update(jnp.array([2.0]), tx.init(jnp.zeros(1)))
      >>> u
      Array([2.], dtype=float32)

    Reference: Graves, Generating Sequences With Recurrent Neural Networks, 2013.
    """
    return _scale_by_root_of_ema(
        decay, eps, initial_scale, eps_in_sqrt, bias_correction, mu_dtype, nu_dtype, centered=True
    )


def _scale_by_root_of_ema(
    decay, eps, initial_scale, eps_in_sqrt, bias_correction, mu_dtype, nu_dtype, *, centered
) -> GradientTransformationExtraArgs:
    """`scale_by_rms` (`centered=False`) and `scale_by_stddev` (`centered=True`): one rule,
    g / sqrt(nu - mu**2 + eps), with the `mu` term only when centered."""
    check_decay("decay", decay)
    check_nonnegative("eps", eps)
    check_nonnegative("initial_scale", initial_scale)
    mu_dtype, nu_dtype = check_dtype("mu_dtype", mu_dtype), check_dtype("nu_dtype", nu_dtype)

    def init(params):
        nu = _full_like(params, initial_scale, nu_dtype)
        if centered:
            return ScaleByStddevState(step_counter(), optax.tree.zeros_like(params, mu_dtype), nu)
        return ScaleByRmsState(step_counter(), nu)

    def update(updates, state, params=None):
        del params
        check_same_structure(updates, state.nu, "updates", "state.nu")
        count = optax.safe_increment(state.count)
        debias = (lambda x: _debias(x, decay, count)) if bias_correction else (lambda x: x)

        def leaf(g, nu_prev, mu_prev=None):
            nu = (1 - decay) * moment_square(g, nu_prev) + decay * nu_prev
            var, moments = debias(nu), (nu.astype(nu_prev.dtype),)
            if centered:
                mu = (1 - decay) * g + decay * mu_prev
                var, moments = var - abs_sq(debias(mu)), (*moments, mu.astype(mu_prev.dtype))
            scaling = jax.lax.rsqrt(var + eps) if eps_in_sqrt else 1 / (jnp.sqrt(var) + eps)
            return ((scaling * g).astype(g.dtype), *moments)

        if not centered:
            updates, nu = tree_map_unzip(leaf, updates, state.nu, n=2)
            return updates, ScaleByRmsState(count, nu)
        updates, nu, mu = tree_map_unzip(leaf, updates, state.nu, state.mu, n=3)
        return updates, ScaleByStddevState(count, mu, nu)

    return gradient_transformation(init, update)


class ScaleByAdamState(NamedTuple):
    count: jax.Array  # int32 step counter (saturating), for the bias corrections
    mu: Any  # first moment (EMA of g), dtype `mu_dtype`
    nu: Any  # second moment (EMA of g**2), dtype `nu_dtype`


def _check_adam(b1, b2, eps, eps_root):
    check_decay("b1", b1)
    check_decay("b2", b2)
    check_nonnegative("eps", eps)
    check_nonnegative("eps_root", eps_root)


def scale_by_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    *,
    nesterov: bool = False,
    nu_dtype: Any = None,
) -> GradientTransformationExtraArgs:
    """Adam's scaling: debiased first moment over the root of the debiased second moment.

    mu_t = b1 * mu_{t-1} + (1 - b1) * g_t;   nu_t = b2 * nu_{t-1} + (1 - b2) * g_t**2
    m_t = mu_t / (1 - b1**t)
      (Nesterov: m_t = b1 * mu_t / (1 - b1**(t+1)) + (1 - b1) * g_t / (1 - b1**t))
    u_t = m_t / (sqrt(nu_t / (1 - b2**t) + eps_root) + eps)

    Args:
      b1: decay rate of the first moment, in [0, 1].
      b2: decay rate of the second moment, in [0, 1].
      eps: >= 0, added outside the root.
      eps_root: >= 0, added inside the root (keeps meta-gradients finite).
      mu_dtype: dtype of `mu` (e.g. `jnp.bfloat16` to halve its memory).
      nesterov: NAdam's look-ahead first moment.
      nu_dtype: dtype of `nu`.

    Examples:
      >>> import gradxform as gx, jax.numpy as jnp
      >>> tx = gx.scale_by_adam()
      >>> u, _ = tx.update(jnp.array([0.5, -2.0]), tx.init(jnp.zeros(2)))
      >>> u  # the first Adam step is sign(g), up to eps
      Array([ 1., -1.], dtype=float32)

    References: Kingma & Ba, Adam: A Method for Stochastic Optimization, 2015;
    Dozat, Incorporating Nesterov Momentum into Adam, 2016.
    """
    _check_adam(b1, b2, eps, eps_root)
    mu_dtype, nu_dtype = check_dtype("mu_dtype", mu_dtype), check_dtype("nu_dtype", nu_dtype)

    def init(params):
        return ScaleByAdamState(
            step_counter(),
            optax.tree.zeros_like(params, mu_dtype),
            optax.tree.zeros_like(params, nu_dtype),
        )

    def update(updates, state, params=None):
        del params
        check_same_structure(updates, state.mu, "updates", "state.mu")
        count = optax.safe_increment(state.count)

        def leaf(g, mu_prev, nu_prev):
            mu = (1 - b1) * g + b1 * mu_prev
            nu = (1 - b2) * moment_square(g, nu_prev) + b2 * nu_prev
            if nesterov:
                m = b1 * _debias(mu, b1, optax.safe_increment(count)) + (1 - b1) * _debias(
                    g, b1, count
                )
            else:
                m = _debias(mu, b1, count)
            u = m / (jnp.sqrt(_debias(nu, b2, count) + eps_root) + eps)
            return u.astype(g.dtype), mu.astype(mu_prev.dtype), nu.astype(nu_prev.dtype)

        updates, mu, nu = tree_map_unzip(leaf, updates, state.mu, state.nu, n=3)
        return updates, ScaleByAdamState(count, mu, nu)

    return gradient_transformation(init, update)


class ScaleByAmsgradState(NamedTuple):
    count: jax.Array  # int32 step counter (saturating)
    mu: Any  # first moment, dtype `mu_dtype`
    nu: Any  # second moment, dtype `nu_dtype`
    nu_max: Any  # running maximum of the (debiased) second moment, dtype `nu_dtype`


def scale_by_amsgrad(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    bias_correction_mu: bool = True,
    bias_correction_nu: bool = True,
    *,
    nu_dtype: Any = None,
) -> GradientTransformationExtraArgs:
    """AMSGrad's scaling: Adam with a non-decreasing second moment.

    nu_max_t = max(nu_max_{t-1}, nu_t / (1 - b2**t))
    u_t = m_t / (sqrt(nu_max_t + eps_root) + eps)

    Args:
      b1: decay rate of the first moment, in [0, 1].
      b2: decay rate of the second moment, in [0, 1].
      eps: >= 0, added outside the root.
      eps_root: >= 0, added inside the root.
      mu_dtype: dtype of `mu`.
      bias_correction_mu: debias the first moment.
      bias_correction_nu: debias the second moment before the maximum (set both `False` for the
        paper's original rule).
      nu_dtype: dtype of `nu` and `nu_max`.

    Examples:
      >>> import gradxform as gx, jax.numpy as jnp
      >>> tx = gx.scale_by_amsgrad()
      >>> u, _ = tx.update(jnp.array([0.5, -2.0]), tx.init(jnp.zeros(2)))
      >>> u
      Array([ 1., -1.], dtype=float32)

    Reference: Reddi et al., On the Convergence of Adam and Beyond, 2018.
    """
    _check_adam(b1, b2, eps, eps_root)
    mu_dtype, nu_dtype = check_dtype("mu_dtype", mu_dtype), check_dtype("nu_dtype", nu_dtype)

    def init(params):
        return ScaleByAmsgradState(  # nu and nu_max distinct buffers, so they can be donated
            step_counter(),
            optax.tree.zeros_like(params, mu_dtype),
            optax.tree.zeros_like(params, nu_dtype),
            optax.tree.zeros_like(params, nu_dtype),
        )

    def update(updates, state, params=None):
        del params
        check_same_structure(updates, state.mu, "updates", "state.mu")
        count = optax.safe_increment(state.count)

        def leaf(g, mu_prev, nu_prev, nu_max_prev):
            mu = (1 - b1) * g + b1 * mu_prev
            nu = (1 - b2) * moment_square(g, nu_prev) + b2 * nu_prev
            m = _debias(mu, b1, count) if bias_correction_mu else mu
            nu_max = jnp.maximum(nu_max_prev, _debias(nu, b2, count) if bias_correction_nu else nu)
            u = m / (jnp.sqrt(nu_max + eps_root) + eps)
            return (
                u.astype(g.dtype),
                mu.astype(mu_prev.dtype),
                nu.astype(nu_prev.dtype),
                nu_max.astype(nu_max_prev.dtype),
            )

        updates, mu, nu, nu_max = tree_map_unzip(
            leaf, updates, state.mu, state.nu, state.nu_max, n=4
        )
        return updates, ScaleByAmsgradState(count, mu, nu, nu_max)

    return gradient_transformation(init, update)


def scale_by_adamax(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> GradientTransformationExtraArgs:
    """Adamax's scaling: Adam with the infinity norm in place of the second moment.

    mu_t = b1 * mu_{t-1} + (1 - b1) * g_t;   nu_t = max(|g_t| + eps, b2 * nu_{t-1})
    u_t = mu_t / (1 - b1**t) / nu_t

    Args:
      b1: decay rate of the first moment, in [0, 1].
      b2: decay rate of the infinity norm, in [0, 1].
      eps: > 0 in practice, keeps `nu` away from zero.

    Examples:
      >>> import gradxform as gx, jax.numpy as jnp
      >>> tx = gx.scale_by_adamax(eps=0.0)
      >>> u, _ = tx.update(jnp.array([0.5, -2.0]), tx.init(jnp.zeros(2)))
      >>> u
      Array([ 1., -1.], dtype=float32)

    Reference: Kingma & Ba, Adam: A Method for Stochastic Optimization, 2015 (section 7).
    """
    _check_adam(b1, b2, eps, 0.0)

    def init(params):
        return ScaleByAdamState(
            step_counter(), optax.tree.zeros_like(params), optax.tree.zeros_like(params)
        )

    def update(updates, state, params=None):
        del params
        check_same_structure(updates, state.mu, "updates", "state.mu")
        count = optax.safe_increment(state.count)

        def leaf(g, mu_prev, nu_prev):
            mu = (1 - b1) * g + b1 * mu_prev
            nu = jnp.maximum(jnp.abs(g) + eps, b2 * nu_prev)
            u = _debias(mu, b1, count) / nu
            return u.astype(g.dtype), mu.astype(mu_prev.dtype), nu.astype(nu_prev.dtype)

        updates, mu, nu = tree_map_unzip(leaf, updates, state.mu, state.nu, n=3)
        return updates, ScaleByAdamState(count, mu, nu)

    return gradient_transformation(init, update)
