"""Reading telemetry on the host, and asserting on it: `read_health` turns every record in a
nested optimizer state into flat, loggable floats; `assert_healthy` raises an error naming
the step and the layers; `check_healthy` makes the same checks inside `jit` under
`checkify`/`chex.chexify`. All of them find records through the one walker,
`telemetry_records`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import checkify

from gradxform._checks import leaf_name
from gradxform._moments import Moments
from gradxform._records import ClipRecord, find_states, telemetry_records, unit_names
from gradxform._tree import global_norm
from gradxform.telemetry import NOT_MEASURED, HealthState


def _fetched_records(opt_state: Any, needs: str = "telemetry") -> list[tuple[str, Any]]:
    """`telemetry_records`, copied to the host in one transfer that leaves the moments behind.

    Raises a `ValueError` naming the fix when there is no record of what the caller `needs`
    (`"telemetry"`: any record; `"health"`: a `health` record): reading nothing must not
    pass for reading a healthy run.
    """
    named = telemetry_records(opt_state)
    kinds = {type(record).record_kind for _, record in named}
    if (needs == "health" and "health" not in kinds) or not named:
        raise _missing_record(needs, kinds)
    return list(zip([n for n, _ in named], jax.device_get([r for _, r in named]), strict=True))


def _missing_record(needs: str, kinds: set[str]) -> ValueError:
    found = f"it holds only {', '.join(sorted(kinds))} records" if kinds else "it holds none"
    return ValueError(
        f"`opt_state` holds no {needs} record ({found}): nothing to read. Wrap the optimizer "
        "in `gx.stable(opt)` or `gx.health(opt)`, or put `gx.health()` in the chain, and pass "
        "the state that `update` returned."
    )


def _is(record: Any, kind: str) -> bool:
    return type(record).record_kind == kind


# State fields that are not per-step telemetry: inner states, counters, history buffers.
_UNLOGGED = frozenset(
    {"inner", "count", "norms", "losses", "written", "mu", "nu"}
)  # health logs its own


def _scalar(x: Any) -> float:
    x = np.asarray(x)
    return float(x.reshape(-1)[0]) if x.size else float("nan")  # replicas agree: take the first


def _leaf_name(path) -> str:
    """The same name under every client: a Flax NNX `Variable`'s `value` is dropped."""
    return leaf_name(path)


def _units(slots: Any, vector: Any) -> list[tuple[str, float]]:
    """`(name, value)` of each entry of a per-unit vector (`Dense_0/kernel`, `layers/w[7]`)."""
    vector = np.asarray(vector)
    return [(name, _scalar(vector[..., i])) for i, name in enumerate(unit_names(slots))]


def _flat(prefix: str, tree: Any, out: dict[str, float], slots: Any = None) -> None:
    """`out[prefix/name] = value` for the leaves of `tree`, or, with `slots`, for the entries
    of the per-unit vector `tree`."""
    if slots is not None:
        named = _units(slots, tree)
    else:
        named = [(_leaf_name(p), _scalar(x)) for p, x in jax.tree_util.tree_leaves_with_path(tree)]
    for name, value in named:
        out[f"{prefix}/{name}" if name else prefix] = value


def read_health(opt_state: Any) -> dict[str, float]:
    """Flat `{name: float}` of every health, clip, skip and loss-scale record in `opt_state`.

    Works on any nesting (optax chains, `inject_hyperparams`, `MultiSteps`, `masked`, Flax
    optimizers' `opt_state`) and on `pmap`-replicated state. Names look like
    `health/global_norm`, `health/grad_norm/Dense_0/kernel`, `clip/norm`, `skip/skipped`.
    One device-to-host transfer of the records alone (moments and inner states stay put).

    Args:
      opt_state: any optimizer state (or a tree containing one).

    Returns:
      `{name: float}`; booleans are 0.0 / 1.0.

    Examples:
      >>> import gradxform as gx, jax.numpy as jnp
      >>> tx = gx.chain(gx.clip_by_global_norm(1.0), gx.sgd(0.1))
      >>> _, state = tx.update({"w": jnp.array([3.0, 4.0])}, tx.init({"w": jnp.zeros(2)}))
      >>> gx.read_health(state)
      {'clip/norm': 5.0, 'clip/threshold': 1.0, 'clip/clipped': 1.0, 'clip/clipped_total': 1.0}
    """
    out: dict[str, float] = {}
    fetched = _fetched_records(opt_state)
    guards = [name for name, record in fetched if _is(record, "skip") or _is(record, "stable")]
    if guards:
        out[f"{guards[0]}/stalled"] = float(_stalled(opt_state, fetched) is not None)
    for name, record in fetched:
        if _is(record, "health"):
            _read_health_record(name, record, out)
        else:
            for field, value in record._asdict().items():
                if field in _UNLOGGED or value is None:  # None: a nested record, read apart
                    continue
                if isinstance(value, ClipRecord):
                    for sub in ("norm", "threshold", "clipped", "clipped_total"):
                        per_leaf = sub in ("norm", "clipped")  # per-leaf clips: per leaf
                        slots = value.leaves if per_leaf else None
                        _flat(f"{name}/{sub}", getattr(value, sub), out, slots)
                elif isinstance(value, Moments):
                    out[f"{name}/{field}_mean"] = _scalar(value.mean)
                    out[f"{name}/{field}_std"] = math.sqrt(max(_scalar(value.var), 0.0))
                else:
                    out[f"{name}/{field}"] = _scalar(value)
    return out


