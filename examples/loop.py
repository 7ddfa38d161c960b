"""The training loop: build everything from a `Config`, train, log, check, checkpoint, summarise."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

import gradxform as gx
from gradxform.plots import plot_health

from . import checkpoint, health, models, optim, plots
from . import data as data_lib
from . import step as step_lib
from .config import Config, UsageError
from .runlog import RunDir

# Fields that do not change the numbers; they may differ between a checkpoint and its run.
_NOT_NUMERIC = (
    "data_dir",
    "log_every",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "check",
)


def build(cfg: Config, data: data_lib.Dataset) -> tuple[nnx.GraphDef, nnx.State]:
    """Model and optimizer for `cfg` as `(graphdef, state)`.

    The state is initialised inside one `jax.jit`: one compilation instead of one per op.
    """

    def make() -> tuple[nnx.Module, nnx.Optimizer]:
        model = models.build(
            cfg.model, data.image_shape, data.num_classes, seed=cfg.seed, depth=cfg.depth,
            width=cfg.width, activation=cfg.activation, init=cfg.init, init_scale=cfg.init_scale,
            channels=cfg.channels, batch_norm=cfg.batch_norm, dropout=cfg.dropout,
            bn_axis_name=step_lib.AXIS if cfg.parallel == "pmap" else None,
        )  # fmt: skip
        return model, nnx.Optimizer(model, optim.build(cfg, key_seed=cfg.seed), wrt=nnx.Param)

    abstract_model, abstract_optimizer = nnx.eval_shape(make)
    graphdef, _ = nnx.split((abstract_model, abstract_optimizer))
    return graphdef, jax.jit(lambda: nnx.split(make())[1])()


def _numeric_config(cfg: Config | dict[str, Any]) -> dict[str, Any]:
    values = json.loads(cfg.to_json()) if isinstance(cfg, Config) else dict(cfg)
    return {k: v for k, v in values.items() if k not in _NOT_NUMERIC}


def _restore(rd: RunDir, cfg: Config, state: nnx.State) -> tuple[int, nnx.State]:
    found = checkpoint.list_checkpoints(rd.checkpoints)
    if not found:
        raise checkpoint.CheckpointError(
            f"No checkpoint to resume in {rd.checkpoints}; the run needs `--checkpoint-every N`."
        )
    path = found[-1]
    step, meta, leaves = checkpoint.read(path)
    saved, current = _numeric_config(meta.get("config", {})), _numeric_config(cfg)
    if saved != current:
        diff = {
            k: (saved.get(k), current.get(k))
            for k in saved.keys() | current.keys()
            if saved.get(k) != current.get(k)
        }
        raise checkpoint.CheckpointError(
            f"Checkpoint {path} was written with a different configuration than "
            f"{rd.path}/config.json (field: (checkpoint, config.json)): {diff}."
        )
    return step, checkpoint.restore_into(state, leaves, path)


def _window_record(rows: list[dict[str, Any]], skipped_total: int) -> dict[str, Any]:
    """The example's part of a `metrics.jsonl` line: sums, means and maxima over the steps since
    the last line (`gx.read_health` adds the last step's records: `health/...`, `skip/...`)."""
    return {
        "step": rows[-1]["step"],
        "loss": float(np.mean([r["loss"] for r in rows], dtype=np.float64)),
        "accuracy": float(np.mean([r["accuracy"] for r in rows], dtype=np.float64)),
        "lr": float(rows[-1]["lr"]),
        "grad_norm_max": float(np.max([r["grad_norm"] for r in rows])),
        "nonfinite": sum(int(r["nonfinite"]) for r in rows),
        "skipped": sum(bool(r["skipped"]) for r in rows),
        "skipped_total": skipped_total,
    }


def _validate(cfg: Config) -> None:
    for flag in ("steps", "batch_size", "log_every"):
        if getattr(cfg, flag) < 1:
            raise UsageError(
                f"`--{flag.replace('_', '-')}` must be at least 1, got {getattr(cfg, flag)}."
            )
    if cfg.on_instability not in ("stop", "skip", "warn"):
        raise UsageError(
            f"`--on-instability` must be stop, skip or warn, got {cfg.on_instability!r}."
        )


def train(
    cfg: Config,
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    plot: bool = True,
) -> dict[str, Any]:
    """Train per `cfg` into `run_dir` (from its latest checkpoint if `resume`); the summary."""
    _validate(cfg)
    wall0 = time.perf_counter()
    data = data_lib.load(cfg.dataset, cfg.data_dir)
    order = data_lib.BatchOrder(len(data.y_train), cfg.batch_size, cfg.seed)
    graphdef, state = build(cfg, data)
    runner = step_lib.make_runner(
        cfg.parallel, graphdef, cfg.batch_size, check=cfg.check, num_classes=data.num_classes,
        seed=cfg.seed, schedule=optim.learning_rate(cfg),
    )  # fmt: skip
    eval_step = step_lib.make_eval_step(graphdef)
    rd = RunDir(run_dir, writer=jax.process_index() == 0)

    if resume:
        start, state = _restore(rd, cfg, state)
        records = rd.truncate_metrics(start)
    else:
        rd.start(cfg)
        start, records = 0, []
    skipped_total = records[-1]["skipped_total"] if records else 0
    problems: list[health.InstabilityError] = []
    dstate = runner.put_state(state)
    pending: list[tuple[int, Any]] = []
    name = f"{cfg.model}/{cfg.optimizer}/{cfg.parallel}"
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress or not rd.writer, unit="step",
               desc=name, dynamic_ncols=True)  # fmt: skip
    t_first, t_aside = None, 0.0  # t_aside: evaluation and checkpoint time, not training
    try:
        for i in range(start, cfg.steps):
            images, labels = runner.put_batch(*data_lib.batch(data, order, i))
            dstate, metrics = runner.step(dstate, images, labels, np.int32(i))
            pending.append((i + 1, metrics))
            done = i + 1
            if t_first is None:
                jax.block_until_ready(metrics)
                t_first = time.perf_counter()  # data loading and compilation excluded from steps/s
            bar.update(1)
            evaluate = done == cfg.steps or (cfg.eval_every and done % cfg.eval_every == 0)
            save = cfg.checkpoint_every and done % cfg.checkpoint_every == 0
            if not (evaluate or save or done % cfg.log_every == 0):
                continue
            rows, found = [], []
            for s, metrics in pending:
                row = runner.get_metrics({k: v for k, v in metrics.items() if k != "health"})
                if row["exploding"] or not np.isfinite(row["loss"]):  # fetch the whole record
                    found.append(
                        health.check(runner.get_metrics(metrics["health"]), float(row["loss"]))
                    )
                rows.append({"step": s, **row})
            pending.clear()
            problems += found
            skipped_total += sum(bool(r["skipped"]) for r in rows)
            record = _window_record(rows, skipped_total)
            host_state = runner.get_state(dstate)
            record.update(gx.read_health(health.optimizer_state(graphdef, host_state)))
            if evaluate:
                t_eval = time.perf_counter()
                record.update(step_lib.evaluate(eval_step, host_state, data.x_test, data.y_test))
                t_aside += time.perf_counter() - t_eval
            records.append(record)
            rd.log(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.3f}")
            if found and cfg.on_instability == "stop":
                raise found[0]  # from gx.assert_healthy's error: names the step and the layers
            if found and cfg.on_instability == "warn":
                bar.write(f"warning: {found[0]}")
            if save and rd.writer:
                t_save = time.perf_counter()
                meta = {
                    "config": json.loads(cfg.to_json()),
                    "data_order": order.state(done),
                    "step": done,
                }
                checkpoint.save(
                    rd.checkpoints, done, runner.get_state(dstate), meta, cfg.keep_checkpoints
                )
                t_aside += time.perf_counter() - t_save
        jax.block_until_ready(dstate)
        t_end = time.perf_counter()
    finally:
        bar.close()
        if plot and records and rd.writer:
            plots.plot_curves(records, rd.path / "curves.png")
            plot_health(records, rd.path / "grad_norms.png", title=name)
    timed = cfg.steps - start - 1
    final = records[-1] if records else {}
    summary = {
        "run_dir": str(rd.path),
        "steps": cfg.steps,
        "resumed_from": start if resume else None,
        "test_accuracy": final.get("test_accuracy"),
        "test_loss": final.get("test_loss"),
        "train_loss": final.get("loss"),
        "steps_per_s": timed / (t_end - t_first - t_aside) if t_first and timed > 0 else None,
        "startup_s": (t_first - wall0) if t_first else None,
        "wall_s": time.perf_counter() - wall0,
        "devices": jax.device_count(),
        "parallel": cfg.parallel,
        "skipped_steps": skipped_total,
        "health": health.verdict(
            records,
            problems,
            health.optimizer_state(graphdef, runner.get_state(dstate)),
            cfg.on_instability,
        ),
    }
    rd.write_summary(summary)
    return summary
