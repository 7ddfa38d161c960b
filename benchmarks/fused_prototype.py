"""Prototype fast path for `chain(clip_by_global_norm(c), adamw(...))`, outside the library.

Measured by `benchmarks/performance.py` (the `gx-fused` rows). On XLA:CPU an optimizer step's
compile time grows with the number of HLO instructions (the fusion and layout passes are
superlinear), and every leaf costs a reduction kernel for the global norm plus one kernel per
output (no multi-output fusion on CPU). Two changes cut that cost without changing the
public API:

- `clip_adamw` traces the whole per-leaf rule (clip scale, Adam, decoupled decay, learning
  rate) as one `jax.jit`-ed function, so JAX traces it once per distinct leaf (shape, dtype)
  instead of once per leaf. It performs exactly the unfused chain's floating-point operations
  in the same order, so under `jit` it is bit-for-bit identical to the chain (tested).
- `global_norm_grouped` concatenates the small leaves (biases, normalisation scales) and
  reduces each concatenation with one kernel; large leaves keep their own reduction, because
  concatenating them would allocate a model-sized temporary on every step. It changes the
  order of the float32 sum, so it is meant to *replace* `_base.global_norm`, keeping fused and
  unfused paths identical.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from gradxform._base import (
    ClipRecord,
    GradientTransformationExtraArgs,
    ScalarOrSchedule,
    chain,
    global_norm,
    gradient_transformation,
    resolve,
    safe_increment,
    scale_leaf,
)
from gradxform.adaptive import ScaleByAdamState, _debias
from gradxform.clipping import ClipState, clip_by_global_norm
from gradxform.decay import AddDecayedWeightsState
from gradxform.learning_rate import ScaleByScheduleState
from gradxform.optimizers import adamw

SMALL_LEAF = 1 << 14  # leaves of at most this many elements are reduced together
SMALL_TOTAL = 1 << 20  # elements per concatenation at most (a 4 MiB float32 temporary)


def global_norm_grouped(
    tree: Any,
    axis_name: str | None = None,
    *,
    small_leaf: int = SMALL_LEAF,
    small_total: int = SMALL_TOTAL,
) -> jax.Array:
    """`gx.global_norm` with one reduction kernel per group of small leaves.

    Leaves of at most `small_leaf` elements are raveled, converted to (at least) float32 and
    concatenated, `small_total` elements at most per concatenation, and each concatenation is
    reduced once; larger leaves are reduced one by one. A ResNet-50 (106 of its 161 leaves are
    BatchNorm vectors) then compiles a few reductions instead of one or two per leaf.

    Args:
      tree: a pytree of arrays.
      axis_name: optional mapped axis whose shards' squared sums are `psum`-ed.
      small_leaf: size limit of a leaf that joins a concatenation.
      small_total: size limit of one concatenation.

    Returns:
      The float32 L2 norm of all leaves together.

    Examples:
      >>> import jax.numpy as jnp
      >>> from gradxform._fused import global_norm_grouped
      >>> global_norm_grouped({"a": jnp.array([3.0]), "b": jnp.array([4.0], jnp.float16)})
      Array(5., dtype=float32)
    """
    total = jnp.zeros([], jnp.float32)
    group: list[jax.Array] = []
    size = 0

    def reduce_group():
        nonlocal total, group, size
        if group:
            flat = group[0] if len(group) == 1 else jnp.concatenate(group)
            total = total + jnp.sum(flat * flat)
        group, size = [], 0

    for x in jax.tree.leaves(tree):
        x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        if x.size > small_leaf:
            total = total + jnp.sum(x * x)
            continue
        if size + x.size > small_total or (group and group[0].dtype != x.dtype):
            reduce_group()
        group.append(jnp.ravel(x))
        size += x.size
    reduce_group()
    if axis_name is not None:
        total = jax.lax.psum(total, axis_name)
    return jnp.sqrt(total)


def clip_adamw(
    max_norm: ScalarOrSchedule,
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    weight_decay: ScalarOrSchedule = 1e-4,
    *,
    nu_dtype: Any = None,
    norm: Any = global_norm,
) -> GradientTransformationExtraArgs:
    """`chain(clip_by_global_norm(max_norm), adamw(...))`, traced once per leaf shape.

    Same `init` and state structure as the chain, and under `jit` the same updates and state
    bit for bit. The prototype covers AdamW's common case: no `mask`, no `nesterov`.

    Args:
      max_norm: positive bound on the global norm; a float, 0-d array or schedule.
      learning_rate: as in `gx.adamw`.
      b1: decay rate of the first moment, in [0, 1).
      b2: decay rate of the second moment, in [0, 1).
      eps: >= 0, added outside the root.
      eps_root: >= 0, added inside the root.
      mu_dtype: dtype of `mu`.
      weight_decay: non-negative decoupled decay rate; a float, 0-d array or schedule.
      nu_dtype: dtype of `nu`.
      norm: the global-norm function (`gx.global_norm`, or `global_norm_grouped`).

    Returns:
      A gradient transformation that needs `params` in `update`.

    Examples:
      >>> import gradxform as gx, jax, jax.numpy as jnp
      >>> from gradxform._fused import clip_adamw
      >>> params, grads = {"w": jnp.array([1.0, -2.0])}, {"w": jnp.array([30.0, 40.0])}
      >>> fused = clip_adamw(1.0, 0.1)
      >>> unfused = gx.chain(gx.clip_by_global_norm(1.0), gx.adamw(0.1))
      >>> u1, _ = jax.jit(fused.update)(grads, fused.init(params), params)
      >>> u2, _ = jax.jit(unfused.update)(grads, unfused.init(params), params)
      >>> bool(jnp.all(u1["w"] == u2["w"]))
      True
    """
    reference = chain(
        clip_by_global_norm(max_norm),
        adamw(learning_rate, b1, b2, eps, eps_root, mu_dtype, weight_decay, nu_dtype=nu_dtype),
    )  # validates every hyperparameter and provides `init`
    decay_is_zero = isinstance(weight_decay, int | float) and weight_decay == 0

    @jax.jit
    def leaf(g, mu_prev, nu_prev, p, factor, count, wd, lr):
        # The unfused chain's operations in its order: XLA's CSE merges the per-leaf scalar
        # work (bias corrections) exactly as it does for the chain, so both compile alike.
        g = scale_leaf(g, factor)  # clip_by_global_norm
        mu = (1 - b1) * g + b1 * mu_prev  # scale_by_adam
        nu = (1 - b2) * (g * g) + b2 * nu_prev
        u = _debias(mu, b1, count) / (jnp.sqrt(_debias(nu, b2, count) + eps_root) + eps)
        u = u.astype(g.dtype)
        if not decay_is_zero:  # add_decayed_weights; a constant rate stays a Python constant
            u = (u + (wd if callable(weight_decay) else weight_decay) * p).astype(u.dtype)
        if callable(learning_rate):  # scale_by_schedule(-lr(t))
            u = jnp.asarray(lr, u.dtype) * u
        else:  # scale(-lr)
            u = ((-1 * learning_rate) * u).astype(u.dtype)
        return u, mu.astype(mu_prev.dtype), nu.astype(nu_prev.dtype)

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("Weight decay needs `params`: call `update(g, state, params)`.")
        clip_state, (adam_state, decay_state, lr_state) = state
        bound = jnp.asarray(resolve(max_norm, clip_state.count), jnp.float32)
        g_norm = norm(updates)
        clipped = g_norm > bound
        factor = jnp.where(clipped, bound / g_norm, 1.0)
        count = safe_increment(adam_state.count)
        wd = resolve(weight_decay, decay_state.count) if callable(weight_decay) else 0.0
        if callable(learning_rate):
            lr = -1 * learning_rate(lr_state.count)
            new_lr_state = ScaleByScheduleState(safe_increment(lr_state.count))
        else:
            lr, new_lr_state = 0.0, lr_state

        leaves, treedef = jax.tree.flatten(updates)
        rest = (treedef.flatten_up_to(t) for t in (adam_state.mu, adam_state.nu, params))
        outs = [
            leaf(g, m, v, p, factor, count, wd, lr)
            for g, m, v, p in zip(leaves, *rest, strict=True)
        ]
        columns = list(zip(*outs, strict=True)) if outs else [(), (), ()]
        new_updates, mu, nu = (treedef.unflatten(column) for column in columns)
        new_state = (
            ClipState(safe_increment(clip_state.count), ClipRecord(g_norm, bound, clipped)),
            (
                ScaleByAdamState(count, mu, nu),
                AddDecayedWeightsState(safe_increment(decay_state.count)),
                new_lr_state,
            ),
        )
        return new_updates, new_state

    return gradient_transformation(reference.init, update)