_HEALTH_SCALARS = (
    "global_norm", "nonfinite", "nonfinite_params", "zero_fraction", "z_score", "growth",
    "count", "exploding", "vanishing", "vanishing_streak", "dead_leaves",
)  # fmt: skip


def _read_health_record(name: str, record: HealthState, out: dict[str, float]) -> None:
    """A health record's scalars, per-leaf norms and (where measured) update ratios."""
    for field in _HEALTH_SCALARS:
        value = _scalar(getattr(record, field))
        if not (field == "zero_fraction" and value == NOT_MEASURED):  # `stable` does not count
            out[f"{name}/{field}"] = value
    _flat(f"{name}/grad_norm", record.leaf_norms, out, record.leaves)
    if not np.all(record.update_ratios == NOT_MEASURED):  # `stable` does not measure them
        _flat(f"{name}/update_ratio", record.update_ratios, out, record.leaves)


# ----------------------------------------------------------------------------- assertions


class GradientHealthError(RuntimeError):
    """Base class of the errors `assert_healthy` raises."""


class NonFiniteGradientError(GradientHealthError):
    """A gradient value was NaN or infinite."""


class GradientExplosionError(GradientHealthError):
    """The gradient norm jumped far above its running history or past an absolute bound."""


class VanishingGradientError(GradientHealthError):
    """Some layers' gradients stayed negligible compared with the others' for many steps."""


class NonFiniteParameterError(GradientHealthError):
    """A parameter value was NaN or infinite (whatever the gradient)."""


class StalledTrainingError(GradientHealthError):
    """A guard skips every step and will go on doing so: training has silently stopped."""


STALL_STEPS = 100  # consecutive steps `stable` skips before training counts as stalled


def _stalled(opt_state: Any, fetched: list[tuple[str, Any]]) -> str | None:
    """Why the guarded steps can no longer be accepted, or None (`fetched`: the host copies
    of `telemetry_records(opt_state)`).

    A guard inside `optax.MultiSteps` sees the accumulated gradient: one non-finite micro-batch
    makes the accumulator non-finite for good, and the guard then skips every later step. A
    guard that has skipped a whole window of consecutive steps is reported too.
    """
    for multi in find_states(opt_state, optax.MultiStepsState):
        inside = telemetry_records(multi.inner_opt_state)
        guarded = [r for _, r in inside if _is(r, "skip") or _is(r, "stable")]
        if guarded and not bool(jnp.isfinite(global_norm(multi.acc_grads))):
            return (
                "a guard inside `optax.MultiSteps`, whose gradient accumulator now holds "
                "NaN/inf: every later step will be skipped. Put the guard outside the "
                "accumulation, `gx.skip_if(optax.MultiSteps(opt, k))` or "
                "`gx.stable(optax.MultiSteps(opt, k))`, so it refuses the bad micro-batch "
                "before it is accumulated"
            )
    for _, record in fetched:
        if _is(record, "skip"):  # (a record whose history was dropped has no window)
            window, consecutive = record.norms.shape[-1], int(np.max(record.consecutive))
            fix = "pass `give_up_after=` to accept a lasting change of scale"
        elif _is(record, "stable"):
            window, consecutive = STALL_STEPS, int(np.max(record.consecutive))
            fix = "lower the learning rate"
        else:
            continue
        if window and consecutive >= window:
            return (
                f"{consecutive} consecutive steps skipped, a whole window of {window}: check "
                f"the data and the loss for NaN/inf, or {fix}"
            )
    return None


