"""Flax NNX classifiers: a configurable MLP and a small CNN.

The model-side remedies for unstable gradients are arguments of both: the kernel initialiser and
its scale (`--init`, `--init-scale`), batch normalisation (`--batch-norm`), dropout before the
head (`--dropout`) and the activation (`--activation`, Leaky ReLU among them).

Layer attributes are named so that sorting their names (the order of `nnx.State` and therefore of
every per-layer metric and plot) follows the network from input to output.
Both models take `(batch, H, W, C)` float images and an optional dropout key, and return logits.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import jax
from flax import nnx

from .config import UsageError

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nnx.relu,
    "leaky_relu": nnx.leaky_relu,  # slope 0.01 below zero: units never go silent
    "gelu": nnx.gelu,
    "silu": nnx.silu,
    "tanh": nnx.tanh,
    "elu": nnx.elu,
}
INITIALIZERS = {
    "he": nnx.initializers.he_normal,
    "lecun": nnx.initializers.lecun_normal,
    "glorot": nnx.initializers.glorot_normal,
    "he_uniform": nnx.initializers.he_uniform,
}


def _choose(table: dict, name: str, flag: str):
    if name not in table:
        raise UsageError(f"`{flag}` must be one of {sorted(table)}, got {name!r}.")
    return table[name]


def kernel_init(init: str, init_scale: float) -> nnx.initializers.Initializer:
    """The initialiser called `init` (`--init`), its samples times `init_scale`."""
    base = _choose(INITIALIZERS, init, "--init")()
    return lambda key, shape, dtype=jax.numpy.float32: init_scale * base(key, shape, dtype)


class MLP(nnx.Module):
    """`depth` hidden Linear layers of `width` units, each -> [BN] -> `activation`; a linear head.

    `init` and `init_scale` set the hidden kernels; the head keeps Flax's default.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        depth: int = 2,
        width: int = 128,
        activation: str = "relu",
        init: str = "he",
        init_scale: float = 1.0,
        batch_norm: bool = False,
        dropout: float = 0.0,
        bn_axis_name: str | None = None,
        rngs: nnx.Rngs,
    ):
        self.act = _choose(ACTIVATIONS, activation, "--activation")
        init_fn = kernel_init(init, init_scale)
        sizes = [in_features] + [width] * depth
        # nnx.List names the layers `layers/0`, `layers/1`, ...; integer keys sort numerically.
        self.layers = nnx.List(
            [
                nnx.Linear(a, b, kernel_init=init_fn, use_bias=not batch_norm, rngs=rngs)
                for a, b in itertools.pairwise(sizes)
            ]
        )
        norms = [nnx.BatchNorm(width, axis_name=bn_axis_name, rngs=rngs) for _ in range(depth)]
        self.layers_bn = nnx.List(norms) if batch_norm else None
        self.dropout = nnx.Dropout(dropout)
        self.out = nnx.Linear(sizes[-1], num_classes, rngs=rngs)  # Flax's default init

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            x = self.act(self.layers_bn[i](x) if self.layers_bn is not None else x)
        return self.out(self.dropout(x, rngs=dropout_key))


class CNN(nnx.Module):
    """conv3x3 -> [BN] -> act -> maxpool, twice; then a Dense layer, dropout, a linear head.

    `init` and `init_scale` set the kernels of the convolutions and the Dense layer.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        num_classes: int,
        *,
        channels: tuple[int, int] = (32, 64),
        hidden: int = 128,
        batch_norm: bool = False,
        dropout: float = 0.0,
        activation: str = "relu",
        init: str = "lecun",
        init_scale: float = 1.0,
        bn_axis_name: str | None = None,
        rngs: nnx.Rngs,
    ):
        h, w, c = image_shape
        if h % 4 or w % 4:
            raise UsageError(
                "The CNN pools twice by 2: image height and width must be multiples of 4, "
                f"got {h}x{w}."
            )
        self.act = _choose(ACTIVATIONS, activation, "--activation")
        init_fn = kernel_init(init, init_scale)
        conv = lambda a, b: nnx.Conv(
            a, b, (3, 3), kernel_init=init_fn, use_bias=not batch_norm, rngs=rngs
        )
        self.conv1, self.conv2 = conv(c, channels[0]), conv(channels[0], channels[1])
        norm = lambda n: nnx.BatchNorm(n, axis_name=bn_axis_name, rngs=rngs) if batch_norm else None
        self.conv1_bn, self.conv2_bn = norm(channels[0]), norm(channels[1])
        flat = channels[1] * (h // 4) * (w // 4)
        self.dense = nnx.Linear(flat, hidden, kernel_init=init_fn, rngs=rngs)
        self.dropout = nnx.Dropout(dropout)
        self.head = nnx.Linear(hidden, num_classes, rngs=rngs)  # Flax's default init

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        for conv, bn in ((self.conv1, self.conv1_bn), (self.conv2, self.conv2_bn)):
            x = conv(x)
            x = self.act(bn(x) if bn is not None else x)
            x = nnx.max_pool(x, (2, 2), strides=(2, 2))
        x = self.act(self.dense(x.reshape(x.shape[0], -1)))
        return self.head(self.dropout(x, rngs=dropout_key))


def build(
    name: str,
    image_shape: tuple[int, int, int],
    num_classes: int,
    *,
    seed: int,
    depth: int = 2,
    width: int = 128,
    activation: str = "relu",
    init: str | None = None,
    init_scale: float = 1.0,
    channels: tuple[int, int] = (32, 64),
    batch_norm: bool = False,
    dropout: float = 0.0,
    bn_axis_name: str | None = None,
) -> nnx.Module:
    """The model called `name` (`mlp` or `cnn`), initialised from `seed`; `init=None` is He for
    the MLP and LeCun (Flax's default) for the CNN.

    Keys use the `rbg` generator: XLA compiles threefry's unrolled rounds slowly on CPU (about 4 s
    against 1 s for this initialisation), and either is bitwise reproducible on one machine.
    """
    rngs = nnx.Rngs(params=jax.random.key(seed, impl="rbg"))
    if name == "mlp":
        in_features = image_shape[0] * image_shape[1] * image_shape[2]
        return MLP(
            in_features, num_classes, depth=depth, width=width, activation=activation,
            init=init or "he", init_scale=init_scale, batch_norm=batch_norm, dropout=dropout,
            bn_axis_name=bn_axis_name, rngs=rngs,
        )  # fmt: skip
    if name == "cnn":
        return CNN(
            image_shape, num_classes, channels=channels, hidden=width, batch_norm=batch_norm,
            dropout=dropout, activation=activation, init=init or "lecun", init_scale=init_scale,
            bn_axis_name=bn_axis_name, rngs=rngs,
        )  # fmt: skip
    raise UsageError(f"`--model` must be 'mlp' or 'cnn', got {name!r}.")
