"""Named optimizers: each is a `chain` of gradxform primitives, with no maths of its own.

Signatures and defaults follow optax's optimizers of the same name, so
`gx.adamw(3e-4, weight_decay=0.01)` replaces `optax.adamw(3e-4, weight_decay=0.01)`.
Every `learning_rate` may be a float, a 0-d array or an optax schedule; `None` leaves the
updates unscaled (no sign flip either), as in optax.
"""

from __future__ import annotations

from typing import Any

from gradxform._base import GradientTransformationExtraArgs, ScalarOrSchedule, chain
from gradxform._checks import check_range
from gradxform.adaptive import (
    scale_by_adam,
    scale_by_adamax,
    scale_by_amsgrad,
    scale_by_rms,
    scale_by_rss,
    scale_by_stddev,
)
from gradxform.decay import Mask, add_decayed_weights
from gradxform.learning_rate import scale_by_learning_rate
from gradxform.momentum import trace


def sgd(
    learning_rate: ScalarOrSchedule | None,
    momentum: float | None = None,
    nesterov: bool = False,
    accumulator_dtype: Any = None,
) -> GradientTransformationExtraArgs:
    """Stochastic gradient descent, optionally with heavy-ball or Nesterov momentum.

    `chain(trace(momentum, nesterov), scale_by_learning_rate(learning_rate))`

    Args:
      learning_rate: >= 0; a float, 0-d array or optax schedule (`None`: no scaling).
      momentum: heavy-ball coefficient in [0, 1], or `None` for plain SGD.
      nesterov: use Nesterov momentum.
      accumulator_dtype: dtype of the momentum buffer.

    Examples:
      >>> import gradxform as gx, jax.numpy as jnp
      >>> tx = gx.sgd(0.1, momentum=0.9, nesterov=True)
      >>> tx.update(jnp.array([1.0]), tx.init(jnp.zeros(1)))[0]
      Array([-0.19], dtype=float32)

    Reference: Sutskever et al., On the importance of initialization and momentum in deep
    learning, 2013.
    """
    check_range("momentum", momentum, 0.0, 1.0, optional=True)  # named as the user typed it
    momentum_part = () if momentum is None else (trace(momentum, nesterov, accumulator_dtype),)
    return chain(*momentum_part, scale_by_learning_rate(learning_rate))


def adagrad(
    learning_rate: ScalarOrSchedule | None,
    initial_accumulator_value: float = 0.1,
    eps: float = 1e-7,
) -> GradientTransformationExtraArgs:
    """Adagrad: `chain(scale_by_rss(...), scale_by_learning_rate(learning_rate))`.

    Args:
      learning_rate: >= 0; a float, 0-d array or optax schedule (`None`: no scaling).
      initial_accumulator_value: starting sum of squares, >= 0.
      eps: >= 0, inside the root.

    Examples:
      >>> import gradxform as gx, jax.numpy as jnp
      >>> tx = gx.adagrad(0.1, initial_accumulator_value=0.0, eps=0.0)
      >>> tx.update(jnp.array([3.0]), tx.init(jnp.zeros(1)))[0]
      Array([-0.1], dtype=float32)

    Reference: Duchi et al., 2011.
    """
    return chain(
        scale_by_rss(initial_accumulator_value, eps), scale_by_learning_rate(learning_rate)
    )


def rmsprop(
    learning_rate: ScalarOrSchedule | None,
    decay: float = 0.9,
    eps: float = 1e-8,
    initial_scale: float = 0.0,
    eps_in_sqrt: bool = True,
    centered: bool = False,
    momentum: float | None = None,
    nesterov: bool = False,
    bias_correction: bool = False,
) -> GradientTransformationExtraArgs:
    """RMSprop, optionally centered and with momentum applied after the learning rate.

    `chain(scale_by_rms | scale_by_stddev, scale_by_learning_rate, trace(momentum, nesterov))`

    Args:
      learning_rate: >= 0; a float, 0-d array or optax schedule (`None`: no scaling).
      decay: EMA rate of the squared gradients, in [0, 1].
      eps: >= 0, added to the denominator.
      initial_scale: starting value of the EMA, >= 0.
      eps_in_sqrt: add `eps` inside the root (optax's convention) or outside.
      centered: divide by the standard deviation instead of the RMS.
      momentum: optional heavy-ball coefficient in [0, 1], applied after the learning rate.
      nesterov: use Nesterov momentum.
      bias_correction: debias the EMAs.

    Examples:
      >>> import gradxform as gx, jax.numpy as jnp
      >>> tx = gx.rmsprop(0.01, decay=0.0, eps=0.0)
      >>> tx.update(jnp.array([-5.0]), tx.init(jnp.zeros(1)))[0]
      Array([0.01], dtype=float32)

    Reference: Tieleman & Hinton, 2012; Graves, 2013 (centered).
    """
    check_range("momentum", momentum, 0.0, 1.0, optional=True)
    scaling = scale_by_stddev if centered else scale_by_rms
    momentum_part = () if momentum is None else (trace(momentum, nesterov),)
    return chain(
        scaling(decay, eps, initial_scale, eps_in_sqrt, bias_correction),
        scale_by_learning_rate(learning_rate),
        *momentum_part,
    )


