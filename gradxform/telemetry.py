"""Gradient-health telemetry inside `jit`: `health()` records, per step, the gradient's
statistics and the flags that see explosion and vanishing coming.

`health()` is an ordinary transform whose fixed-structure state (`HealthState`) holds this
step's statistics and flags. Its update is four named steps that `gx.stable` shares:
`leaf_statistics` (one pass over the gradient, params and updates), `explosion`, `vanishing`
and `next_health` (the new record). Reading the records on the host (`read_health`,
`assert_healthy`, `check_healthy`) lives in `gradxform.reading`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradxform._base import EmptyState, GradientTransformationExtraArgs, gradient_transformation
from gradxform._checks import (
    Stacked,
    check_decay,
    check_integer,
    check_positive,
    check_range,
    check_stacked,
    check_transform,
)
from gradxform._moments import LOG_NORM_MIN_STD, Moments, moments_update, moments_zscore
from gradxform._records import (
    check_slots,
    leaf_layers,
    leaf_slots,
    stack_scalars,
    unflatten_vector,
    unit_names,
)
from gradxform._stats import LeafStats, leaf_statistics

# health's scalar statistics, by name. They are packed into two vectors because XLA:CPU
# gives every state buffer a kernel of its own, plus copies of the donated buffers that other
# kernels read: 20 scalars cost about 50 kernels a step, two vectors a few.
_FLOATS = (
    "global_norm",  # ||g|| of the incoming gradient this step
    "zero_fraction",  # fraction of gradient values exactly 0 (`NOT_MEASURED` in `stable`)
    "z_score",  # z-score of log ||g|| against the running moments
    "growth",  # ||g|| / exp(baseline mean): how far the norm has climbed
    "log_norm_mean", "log_norm_var",  # running moments of log ||g|| over finite steps
    "baseline_mean", "baseline_var",  # slow running moments: the trend a climb departs from
    "z_bound",  # `z_threshold` (constant: makes the record self-describing)
    "norm_bound",  # `max_norm`, inf when unset (constant)
    "growth_bound",  # `max_growth`, inf when unset (constant)
)  # fmt: skip
_INTS = (
    "count",  # steps seen (saturating)
    "nonfinite",  # number of gradient leaves (layers, if stacked) holding NaN/inf this step
    "nonfinite_params",  # number of params leaves holding NaN/inf this step
    "log_norm_n", "baseline_n",  # finite steps in the running moments (saturating)
    "vanishing_streak",  # consecutive steps with some vanishing leaf
    "dead_leaves",  # leaves whose gradient was non-zero before and is exactly zero now
    "dead_streak",  # consecutive steps with some dead leaf
    "exploding",  # (bool) z-score, growth or absolute bound exceeded, or non-finite
    "vanishing",  # (bool) some leaf vanishing for `patience` steps, or dead for `dead_after`
)  # fmt: skip


# A statistic the record's owner did not compute (`stable` reads no updates and counts no
# zeros): negative, so no measured value is mistaken for it, and finite, so states compare
# equal to themselves (a NaN would not) after a checkpoint round trip.
NOT_MEASURED = -1.0


def _packed(vector: str, name: str, kind: Any = None) -> property:
    """A named read of one entry of a packed statistics vector (bool for the flags)."""
    index = (_FLOATS if vector == "floats" else _INTS).index(name)

    def read(self: HealthState) -> jax.Array:
        value = getattr(self, vector)[..., index]
        return value != 0 if kind is bool else value

    return property(read, doc=f"`{name}` (packed in `{vector}`).")


class HealthState(NamedTuple):
    """health's record of the last step.

    Scalars are read by name: `state.global_norm`, `state.z_score`, `state.exploding`, ...
    (stored packed in `floats` and `ints`, two buffers instead of twenty). Per-leaf statistics
    are vectors, one entry per params leaf (per layer of a stacked leaf) in `jax.tree.leaves`
    order; `per_leaf(field)` gives one as a tree shaped like the params.
    """

    record_kind = "health"  # telemetry: read by `read_health` under this name
    floats: jax.Array  # float32 statistics, packed: read them by name (`state.global_norm`)
    ints: jax.Array  # int32 counters and flags, packed: read them by name (`state.exploding`)
    leaves: Any  # `leaf_slots(params, stacked)`: names the vectors' entries (holds no buffer)
    leaf_norms: jax.Array  # float32[leaves]: ||g_l||
    update_ratios: jax.Array  # float32[leaves]: ||u_l|| / ||p_l||; `NOT_MEASURED` in `stable`
    vanishing_leaves: jax.Array  # bool[leaves]: below the vanishing bounds, or dead, this step
    live_leaves: jax.Array  # bool[leaves]: the leaf's gradient was non-zero on some step
    inner: Any  # the wrapped transform's state (EmptyState when used stand-alone)

    global_norm = _packed("floats", "global_norm")
    zero_fraction = _packed("floats", "zero_fraction")
    z_score = _packed("floats", "z_score")
    growth = _packed("floats", "growth")
    z_bound = _packed("floats", "z_bound")
    norm_bound = _packed("floats", "norm_bound")
    growth_bound = _packed("floats", "growth_bound")
    count = _packed("ints", "count")
    nonfinite = _packed("ints", "nonfinite")
    nonfinite_params = _packed("ints", "nonfinite_params")
    vanishing_streak = _packed("ints", "vanishing_streak")
    dead_leaves = _packed("ints", "dead_leaves")
    dead_streak = _packed("ints", "dead_streak")
    exploding = _packed("ints", "exploding", bool)
    vanishing = _packed("ints", "vanishing", bool)

    @property
    def log_norm(self) -> Moments:
        """Running moments of log ||g|| (the z-score's reference)."""
        at = lambda name: self.floats[..., _FLOATS.index(name)]
        return Moments(self.ints[..., _INTS.index("log_norm_n")], at("log_norm_mean"),
                       at("log_norm_var"))  # fmt: skip

    @property
    def baseline(self) -> Moments:
        """Slow running moments of log ||g|| (the growth's reference)."""
        at = lambda name: self.floats[..., _FLOATS.index(name)]
        return Moments(self.ints[..., _INTS.index("baseline_n")], at("baseline_mean"),
                       at("baseline_var"))  # fmt: skip

    def per_leaf(self, field: str) -> Any:
        """`leaf_norms`, `update_ratios` or `vanishing_leaves` as a tree shaped like the params."""
        return unflatten_vector(self.leaves, getattr(self, field))


class HealthRule(NamedTuple):
    """`health`'s arguments, as its steps read them."""

    z_threshold: float
    max_norm: float | None
    max_growth: float | None
    warmup_steps: int
    decay: float
    baseline_decay: float
    vanishing_fraction: float
    ratio_floor: float
    patience: int
    dead_after: int
    stacked: Stacked = None


def health(
    inner: GradientTransformationExtraArgs | None = None,
    *,
    z_threshold: float = 6.0,
    max_norm: float | None = None,
    max_growth: float | None = 100.0,
    warmup_steps: int = 20,
    decay: float = 0.99,
    baseline_decay: float = 0.999,
    vanishing_fraction: float = 1e-3,
    ratio_floor: float = 1e-9,
    patience: int = 20,
    dead_after: int = 3,
    axis_name: str | None = None,
    stacked: Stacked = None,
) -> GradientTransformationExtraArgs:
    """Record gradient-health statistics and flags in the state; pass updates through.

    Per step, in float32 and in one pass over each leaf: the global norm ||g||, each leaf's
    norm, the update-to-parameter ratio ||u_l|| / ||p_l|| per leaf, the count of non-finite
    values (in the gradient, and of params leaves holding any) and the fraction of exact
    zeros (small leaves are reduced together; per-leaf values are vectors in `jax.tree.leaves`
    order, `state.per_leaf("leaf_norms")` is the tree). Flags:

      exploding  = non-finite  or  z > z_threshold  or  growth > max_growth
                   or  ||g|| > max_norm,
                   z = (log||g|| - mean) / max(std, 0.25)  over running moments of log||g||
                   (catches sudden spikes; a steady climb moves the moments with it, so)
                   growth = ||g|| / exp(slow mean of log||g||)  (catches steady climbs; from
                   the second step on, against the mean of the steps so far, so a blow-up
                   from init is flagged before it overflows)
      vanishing  = for `patience` consecutive steps some leaf has
                   rms(g_l) < vanishing_fraction * max_k rms(g_k)  or  ratio_l < ratio_floor,
                   or for `dead_after` consecutive steps some leaf whose gradient was
                   non-zero before is exactly zero (dead units: a ReLU net killed by a spike)

    Used stand-alone (`chain(health(), adam(...))`) it sees the incoming gradients, and the
    ratios are of those gradients. Wrapping the optimizer (`health(adam(...))`) it also sees the
    optimizer's output, so the ratios are of the real updates (before the learning rate, if the
    chain ends with one, the ratio is of the chain's full output).

    Args:
      inner: optional transform to wrap.
      z_threshold: positive bound on the z-score of log ||g||.
      max_norm: optional absolute bound on ||g||.
      max_growth: bound (> 1) on ||g|| over its slow baseline, or `None`; a norm climbing
        10% a step is flagged ~50 steps in, at ~100x its baseline, long before overflow.
      warmup_steps: finite steps observed before z-scores count.
      decay: rate of the running moments of log ||g|| after warm-up, in [0, 1].
      baseline_decay: rate of the slow baseline, in [0, 1] (0.999: ~1000 steps of memory).
      vanishing_fraction: relative RMS below which a leaf counts as vanishing.
      ratio_floor: update-to-parameter ratio below which a leaf counts as vanishing
        (leaves whose parameters are all zero are exempt).
      patience: consecutive steps before `vanishing` is raised.
      dead_after: consecutive steps with a dead leaf before `vanishing` is raised.
      axis_name: `psum` every per-leaf sum over this axis (parameters sharded across it), so
        norms, counts, ratios and flags are those of the whole model on every device.
      stacked: marks the leaves whose axis 0 is a layer axis (scanned layers): a regex
        searched in the leaf name (`"layers"` matches every leaf under `layers`) or a
        predicate `(name, leaf) -> bool`. Each layer of such a leaf is a unit of its own:
        its norm, update ratio, counts and vanishing flag (reduced over axes 1.., in the same
        pass), named `health/grad_norm/layers/w[7]` by `read_health`.

    Examples:
      >>> import gradxform as gx, jax.numpy as jnp
      >>> tx = gx.health(gx.sgd(0.1))
      >>> params = {"w": jnp.ones(4)}
      >>> _, state = tx.update({"w": jnp.full(4, 0.5)}, tx.init(params), params)
      >>> gx.read_health(state)["health/global_norm"]
      1.0
    """
    if inner is not None:
        check_transform("inner", inner)
    rule = health_rule(
        z_threshold=z_threshold, max_norm=max_norm, max_growth=max_growth,
        warmup_steps=warmup_steps, decay=decay, baseline_decay=baseline_decay,
        vanishing_fraction=vanishing_fraction, ratio_floor=ratio_floor, patience=patience,
        dead_after=dead_after, stacked=stacked,
    )  # fmt: skip

    def init(params):
        return init_health(params, rule, EmptyState() if inner is None else inner.init(params))

    def update(grads, state, params=None, **extra_args):
        if inner is None:
            updates, inner_state = grads, state.inner
        else:
            updates, inner_state = inner.update(grads, state.inner, params, **extra_args)
        check_slots(state.leaves, grads, "health")
        leaves, treedef = jax.tree.flatten(grads)
        p, u = (None, None) if params is None else (treedef.flatten_up_to(params),
                                                    treedef.flatten_up_to(updates))  # fmt: skip
        stats = leaf_statistics(leaves, p, u, axis_name, layers=leaf_layers(state.leaves))
        record = next_health(state, stats, rule)._replace(inner=inner_state)
        if params is not None:
            # `* one` (exactly 1: the count is finite) makes the update depend on the sums,
            # which read the params. XLA then runs them before `apply_updates` overwrites the
            # donated params in place; otherwise it cannot order them and copies every param.
            one = 1.0 + 0.0 * jnp.isfinite(jnp.sum(stats.p_sq)).astype(jnp.float32)
            updates = jax.tree.map(lambda x: x * one.astype(x.dtype), updates)
        return updates, record

    return gradient_transformation(init, update, extra_args=True)


def health_rule(**kwargs: Any) -> HealthRule:
    """`HealthRule` of `health`'s keyword arguments, each checked (errors name the argument)."""
    rule = HealthRule(**kwargs)
    check_positive("z_threshold", rule.z_threshold, finite=False)
    check_positive("max_norm", rule.max_norm, finite=False, optional=True)
    check_decay("decay", rule.decay)
    check_decay("baseline_decay", rule.baseline_decay)
    check_range("max_growth", rule.max_growth, 1.0, low_open=True, finite=False, optional=True)
    check_range("vanishing_fraction", rule.vanishing_fraction, 0.0, 1.0)
    check_range("ratio_floor", rule.ratio_floor, 0.0)
    check_integer("patience", rule.patience, 1)
    check_integer("dead_after", rule.dead_after, 1)
    check_integer("warmup_steps", rule.warmup_steps, 0)
    check_stacked("stacked", rule.stacked)
    return rule


def init_health(params: Any, rule: HealthRule, inner: Any) -> HealthState:
    """The record before the first step: zero statistics, the bounds, no leaf seen alive."""
    slots = leaf_slots(params, rule.stacked)
    n = len(unit_names(slots))
    floats = dict.fromkeys(_FLOATS, 0.0) | dict(
        growth=1.0,
        z_bound=rule.z_threshold,
        norm_bound=jnp.inf if rule.max_norm is None else rule.max_norm,
        growth_bound=jnp.inf if rule.max_growth is None else rule.max_growth,
    )
    return HealthState(
        floats=stack_scalars([floats[k] for k in _FLOATS], jnp.float32),
        ints=jnp.zeros([len(_INTS)], jnp.int32),
        leaves=slots,
        leaf_norms=jnp.zeros([n], jnp.float32),
        update_ratios=jnp.zeros([n], jnp.float32),
        vanishing_leaves=jnp.zeros([n], bool),
        live_leaves=jnp.zeros([n], bool),
        inner=inner,
    )


def next_health(
    state: HealthState, stats: LeafStats, rule: HealthRule, absorb: tuple | None = None
) -> HealthState:
    """The record of this step, from the statistics of its gradient (`inner` unchanged).

    `absorb = (accept, log_norm)` overrides what the running moments take in (a guard feeds
    them only the steps it accepted, clipped); by default every finite step, as it came.
    """
    norm, finite = stats.norm, stats.finite
    log_norm = jnp.log(jnp.maximum(norm, 1e-30))
    z, growth, exploding = explosion(state, norm, finite, rule)
    low, dead, streaks = vanishing(state, stats, rule)
    accept, absorbed = (finite, log_norm) if absorb is None else absorb
    log_moments = moments_update(state.log_norm, absorbed, rule.decay, rule.warmup_steps, accept)
    baseline = moments_update(
        state.baseline, absorbed, rule.baseline_decay, rule.warmup_steps, accept
    )
    nonfinite_params = 0 if stats.p_sq is None else jnp.sum(~jnp.isfinite(stats.p_sq))
    floats = dict(
        global_norm=norm,
        zero_fraction=NOT_MEASURED
        if stats.zeros is None
        else jnp.sum(stats.zeros) / jnp.maximum(stats.total, 1),
        z_score=z,
        growth=growth,
        log_norm_mean=log_moments.mean,
        log_norm_var=log_moments.var,
        baseline_mean=baseline.mean,
        baseline_var=baseline.var,
        z_bound=state.z_bound,
        norm_bound=state.norm_bound,
        growth_bound=state.growth_bound,
    )
    ints = dict(
        count=optax.safe_increment(state.count),
        nonfinite=jnp.sum(stats.nonfinite, dtype=jnp.int32),
        nonfinite_params=nonfinite_params,
        log_norm_n=log_moments.n,
        baseline_n=baseline.n,
        vanishing_streak=streaks[0],
        dead_leaves=jnp.sum(dead, dtype=jnp.int32),
        dead_streak=streaks[1],
        exploding=exploding,
        vanishing=(streaks[0] >= rule.patience) | (streaks[1] >= rule.dead_after),
    )
    return state._replace(
        floats=stack_scalars([floats[k] for k in _FLOATS], jnp.float32),
        ints=stack_scalars([ints[k] for k in _INTS], jnp.int32),
        leaf_norms=jnp.sqrt(stats.sq),
        update_ratios=_update_ratios(stats),
        vanishing_leaves=low | dead,
        live_leaves=state.live_leaves | (stats.sq > 0),
    )


def explosion(state: HealthState, norm: jax.Array, finite: jax.Array, rule: HealthRule):
    """(z, growth, exploding) of this step's norm against the record's running moments.

    The z-score counts after `warmup_steps`; the growth over the slow baseline counts from the
    second step (before warm-up the baseline is the exact mean of the steps so far).
    """
    log_norm = jnp.log(jnp.maximum(norm, 1e-30))
    z = moments_zscore(state.log_norm, log_norm, rule.warmup_steps, min_std=LOG_NORM_MIN_STD)
    z = jnp.where(finite, z, jnp.inf)
    seen = state.baseline.n >= 1
    growth = jnp.where(seen & finite, jnp.exp(log_norm - state.baseline.mean), 1.0)
    exploding = (~finite) | (z > state.z_bound) | (norm > state.norm_bound)
    return z, growth, exploding | (growth > state.growth_bound)


def vanishing(state: HealthState, stats: LeafStats, rule: HealthRule):
    """(low, dead, (vanishing_streak, dead_streak)) of this step.

    low: leaves whose RMS is negligible beside the largest, or whose update ratio is below the
    floor (when measured; all-zero params exempt). dead: leaves with an exactly zero gradient
    that was non-zero on some earlier step. A step whose update is all zero (skipped by a
    guard) is no evidence of vanishing: the streak holds.
    """
    rms = jnp.sqrt(stats.sq / stats.sizes)
    low = rms < rule.vanishing_fraction * jnp.max(rms, initial=0.0)
    if stats.u_sq is not None:
        ratios = _update_ratios(stats)
        low |= (ratios < rule.ratio_floor) & (stats.p_sq > 0)
    finite = stats.finite
    dead = state.live_leaves & (stats.sq == 0) & finite
    grow = lambda streak, cond: jnp.where(cond, optax.safe_increment(streak), 0)
    streak = grow(state.vanishing_streak, jnp.any(low) & finite)
    if stats.u_sq is not None:  # an all-zero update (a skipped step) is no evidence
        streak = jnp.where(jnp.sum(stats.u_sq) > 0, streak, state.vanishing_streak)
    return low, dead, (streak, grow(state.dead_streak, jnp.any(dead)))


def _update_ratios(stats: LeafStats) -> jax.Array:
    """||u_l|| / ||p_l|| per leaf, or `NOT_MEASURED` without the updates."""
    if stats.u_sq is None or stats.p_sq is None:
        return jnp.full(stats.sq.shape, NOT_MEASURED, jnp.float32)
    return jnp.sqrt(stats.u_sq) / jnp.maximum(jnp.sqrt(stats.p_sq), 1e-30)