def _top(record: HealthState, k: int = 3, reverse: bool = True) -> list[tuple[str, float]]:
    """The `k` largest (`reverse`) or smallest units of the record by gradient norm."""
    items = _units(record.leaves, record.leaf_norms)
    key = lambda item: (math.isfinite(item[1]), item[1]) if reverse else item[1]
    return sorted(items, key=key, reverse=reverse)[:k]


def assert_healthy(
    opt_state: Any,
    *,
    check_nonfinite: bool = True,
    check_exploding: bool = True,
    check_vanishing: bool = True,
    max_norm: float | None = None,
    check_stalled: bool = True,
) -> None:
    """Raise if any health record in `opt_state` flags a problem on its last step.

    Raises `NonFiniteGradientError`, `GradientExplosionError` (also when ||g|| > `max_norm`,
    if given) or `VanishingGradientError`, with the step, the responsible leaf paths, the
    measured value, the bound and the usual remedies in the message. Host side: call it
    outside `jit` (for inside `jit`, see `check_healthy`).

    Args:
      opt_state: any optimizer state containing `health` records.
      check_nonfinite: raise on NaN/inf gradient values.
      check_exploding: raise on the exploding flag (or `max_norm`) of a finite step.
      check_vanishing: raise on the vanishing flag.
      max_norm: an extra absolute bound on the global norm, checked here.
      check_stalled: raise `StalledTrainingError` when a `skip_if` guard skips every step
        for good (a guard inside `optax.MultiSteps` after a non-finite micro-batch, or a
        whole window of consecutive skips).

    Examples:
      >>> import gradxform as gx, jax.numpy as jnp
      >>> tx = gx.health()
      >>> _, state = tx.update({"w": jnp.array([1.0, jnp.nan])}, tx.init({"w": jnp.zeros(2)}))
      >>> gx.assert_healthy(state)
      Traceback (most recent call last):
      ...
      gradxform.reading.NonFiniteGradientError: Non-finite gradient at step 1: ...
    """
    fetched = _fetched_records(opt_state, needs="health")
    reason = _stalled(opt_state, fetched) if check_stalled else None
    if reason is not None:
        raise StalledTrainingError(f"Training has stalled: {reason}.")
    for name, record in fetched:
        if not _is(record, "health"):
            continue
        errors = (
            check_nonfinite and _nonfinite_params_error(name, record),
            check_nonfinite and _nonfinite_error(name, record),
            check_exploding and _explosion_error(name, record, max_norm),
            check_vanishing and _vanishing_error(name, record),
        )
        for error in errors:
            if error:
                raise error


def _finite_step(record: HealthState) -> bool:
    """No NaN/inf on the record's step: only such a step is judged for explosion or vanishing
    (a non-finite one is reported as such, or deliberately not)."""
    return _scalar(record.nonfinite) == 0 and math.isfinite(_scalar(record.global_norm))


def _nonfinite_error(name: str, record: HealthState) -> GradientHealthError | None:
    """The error for a step with NaN/inf gradient values, naming the leaves that hold them."""
    if _scalar(record.nonfinite) == 0:
        return None
    leaf_norms = _top(record, k=10**9)
    bad = [n for n, v in leaf_norms if not math.isfinite(v)]
    return NonFiniteGradientError(
        f"Non-finite gradient at step {int(_scalar(record.count))}: NaN/inf in "
        f"{int(_scalar(record.nonfinite))} leaves, {', '.join(bad) or 'the global norm'} "
        f"({name}). Remedies: lower the learning rate or "
        "add warm-up, clip (`gx.clip_by_global_norm`, `gx.zclip`), guard the step "
        "(`gx.skip_if`, `gx.stable`), use loss scaling in low precision."
    )


def _nonfinite_params_error(name: str, record: HealthState) -> GradientHealthError | None:
    """The error for params holding NaN/inf (caught even when the gradient is finite)."""
    count = int(_scalar(record.nonfinite_params))
    if count == 0:
        return None
    return NonFiniteParameterError(
        f"Non-finite parameters at step {int(_scalar(record.count))}: {count} params leaves "
        f"hold NaN/inf ({name}). An earlier update corrupted them, or they were restored or "
        "initialised that way: restore the last good checkpoint, and guard the step "
        "(`gx.stable`, `gx.skip_if`) so non-finite updates never reach the params."
    )


