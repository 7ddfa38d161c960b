"""The stability suite's families: data, models as pure functions, and the settings table.

Every model is `init(key) -> params` plus `loss(params, x, y) -> scalar` and
`quality(params, x, y) -> scalar` (test accuracy, or held-out loss for the language model), so
that seeds stack as lanes under `jax.vmap`. Sizes are tiny: the whole suite runs on a CPU.

Families (data: scikit-learn's 8x8 digits as `examples/data.py` loads them, except `gpt`):

  mlp    8x64 ReLU MLP, He init, zero biases (the old suite's model)
  cnn    two 3x3 convolutions with GroupNorm, global average pool, linear head
  lstm   LSTM reading the image as a sequence (8 rows of 8 pixels, or 32 steps of 2), or a
         plain tanh RNN (8 or 16 steps: the exploding gradients of Pascanu et al., 2013)
  gpt    2-layer character-level GPT on Python standard-library source, N(0, 0.02) init
  lora   an MLP pretrained here on the digits, fine-tuned on shifted digits: LoRA adapters
         (A random, B = 0) or, for `finetune`, all of its weights at a small learning rate
  scan   residual MLP whose blocks are stacked on a leading layer axis and applied with
         `lax.scan`, residual gains and the output head initialised at zero
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from examples import data as example_data

# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Task:
    """Arrays of one family, in host memory. `x` rows are examples; batches index them."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    metric: str  # "accuracy" (higher is better) or "loss" (lower is better)
    fail_bound: float  # a run whose final quality is past this failed (chance, unigram entropy)


@functools.cache
def digits(shift: int = 0) -> Task:
    """The digits (N, 8, 8, 1), standardised; `shift` rolls every image right and down by
    that many pixels (the fine-tuning task of `lora`). Chance accuracy is 0.1; a run below
    0.2 failed."""
    ds = example_data.load("digits")
    roll = lambda x: np.roll(x, (shift, shift), axis=(1, 2))
    return Task(roll(ds.x_train), ds.y_train, roll(ds.x_test), ds.y_test, "accuracy", 0.2)


TEXT_FILES = ("os.py", "functools.py", "contextlib.py", "textwrap.py", "string.py", "copy.py",
              "abc.py", "heapq.py", "shlex.py")  # fmt: skip
CONTEXT = 32
VOCAB = 97  # 0: any other byte, 1..95: printable ASCII, 96: newline


def encode(text: bytes) -> np.ndarray:
    """Bytes to token ids (uint8): printable ASCII and newline, everything else 0."""
    b = np.frombuffer(text, np.uint8).astype(np.int32)
    ids = np.where((b >= 32) & (b < 127), b - 31, 0)
    return np.where(b == 10, VOCAB - 1, ids).astype(np.int32)


@functools.cache
def text() -> Task:
    """Character windows of the standard library's own source (`TEXT_FILES`, read from
    `os.path.dirname(os.__file__)`): 90% train, the last 10% held out. x: (N, CONTEXT) tokens,
    y: the next tokens. A run whose held-out loss is above the training text's unigram
    entropy (nats per character) learned nothing beyond character frequencies: failed."""
    root = os.path.dirname(os.__file__)
    tokens = encode(b"".join(open(os.path.join(root, f), "rb").read() for f in TEXT_FILES))
    cut = int(0.9 * len(tokens))

    def windows(t: np.ndarray, stride: int) -> np.ndarray:
        starts = np.arange(0, len(t) - CONTEXT - 1, stride)
        return t[starts[:, None] + np.arange(CONTEXT + 1)]

    train, test = windows(tokens[:cut], 8), windows(tokens[cut:], CONTEXT)[:512]
    freq = np.bincount(tokens[:cut], minlength=VOCAB) / cut
    entropy = float(-np.sum(freq[freq > 0] * np.log(freq[freq > 0])))
    return Task(train[:, :-1], train[:, 1:], test[:, :-1], test[:, 1:], "loss", entropy)


# ----------------------------------------------------------------------------- layers


def _normal(key: jax.Array, shape: tuple[int, ...], std: float) -> jax.Array:
    return std * jax.random.normal(key, shape, jnp.float32)


def _dense(key: jax.Array, a: int, b: int, std: float | None = None) -> dict:
    """Kernel N(0, std) (He: sqrt(2 / a) when None), zero bias."""
    return {"w": _normal(key, (a, b), math.sqrt(2 / a) if std is None else std),
            "b": jnp.zeros([b], jnp.float32)}  # fmt: skip


