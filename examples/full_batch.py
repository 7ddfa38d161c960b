"""`--optimizer lbfgs`: the model trained on the whole training set by `gx.minimize`.

Every L-BFGS step sees the mean cross-entropy over all training examples; its line search picks
the step size. `gx.minimize(loss, params, tx=...)` runs the steps in one compiled
`lax.while_loop`, with `tx` the example's `gx.health(gx.lbfgs())` (`--impl optax`:
`optax.lbfgs()` inside the same health wrapper).

The run is cut into chunks of `--eval-every` steps (0: one chunk of `--steps`). After each chunk
it writes a `metrics.jsonl` line: the full-batch loss, accuracy and gradient norm, the loss
evaluations so far (line-search points included) and `gx.read_health` of the chunk's last step
(`health/...`, `lbfgs/...`, `linesearch/...`), with the test loss and accuracy; a first line at
step 0 holds the starting point. At multiples of `--checkpoint-every` the chunk's end is
checkpointed. Each chunk starts L-BFGS afresh (`gx.minimize` begins at `tx.init`, so the
curvature memory is rebuilt over the next `memory_size` = 10 steps): a checkpoint is all a chunk
starts from, and a resumed run repeats the uninterrupted one exactly.

The run stops after `--steps` steps, when the gradient norm is at most `TOL` (converged), or
when a chunk ends early without converging (the line search found no lower loss).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import optax
from flax import nnx

import gradxform as gx
from examples import runlog
from examples.train import Runner, _evaluate, _Run, optimizer_state

TOL = 1e-5  # gx.minimize's default: converged when the full-batch gradient norm is at most this


def make_solver(graphdef: nnx.GraphDef, state: nnx.State, tol: float = TOL) -> Callable:
    """`solve(state, images, labels, max_steps) -> (state, metrics)`: at most `max_steps`
    L-BFGS steps from `state` on the mean cross-entropy over all of `images`.

    One `loss` and one `tx` serve every call, so `gx.minimize` compiles its loop once.
    """
    model, optimizer = nnx.merge(graphdef, state)
    model_def = nnx.split(model, nnx.Param, ...)[0]
    tx = optimizer.tx

    def loss(params, rest, images, labels):
        logits = nnx.merge(model_def, params, rest)(images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def solve(state, images, labels, max_steps):
        model, optimizer = nnx.merge(graphdef, state)
        _, params, rest = nnx.split(model, nnx.Param, ...)
        args = (nnx.as_pure(rest), images, labels)
        result = gx.minimize(
            loss, nnx.as_pure(params), args=args, tx=tx, max_steps=max_steps, tol=tol
        )
        nnx.update(model, result.params)
        nnx.update(optimizer.opt_state, nnx.state(result.state))
        optimizer.step[...] += result.steps.astype(optimizer.step[...].dtype)
        metrics = {
            "loss": result.value, "grad_norm": result.grad_norm, "steps": result.steps,
            "fun_evals": result.fun_evals, "converged": result.converged,
            "exploding": result.state.exploding,  # gx.health's flag, on the last step
        }  # fmt: skip
        return nnx.split((model, optimizer))[1], metrics

    return solve


class FullBatchRun(_Run):
    """A `--optimizer lbfgs` run: chunks of `gx.minimize` instead of minibatch steps."""

    evals = 0  # loss evaluations so far (`fun_evals`)
    stop_reason: str | None = None  # converged, steps or line search; None: not finished

    def feed(self) -> tuple[None, Runner]:
        put = lambda x, y: (jax.device_put(x), jax.device_put(y))
        solve = make_solver(self.graphdef, self.state)
        return None, Runner("none", solve, jax.device_put, lambda s: s, put, jax.device_get)

    def train(self, start: int) -> None:
        """Chunks from step `start` until `--steps`, convergence or a stalled line search."""
        cfg, run = self.cfg, self.runner
        images, labels = run.put_batch(self.data.x_train, self.data.y_train)
        _, metrics = run.step(self.state, images, labels, 0)  # compiles; no step taken
        metrics = run.get_metrics(metrics)
        self.t_first = time.perf_counter()
        self.evals = self.records[-1]["fun_evals"] if self.records else 0
        if not self.records:  # a fresh run: the starting point
            self.log_point(metrics, with_health=False)
        while self.done < cfg.steps:
            before, every = self.done, cfg.eval_every
            end = min(cfg.steps, (before // every + 1) * every) if every else cfg.steps
            state, metrics = run.step(self.state, images, labels, end - before)
            metrics = run.get_metrics(metrics)
            self.state, self.done = state, before + int(metrics["steps"])
            self.evals += int(metrics["fun_evals"])
            record = self.log_point(metrics)
            if metrics["exploding"]:  # a gradient norm above --max-grad-norm
                health = optimizer_state(self.graphdef, run.get_state(self.state))
                self.problems.append(runlog.check(health, record["loss"], cfg))
                raise self.problems[-1]
            every = cfg.checkpoint_every
            if every and self.done // every > before // every:
                self.save()
            self.bar.update(self.done, record)
            if metrics["converged"] or self.done < end:
                self.stop_reason = "converged" if metrics["converged"] else "line search"
                return
        self.stop_reason = "steps"

    def log_point(self, metrics: dict[str, Any], *, with_health: bool = True) -> dict[str, Any]:
        """Write and keep the `metrics.jsonl` line of the current point."""
        t = time.perf_counter()
        state, data = self.runner.get_state(self.state), self.data
        on_train = _evaluate(self.eval_step, state, data.x_train, data.y_train, name="train")
        record = {
            "step": self.done, "loss": float(metrics["loss"]),
            "accuracy": on_train["train_accuracy"], "grad_norm": float(metrics["grad_norm"]),
            "fun_evals": self.evals,
        }  # fmt: skip
        if with_health:
            record.update(gx.read_health(optimizer_state(self.graphdef, state)))
        record.update(_evaluate(self.eval_step, state, data.x_test, data.y_test))
        self.t_aside += time.perf_counter() - t
        self.records.append(record)
        if self.writer:
            self.rd.log(record)
        return record

    def summary(self, status: str) -> dict[str, Any]:
        """The per-step run's fields (steps/s: L-BFGS steps, compilation left out), the loss
        evaluations, the final gradient norm and why the run stopped."""
        summary = super().summary(status, untimed=0)
        final = self.records[-1] if self.records else {}
        norm = final.get("grad_norm")
        summary.update(
            fun_evals=final.get("fun_evals"), grad_norm=norm, tol=TOL,
            converged=norm is not None and norm <= TOL, stop_reason=self.stop_reason,
        )  # fmt: skip
        return summary