def _explosion_error(
    name: str, record: HealthState, max_norm: float | None
) -> GradientHealthError | None:
    """The error for a finite step flagged `exploding` (or above `max_norm`), naming the bound
    it crossed and the largest leaves."""
    norm = _scalar(record.global_norm)
    if not _finite_step(record):
        return None
    norm_bound = min(_scalar(record.norm_bound), math.inf if max_norm is None else max_norm)
    if not (bool(_scalar(record.exploding)) or norm > norm_bound):
        return None
    growth, growth_bound = _scalar(record.growth), _scalar(record.growth_bound)
    if norm > norm_bound:
        bound = f"> bound {norm_bound:g}"
    elif growth > growth_bound:
        bound = f"{growth:.3g}x its running baseline > {growth_bound:g}x"
    else:
        z, z_bound = _scalar(record.z_score), _scalar(record.z_bound)
        bound = f"z-score {z:.1f} of log-norm > {z_bound:g} over its running history"
    culprits = ", ".join(f"{n} (norm {v:.3g})" for n, v in _top(record))
    return GradientExplosionError(
        f"Gradient explosion at step {int(_scalar(record.count))}: global norm {norm:.4g} "
        f"({bound}); largest in {culprits} ({name}). Remedies: clip (`gx.clip_by_global_norm`, "
        "`gx.zclip`, `gx.adaptive_grad_clip`), lower the learning rate or add warm-up, skip "
        "spikes (`gx.skip_if`), normalisation layers."
    )


def _vanishing_error(name: str, record: HealthState) -> GradientHealthError | None:
    """The error for a finite step flagged `vanishing`, naming the leaves below the bounds."""
    if not _finite_step(record) or not bool(_scalar(record.vanishing)):
        return None
    low = [name for name, flag in _units(record.leaves, record.vanishing_leaves) if flag]
    leaf_norms = _top(record, reverse=False)
    smallest = ", ".join(f"{n} (norm {v:.3g})" for n, v in leaf_norms)
    dead = int(_scalar(record.dead_leaves))
    why = (
        f"{dead} leaves whose gradient was non-zero are now exactly zero (dead units, e.g. "
        f"ReLUs killed by a spike) for {int(_scalar(record.dead_streak))} steps"
        if dead
        else f"below the bounds for {int(_scalar(record.vanishing_streak))} steps"
    )
    return VanishingGradientError(
        f"Vanishing gradients at step {int(_scalar(record.count))}: {len(low)} leaves "
        f"({', '.join(low[:5])}{', ...' if len(low) > 5 else ''}) {why}; "
        f"smallest: {smallest} ({name}). "
        "Remedies: He/Xavier initialisation, normalisation layers, residual connections, "
        "ReLU/Leaky ReLU, an adaptive optimizer (`gx.adam`), a larger learning rate for early "
        "layers."
    )


def check_healthy(opt_state: Any) -> None:
    """The checks of `assert_healthy`, as `checkify` checks usable inside `jit`.

    Run the step under `jax.experimental.checkify.checkify` or `chex.chexify` to get an error
    naming the step and the norm from inside a compiled step (for debugging runs).

    Args:
      opt_state: any optimizer state containing `health` records (traced is fine).

    Examples:
      >>> import gradxform as gx, jax, jax.numpy as jnp
      >>> from jax.experimental import checkify
      >>> tx = gx.health()
      >>> def step(g, s):
      ...     _, s = tx.update(g, s)
      ...     gx.check_healthy(s)
      ...     return s
      >>> state = tx.init({"w": jnp.zeros(1)})
      >>> err, _ = checkify.checkify(jax.jit(step))({"w": jnp.array([jnp.inf])}, state)
      >>> print(err.get())  # doctest: +ELLIPSIS
      Non-finite gradient at step 1: NaN/inf in 1 leaves (global norm inf)...
    """
    records = [r for _, r in telemetry_records(opt_state) if _is(r, "health")]
    if not records:
        raise _missing_record("health", set())
    for record in records:
        kw = {"step": record.count, "norm": record.global_norm}
        checkify.check(
            record.nonfinite_params == 0,
            "Non-finite parameters at step {step}: {n} params leaves hold NaN/inf",
            n=record.nonfinite_params,
            step=record.count,
        )
        checkify.check(
            record.nonfinite == 0,
            "Non-finite gradient at step {step}: NaN/inf in {n} leaves (global norm {norm})",
            n=record.nonfinite,
            **kw,
        )
        checkify.check(
            ~record.exploding,
            "Gradient explosion at step {step}: global norm {norm} (bound {b}), z-score {z} "
            "(bound {zb})",
            z=record.z_score,
            b=record.norm_bound,
            zb=record.z_bound,
            **kw,
        )
        checkify.check(
            ~record.vanishing,
            "Vanishing gradients at step {step}: some leaves below the bounds for {s} steps",
            s=record.vanishing_streak,
            step=record.count,
        )
