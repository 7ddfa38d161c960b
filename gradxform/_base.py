"""The protocol every transform speaks, and the wrapper that normalises and checks its inputs.

gradxform speaks optax's protocol unchanged: a transform is an
`optax.GradientTransformationExtraArgs` and `chain` is `optax.chain`, so gradxform and optax
transforms mix freely in either library's combinators. The shared helpers live beside this
module by concern: `_checks` (arguments), `_tree` (tree maths, norms), `_records`
(telemetry records), `_moments` (running statistics).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from gradxform._checks import check_floating, check_same_structure
from gradxform._tree import as_arrays, trainable

GradientTransformation = optax.GradientTransformation
GradientTransformationExtraArgs = optax.GradientTransformationExtraArgs
EmptyState = optax.EmptyState
chain = optax.chain

PyTree = Any
Params = Updates = PyTree
Scalar = float | jax.Array
ScalarOrSchedule = float | jax.Array | Callable[[jax.Array], jax.Array]


def gradient_transformation(
    init: Callable[[Params], Any],
    update: Callable[..., tuple[Updates, Any]],
    *,
    extra_args: bool = False,
) -> GradientTransformationExtraArgs:
    """Wrap a transform's `init`/`update` pair with gradxform's input normalisation and checks.

    One step for every transform, in Python at trace time (free inside a compiled step):
    Python and NumPy scalar leaves become JAX arrays; integer and boolean params leaves become
    `None` (no state, and their `None` gradient passes through); updates must be floating
    point (real or complex) and match the params' tree and shapes. `update` receives the extra
    keyword arguments (e.g. `loss=`) only when `extra_args=True`.
    """

    def checked_init(params):
        return init(trainable(params))

    def checked_update(updates, state, params=None, **kwargs):
        updates = as_arrays(updates)
        check_floating(updates, "updates")
        if params is not None:
            params = trainable(params)
            check_same_structure(updates, params, "updates", "params")
        if extra_args:
            return update(updates, state, params, **kwargs)
        return update(updates, state, params)

    return GradientTransformationExtraArgs(checked_init, checked_update)


def resolve(value: ScalarOrSchedule, count: jax.Array) -> Any:
    """The value of a hyperparameter at step `count`: a schedule is called, a constant returned."""
    return value(count) if callable(value) else value


def step_counter() -> jax.Array:
    """A transform's step count at init: int32 zero (`optax.safe_increment` advances it)."""
    return jnp.zeros([], jnp.int32)
