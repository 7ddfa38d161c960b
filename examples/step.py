"""The jitted train and eval steps, and the three ways to run them: one device, pmap, sharded.

The train state is the `nnx.State` of `(model, nnx.Optimizer)`; a step merges it with the static
graph definition, runs forward/backward/update and splits it again, so the same pure function
runs under `jax.jit`, `jax.pmap` and `jax.jit` over a `Mesh`.

- `none`: one device, `jax.jit`.
- `pmap`: state replicated, the batch split `(devices, per_device, ...)`, gradients, loss and
  accuracy averaged with `jax.lax.pmean` over the `data` axis before the update, so every
  replica applies the same update (and the same noise and skip decisions).
- `sharded`: `jax.jit` with the state replicated and the batch split along a `data` mesh axis
  (`NamedSharding`); XLA inserts the gradient all-reduce.

With several processes (`--distributed`), each process puts its own slice of the global batch
on its local devices.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import gradxform as gx

from .config import UsageError

AXIS = "data"
PARALLEL = ("none", "pmap", "sharded")
Metrics = dict[str, jax.Array]
_OUTSIDE = nnx.Not(nnx.PathContains("opt_state"))  # the model, and the optimizer's step counter


def make_train_step(
    graphdef: nnx.GraphDef,
    *,
    num_classes: int,
    seed: int,
    schedule: optax.Schedule,
    check: bool = False,
    axis_name: str | None = None,
) -> Callable[[nnx.State, jax.Array, jax.Array, jax.Array], tuple[nnx.State, Metrics]]:
    """`train_step(state, images, labels, step) -> (state, metrics)`; pure, for jit or pmap.

    The metrics hold this step's `gx.health` record (the optimizer is wrapped in `gx.health`,
    see `optim.build`), a few of its fields, and whether `gx.skip_if` (if present) skipped it.
    """

    def train_step(state, images, labels, step):
        kept = nnx.as_pure(nnx.filter_state(state, _OUTSIDE))  # before `merge` shares the arrays
        model, optimizer = nnx.merge(graphdef, state)
        model.train()
        batch = images.shape[0]
        chex.assert_rank(images, 4)
        chex.assert_type(images, jnp.float32)
        chex.assert_shape(labels, (batch,))
        chex.assert_type(labels, jnp.int32)
        key = jax.random.fold_in(jax.random.key(seed, impl="rbg"), step)  # dropout: fresh per step
        if axis_name is not None:
            key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))

        def loss_fn(model):
            logits = model(images, key)
            chex.assert_shape(logits, (batch, num_classes))
            chex.assert_type(logits, jnp.float32)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

        (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        chex.assert_trees_all_equal_shapes_and_dtypes(grads, nnx.state(model, nnx.Param))
        accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
        if axis_name is not None:  # every replica then records and decides alike
            grads, loss, accuracy = jax.lax.pmean((grads, loss, accuracy), axis_name)
        if check:  # value assertions: only valid under chex.chexify
            chex.assert_tree_all_finite(loss)
            chex.assert_tree_all_finite(grads)
        lr = schedule(optimizer.step[...].astype(jnp.int32))  # the rate this update uses
        optimizer.update(model, grads, loss=loss)  # `gx.skip_if` also skips a non-finite loss
        opt_state = nnx.as_pure(optimizer.opt_state)  # gx.health(...) outermost
        skipped = jnp.zeros([], bool)
        if isinstance(opt_state.inner, gx.SkipIfState):
            # The guard kept the optimizer's own state; keep what lives outside it too (batch
            # statistics, the step that drives the schedule), by the guard's own decision.
            skipped = opt_state.inner.skipped
            now = nnx.as_pure(nnx.state((model, optimizer), _OUTSIDE))
            nnx.update((model, optimizer), jax.tree.map(partial(jnp.where, skipped), kept, now))
        record = opt_state._replace(inner=gx.EmptyState())  # the telemetry, not the moments
        metrics = {
            "loss": loss, "accuracy": accuracy, "lr": lr, "skipped": skipped,
            # read on the host every step; the whole record only when these flag a problem
            "exploding": record.exploding, "nonfinite": record.nonfinite,
            "grad_norm": record.global_norm, "health": record,
        }  # fmt: skip
        return nnx.split((model, optimizer))[1], metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """`eval_step(state, images, labels, mask) -> (sum of losses, number correct)` over `mask`."""

    @jax.jit
    def eval_step(state, images, labels, mask):
        model, _ = nnx.merge(graphdef, state)
        model.eval()
        logits = model(images)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return jnp.sum(losses * mask), jnp.sum(
            jnp.where(jnp.argmax(logits, -1) == labels, mask, 0.0)
        )

    return eval_step


def evaluate(
    eval_step, state, images: np.ndarray, labels: np.ndarray, chunk: int = 1000
) -> dict[str, float]:
    """Test loss and accuracy; the last chunk is padded and masked, so one compiled shape."""
    n = len(labels)
    chunk = min(chunk, n)
    loss = correct = 0.0
    for start in range(0, n, chunk):
        x, y = images[start : start + chunk], labels[start : start + chunk]
        pad = chunk - len(y)
        mask = np.concatenate([np.ones(len(y), np.float32), np.zeros(pad, np.float32)])
        x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
        y = np.concatenate([y, np.zeros(pad, y.dtype)])
        batch_loss, batch_correct = eval_step(state, x, y, mask)
        loss += float(batch_loss)
        correct += float(batch_correct)
    return {"test_loss": loss / n, "test_accuracy": correct / n}


# ----------------------------------------------------------------------------- parallel modes


@dataclass
class Runner:
    """How one parallel mode places state and batches and runs the step."""

    mode: str
    step: Callable[..., tuple[Any, Metrics]]  # (state, images, labels, step) -> (state, metrics)
    put_state: Callable[[Any], Any]  # host/unreplicated state -> device state
    get_state: Callable[[Any], Any]  # device state -> unreplicated state (for eval, checkpoints)
    put_batch: Callable[[np.ndarray, np.ndarray], tuple[Any, Any]]
    get_metrics: Callable[[Metrics], dict[str, np.ndarray]]  # one step's metrics on the host


def per_device_batch(batch_size: int, num_devices: int) -> int:
    if batch_size % num_devices:
        lower = batch_size // num_devices * num_devices
        hint = f"{lower} or {lower + num_devices}" if lower else str(num_devices)
        raise UsageError(
            f"`--batch-size` {batch_size} does not divide evenly over {num_devices} devices; "
            f"the global batch is split equally, so use a multiple of {num_devices} (e.g. {hint})."
        )
    return batch_size // num_devices


def _is_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def _replicate(x: Any, n: int) -> Any:
    """`n` stacked copies of a leaf, built on the host (pmap places them)."""
    if _is_key(x):
        return jax.random.wrap_key_data(
            _replicate(jax.random.key_data(x), n), impl=jax.random.key_impl(x)
        )
    return np.broadcast_to(np.asarray(x), (n, *np.shape(x)))


def _first_replica(x: Any) -> Any:
    if _is_key(x):
        return jax.random.wrap_key_data(
            _first_replica(jax.random.key_data(x)), impl=jax.random.key_impl(x)
        )
    return np.asarray(x.addressable_data(0))[0]


def _process_slice(x: np.ndarray) -> np.ndarray:
    """This process's contiguous share of a global batch (the whole batch with one process)."""
    n = len(x) // jax.process_count()
    return x[jax.process_index() * n : (jax.process_index() + 1) * n]


