"""Throughput checks for the example's train step, in one process (`python -m examples.throughput`).

1. gradxform vs optax: the same chain built from either library (`--impl`), same model and data,
   both inside the example's `gx.health` wrapper; steps/s of the compiled step, interleaved
   repeats, median.
2. Input pipeline: a trivial model (one linear layer) fed from host batches (a NumPy gather and
   a transfer per step, as in training) vs the same batches already on the device. If the two are
   close, batch production is not the bottleneck.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import numpy as np

from examples import data as data_lib
from examples import train
from examples.config import Config


class Timed:
    """A compiled train step with its state and batches, timed in blocks of `steps` steps."""

    def __init__(self, cfg: Config, data: data_lib.Dataset, steps: int, cached: bool = False):
        graphdef, state = train.create_train_state(cfg, data)
        self.runner = train.make_runner(
            cfg.parallel, graphdef, cfg.batch_size, num_classes=data.num_classes, seed=cfg.seed,
            schedule=train.learning_rate(cfg),
        )  # fmt: skip
        self.state, self.steps, self.data = self.runner.put_state(state), steps, data
        self.order = data_lib.BatchOrder(len(data.y_train), cfg.batch_size, cfg.seed)
        self.cached = [jax.device_put(self._host(i)) for i in range(steps)] if cached else None
        self.block()  # compile

    def _host(self, i: int):
        return self.runner.put_batch(*data_lib.batch(self.data, self.order, i))

    def block(self) -> float:
        """Steps/s of one block of `steps` steps, batches from the host or the device cache."""
        t = time.perf_counter()
        for i in range(self.steps):
            images, labels = self.cached[i] if self.cached else self._host(i)
            self.state, _ = self.runner.step(self.state, images, labels, np.int32(i))
        jax.block_until_ready(self.state)
        return self.steps / (time.perf_counter() - t)


def interleaved(timers: dict[str, Timed], repeats: int) -> dict[str, list[float]]:
    """Alternate the timers block by block, so machine load hits them alike."""
    rates: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(repeats):
        for name, timer in timers.items():
            rates[name].append(timer.block())
    return rates


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=200, help="steps per timed block")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--model", default="cnn")
    p.add_argument("--optimizer", default="adamw")
    args = p.parse_args(argv)
    data = data_lib.load("digits")
    cfg = Config(model=args.model, optimizer=args.optimizer)  # the default run's schedule
    impls = interleaved(
        {impl: Timed(replace(cfg, impl=impl), data, args.steps) for impl in ("gradxform", "optax")},
        args.repeats,
    )
    trivial = replace(cfg, model="mlp", depth=0)
    feeds = interleaved(
        {
            "host": Timed(trivial, data, args.steps),
            "cached": Timed(trivial, data, args.steps, cached=True),
        },
        args.repeats,
    )
    med = {name: statistics.median(r) for name, r in {**impls, **feeds}.items()}
    best = {name: max(r) for name, r in impls.items()}  # the least disturbed block under load
    report = {
        "model": args.model,
        "optimizer": args.optimizer,
        "gradxform_steps_per_s": med["gradxform"],
        "optax_steps_per_s": med["optax"],
        "gradxform_over_optax": med["gradxform"] / med["optax"],
        "best_gradxform_over_optax": best["gradxform"] / best["optax"],
        "runs": {**impls, **feeds},
        "trivial_model_host_batches_steps_per_s": med["host"],
        "trivial_model_device_cached_steps_per_s": med["cached"],
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