def _row(v: jax.Array, ndim: int) -> jax.Array:
    """A vector reshaped to broadcast over the last axis of a rank-`ndim` array (the tests
    run with `jax_numpy_rank_promotion="raise"`)."""
    return v.reshape((1,) * (ndim - 1) + v.shape)


def _affine(x: jax.Array, p: dict) -> jax.Array:
    """x @ w + b."""
    y = x @ p["w"]
    return y + _row(p["b"], y.ndim)


def _norm_params(n: int) -> dict:
    return {"scale": jnp.ones([n], jnp.float32), "bias": jnp.zeros([n], jnp.float32)}


def _layer_norm(x: jax.Array, p: dict) -> jax.Array:
    x32 = x.astype(jnp.float32)  # statistics in float32 even under float16
    mean = x32.mean(-1, keepdims=True)
    var = jnp.mean((x32 - mean) ** 2, -1, keepdims=True)
    y = ((x32 - mean) * jax.lax.rsqrt(var + 1e-5)).astype(x.dtype)
    return y * _row(p["scale"], y.ndim) + _row(p["bias"], y.ndim)


def cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _accuracy(logits: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(logits, -1) == y)


@dataclass(frozen=True)
class Model:
    """One family's model at one configuration: pure functions, vmappable over seeds."""

    init: Callable[[jax.Array], Any]
    apply: Callable[[Any, jax.Array], jax.Array]  # logits
    task: Task

    def loss(self, params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        return cross_entropy(self.apply(params, x), y)

    def quality(self, params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        logits = self.apply(params, x).astype(jnp.float32)
        return _accuracy(logits, y) if self.task.metric == "accuracy" else cross_entropy(logits, y)


# ----------------------------------------------------------------------------- families


def mlp(depth: int = 8, width: int = 64, zero_head: bool = False) -> Model:
    """ReLU MLP on the flattened digits, He-normal kernels, zero biases."""

    def init(key):
        dims = [64] + [width] * depth + [10]
        keys = jax.random.split(key, len(dims) - 1)
        layers = [_dense(k, a, b) for k, a, b in zip(keys, dims[:-1], dims[1:], strict=True)]
        if zero_head:
            layers[-1]["w"] = jnp.zeros_like(layers[-1]["w"])
        return {"layers": layers}

    return Model(init, _mlp_apply, digits())


def _mlp_apply(params: dict, x: jax.Array) -> jax.Array:
    x = x.reshape(x.shape[0], -1)
    *hidden, head = params["layers"]
    for layer in hidden:
        x = jax.nn.relu(_affine(x, layer))
    return _affine(x, head)


def _group_norm(x: jax.Array, p: dict, groups: int = 4) -> jax.Array:
    n, h, w, c = x.shape
    x32 = x.astype(jnp.float32).reshape(n, h, w, groups, c // groups)
    mean = x32.mean((1, 2, 4), keepdims=True)
    var = jnp.mean((x32 - mean) ** 2, (1, 2, 4), keepdims=True)
    y = ((x32 - mean) * jax.lax.rsqrt(var + 1e-5)).reshape(n, h, w, c).astype(x.dtype)
    return y * _row(p["scale"], 4) + _row(p["bias"], 4)


def _conv(x: jax.Array, w: jax.Array) -> jax.Array:
    """3x3 'SAME' convolution as one matmul over the nine shifted copies of `x` (im2col):
    under `vmap` over lanes it stays a batched matmul, where XLA:CPU's grouped convolution
    is many times slower."""
    _, h, wd, c = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = [padded[:, i : i + h, j : j + wd] for i in range(3) for j in range(3)]
    return jnp.concatenate(patches, -1) @ w.reshape(9 * c, -1)


def cnn(channels: tuple[int, int] = (16, 32)) -> Model:
    """conv3x3 -> GroupNorm -> ReLU -> 2x2 average pool, conv3x3 -> GroupNorm -> ReLU ->
    global average pool, linear head. He init, zero biases, GroupNorm scale 1 and bias 0."""
    c1, c2 = channels

    def init(key):
        k1, k2, k3 = jax.random.split(key, 3)
        return {
            "conv1": _normal(k1, (3, 3, 1, c1), math.sqrt(2 / 9)),
            "norm1": _norm_params(c1),
            "conv2": _normal(k2, (3, 3, c1, c2), math.sqrt(2 / (9 * c1))),
            "norm2": _norm_params(c2),
            "head": _dense(k3, c2, 10, math.sqrt(1 / c2)),
        }

    def apply(p, x):
        x = jax.nn.relu(_group_norm(_conv(x, p["conv1"]), p["norm1"]))
        n, h, w, c = x.shape
        x = x.reshape(n, h // 2, 2, w // 2, 2, c).mean((2, 4))
        x = jax.nn.relu(_group_norm(_conv(x, p["conv2"]), p["norm2"])).mean((1, 2))
        return _affine(x, p["head"])

    return Model(init, apply, digits())


def lstm(
    hidden: int = 32, steps: int = 8, recurrent_scale: float = 1.0, cell: str = "lstm"
) -> Model:
    """LSTM over the image read as `steps` chunks of 64 / steps pixels; LeCun-normal input
    kernel, recurrent kernel N(0, recurrent_scale / sqrt(hidden)), zero biases; linear head
    on the last hidden state. `cell="tanh"`: a plain tanh RNN, `h = tanh(x wx + h wh + b)`,
    whose gradient through time grows as the recurrent kernel's spectral radius (about
    `recurrent_scale`) to the power of the steps where it is not saturated (Pascanu et al.,
    On the difficulty of training recurrent neural networks, 2013)."""
    if cell not in ("lstm", "tanh"):
        raise ValueError(f"cell must be 'lstm' or 'tanh', got {cell!r}")
    width = 64 // steps
    gates = 4 if cell == "lstm" else 1

    def init(key):
        k1, k2, k3 = jax.random.split(key, 3)
        return {
            "wx": _normal(k1, (width, gates * hidden), math.sqrt(1 / width)),
            "wh": _normal(k2, (hidden, gates * hidden), recurrent_scale / math.sqrt(hidden)),
            "b": jnp.zeros([gates * hidden], jnp.float32),
            "head": _dense(k3, hidden, 10, math.sqrt(1 / hidden)),
        }

    def lstm_cell(p, carry, xt):
        h, c = carry
        i, f, g, o = jnp.split(xt @ p["wx"] + h @ p["wh"] + _row(p["b"], 2), 4, -1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        return (jax.nn.sigmoid(o) * jnp.tanh(c), c), None

    def tanh_cell(p, carry, xt):
        h, c = carry
        return (jnp.tanh(xt @ p["wx"] + h @ p["wh"] + _row(p["b"], 2)), c), None

    def apply(p, x):
        seq = x.reshape(x.shape[0], steps, width).swapaxes(0, 1)  # (steps, batch, width)
        step = functools.partial(lstm_cell if cell == "lstm" else tanh_cell, p)
        zeros = jnp.zeros((x.shape[0], hidden), x.dtype)
        (h, _), _ = jax.lax.scan(step, (zeros, zeros), seq)
        return _affine(h, p["head"])

    return Model(init, apply, digits())


def gpt(width: int = 32, depth: int = 2, heads: int = 2) -> Model:
    """Pre-LayerNorm causal transformer on characters (`CONTEXT` tokens): every matrix
    N(0, 0.02) as in GPT-2, zero biases, LayerNorm scale 1 and bias 0, untied head."""

    def block(key):
        k = jax.random.split(key, 4)
        return {"ln1": _norm_params(width), "qkv": _dense(k[0], width, 3 * width, 0.02),
                "proj": _dense(k[1], width, width, 0.02), "ln2": _norm_params(width),
                "fc": _dense(k[2], width, 4 * width, 0.02),
                "out": _dense(k[3], 4 * width, width, 0.02)}  # fmt: skip

    def init(key):
        k = jax.random.split(key, depth + 3)
        return {
            "embed": _normal(k[0], (VOCAB, width), 0.02),
            "pos": _normal(k[1], (CONTEXT, width), 0.02),
            "blocks": [block(kb) for kb in k[3:]],
            "ln_f": _norm_params(width),
            "head": _normal(k[2], (width, VOCAB), 0.02),
        }

    def attend(p, x):
        n, t, _ = x.shape
        q, k, v = jnp.split(_affine(x, p["qkv"]), 3, -1)
        split = lambda a: a.reshape(n, t, heads, width // heads)
        s = jnp.einsum("nqhd,nkhd->nhqk", split(q), split(k)) / math.sqrt(width // heads)
        s = jnp.where(jnp.tril(jnp.ones((1, 1, t, t), bool)), s, jnp.finfo(s.dtype).min)
        a = jax.nn.softmax(s.astype(jnp.float32), -1).astype(x.dtype)
        y = jnp.einsum("nhqk,nkhd->nqhd", a, split(v)).reshape(n, t, width)
        return _affine(y, p["proj"])

    def apply(p, tokens):
        x = p["embed"][tokens] + p["pos"][None]
        for b in p["blocks"]:
            x = x + attend(b, _layer_norm(x, b["ln1"]))
            x = x + _affine(jax.nn.gelu(_affine(_layer_norm(x, b["ln2"]), b["fc"])), b["out"])
        return _layer_norm(x, p["ln_f"]) @ p["head"]

    return Model(init, apply, text())


def scan(depth: int = 6, width: int = 32, hidden: int = 64) -> Model:
    """Residual MLP with its `depth` blocks stacked on a leading layer axis (`layers/*`),
    applied with `lax.scan`: h += gain * W2 relu(W1 LayerNorm(h)). Gains and the head start
    at zero, so at init the network outputs zeros."""

    def init(key):
        k = jax.random.split(key, 3)
        return {
            "embed": _dense(k[0], 64, width),
            "layers": {
                "norm": jax.tree.map(lambda a: jnp.tile(a, (depth, 1)), _norm_params(width)),
                "w1": _normal(k[1], (depth, width, hidden), math.sqrt(2 / width)),
                "w2": _normal(k[2], (depth, hidden, width), math.sqrt(1 / hidden)),
                "gain": jnp.zeros([depth], jnp.float32),
            },
            "head": {"w": jnp.zeros([width, 10], jnp.float32), "b": jnp.zeros([10], jnp.float32)},
        }

    def apply(p, x):
        h = _affine(x.reshape(x.shape[0], -1), p["embed"])

        def layer(h, lp):
            branch = jax.nn.relu(_layer_norm(h, lp["norm"]) @ lp["w1"]) @ lp["w2"]
            return h + lp["gain"] * branch, None

        h, _ = jax.lax.scan(layer, h, p["layers"])
        return _affine(h, p["head"])

    return Model(init, apply, digits())


# ----------------------------------------------------------------------------- LoRA


PRETRAIN_STEPS = 400


@functools.cache
def pretrained(width: int = 64) -> dict:
    """A 2x`width` ReLU MLP trained here on the unshifted digits (Adam 1e-3, batch 64,
    `PRETRAIN_STEPS` steps, seed 0): the base that `lora` fine-tunes."""
    base = mlp(depth=2, width=width)
    data, tx = base.task, optax.adam(1e-3)
    order = example_data.BatchOrder(len(data.y_train), 64, 0)
    idx = jnp.asarray(np.stack([order.indices(s) for s in range(PRETRAIN_STEPS)]))
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)

    @jax.jit
    def train(params):
        def step(carry, ib):
            p, s = carry
            g = jax.grad(base.loss)(p, x[ib], y[ib])
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(step, (params, tx.init(params)), idx)[0][0]

    return jax.device_get(train(base.init(jax.random.key(1000))))


def lora(rank: int = 4, shift: int = 1, full: bool = False) -> Model:
    """Fine-tune `pretrained()` on digits shifted by `shift` pixels. LoRA: each layer's kernel
    W becomes W + A @ B with A (in, rank) N(0, 1 / in) and B (rank, out) = 0, the base frozen;
    the trainable params are the adapters only. `full=True`: all base weights train."""
    base = jax.tree.map(jnp.asarray, pretrained())
    task = digits(shift)
    if full:
        return Model(lambda key: jax.tree.map(jnp.copy, base), _mlp_apply, task)

    def init(key):
        keys = jax.random.split(key, len(base["layers"]))
        return [{"a": _normal(k, (layer["w"].shape[0], rank), 1 / math.sqrt(layer["w"].shape[0])),
                 "b": jnp.zeros((rank, layer["w"].shape[1]), jnp.float32)}
                for k, layer in zip(keys, base["layers"], strict=True)]  # fmt: skip

    def apply(adapters, x):
        layers = [{"w": layer["w"].astype(x.dtype) + (ad["a"] @ ad["b"]).astype(x.dtype),
                   "b": layer["b"].astype(x.dtype)}
                  for layer, ad in zip(base["layers"], adapters, strict=True)]  # fmt: skip
        return _mlp_apply({"layers": layers}, x)

    return Model(init, apply, task)


FAMILIES: dict[str, Callable[..., Model]] = {
    "mlp": mlp, "cnn": cnn, "lstm": lstm, "gpt": gpt, "lora": lora, "scan": scan,
}  # fmt: skip


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Setting:
    """One training setting of one family. Unstable settings name the healthy setting of the
    same family (same optimizer family) that their quality is judged against."""

    family: str
    name: str
    kind: str  # healthy | lr | warmup | corrupt | nan | recurrent | fp16
    split: str  # tune | held-out
    optimizer: str  # sgd (momentum 0.9) | adam | adamw (weight decay 0.01)
    lr: float
    reference: str = ""  # the healthy setting it is judged against; "" for healthy ones
    model: tuple[tuple[str, Any], ...] = ()  # keyword arguments of the family's model
    schedule: bool = False  # linear warm-up over `warmup` of the run, then cosine to lr / 10
    warmup: float = 0.0  # fraction of the steps
    every: int = 0  # kind corrupt / nan: inject on steps every, 2 every, ... (1-based)
    corrupt: str = "inputs"  # corrupt: inputs x1000, or "loss": the batch's loss x1000
    fp16_scale: float = 0.0  # > 0: forward and backward in float16, loss times this scale

    @property
    def key(self) -> str:
        return f"{self.family}/{self.name}"

    def build(self) -> Model:
        return FAMILIES[self.family](**dict(self.model))


S = Setting
SETTINGS: tuple[Setting, ...] = (
    S("mlp", "healthy sgd", "healthy", "tune", "sgd", 0.01),
    S("mlp", "healthy adam, zero head", "healthy", "held-out", "adam", 1e-3,
      model=(("zero_head", True),)),
    S("mlp", "lr x10", "lr", "tune", "sgd", 0.1, "healthy sgd"),
    S("mlp", "NaN batch /100", "nan", "held-out", "adam", 1e-3, "healthy adam, zero head",
      model=(("zero_head", True),), every=100),
    S("mlp", "fp16 scale 2^17", "fp16", "tune", "sgd", 0.01, "healthy sgd", fp16_scale=2.0**17),
    S("cnn", "healthy sgd", "healthy", "tune", "sgd", 0.05),
    S("cnn", "loss x1000 /100", "corrupt", "held-out", "sgd", 0.05, "healthy sgd", every=100,
      corrupt="loss"),
    S("cnn", "fp16 scale 2^17", "fp16", "held-out", "sgd", 0.05, "healthy sgd",
      fp16_scale=2.0**17),
    S("lstm", "healthy sgd", "healthy", "held-out", "sgd", 0.05),
    S("lstm", "recurrent init x16", "recurrent", "tune", "sgd", 0.05, "healthy sgd",
      model=(("recurrent_scale", 16.0),)),
    S("lstm", "32 steps, recurrent x4", "recurrent", "held-out", "sgd", 0.05, "healthy sgd",
      model=(("recurrent_scale", 4.0), ("steps", 32))),
    S("lstm", "NaN batch /100", "nan", "tune", "sgd", 0.05, "healthy sgd", every=100),
    S("lstm", "healthy tanh RNN sgd", "healthy", "held-out", "sgd", 0.05,
      model=(("cell", "tanh"),)),
    S("lstm", "tanh RNN, 16 steps", "recurrent", "held-out", "sgd", 0.05,
      "healthy tanh RNN sgd", model=(("cell", "tanh"), ("steps", 16))),
    S("gpt", "healthy adamw, warm-up", "healthy", "held-out", "adamw", 3e-3, schedule=True,
      warmup=0.1),
    S("gpt", "no warm-up, lr x3", "warmup", "tune", "adamw", 1e-2, "healthy adamw, warm-up",
      schedule=True),
    S("gpt", "loss x1000 /100", "corrupt", "tune", "adamw", 3e-3, "healthy adamw, warm-up",
      schedule=True, warmup=0.1, every=100, corrupt="loss"),
    S("gpt", "no warm-up, lr x10", "warmup", "held-out", "adamw", 3e-2,
      "healthy adamw, warm-up", schedule=True),
    S("lora", "healthy lora adam", "healthy", "tune", "adam", 1e-3),
    S("lora", "healthy full fine-tune sgd", "healthy", "held-out", "sgd", 1e-3,
      model=(("full", True),)),
    S("lora", "lr x100", "lr", "held-out", "adam", 0.1, "healthy lora adam"),
    S("lora", "inputs x1000 /100", "corrupt", "tune", "adam", 1e-3, "healthy lora adam",
      every=100),
    S("scan", "healthy adamw, warm-up", "healthy", "tune", "adamw", 3e-3, schedule=True,
      warmup=0.1),
    S("scan", "loss x1000 /100", "corrupt", "held-out", "adamw", 3e-3,
      "healthy adamw, warm-up", schedule=True, warmup=0.1, every=100, corrupt="loss"),
    S("scan", "NaN batch /100", "nan", "tune", "adamw", 3e-3, "healthy adamw, warm-up",
      schedule=True, warmup=0.1, every=100),
)  # fmt: skip
