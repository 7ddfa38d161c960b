"""L-BFGS: optax's maths, float32 reductions, a line search that rejects non-finite points,
and a record of every step that `read_health` reads.

`lbfgs = chain(scale_by_lbfgs, scale(-1) or scale_by_learning_rate, line search)`, as in optax.
The line search is optax's zoom line search, wrapped (`scale_by_finite_zoom_linesearch`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradxform._base import (
    GradientTransformation,
    GradientTransformationExtraArgs,
    Params,
    Updates,
    gradient_transformation,
    step_counter,
)
from gradxform._checks import check_range
from gradxform.learning_rate import scale, scale_by_learning_rate


def _wide(dtype: Any) -> Any:
    """The dtype reductions of `dtype` values accumulate in: float32, or wider if it is."""
    return jnp.promote_types(dtype, jnp.float32)


def _upcast(tree: Any) -> Any:
    return jax.tree.map(lambda x: x.astype(_wide(x.dtype)), tree)


def _cast_like(tree: Any, like: Any) -> Any:
    return jax.tree.map(lambda x, y: x.astype(y.dtype), tree, like)


def _vdot(a: Updates, b: Updates) -> jax.Array:
    """`<a, b>` over all leaves, each leaf accumulated in float32 or wider."""
    dots = [
        jnp.vdot(x.astype(_wide(x.dtype)), y.astype(_wide(y.dtype)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    ]
    return sum(dots[1:], dots[0]).real if dots else jnp.zeros([], jnp.float32)


def _axpy(alpha: jax.Array, x: Updates, y: Updates) -> Updates:
    """`y + alpha * x` leaf by leaf, computed in float32 or wider and returned in `y`'s dtype."""
    return jax.tree.map(
        lambda xi, yi: (yi.astype(_wide(yi.dtype)) + alpha * xi.astype(_wide(xi.dtype))).astype(
            yi.dtype
        ),
        x,
        y,
    )


# ----------------------------------------------------------------------------- the direction


class LbfgsRecord(NamedTuple):
    """What `scale_by_lbfgs` did with the curvature pair of its last step."""

    record_kind = "lbfgs"  # telemetry: read by `read_health` under this name
    curvature: jax.Array  # s . y of the pair stored this step (0 on the first step)
    pair_skipped: jax.Array  # bool: the pair got weight 0 (s . y == 0, optax's rule)
    identity_scale: jax.Array  # gamma, the initial inverse-Hessian scale used this step


class ScaleByLbfgsState(NamedTuple):
    count: jax.Array  # int32 step counter, saturating
    params: Params  # parameters seen on the last step
    updates: Updates  # incoming updates (gradients) seen on the last step
    diff_params_memory: Updates  # s_j = w_{j+1} - w_j, stacked on a leading memory axis
    diff_updates_memory: Updates  # y_j = g_{j+1} - g_j, stacked the same way
    weights_memory: jax.Array  # rho_j = 1 / (s_j . y_j), float32 or wider; 0 for no pair
    record: LbfgsRecord


def _two_loop(g: Updates, state: ScaleByLbfgsState, gamma: jax.Array, newest: jax.Array):
    """H g by the two-loop recursion over the stored pairs, oldest slot `newest + 1`."""
    memory_size = state.weights_memory.shape[0]
    order = (newest + 1 + jnp.arange(memory_size)) % memory_size  # oldest to newest

    def pair(i):
        return jax.tree.map(lambda m: m[i], (state.diff_params_memory, state.diff_updates_memory))

    def backward(q, i):  # newest to oldest: alpha_i = rho_i s_i.q;  q -= alpha_i y_i
        s, y = pair(i)
        alpha = state.weights_memory[i] * _vdot(s, q)
        return _axpy(-alpha, y, q), alpha

    q, alphas = jax.lax.scan(backward, g, order, reverse=True)
    r = jax.tree.map(lambda x: (gamma * x.astype(_wide(x.dtype))).astype(x.dtype), q)

    def forward(r, i_alpha):  # oldest to newest: beta = rho_i y_i.r;  r += (alpha_i - beta) s_i
        i, alpha = i_alpha
        s, y = pair(i)
        beta = state.weights_memory[i] * _vdot(y, r)
        return _axpy(alpha - beta, s, r), None

    return jax.lax.scan(forward, r, (order, alphas))[0]


