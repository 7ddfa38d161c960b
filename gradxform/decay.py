"""Weight decay: L2 (coupled or decoupled, by placement), L1, and the usual decay mask.

Placement decides the kind of L2 decay. Before an adaptive scaling
(`chain(add_decayed_weights(wd), scale_by_adam(), ...)`) it is classic coupled L2
regularisation, whose pull is rescaled per coordinate by Adam. After it
(`chain(scale_by_adam(), add_decayed_weights(wd), scale_by_learning_rate(lr))`) it is
decoupled weight decay, AdamW (Loshchilov & Hutter, 2019).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradxform._base import (
    GradientTransformationExtraArgs,
    ScalarOrSchedule,
    gradient_transformation,
    resolve,
    step_counter,
)
from gradxform._checks import check_nonnegative, path_name

Mask = Any | Callable[[Any], Any]


class AddDecayedWeightsState(NamedTuple):
    count: jax.Array  # int32 step counter (saturating); drives a weight-decay schedule


def _add_param_term(
    weight_decay: ScalarOrSchedule, term: Callable[[jax.Array], jax.Array], mask: Mask | None
) -> GradientTransformationExtraArgs:
    """`u = g + weight_decay * term(p)`, optionally restricted to the leaves `mask` selects."""
    check_nonnegative("weight_decay", weight_decay)

    def init(params):
        del params
        return AddDecayedWeightsState(step_counter())

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("Weight decay needs `params`: call `update(g, state, params)`.")
        new_state = AddDecayedWeightsState(optax.safe_increment(state.count))
        if isinstance(weight_decay, int | float) and weight_decay == 0:
            return updates, new_state
        wd = resolve(weight_decay, state.count)
        updates = jax.tree.map(lambda g, p: (g + wd * term(p)).astype(g.dtype), updates, params)
        return updates, new_state

    tx = gradient_transformation(init, update)
    return tx if mask is None else optax.masked(tx, mask)


def add_decayed_weights(
    weight_decay: ScalarOrSchedule = 0.0, mask: Mask | None = None
) -> GradientTransformationExtraArgs:
    """Add L2 weight decay: the parameters scaled by `weight_decay`.

    u_t = g_t + weight_decay * p_t

    Args:
      weight_decay: non-negative rate; a float, 0-d array or schedule.
      mask: a tree of bools shaped like (a prefix of) the params, or a function of the params
        returning one; `True` leaves are decayed. See `weight_decay_mask`.

    Examples:
      >>> import gradxform as gx, jax.numpy as jnp
      >>> p = {"w": jnp.array([1.0, -2.0])}
      >>> tx = gx.add_decayed_weights(0.1)
      >>> u, _ = tx.update({"w": jnp.zeros(2)}, tx.init(p), p)
      >>> u["w"]
      Array([ 0.1, -0.2], dtype=float32)

    Reference: Loshchilov & Hutter, Decoupled Weight Decay Regularization, 2019.
    """
    return _add_param_term(weight_decay, lambda p: p, mask)


def add_l1_decay(
    weight_decay: ScalarOrSchedule = 0.0, mask: Mask | None = None
) -> GradientTransformationExtraArgs:
    """Add the L1 penalty's (sub)gradient: `weight_decay * sign(p)`.

    u_t = g_t + weight_decay * sign(p_t)

    Pulls every weight towards zero by the same amount, so small weights reach (and then
    oscillate around) zero sooner than under L2 (Tibshirani, 1996).

    Args:
      weight_decay: non-negative rate; a float, 0-d array or schedule.
      mask: as in `add_decayed_weights`.

    Examples:
      >>> import gradxform as gx, jax.numpy as jnp
      >>> p = {"w": jnp.array([3.0, -0.5, 0.0])}
      >>> tx = gx.add_l1_decay(0.1)
      >>> u, _ = tx.update({"w": jnp.zeros(3)}, tx.init(p), p)
      >>> u["w"]
      Array([ 0.1, -0.1,  0. ], dtype=float32)
    """
    return _add_param_term(weight_decay, jnp.sign, mask)


_NOT_DECAYED = frozenset({"bias", "scale", "b"})


def weight_decay_mask(params: Any) -> Any:
    """The usual mask: decay kernels and embeddings, not biases or normalisation scales.

    A leaf is decayed when it has at least two dimensions and its name is not `bias`,
    `scale` or `b`. Pass the function itself as `mask=` so it is applied to the params.

    Args:
      params: the parameter tree.

    Returns:
      A tree of Python bools shaped like `params`.

    Examples:
      >>> import gradxform as gx, jax.numpy as jnp
      >>> params = {"Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)}}
      >>> gx.weight_decay_mask(params)
      {'Dense_0': {'bias': False, 'kernel': True}}
    """

    def decide(path, leaf):
        name = path_name(path).rsplit("/", 1)[-1]
        return jnp.ndim(leaf) >= 2 and name not in _NOT_DECAYED

    return jax.tree_util.tree_map_with_path(decide, params)
