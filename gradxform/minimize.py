"""`minimize`: a full-batch optimization loop compiled into one `lax.while_loop`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradxform._base import GradientTransformation, Params
from gradxform._checks import check_range
from gradxform._tree import global_norm
from gradxform.lbfgs import lbfgs


class MinimizeResult(NamedTuple):
    """What `minimize` returns (arrays; `state` is the optimizer's final state)."""

    params: Params  # the last iterate
    value: jax.Array  # fun(params, *args), float32 or wider
    grad_norm: jax.Array  # float32 ||grad fun(params)||
    steps: jax.Array  # int32 optimizer steps taken
    converged: jax.Array  # bool: grad_norm <= tol
    fun_evals: jax.Array  # int32 evaluations of value_and_grad(fun), line searches included
    state: Any  # the optimizer state (`gx.read_health(result.state)` reads its records)


class _Carry(NamedTuple):
    params: Params
    state: Any
    value: jax.Array
    grad: Params
    steps: jax.Array
    fun_evals: jax.Array
    moved: jax.Array  # bool: the last update was not all zeros


def minimize(
    fun: Callable[..., jax.Array],
    params: Params,
    *,
    args: tuple = (),
    tx: GradientTransformation | None = None,
    max_steps: int = 500,
    tol: float = 1e-5,
) -> MinimizeResult:
    """Minimize `fun(params, *args)` with `tx`, the whole loop in one jitted `lax.while_loop`.

    Each step: u, state = tx.update(g, state, w, value=f(w), grad=g, value_fn=f);
    w <- w + u; then f(w) and g = grad f(w) are taken from the state when a line search left
    them there (`state.value`, `state.grad`, as `optax.value_and_grad_from_state` does: no
    evaluation is repeated), else computed once. It stops when ||g|| <= `tol` (float32 norm),
    after `max_steps` steps, when the value is not finite, or when a step leaves the params
    where they were (a line search that found no finite point with a lower value).

    Any transform works: `gx.lbfgs()` (default), `optax.lbfgs()`, or a first-order optimizer
    such as `gx.adam(1e-2)` (the extra arguments are ignored by transforms that take none).
    The compiled loop is cached on (`fun`, `tx`, shapes and dtypes): a second call with new
    `params`, `args`, `max_steps` or `tol` does not recompile. It can also be called inside
    `jit` or `vmap`.

    Full-batch training: `result = gx.minimize(loss, params, args=(x, y), tx=gx.lbfgs())`
    with `loss(params, x, y) -> scalar` over the whole data set; then `result.params`,
    `result.value`, `result.converged`, and `gx.read_health(result.state)` for the last step's
    line-search and curvature records.

    Args:
      fun: the objective, `fun(params, *args) -> scalar`, differentiable in `params`.
      params: the initial point, a pytree of floating arrays.
      args: extra positional arguments of `fun` (data); arrays are traced, not baked in.
      tx: the optimizer (default `gx.lbfgs()`).
      max_steps: maximum number of optimizer steps, >= 0.
      tol: stop when the gradient's L2 norm is <= tol (>= 0).

    Returns:
      A `MinimizeResult(params, value, grad_norm, steps, converged, fun_evals, state)`.

    Examples:
      >>> import gradxform as gx, jax.numpy as jnp
      >>> f = lambda w, c: jnp.sum((w - c) ** 2)
      >>> result = gx.minimize(f, jnp.zeros(3), args=(jnp.arange(3.0),))
      >>> result.params, bool(result.converged), int(result.steps)
      (Array([0., 1., 2.], dtype=float32), True, 2)

    Reference: Nocedal & Wright, Numerical Optimization, 1999, chapter 7 (L-BFGS).
    """
    check_range("max_steps", max_steps, 0)
    check_range("tol", tol, 0.0)
    if not callable(fun):
        raise TypeError(f"`fun` must be a callable `fun(params, *args) -> scalar`, got {fun!r}.")
    if not isinstance(args, tuple):
        raise TypeError(f"`args` must be a tuple of extra arguments of `fun`, got {args!r}.")
    tx = _default_tx() if tx is None else tx
    if not isinstance(tx, GradientTransformation):
        raise TypeError(f"`tx` must be a gradient transformation, got {type(tx).__name__}.")
    steps, tol = jnp.asarray(max_steps, jnp.int32), jnp.asarray(tol, jnp.float32)
    return _solve(fun, tx, params, args, steps, tol)


@functools.cache
def _default_tx() -> GradientTransformation:
    return lbfgs()  # one object, so repeated calls hit the same compiled loop


@functools.partial(jax.jit, static_argnums=(0, 1))
def _solve(fun, tx, params, args, max_steps, tol) -> MinimizeResult:
    def value_fn(p):
        return fun(p, *args)

    value, grad = jax.value_and_grad(value_fn)(params)
    value = _wide(value)
    one, true = jnp.ones([], jnp.int32), jnp.ones([], bool)
    start = _Carry(params, tx.init(params), value, grad, 0 * one, one, true)

    def going(c: _Carry) -> jax.Array:
        under_budget = (c.steps < max_steps) & c.moved
        return under_budget & (global_norm(c.grad) > tol) & jnp.isfinite(c.value)

    def step(c: _Carry) -> _Carry:
        updates, state = tx.update(
            c.grad, c.state, c.params, value=c.value, grad=c.grad, value_fn=value_fn
        )
        params = optax.apply_updates(c.params, updates)
        value, grad, evals = _value_and_grad_after(value_fn, params, state, c)
        moved = global_norm(updates) > 0
        return _Carry(params, state, value, grad, c.steps + 1, c.fun_evals + evals, moved)

    end = jax.lax.while_loop(going, step, start)
    norm = global_norm(end.grad)
    return MinimizeResult(
        end.params, end.value, norm, end.steps, norm <= tol, end.fun_evals, end.state
    )


def _wide(value: jax.Array) -> jax.Array:
    value = jnp.asarray(value)
    return value.astype(jnp.promote_types(value.dtype, jnp.float32))


def _value_and_grad_after(value_fn, params, state, c: _Carry):
    """f(w), grad f(w) at the new params: the line search's (if finite) or computed; evals."""
    compute = jax.value_and_grad(value_fn)
    cached_value, cached_grad = optax.tree.get(state, "value"), optax.tree.get(state, "grad")
    if cached_value is None or cached_grad is None:
        value, grad = compute(params)
        return _wide(value).astype(c.value.dtype), grad, jnp.ones([], jnp.int32)

    def fresh(_):
        value, grad = compute(params)
        return _wide(value).astype(c.value.dtype), _like(grad, c.grad)

    reuse = jnp.isfinite(cached_value)
    cached = (jnp.asarray(cached_value).astype(c.value.dtype), _like(cached_grad, c.grad))
    value, grad = jax.lax.cond(reuse, lambda _: cached, fresh, None)
    searched = optax.tree.get(state, "num_linesearch_steps")
    searched = jnp.zeros([], jnp.int32) if searched is None else searched.astype(jnp.int32)
    return value, grad, searched + jnp.where(reuse, 0, 1).astype(jnp.int32)


def _like(tree: Params, like: Params) -> Params:
    return jax.tree.map(lambda x, y: x.astype(y.dtype), tree, like)