def scale_by_lbfgs(
    memory_size: int = 10, scale_init_precond: bool = True
) -> GradientTransformationExtraArgs:
    """Multiply the updates by the L-BFGS approximation H of the inverse Hessian (optax's maths).

    With s_j = w_{j+1} - w_j and y_j = g_{j+1} - g_j for the last `memory_size` steps,
    rho_j = 1 / (s_j . y_j) (0 when s_j . y_j == 0: the pair is skipped), and the initial scale
    gamma = (s . y) / (y . y) of the newest pair (`scale_init_precond`; min(1, 1/||g||) on the
    first step; 1 without it), u = H g by the two-loop recursion:

      q = g;  for j newest..oldest: a_j = rho_j s_j.q,  q -= a_j y_j
      r = gamma q;  for j oldest..newest: b = rho_j y_j.r,  r += (a_j - b) s_j;  u = r

    Same iterates as `optax.scale_by_lbfgs` in float32 and float64; the dot products and the
    memory weights accumulate in float32 (at least) for low-precision params. The state's
    `record` holds this step's curvature s.y, whether the pair was skipped, and gamma.

    Args:
      memory_size: number of (s, y) pairs kept, >= 1.
      scale_init_precond: scale the initial inverse Hessian by gamma (else the identity).

    Examples:
      >>> import gradxform as gx, jax.numpy as jnp
      >>> tx = gx.scale_by_lbfgs()
      >>> tx.update(jnp.array([3.0, 4.0]), tx.init(jnp.zeros(2)), jnp.zeros(2))[0]
      Array([0.6, 0.8], dtype=float32)

    Reference: Nocedal & Wright, Numerical Optimization, 1999, algorithms 7.4 and 7.5;
    Liu & Nocedal, On the limited memory BFGS method for large scale optimization, 1989.
    """
    _check_memory_size(memory_size)

    def init(params):
        wide = jnp.result_type(*[_wide(x.dtype) for x in jax.tree.leaves(params)] or [float])
        memory = jax.tree.map(lambda x: jnp.zeros((memory_size, *x.shape), x.dtype), params)
        zero = jnp.zeros([], wide)
        return ScaleByLbfgsState(
            count=step_counter(),
            params=jax.tree.map(jnp.zeros_like, params),
            updates=jax.tree.map(jnp.zeros_like, params),
            diff_params_memory=memory,
            diff_updates_memory=memory,
            weights_memory=jnp.zeros([memory_size], wide),
            record=LbfgsRecord(zero, jnp.zeros([], bool), zero),
        )

    def update(updates, state, params):
        if params is None:
            raise ValueError("`scale_by_lbfgs` needs `params`: call `tx.update(g, state, params)`.")
        started = state.count > 0
        newest = (state.count - 1) % memory_size  # the slot this step's pair goes into
        s, y = _diff(params, state.params, started), _diff(updates, state.updates, started)
        sy = _vdot(s, y).astype(state.weights_memory.dtype)
        rho = jnp.where(sy == 0, 0.0, 1.0 / sy).astype(sy.dtype)
        state = state._replace(
            diff_params_memory=_store(state.diff_params_memory, newest, s),
            diff_updates_memory=_store(state.diff_updates_memory, newest, y),
            weights_memory=state.weights_memory.at[newest].set(rho),
        )
        gamma = _initial_scale(updates, s, y, sy, started) if scale_init_precond else 1.0
        gamma = jnp.asarray(gamma, sy.dtype)
        direction = _two_loop(updates, state, gamma, newest)
        record = LbfgsRecord(sy, started & (sy == 0), gamma)
        return direction, state._replace(
            count=optax.safe_increment(state.count),
            params=_cast_like(params, state.params),
            updates=_cast_like(updates, state.updates),
            record=record,
        )

    return gradient_transformation(init, update)


def _diff(new: Updates, old: Updates, started: jax.Array) -> Updates:
    """`new - old` leaf by leaf in `old`'s dtype; zeros before the first step."""
    return jax.tree.map(lambda a, b: jnp.where(started, a - b, 0).astype(b.dtype), new, old)


def _store(memory: Updates, slot: jax.Array, tree: Updates) -> Updates:
    """`tree` written into row `slot` of the stacked `memory`."""
    return jax.tree.map(lambda m, x: m.at[slot].set(x), memory, tree)


def _initial_scale(g, s, y, sy, started) -> jax.Array:
    """gamma = s.y / y.y (1 if y = 0); on the first step min(1, 1 / ||g||) instead."""
    yy = _vdot(y, y)
    gamma = jnp.where(yy > 0, sy / jnp.where(yy > 0, yy, 1), 1.0)
    first = jnp.minimum(1.0, 1.0 / jnp.sqrt(_vdot(g, g)))
    return jnp.where(started, gamma, first)


def _check_memory_size(memory_size: Any) -> None:
    if isinstance(memory_size, bool) or not isinstance(memory_size, int):
        raise TypeError(f"`memory_size` must be an int >= 1, got {memory_size!r}.")
    check_range("memory_size", memory_size, 1)


# ----------------------------------------------------------------------------- the line search


