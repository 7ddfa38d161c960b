"""Train a Flax NNX MLP or CNN with a gradxform optimizer: `python examples/train.py --help`.

One training step reads from three files: this one (`create_optimizer`, `create_train_state`,
`train_step`), `models.py` (the network) and `config.py` (the choices). `train_and_evaluate` runs
the steps, logs, evaluates, checkpoints and judges the run; `main.py` is its command line.

The train state is the `nnx.State` of `(model, nnx.Optimizer)`. A step merges it with the static
graph definition, runs forward, backward and update, and splits it again, so the same pure
function runs three ways (`--parallel`):

- `none`: one device, `jax.jit`.
- `pmap`: state replicated, the batch split `(devices, per_device, ...)`; gradients, loss and
  accuracy averaged with `jax.lax.pmean` over the `data` axis before the update, so every
  replica applies the same update (and the same noise and skip decisions).
- `sharded`: `jax.jit` with the state replicated and the batch split along a `data` mesh axis
  (`NamedSharding`); XLA inserts the gradient all-reduce.

With several processes (`--distributed`) each process puts its own slice of the global batch on
its local devices, and only process 0 touches the run directory.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `examples` and `gradxform` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import gradxform as gx
from examples import data as data_lib
from examples import models, runlog
from examples.config import Config, UsageError, free_on_resume
from gradxform.plots import plot_health

AXIS = "data"
Metrics = dict[str, jax.Array]
_OUTSIDE = nnx.Not(nnx.PathContains("opt_state"))  # the model, and the optimizer's step counter


# ----------------------------------------------------------------------------- optimizer


def learning_rate(cfg: Config) -> optax.Schedule:
    """`--lr` under `--lr-schedule` after `--warmup` linear warm-up steps (optax schedules)."""
    lr, warmup, steps = cfg.lr, cfg.warmup, cfg.steps
    if cfg.lr_schedule == "constant":
        if not warmup:
            return optax.constant_schedule(lr)
        return optax.warmup_constant_schedule(0.0, lr, warmup)
    if cfg.lr_schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, end_value=0.0)
    if cfg.lr_schedule == "linear":
        ramp = optax.linear_schedule(0.0, lr, warmup)
        return optax.join_schedules(
            [ramp, optax.linear_schedule(lr, 0.0, steps - warmup)], [warmup]
        )
    # exponential: decays 100x over the run
    return optax.warmup_exponential_decay_schedule(0.0, lr, warmup, steps - warmup, 0.01)


def create_optimizer(cfg: Config) -> optax.GradientTransformation:
    """The chain of the flags, from gradxform (or, to compare, optax), wrapped in `gx.health`.

    Order: clipping -> L2 / L1 penalty -> gradient noise -> the optimizer (ending with the
    learning rate). AdamW's decoupled decay lives inside `adamw`; for every other optimizer
    `--weight-decay` is the coupled L2 penalty (PyTorch's convention). Decay skips biases and
    normalisation scales (`gx.weight_decay_mask`). `--on-instability skip` puts `gx.skip_if`
    inside the health wrapper; `--stable` puts `gx.stable(...)` there instead.
    A value the library rejects becomes a `UsageError`.
    """
    lib = gx if cfg.impl == "gradxform" else optax
    gx_only = partial(_gx_only, cfg)
    clips = [
        (cfg.clip_value, lib.clip),
        (cfg.clip_leaf_norm, lambda v: gx_only("clip_by_leaf_norm")(v)),
        (cfg.clip_block_rms, lib.clip_by_block_rms),
        (cfg.agc, lib.adaptive_grad_clip),
        (cfg.clip_global_norm, lib.clip_by_global_norm),
    ]
    try:
        parts = [make(value) for value, make in clips if value is not None]
        if cfg.optimizer != "adamw" and cfg.weight_decay:
            parts.append(lib.add_decayed_weights(cfg.weight_decay, mask=gx.weight_decay_mask))
        if cfg.l1:
            parts.append(gx_only("add_l1_decay")(cfg.l1, mask=gx.weight_decay_mask))
        if cfg.noise_eta:
            parts.append(lib.add_noise(cfg.noise_eta, cfg.noise_gamma, cfg.seed))
        parts.append(_optimizer(cfg, lib, learning_rate(cfg)))
        tx = parts[0] if len(parts) == 1 else lib.chain(*parts)
        if cfg.stable:  # skips, clips and backs off on its own statistics; records them
            tx = gx_only("stable")(tx, max_norm=cfg.max_grad_norm)
        elif cfg.on_instability == "skip":  # zero update, optimizer state kept
            tx = gx.skip_if(tx, max_norm=cfg.max_grad_norm)
    except ValueError as e:
        raise e if isinstance(e, UsageError) else UsageError(f"{e} (from the flags)") from e
    # `exploding` = non-finite or above `--max-grad-norm`, the bound `--on-instability` acts on.
    # The z-score and growth are recorded but not flagged: late in a calm run a 1.5x wobble
    # passes z > 4 (health's z-score has no floor on the spread) and would stop a healthy run.
    return gx.health(tx, max_norm=cfg.max_grad_norm, z_threshold=float("inf"), max_growth=None)


def _optimizer(cfg: Config, lib, lr: optax.Schedule) -> optax.GradientTransformation:
    adam = dict(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    if cfg.optimizer == "sgd":
        return lib.sgd(lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.optimizer == "adagrad":
        return lib.adagrad(lr, eps=cfg.eps)
    if cfg.optimizer == "rmsprop":
        return lib.rmsprop(
            lr, decay=cfg.rms_decay, eps=cfg.eps, centered=cfg.centered,
            momentum=cfg.momentum, nesterov=cfg.nesterov,
        )  # fmt: skip
    if cfg.optimizer == "adamw":
        decay = 1e-4 if cfg.weight_decay is None else cfg.weight_decay
        return lib.adamw(
            lr, **adam, weight_decay=decay, mask=gx.weight_decay_mask, nesterov=cfg.nesterov
        )
    if cfg.optimizer == "adam":
        return lib.adam(lr, **adam, nesterov=cfg.nesterov)
    if cfg.optimizer == "lbfgs":  # full batch, step sizes from its line search (full_batch.py)
        return lib.lbfgs()
    return getattr(lib, cfg.optimizer)(lr, **adam)  # adamax, nadam, amsgrad


def _gx_only(cfg: Config, name: str) -> Callable[..., optax.GradientTransformation]:
    if cfg.impl == "optax":
        raise UsageError(
            f"`{name}` has no optax equivalent; drop its flag or use `--impl gradxform`."
        )
    return getattr(gx, name)


# ----------------------------------------------------------------------------- state and steps


def create_train_state(cfg: Config, data: data_lib.Dataset) -> tuple[nnx.GraphDef, nnx.State]:
    """Model and optimizer for `cfg` as `(graphdef, state)`, initialised inside one `jax.jit`
    (one compilation instead of one per op)."""

    def make() -> tuple[nnx.Module, nnx.Optimizer]:
        model = models.build(
            cfg.model, data.image_shape, data.num_classes, seed=cfg.seed, depth=cfg.depth,
            width=cfg.width, activation=cfg.activation, init=cfg.init, init_scale=cfg.init_scale,
            channels=cfg.channels, batch_norm=cfg.batch_norm, dropout=cfg.dropout,
            bn_axis_name=AXIS if cfg.parallel == "pmap" else None,
        )  # fmt: skip
        return model, nnx.Optimizer(model, create_optimizer(cfg), wrt=nnx.Param)

    graphdef, _ = nnx.split(nnx.eval_shape(make))
    return graphdef, jax.jit(lambda: nnx.split(make())[1])()


def optimizer_state(graphdef: nnx.GraphDef, state: nnx.State) -> Any:
    """The optimizer state (plain arrays; `gx.health`'s record outermost) of a train state."""
    _, optimizer = nnx.merge(graphdef, state)
    return nnx.as_pure(optimizer.opt_state)


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

    The metrics hold this step's `gx.health` record, a few of its fields read every step, and
    whether `gx.skip_if` or `gx.stable` (if present) skipped the step.
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
        if isinstance(opt_state.inner, gx.SkipIfState | gx.StableState):
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
        correct = jnp.where(jnp.argmax(logits, -1) == labels, mask, 0.0)
        return jnp.sum(losses * mask), jnp.sum(correct)

    return eval_step


def _evaluate(
    eval_step, state, images: np.ndarray, labels: np.ndarray, chunk: int = 1000, name: str = "test"
) -> dict:
    """`{name}_loss` and `{name}_accuracy` (test by default) over `images`; the last chunk is
    padded and masked, so one compiled shape."""
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
    return {f"{name}_loss": loss / n, f"{name}_accuracy": correct / n}


# ----------------------------------------------------------------------------- parallel modes


@dataclass
class Runner:
    """How one `--parallel` mode places state and batches and runs the step."""

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


def _keys_as_data(f: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`f` applied to a leaf, or to the key data of a PRNG key leaf (rewrapped after)."""

    def apply(x):
        if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
            return jax.random.wrap_key_data(f(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        return f(x)

    return apply


def _process_slice(x: np.ndarray) -> np.ndarray:
    """This process's contiguous share of a global batch (the whole batch with one process)."""
    n = len(x) // jax.process_count()
    return x[jax.process_index() * n : (jax.process_index() + 1) * n]


def make_runner(
    mode: str, graphdef, batch_size: int, *, check: bool = False, **step_args
) -> Runner:
    """A `Runner` for `--parallel mode` with global batch `batch_size`."""
    if check and mode == "pmap":
        raise UsageError("`--check` (chexify) runs with `--parallel none` or `sharded`, not pmap.")
    if mode != "none":
        per_device_batch(batch_size, jax.device_count())
    if mode == "none":
        fn = make_train_step(graphdef, check=check, **step_args)
        step = jax.jit(fn, donate_argnums=0)
        step = chex.chexify(step, async_check=False) if check else step
        return Runner(mode, step, jax.device_put, lambda s: s, lambda x, y: (x, y), jax.device_get)
    if mode == "pmap":
        return _pmap_runner(graphdef, **step_args)
    return _sharded_runner(graphdef, check, **step_args)


def _pmap_runner(graphdef, **step_args) -> Runner:
    n = jax.local_device_count()
    fn = make_train_step(graphdef, axis_name=AXIS, **step_args)
    step = jax.pmap(fn, axis_name=AXIS, in_axes=(0, 0, 0, None), donate_argnums=0)
    split = lambda x: _process_slice(x).reshape(n, -1, *x.shape[1:])
    replicate = _keys_as_data(lambda x: np.broadcast_to(np.asarray(x), (n, *np.shape(x))))
    first = _keys_as_data(lambda x: np.asarray(x.addressable_data(0))[0])
    return Runner(
        "pmap", step, lambda s: jax.tree.map(replicate, s), lambda s: jax.tree.map(first, s),
        lambda x, y: (split(x), split(y)), lambda m: jax.tree.map(first, m),
    )  # fmt: skip


def _sharded_runner(graphdef, check: bool, **step_args) -> Runner:
    mesh = Mesh(np.array(jax.devices()), (AXIS,))
    replicated, along_data = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))
    fn = make_train_step(graphdef, check=check, **step_args)
    step = jax.jit(
        fn,
        in_shardings=(replicated, along_data, along_data, replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
    step = chex.chexify(step, async_check=False) if check else step
    local = lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x
    put = lambda a: jax.make_array_from_process_local_data(along_data, _process_slice(a), a.shape)
    return Runner(
        "sharded", step, lambda s: jax.device_put(s, replicated),
        lambda s: jax.tree.map(local, s), lambda x, y: (put(x), put(y)),
        lambda m: jax.device_get(jax.tree.map(local, m)),
    )  # fmt: skip


# ----------------------------------------------------------------------------- the run


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training, after the checkpoint and `summary.json` were written."""

    def __init__(self, summary: dict[str, Any]):
        super().__init__(summary["health"])
        self.summary = summary


def train_and_evaluate(
    cfg: Config,
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    plot: bool = True,
) -> dict[str, Any]:
    """Train per `cfg` into `run_dir` (from its latest checkpoint if `resume`); the summary.

    Every way out writes `summary.json` (on process 0). Its `status`: `completed`, `failed`
    (at chance, most steps skipped, or a non-finite loss), `stopped` (then raises
    `runlog.InstabilityError`) or `interrupted` (Ctrl-C: saves a checkpoint, raises `Interrupted`).
    """
    if cfg.optimizer == "lbfgs":  # full batch; that module builds on this one
        from examples.full_batch import FullBatchRun as Run
    else:
        Run = _Run
    run = Run(cfg, Path(run_dir), progress=progress)
    start = run.begin(resume)
    try:
        run.train(start)
    except runlog.InstabilityError:
        run.finish("stopped", plot)
        raise
    except KeyboardInterrupt:
        run.save_on_interrupt()
        raise Interrupted(run.finish("interrupted", plot)) from None
    return run.finish("completed", plot)


class _Run:
    """The state of one run between steps: device state, pending metrics, records, timers."""

    def __init__(self, cfg: Config, run_dir: Path, *, progress: bool):
        self.wall0 = time.perf_counter()
        self.cfg, self.rd, self.writer = cfg, runlog.RunDir(run_dir), jax.process_index() == 0
        self.data = data_lib.load(cfg.dataset, cfg.data_dir)
        self.graphdef, self.state = create_train_state(cfg, self.data)
        self.order, self.runner = self.feed()
        self.eval_step = make_eval_step(self.graphdef)
        self.pending, self.problems = [], []
        self.records: list[dict[str, Any]] = []
        self.resumed_from, self.done, self.checkpoint = None, 0, None
        self.t_first, self.t_aside = None, 0.0  # t_aside: evaluation and checkpoints
        self.progress = progress and self.writer

    def feed(self) -> tuple[data_lib.BatchOrder | None, Runner]:
        """The batch order and the runner of the training steps."""
        cfg = self.cfg
        order = data_lib.BatchOrder(len(self.data.y_train), cfg.batch_size, cfg.seed)
        runner = make_runner(
            cfg.parallel, self.graphdef, cfg.batch_size, check=cfg.check, seed=cfg.seed,
            num_classes=self.data.num_classes, schedule=learning_rate(cfg),
        )  # fmt: skip
        return order, runner

    def begin(self, resume: bool) -> int:
        """Create the run directory, or restore its latest checkpoint; the first step to run."""
        if resume:
            self.done, self.records, self.state = _restore(self.rd, self.cfg, self.state)
            self.resumed_from = self.done
        else:
            runlog.from_process_0(lambda: self.rd.start(self.cfg))
        self.state = self.runner.put_state(self.state)
        name = f"{self.cfg.model}/{self.cfg.optimizer}/{self.cfg.parallel}"
        self.bar = Progress(self.cfg.steps, self.done, name, enabled=self.progress)
        return self.done

    def train(self, start: int) -> None:
        for i in range(start, self.cfg.steps):
            self.step(i)

    def step(self, i: int) -> None:
        images, labels = self.runner.put_batch(*data_lib.batch(self.data, self.order, i))
        self.state, metrics = self.runner.step(self.state, images, labels, np.int32(i))
        self.pending.append((i + 1, metrics))
        self.done = i + 1
        if self.t_first is None:
            jax.block_until_ready(metrics)
            self.t_first = time.perf_counter()  # data loading and compilation excluded
        cfg, done = self.cfg, self.done
        evaluate = done == cfg.steps or (cfg.eval_every and done % cfg.eval_every == 0)
        save = cfg.checkpoint_every and done % cfg.checkpoint_every == 0
        if evaluate or save or done % cfg.log_every == 0:
            found = self.log(evaluate)
            if found and cfg.on_instability == "stop":
                raise found[0]  # from gx.assert_healthy's error: names the step and the layers
            if found and cfg.on_instability == "warn":
                self.bar.write(f"warning: {found[0]}")
        if save:
            self.save()
        self.bar.update(done, self.records[-1] if self.records else None)

    def log(self, evaluate: bool) -> list[runlog.InstabilityError]:
        """Write the `metrics.jsonl` line of the steps since the last one; their problems."""
        rows, found = [], []
        for s, metrics in self.pending:
            row = self.runner.get_metrics({k: v for k, v in metrics.items() if k != "health"})
            if row["exploding"] or not np.isfinite(row["loss"]):  # fetch the whole record
                record = self.runner.get_metrics(metrics["health"])
                found.append(runlog.check(record, float(row["loss"]), self.cfg))
            rows.append({"step": s, **row})
        self.pending.clear()
        if not rows:
            return found
        self.problems += found
        record = _window_record(rows, self.records[-1]["skipped_total"] if self.records else 0)
        host_state = self.runner.get_state(self.state)
        record.update(gx.read_health(optimizer_state(self.graphdef, host_state)))
        if evaluate:
            t = time.perf_counter()
            test = self.data.x_test, self.data.y_test
            record.update(_evaluate(self.eval_step, host_state, *test))
            self.t_aside += time.perf_counter() - t
        self.records.append(record)
        if self.writer:
            self.rd.log(record)
        return found

    def save(self) -> None:
        t = time.perf_counter()
        if self.writer:
            meta = {
                "config": _config_dict(self.cfg),
                "data_order": self.order.state(self.done) if self.order else None,
                "step": self.done,
            }
            state = self.runner.get_state(self.state)
            folder, keep = self.rd.checkpoints, self.cfg.keep_checkpoints
            self.checkpoint = str(runlog.save_checkpoint(folder, self.done, state, meta, keep))
        self.t_aside += time.perf_counter() - t

    def save_on_interrupt(self) -> None:
        """Log the steps since the last line and checkpoint the last finished step."""
        try:
            self.log(evaluate=False)
            self.save()
        except RuntimeError as e:  # Ctrl-C inside a step whose input was donated
            self.checkpoint = None
            self.bar.write(f"no checkpoint saved: the state was mid-update ({e})")

    def finish(self, status: str, plot: bool) -> dict[str, Any]:
        """The summary (also `summary.json`), the plots; `status` may become `failed`."""
        self.bar.close()
        summary = self.summary(status)
        failed = runlog.failure(summary, self.data.num_classes) if status == "completed" else None
        summary["status"] = "failed" if failed else status
        opt_state = optimizer_state(self.graphdef, self.runner.get_state(self.state))
        summary["health"] = runlog.verdict(
            self.records, self.problems, opt_state, self.cfg.on_instability, failed
        )
        if self.writer:
            self.rd.write_summary(summary)
            if plot and self.records:
                runlog.plot_curves(self.records, self.rd.path / "curves.png")
                name = f"{self.cfg.model}/{self.cfg.optimizer}/{self.cfg.parallel}"
                plot_health(self.records, self.rd.path / "grad_norms.png", title=name)
        return summary

    def summary(self, status: str, untimed: int = 1) -> dict[str, Any]:
        """The fields of `summary.json` but the verdict; steps/s leaves out `untimed` steps
        (the first one, which compiled) and the time of evaluations and checkpoints."""
        t_end = time.perf_counter()
        cfg, final = self.cfg, self.records[-1] if self.records else {}
        timed = self.done - (self.resumed_from or 0) - untimed
        span = t_end - (self.t_first or t_end) - self.t_aside
        return {
            "status": status,
            "run_dir": str(self.rd.path),
            "steps": cfg.steps,
            "steps_done": self.done,
            "resumed_from": self.resumed_from,
            "test_accuracy": final.get("test_accuracy"),
            "test_loss": final.get("test_loss"),
            "train_loss": final.get("loss"),
            "steps_per_s": timed / span if self.t_first and timed > 0 and span > 0 else None,
            "startup_s": (self.t_first - self.wall0) if self.t_first else None,
            "wall_s": time.perf_counter() - self.wall0,
            "devices": jax.device_count(),
            "processes": jax.process_count(),
            "parallel": cfg.parallel,
            "skipped_steps": final.get("skipped_total", 0),
            "checkpoint": self.checkpoint,
        }


def _window_record(rows: list[dict[str, Any]], skipped_before: int) -> dict[str, Any]:
    """The example's part of a `metrics.jsonl` line: sums, means and maxima over the steps since
    the last line (`gx.read_health` adds the last step's records: `health/...`, `skip/...`)."""
    skipped = sum(bool(r["skipped"]) for r in rows)
    return {
        "step": rows[-1]["step"],
        "loss": float(np.mean([r["loss"] for r in rows], dtype=np.float64)),
        "accuracy": float(np.mean([r["accuracy"] for r in rows], dtype=np.float64)),
        "lr": float(rows[-1]["lr"]),
        "grad_norm_max": float(np.max([r["grad_norm"] for r in rows])),
        "nonfinite": sum(int(r["nonfinite"]) for r in rows),
        "skipped": skipped,
        "skipped_total": skipped_before + skipped,
    }


def _config_dict(cfg: Config) -> dict[str, Any]:
    return json.loads(cfg.to_json())


def _restore(rd: runlog.RunDir, cfg: Config, state: nnx.State) -> tuple[int, list, nnx.State]:
    """`(step, records, state)` of the latest checkpoint, read by process 0 and shared."""
    restored = {}

    def read() -> tuple[int, list]:
        found = runlog.list_checkpoints(rd.checkpoints)
        if not found:
            raise runlog.CheckpointError(
                f"No checkpoint to resume in {rd.checkpoints}; the run needs "
                "`--checkpoint-every N` (or a Ctrl-C, which saves one)."
            )
        step, meta, leaves = runlog.read_checkpoint(found[-1])
        _check_same_numbers(meta.get("config", {}), cfg, found[-1], rd.path, step)
        restored["leaves"] = runlog.leaves_of(runlog.restore_into(state, leaves, found[-1]))
        records = rd.truncate_metrics(step)
        rd.write_config(cfg)  # a longer `--steps` is kept for the next resume
        return step, records

    step, records = runlog.from_process_0(read)
    leaves = restored.get("leaves", runlog.leaves_of(state))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        shared = multihost_utils.broadcast_one_to_all(leaves)
        leaves = {k: np.asarray(v).astype(leaves[k].dtype) for k, v in shared.items()}
    return step, records, runlog.restore_into(state, leaves, rd.checkpoints)


def _check_same_numbers(saved: dict, cfg: Config, path: Path, run: Path, step: int) -> None:
    """Refuse a checkpoint written with other numeric choices; a resumed run may only be
    longer (`--steps`) or log, evaluate and checkpoint differently."""
    free = free_on_resume(cfg)
    current = _config_dict(cfg)
    diff = {
        k: (saved.get(k), current.get(k))
        for k in saved.keys() | current.keys()
        if k not in free and saved.get(k) != current.get(k)
    }
    if diff:
        raise runlog.CheckpointError(
            f"Checkpoint {path} was written with a different configuration than "
            f"{run}/config.json (field: (checkpoint, config.json)): {diff}."
        )
    if cfg.steps <= step:
        raise UsageError(
            f"`--steps` {cfg.steps} must exceed the checkpoint's step {step} to resume "
            f"{run}; pass a larger `--steps` to train longer."
        )


class Progress:
    """A tqdm bar on a terminal; elsewhere (logs, CI) a line every tenth of the run."""

    def __init__(self, total: int, initial: int, name: str, *, enabled: bool):
        from tqdm.auto import tqdm

        self.total, self.name, self.enabled = total, name, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, unit="step", desc=name, dynamic_ncols=True,
                        disable=not self.tty)  # fmt: skip
        self.every = max(1, total // 10)
        self.next = (initial // self.every + 1) * self.every

    def update(self, step: int, record: dict[str, Any] | None) -> None:
        if self.tty:
            self.bar.update(step - self.bar.n)
            if record:
                self.bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.3f}")
        elif self.enabled and (step >= self.next or step == self.total):
            self.next = (step // self.every + 1) * self.every
            last = f" loss {record['loss']:.4f} acc {record['accuracy']:.3f}" if record else ""
            print(f"{self.name} step {step}/{self.total}{last}", file=sys.stderr, flush=True)

    def write(self, message: str) -> None:
        self.bar.write(message)

    def close(self) -> None:
        self.bar.close()


if __name__ == "__main__":
    from examples.main import main

    sys.exit(main())
