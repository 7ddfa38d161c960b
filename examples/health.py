"""Judging gradient health on the host, with gradxform's own telemetry and assertions.

The optimizer is always wrapped in `gx.health(...)` (see `optim.build`), and the jitted step
returns that step's `gx.HealthState` record. `check` hands a flagged record to
`gx.assert_healthy`, whose error names the step, the layers and the measured norm, and adds the
command-line flags that help; `verdict` sums up the run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flax import nnx

import gradxform as gx


class InstabilityError(RuntimeError):
    """Training became unstable: a non-finite loss or gradient, or an exploding gradient norm.

    Raised from the `gx.GradientHealthError` that found it (its `__cause__`), if any.
    """


_FLAGS = {
    gx.NonFiniteGradientError: "a lower `--lr` or longer `--warmup`, `--clip-global-norm 1.0`",
    gx.GradientExplosionError: (
        "`--clip-global-norm 1.0`, `--agc 0.01`, a lower `--lr` or longer `--warmup`, or a "
        "higher `--max-grad-norm` if such norms are expected"
    ),
}


def check(record: gx.HealthState, loss: float) -> InstabilityError:
    """The problem of a step flagged `exploding` or with a non-finite loss, as an error to raise
    or log: `gx.assert_healthy`'s on the step's record, or one about the loss."""
    try:
        gx.assert_healthy(record, check_vanishing=False)  # vanishing is for the verdict
    except gx.GradientHealthError as e:
        flags = _FLAGS.get(type(e), _FLAGS[gx.GradientExplosionError])
        error = InstabilityError(
            f"{e}\nWith this example's flags: {flags}; or `--on-instability skip`, `--stable`."
        )
        error.__cause__ = e
        return error
    return InstabilityError(
        f"Non-finite loss ({loss}) at step {int(record.count)} with finite gradients. With this "
        "example's flags: a lower `--lr`, or `--on-instability skip`."
    )


def vanishing(opt_state: Any) -> str | None:
    """`gx.assert_healthy`'s message if the last step flagged vanishing gradients, else `None`."""
    try:
        gx.assert_healthy(opt_state, check_nonfinite=False, check_exploding=False)
    except gx.VanishingGradientError as e:
        return str(e)
    return None


def verdict(
    records: Sequence[dict[str, Any]],
    problems: Sequence[InstabilityError],
    opt_state: Any,
    mode: str,
) -> str:
    """One line for the summary, from the logged records, the unstable steps seen and the state."""
    first = str(problems[0]).split("\n")[0] if problems else ""
    if problems and mode != "skip":
        more = f" ({len(problems)} unstable steps in all)" if len(problems) > 1 else ""
        return f"UNSTABLE: {first}{more}"
    if not records:
        return "no steps logged"
    parts = []
    if problems:
        skipped = records[-1]["skipped_total"]
        parts.append(
            f"RECOVERED: {len(problems)} unstable steps, {skipped} skipped; first: {first}"
        )
    weak = vanishing(opt_state)
    if weak:
        parts.append(f"VANISHING: {weak}")
    if parts:
        return " | ".join(parts)
    peak = max(records, key=lambda r: r["grad_norm_max"])
    return (
        f"healthy: max global grad norm {peak['grad_norm_max']:.3g} (by step {peak['step']}), "
        "no non-finite values"
    )


def optimizer_state(graphdef: nnx.GraphDef, state: nnx.State) -> Any:
    """The optimizer state (plain arrays) inside an unreplicated train state."""
    _, optimizer = nnx.merge(graphdef, state)
    return nnx.as_pure(optimizer.opt_state)