class LinesearchRecord(NamedTuple):
    """What the line search did on its last step."""

    record_kind = "linesearch"  # telemetry: read by `read_health` under this name
    steps: jax.Array  # int32 function evaluations (points tried) in the line search
    step_size: jax.Array  # the step size taken (0: no point with sufficient decrease)
    decrease_error: jax.Array  # > 0: the sufficient-decrease (Armijo) condition failed
    curvature_error: jax.Array  # > 0: the curvature (strong Wolfe) condition failed


class ScaleByFiniteZoomLinesearchState(NamedTuple):
    inner: optax.ScaleByZoomLinesearchState  # optax's state: `value`, `grad` at the new params
    record: LinesearchRecord


def _guarded(value_fn: Callable, kwargs: dict[str, Any], like: Params) -> Callable:
    """`value_fn(p, **kwargs)` on upcast params `p` whose value is +inf where the value or the
    gradient is not finite; one evaluation of `value_and_grad(value_fn)` per call."""

    def value_and_grad(p):
        value, grad = jax.value_and_grad(value_fn)(_cast_like(p, like), **kwargs)
        finite = jnp.isfinite(value)
        for g in jax.tree.leaves(grad):
            finite &= jnp.all(jnp.isfinite(g))
        value = jnp.where(finite, value, jnp.inf).astype(_wide(jnp.result_type(value)))
        return value, _upcast(grad)

    @jax.custom_vjp
    def fn(p):
        return value_and_grad(p)[0]

    fn.defvjp(value_and_grad, lambda grad, ct: (jax.tree.map(lambda g: ct * g, grad),))
    return fn


def _value_fn_kwargs(value_fn: Callable, extra: dict[str, Any]) -> dict[str, Any]:
    """The extra keyword arguments that `value_fn` takes; a `TypeError` names any other."""
    names = inspect.signature(value_fn).parameters
    unused = sorted(k for k in extra if k not in names)
    if unused:
        raise TypeError(
            f"Extra arguments {unused} passed to the line search's update are not arguments of "
            f"`value_fn` (which takes {list(names)}): pass data that `value_fn` reads by the "
            "name of its parameter, or close over it."
        )
    return extra


def scale_by_finite_zoom_linesearch(
    max_linesearch_steps: int, **zoom_kwargs: Any
) -> GradientTransformationExtraArgs:
    """optax's zoom line search (strong Wolfe conditions) that never accepts a non-finite point.

    Finds a step size eta with  f(w + eta u) <= f(w) + c1 eta <u, g>  and
    |<grad f(w + eta u), u>| <= c2 |<u, g>|, and returns eta u. It runs
    `optax.scale_by_zoom_linesearch(max_linesearch_steps, **zoom_kwargs)` (same arguments,
    same iterates) on a wrapped `value_fn` whose value is +inf wherever the value *or the
    gradient* is not finite: a point with a finite loss but a NaN or infinite gradient is
    rejected (optax could accept it as its safe step when `approx_dec_rtol=None`), the search
    backtracks from it, and when no finite point decreases the loss the step is 0. The wrapper
    is a `jax.custom_vjp`, so each point still costs one `value_and_grad`. For params below
    float32 the search (values, slopes, step sizes) runs on float32 copies; the loss is
    evaluated in the params' dtypes. The state's `record` holds the number of points tried,
    the step size and the two criteria's errors; `inner.value` and `inner.grad` are the value
    and gradient at the new params, for `optax.value_and_grad_from_state` and `gx.minimize`.

    Called as optax's: `update(g, state, params, value=f(w), grad=g, value_fn=f, **data)`,
    where `data` are keyword arguments of `value_fn`.

    Args:
      max_linesearch_steps: maximum number of points tried per step, >= 1.
      **zoom_kwargs: any other argument of `optax.scale_by_zoom_linesearch`
        (`max_learning_rate`, `slope_rtol`, `curv_rtol`, `initial_guess_strategy`, ...).

    Examples:
      >>> import gradxform as gx, jax.numpy as jnp
      >>> f = lambda w: jnp.sum((w - 1.0) ** 2)
      >>> tx = gx.scale_by_finite_zoom_linesearch(10)
      >>> w = jnp.zeros(2)
      >>> g = -2.0 * jnp.ones(2)
      >>> u, state = tx.update(-g, tx.init(w), w, value=f(w), grad=g, value_fn=f)
      >>> u, state.record.step_size
      (Array([1., 1.], dtype=float32), Array(0.5, dtype=float32))

    Reference: Nocedal & Wright, Numerical Optimization, 1999, algorithms 3.5 and 3.6.
    """
    check_range("max_linesearch_steps", max_linesearch_steps, 1)
    inner = optax.scale_by_zoom_linesearch(max_linesearch_steps, **zoom_kwargs)

    def init(params):
        state = inner.init(_upcast(params))
        zero = jnp.zeros([], state.learning_rate.dtype)
        return ScaleByFiniteZoomLinesearchState(
            state, LinesearchRecord(jnp.zeros([], jnp.int32), zero, zero, zero)
        )

    def update(updates, state, params, *, value, grad, value_fn, **extra):
        if params is None:
            raise ValueError("The line search needs `params`: call `tx.update(g, state, params)`.")
        kwargs = _value_fn_kwargs(value_fn, extra)
        fn = _guarded(value_fn, kwargs, params)
        wide_value = jnp.asarray(value).astype(state.inner.value.dtype)
        step, new = inner.update(
            _upcast(updates), state.inner, _upcast(params), value=wide_value,
            grad=_upcast(grad), value_fn=fn,
        )  # fmt: skip
        dtype = new.learning_rate.dtype
        record = LinesearchRecord(
            new.info.num_linesearch_steps.astype(jnp.int32), new.learning_rate,
            new.info.decrease_error.astype(dtype), new.info.curvature_error.astype(dtype),
        )  # fmt: skip
        return _cast_like(step, updates), ScaleByFiniteZoomLinesearchState(new, record)

    return gradient_transformation(init, update, extra_args=True)