def adam(
    learning_rate: ScalarOrSchedule | None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    *,
    nesterov: bool = False,
    nu_dtype: Any = None,
) -> GradientTransformationExtraArgs:
    """Adam: `chain(scale_by_adam(...), scale_by_learning_rate(learning_rate))`.

    Args:
      learning_rate: >= 0; a float, 0-d array or optax schedule (`None`: no scaling).
      b1: decay rate of the first moment, in [0, 1].
      b2: decay rate of the second moment, in [0, 1].
      eps: >= 0, added outside the root.
      eps_root: >= 0, added inside the root.
      mu_dtype: dtype of the first moment.
      nesterov: NAdam's look-ahead first moment.
      nu_dtype: dtype of the second moment.

    Examples:
      >>> import gradxform as gx, jax.numpy as jnp
      >>> tx = gx.adam(1e-3)
      >>> tx.update(jnp.array([4.0]), tx.init(jnp.zeros(1)))[0]
      Array([-0.001], dtype=float32)

    Reference: Kingma & Ba, 2015.
    """
    return chain(
        scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov, nu_dtype=nu_dtype),
        scale_by_learning_rate(learning_rate),
    )


def nadam(
    learning_rate: ScalarOrSchedule | None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    *,
    nesterov: bool = True,
    nu_dtype: Any = None,
) -> GradientTransformationExtraArgs:
    """NAdam: Adam with Nesterov momentum, `adam(..., nesterov=True)` (optax's `nadam`).

    The arguments are `adam`'s, with `nesterov` on by default (`False` gives plain Adam).

    Examples:
      >>> import gradxform as gx, jax.numpy as jnp
      >>> tx = gx.nadam(1e-3)
      >>> tx.update(jnp.array([4.0]), tx.init(jnp.zeros(1)))[0]
      Array([-0.001], dtype=float32)

    Reference: Dozat, Incorporating Nesterov Momentum into Adam, 2016.
    """
    return adam(
        learning_rate, b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov, nu_dtype=nu_dtype
    )


def adamw(
    learning_rate: ScalarOrSchedule | None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: Mask | None = None,
    *,
    nesterov: bool = False,
    nu_dtype: Any = None,
) -> GradientTransformationExtraArgs:
    """AdamW: Adam with decoupled weight decay, added after the Adam scaling.

    `chain(scale_by_adam(...), add_decayed_weights(weight_decay, mask), scale_by_learning_rate(lr))`

    Args:
      learning_rate: >= 0; a float, 0-d array or optax schedule (`None`: no scaling).
      b1: decay rate of the first moment, in [0, 1].
      b2: decay rate of the second moment, in [0, 1].
      eps: >= 0, added outside the root.
      eps_root: >= 0, added inside the root.
      mu_dtype: dtype of the first moment.
      weight_decay: decoupled decay rate, >= 0; a float, 0-d array or schedule.
      mask: which leaves to decay (a tree of bools or a function of the params, e.g.
        `gx.weight_decay_mask`).
      nesterov: NAdam's look-ahead first moment.
      nu_dtype: dtype of the second moment.

    Examples:
      >>> import gradxform as gx, jax.numpy as jnp
      >>> tx = gx.adamw(0.1, weight_decay=0.5, mask=gx.weight_decay_mask)
      >>> params = {"kernel": jnp.ones((1, 1)), "bias": jnp.ones(1)}
      >>> grads = {"kernel": jnp.ones((1, 1)), "bias": jnp.ones(1)}
      >>> u, _ = tx.update(grads, tx.init(params), params)
      >>> u["kernel"], u["bias"]
      (Array([[-0.15]], dtype=float32), Array([-0.1], dtype=float32))

    Reference: Loshchilov & Hutter, Decoupled Weight Decay Regularization, 2019.
    """
    return chain(
        scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov, nu_dtype=nu_dtype),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )


def amsgrad(
    learning_rate: ScalarOrSchedule | None,
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
    """AMSGrad: `chain(scale_by_amsgrad(...), scale_by_learning_rate(learning_rate))`.

    Args:
      learning_rate: >= 0; a float, 0-d array or optax schedule (`None`: no scaling).
      b1: decay rate of the first moment, in [0, 1].
      b2: decay rate of the second moment, in [0, 1].
      eps: >= 0, added outside the root.
      eps_root: >= 0, added inside the root.
      mu_dtype: dtype of the first moment.
      bias_correction_mu: debias the first moment.
      bias_correction_nu: debias the second moment before the running maximum.
      nu_dtype: dtype of the second moment and its maximum.

    Examples:
      >>> import gradxform as gx, jax.numpy as jnp
      >>> tx = gx.amsgrad(1e-3)
      >>> tx.update(jnp.array([4.0]), tx.init(jnp.zeros(1)))[0]
      Array([-0.001], dtype=float32)

    Reference: Reddi et al., 2018.
    """
    scaling = scale_by_amsgrad(
        b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype, nu_dtype=nu_dtype,
        bias_correction_mu=bias_correction_mu, bias_correction_nu=bias_correction_nu,
    )  # fmt: skip
    return chain(scaling, scale_by_learning_rate(learning_rate))


def adamax(
    learning_rate: ScalarOrSchedule | None, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> GradientTransformationExtraArgs:
    """Adamax: `chain(scale_by_adamax(...), scale_by_learning_rate(learning_rate))`.

    Args:
      learning_rate: >= 0; a float, 0-d array or optax schedule (`None`: no scaling).
      b1: decay rate of the first moment, in [0, 1].
      b2: decay rate of the infinity norm, in [0, 1].
      eps: keeps the infinity norm away from zero.

    Examples:
      >>> import gradxform as gx, jax.numpy as jnp
      >>> tx = gx.adamax(1e-3, eps=0.0)
      >>> tx.update(jnp.array([4.0]), tx.init(jnp.zeros(1)))[0]
      Array([-0.001], dtype=float32)

    Reference: Kingma & Ba, 2015 (section 7).
    """
    return chain(scale_by_adamax(b1, b2, eps), scale_by_learning_rate(learning_rate))