def make_runner(
    mode: str,
    graphdef: nnx.GraphDef,
    batch_size: int,
    *,
    check: bool = False,
    **step_args: Any,
) -> Runner:
    """A `Runner` for `--parallel mode` with global batch `batch_size`."""
    if mode not in PARALLEL:
        raise UsageError(f"`--parallel` must be one of {PARALLEL}, got {mode!r}.")
    if check and mode == "pmap":
        raise UsageError(
            "`--check` (chexify) runs with `--parallel none` or `sharded`, not `pmap`."
        )
    wrap = (lambda f: chex.chexify(f, async_check=False)) if check else (lambda f: f)
    host = lambda metrics: jax.device_get(metrics)

    if mode == "none":
        fn = make_train_step(graphdef, check=check, **step_args)
        return Runner(mode, wrap(jax.jit(fn, donate_argnums=0)), jax.device_put, lambda s: s,
                      lambda x, y: (x, y), host)  # fmt: skip

    if mode == "pmap":
        n = jax.local_device_count()
        per_device_batch(batch_size, jax.device_count())
        fn = make_train_step(graphdef, axis_name=AXIS, **step_args)
        pstep = jax.pmap(fn, axis_name=AXIS, in_axes=(0, 0, 0, None), donate_argnums=0)
        split = lambda x: _process_slice(x).reshape(n, -1, *x.shape[1:])
        return Runner(
            mode,
            pstep,
            lambda s: jax.tree.map(lambda x: _replicate(x, n), s),
            lambda s: jax.tree.map(_first_replica, s),
            lambda x, y: (split(x), split(y)),
            lambda m: jax.tree.map(_first_replica, m),
        )

    per_device_batch(batch_size, jax.device_count())
    mesh = Mesh(np.array(jax.devices()), (AXIS,))
    replicated, along_data = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))
    fn = make_train_step(graphdef, check=check, **step_args)
    sstep = jax.jit(
        fn,
        in_shardings=(replicated, along_data, along_data, replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
    local = lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x

    def put_batch(x, y):
        put = lambda a: jax.make_array_from_process_local_data(
            along_data, _process_slice(a), a.shape
        )
        return put(x), put(y)

    return Runner(
        mode,
        wrap(sstep),
        lambda s: jax.device_put(s, replicated),
        lambda s: jax.tree.map(local, s),
        put_batch,
        lambda m: jax.device_get(jax.tree.map(local, m)),
    )