# ----------------------------------------------------------------------------- the optimizer

# optax's default for `lbfgs`: 20 points, initial guess 1 (not the previous step size).
DEFAULT_LINESEARCH = scale_by_finite_zoom_linesearch(20, initial_guess_strategy="one")


def lbfgs(
    learning_rate: Any = None,
    memory_size: int = 10,
    scale_init_precond: bool = True,
    linesearch: GradientTransformation | None = DEFAULT_LINESEARCH,
) -> GradientTransformationExtraArgs:
    """L-BFGS: `chain(scale_by_lbfgs, scale(-1) or scale_by_learning_rate, linesearch)`.

    w_{t+1} = w_t - eta_t H_t g_t,  H_t the L-BFGS inverse Hessian (`scale_by_lbfgs`), eta_t
    from the line search (times `learning_rate`, if given). optax's `lbfgs` with the same
    signature, defaults and iterates; the default line search is optax's zoom line search
    (20 points, initial guess 1) wrapped to reject non-finite points
    (`scale_by_finite_zoom_linesearch`), and the state records, per step, the curvature pair
    (`lbfgs/curvature`, `lbfgs/pair_skipped`) and the line search (`linesearch/steps`,
    `linesearch/step_size`, ...) for `read_health`.

    Full batch: the whole loop runs in one compiled `lax.while_loop` with
    `gx.minimize(loss, params, args=(x, y), tx=gx.lbfgs())`. By hand, as with optax:
    `value, grad = optax.value_and_grad_from_state(f)(params, state=state)` (reuses the line
    search's value and gradient at the new params), then
    `tx.update(grad, state, params, value=value, grad=grad, value_fn=f)`. With a line search,
    do not clip or rescale the gradient before it: the search needs the true value and gradient.

    Args:
      learning_rate: optional float or optax schedule scaling the direction; `None` (default)
        leaves the step size to the line search.
      memory_size: number of curvature pairs kept, >= 1.
      scale_init_precond: scale the initial inverse Hessian by s.y / y.y.
      linesearch: a transform taking `value`, `grad`, `value_fn` (e.g.
        `optax.scale_by_zoom_linesearch(...)`), or `None` for none.

    Examples:
      >>> import gradxform as gx, jax.numpy as jnp, optax
      >>> f = lambda w: jnp.sum((w - jnp.arange(3.0)) ** 2)
      >>> tx, w = gx.lbfgs(), jnp.zeros(3)
      >>> state = tx.init(w)
      >>> for _ in range(2):
      ...     value, grad = optax.value_and_grad_from_state(f)(w, state=state)
      ...     u, state = tx.update(grad, state, w, value=value, grad=grad, value_fn=f)
      ...     w = optax.apply_updates(w, u)
      >>> w
      Array([0., 1., 2.], dtype=float32)

    Reference: Nocedal & Wright, Numerical Optimization, 1999, algorithms 7.4, 7.5, 3.5, 3.6;
    Liu & Nocedal, On the limited memory BFGS method for large scale optimization, 1989.
    """
    _check_memory_size(memory_size)
    if not isinstance(scale_init_precond, bool):
        raise TypeError(f"`scale_init_precond` must be a bool, got {scale_init_precond!r}.")
    if linesearch is not None and not isinstance(linesearch, GradientTransformation):
        raise TypeError(
            "`linesearch` must be a gradient transformation taking `value`, `grad` and "
            "`value_fn` (e.g. `gx.scale_by_finite_zoom_linesearch(20)`) or None, got "
            f"{type(linesearch).__name__}."
        )
    rate = scale(-1.0) if learning_rate is None else scale_by_learning_rate(learning_rate)
    parts = (scale_by_lbfgs(memory_size, scale_init_precond), rate)
    return optax.chain(*parts, *(() if linesearch is None else (linesearch,)))
