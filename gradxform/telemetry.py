"""Gradient-health telemetry inside `jit`: record, read, and assert on explosion and vanishing.

`health()` is an ordinary transform whose fixed-structure state holds this step's gradient
statistics and flags; `read_health(opt_state)` turns every such record (and every clipping,
skipping and loss-scaling record) found anywhere in a nested optimizer state into flat,
loggable floats; `assert_healthy(opt_state)` raises an error naming the step and the layers;
`check_healthy(opt_state)` makes the same checks inside `jit` under `checkify`/`chex.chexify`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import checkify

from gradxform._base import EmptyState, GradientTransformationExtraArgs, gradient_transformation
from gradxform._checks import (
    check_decay,
    check_integer,
    check_positive,
    check_range,
    check_transform,
    leaf_name,
)
from gradxform._moments import LOG_NORM_MIN_STD, Moments, moments_update, moments_zscore
from gradxform._records import (
    ClipRecord,
    check_slots,
    find_states,
    leaf_slots,
    stack_scalars,
    unflatten_vector,
    unit_names,
)
from gradxform._tree import SMALL_GROUP, abs_sq, global_norm, is_sharded, once_per_shape
from gradxform.adaptive_clipping import AutoClipState, ScaleBySpamState, ZClipState
from gradxform.clipping import AdaptiveGradClipState, ClipState
from gradxform.guards import DynamicLossScaleState, SkipIfState
from gradxform.lbfgs import LbfgsRecord, LinesearchRecord

# health's scalar statistics, by name. They are packed into two vectors because XLA:CPU
# gives every state buffer a kernel of its own, plus copies of the donated buffers that other
# kernels read: 18 scalars cost about 45 kernels a step, two vectors a few.
_FLOATS = (
    "global_norm",  # ||g|| of the incoming gradient this step
    "zero_fraction",  # fraction of gradient values exactly 0
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
    "nonfinite",  # number of non-finite gradient values this step
    "log_norm_n", "baseline_n",  # finite steps in the running moments (saturating)
    "vanishing_streak",  # consecutive steps with some vanishing leaf
    "exploding",  # (bool) z-score, growth or absolute bound exceeded, or non-finite
    "vanishing",  # (bool) some leaf vanishing for `patience` consecutive steps
)  # fmt: skip
_BOOLS = ("exploding", "vanishing")


class HealthState(NamedTuple):
    """health's record of the last step.

    Scalars are read by name: `state.global_norm`, `state.z_score`, `state.exploding`, ...
    (float32: global_norm, zero_fraction, z_score, growth, z_bound, norm_bound, growth_bound;
    int32: count, nonfinite, vanishing_streak; bool: exploding, vanishing; `Moments`:
    log_norm, baseline). They are stored packed in `floats` and `ints`.

    Per-leaf statistics are vectors, one entry per params leaf in `jax.tree.leaves` order;
    `per_leaf(field)` gives one as a tree shaped like the params.
    """

    floats: jax.Array  # float32 statistics, packed: read them by name (`state.global_norm`)
    ints: jax.Array  # int32 counters and flags, packed: read them by name (`state.exploding`)
    leaves: Any  # `leaf_slots(params)`: names the entries of the vectors (holds no buffer)
    leaf_norms: jax.Array  # float32[leaves]: ||g_l||
    update_ratios: jax.Array  # float32[leaves]: ||u_l|| / ||p_l|| (u: the inner's output, else g)
    vanishing_leaves: jax.Array  # bool[leaves]: below the vanishing bounds this step
    inner: Any  # the wrapped transform's state (EmptyState when used stand-alone)

    def __getattr__(self, name: str) -> jax.Array:
        if name in _FLOATS:
            return self.floats[..., _FLOATS.index(name)]
        if name in _INTS:
            value = self.ints[..., _INTS.index(name)]
            return value != 0 if name in _BOOLS else value
        raise AttributeError(f"`HealthState` has no field or statistic {name!r}")

    @property
    def count(self) -> jax.Array:
        """Steps seen (int32, saturating)."""
        return self.ints[..., _INTS.index("count")]

    @property
    def log_norm(self) -> Moments:
        return Moments(self.log_norm_n, self.log_norm_mean, self.log_norm_var)

    @property
    def baseline(self) -> Moments:
        return Moments(self.baseline_n, self.baseline_mean, self.baseline_var)

    def per_leaf(self, field: str) -> Any:
        """`leaf_norms`, `update_ratios` or `vanishing_leaves` as a tree shaped like the params."""
        return unflatten_vector(self.leaves, getattr(self, field))


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
    axis_name: str | None = None,
) -> GradientTransformationExtraArgs:
    """Record gradient-health statistics and flags in the state; pass updates through.

    Per step, in float32 and in one pass over each leaf: the global norm ||g||, each leaf's
    norm, the update-to-parameter ratio ||u_l|| / ||p_l|| per leaf, the count of non-finite
    values and the fraction of exact zeros (small leaves are reduced together; per-leaf values
    are vectors in `jax.tree.leaves` order, `state.per_leaf("leaf_norms")` is the tree). Flags:

      exploding  = non-finite  or  z > z_threshold  or  growth > max_growth
                   or  ||g|| > max_norm,
                   z = (log||g|| - mean) / max(std, 0.25)  over running moments of log||g||
                   (catches sudden spikes; a steady climb moves the moments with it, so)
                   growth = ||g|| / exp(slow mean of log||g||)  (catches steady climbs)
      vanishing  = for `patience` consecutive steps some leaf has
                   rms(g_l) < vanishing_fraction * max_k rms(g_k)  or  ratio_l < ratio_floor

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
      axis_name: `psum` every per-leaf sum over this axis (parameters sharded across it), so
        norms, counts, ratios and flags are those of the whole model on every device.

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
    check_positive("z_threshold", z_threshold, finite=False)
    check_positive("max_norm", max_norm, finite=False, optional=True)
    check_decay("decay", decay)
    check_decay("baseline_decay", baseline_decay)
    check_range("max_growth", max_growth, 1.0, low_open=True, finite=False, optional=True)
    check_range("vanishing_fraction", vanishing_fraction, 0.0, 1.0)
    check_range("ratio_floor", ratio_floor, 0.0)
    check_integer("patience", patience, 1)
    check_integer("warmup_steps", warmup_steps, 0)

    def init(params):
        n = len(jax.tree.leaves(params))
        floats = dict.fromkeys(_FLOATS, 0.0) | dict(
            growth=1.0,
            z_bound=z_threshold,
            norm_bound=jnp.inf if max_norm is None else max_norm,
            growth_bound=jnp.inf if max_growth is None else max_growth,
        )
        return HealthState(
            floats=stack_scalars([floats[k] for k in _FLOATS], jnp.float32),
            ints=jnp.zeros([len(_INTS)], jnp.int32),
            leaves=leaf_slots(params),
            leaf_norms=jnp.zeros([n], jnp.float32),
            update_ratios=jnp.zeros([n], jnp.float32),
            vanishing_leaves=jnp.zeros([n], bool),
            inner=EmptyState() if inner is None else inner.init(params),
        )

    def update(grads, state, params=None, **extra_args):
        if inner is None:
            updates, inner_state = grads, state.inner
        else:
            updates, inner_state = inner.update(grads, state.inner, params, **extra_args)

        check_slots(state.leaves, grads, "health")
        leaves, treedef = jax.tree.flatten(grads)
        with_params = params is not None
        others = [treedef.flatten_up_to(t) for t in (params, updates)] if with_params else []
        sums = _per_leaf_sums(leaves, *others)
        shards = 1
        if axis_name is not None:  # each device holds a slice of every leaf: add them up
            sums, shards = jax.lax.psum((sums, 1), axis_name)
        sq, p_sq, u_sq = (x.astype(jnp.float32) for x in (sums[0], sums[3], sums[4]))
        nonfinite, zeros = (jnp.sum(x, dtype=jnp.int32) for x in (sums[1], sums[2]))
        sizes = np.array([max(g.size, 1) for g in leaves], np.float32) * shards
        norm = jnp.sqrt(jnp.sum(sq))
        leaf_norms, p_norms = jnp.sqrt(sq), jnp.sqrt(p_sq)
        ratios = jnp.sqrt(u_sq) / jnp.maximum(p_norms, 1e-30)
        rms = jnp.sqrt(sq / sizes)
        low = (rms < vanishing_fraction * jnp.max(rms, initial=0.0)) | (
            (ratios < ratio_floor) & (p_norms > 0)
        )
        streak = jnp.where(jnp.any(low), optax.safe_increment(state.vanishing_streak), 0)
        if with_params:  # an all-zero update (a skipped step) is no evidence
            streak = jnp.where(jnp.sum(u_sq) > 0, streak, state.vanishing_streak)

        finite = jnp.isfinite(norm) & (nonfinite == 0)
        log_norm = jnp.log(jnp.maximum(norm, 1e-30))
        z = moments_zscore(state.log_norm, log_norm, warmup_steps, min_std=LOG_NORM_MIN_STD)
        z = jnp.where(finite, z, jnp.inf)
        warm = state.baseline.n >= warmup_steps
        growth = jnp.where(warm & finite, jnp.exp(log_norm - state.baseline.mean), 1.0)
        exploding = (~finite) | (z > state.z_bound) | (norm > state.norm_bound)
        exploding |= growth > state.growth_bound
        log_moments = moments_update(state.log_norm, log_norm, decay, warmup_steps, finite)
        baseline = moments_update(state.baseline, log_norm, baseline_decay, warmup_steps, finite)
        floats = dict(
            global_norm=norm,
            zero_fraction=zeros.astype(jnp.float32)
            / jnp.maximum(sum(g.size for g in leaves) * shards, 1),
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
            nonfinite=nonfinite,
            log_norm_n=log_moments.n,
            baseline_n=baseline.n,
            vanishing_streak=streak,
            exploding=exploding,
            vanishing=streak >= patience,
        )
        new_state = HealthState(
            floats=stack_scalars([floats[k] for k in _FLOATS], jnp.float32),
            ints=stack_scalars([ints[k] for k in _INTS], jnp.int32),
            leaves=state.leaves,
            leaf_norms=leaf_norms,
            update_ratios=ratios,
            vanishing_leaves=low,
            inner=inner_state,
        )
        if with_params:
            # `* one` (exactly 1: the count is finite) makes the update depend on the sums,
            # which read the params. XLA then runs them before `apply_updates` overwrites the
            # donated params in place; otherwise it cannot order them and copies every param.
            one = 1.0 + 0.0 * nonfinite.astype(jnp.float32)
            updates = jax.tree.map(lambda u: u * one.astype(u.dtype), updates)
        return updates, new_state

    return gradient_transformation(init, update, extra_args=True)


_BLOCK = 4096  # rows of a blocked reduction: one pass, float32 error ~1e-6 at 25M elements


def _terms(g: jax.Array, p: jax.Array | None, u: jax.Array | None) -> tuple:
    wide = lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32))
    squares = lambda x: abs_sq(wide(x))
    out = [squares(g), (~jnp.isfinite(g)).astype(jnp.int32), (g == 0).astype(jnp.int32)]
    return tuple(out if p is None else [*out, squares(p), squares(u)])


def _reduce(operands: tuple, axes: tuple[int, ...]) -> tuple:
    """Sums of several same-shaped arrays in one kernel (a `jnp.sum` each: a pass each)."""
    init = tuple(jnp.zeros([], x.dtype) for x in operands)
    return jax.lax.reduce(operands, init, lambda a, b: tuple(map(jnp.add, a, b)), axes)


def _leaf_sums(g: jax.Array, p: jax.Array | None = None, u: jax.Array | None = None) -> tuple:
    """One pass over a large leaf: (sum g**2, #non-finite g, #zero g[, sum p**2, sum u**2]).

    Blocked (rows of `_BLOCK`, then the row sums) because a single long float32 accumulation
    drifts by percents over tens of millions of elements.
    """
    flat = [None if x is None else x.reshape(-1) for x in (g, p, u)]
    main = (flat[0].size // _BLOCK) * _BLOCK
    tail = _reduce(_terms(*[None if x is None else x[main:] for x in flat]), (0,))
    blocks = [None if x is None else x[:main].reshape(-1, _BLOCK) for x in flat]
    rows = _reduce(_terms(*blocks), (1,))
    return tuple(map(jnp.add, _reduce(rows, (0,)), tail))


def _group_sums(g: list, p: list | None, u: list | None) -> tuple:
    """`_leaf_sums` of small leaves at once: zero-padded to one width, stacked, one reduction."""
    width = max(x.size for x in g)
    stack = lambda xs: jnp.stack([jnp.pad(x.reshape(-1), (0, width - x.size)) for x in xs])
    stacked = (None if xs is None else stack(xs) for xs in (g, p, u))
    sq, bad, zero, *rest = _reduce(_terms(*stacked), (1,))
    padding = np.array([width - x.size for x in g], np.int32)
    return (sq, bad, zero - padding, *rest)


def _per_leaf_sums(g: list, p: list | None = None, u: list | None = None) -> list[jax.Array]:
    """[sum g**2, #non-finite g, #zero g, sum p**2, sum u**2] per leaf, as five vectors.

    Leaves above `_BLOCK` elements get one blocked pass each; the small ones (biases, scales:
    most of a network's leaves) are reduced together, in groups whose zero padding at most
    doubles their size and that hold at most `SMALL_GROUP` padded elements, so they cost a few
    kernels instead of a few per leaf.
    """
    n = len(g)
    if n == 0:
        return [jnp.zeros([0], dtype) for dtype in (jnp.float32, jnp.int32, jnp.int32)] + [
            jnp.zeros([0], jnp.float32)
        ] * 2
    at = lambda idx: [None if xs is None else [xs[i] for i in idx] for xs in (g, p, u)]
    alone = [i for i in range(n) if is_sharded(g[i])]  # cannot be flattened or stacked
    large = [i for i in range(n) if g[i].size > _BLOCK and i not in alone]
    groups: list[list[int]] = []
    real = 0  # elements of the open group, before padding
    for i in sorted(set(range(n)) - set(large) - set(alone), key=lambda i: g[i].size):
        padded = (len(groups[-1]) + 1) * g[i].size if groups else 0
        if not groups or padded > SMALL_GROUP or padded > 2 * (real + g[i].size):
            groups.append([])
            real = 0
        groups[-1].append(i)
        real += g[i].size
    pieces = [_group_sums(*at(idx)) for idx in groups]
    leaf_sums = once_per_shape(_leaf_sums, at(large)[0])
    for i in large:
        one = [None if xs is None else xs[i] for xs in (g, p, u)]
        pieces.append([jnp.reshape(s, 1) for s in leaf_sums(*one)])
    for i in alone:
        one = [None if xs is None else xs[i] for xs in (g, p, u)]
        sums = _reduce(_terms(*one), tuple(range(g[i].ndim)))
        pieces.append([jnp.reshape(s, 1) for s in sums])
    order = np.argsort([i for idx in groups for i in idx] + large + alone)  # leaves order
    stats = [jnp.concatenate(column)[order] for column in zip(*pieces, strict=True)]
    return stats if p is not None else [*stats, *[jnp.zeros([n], jnp.float32)] * 2]


# ----------------------------------------------------------------------------- reading


def telemetry_records(opt_state: Any) -> list[tuple[str, Any]]:
    """Every telemetry record in `opt_state`, named as `read_health` names them.

    The one walk over optimizer states that `read_health`, `assert_healthy`, the plots, the
    benchmarks and the example share. A record is the state of `health`, a clip, a guard, loss
    scaling or L-BFGS, with its inner state and moments left out (`None`), so it is small.
    Names are the kind, numbered from the second of a kind on: `health`, `clip`, `clip_1`,
    `skip`, ... Works on traced states too (inside `jit` or `lax.scan`), and a tuple of
    records is itself a state `read_health` reads.

    Args:
      opt_state: any optimizer state (or a tree containing one).

    Returns:
      `[(name, record), ...]`, outermost first.

    Examples:
      >>> import gradxform as gx, jax.numpy as jnp
      >>> tx = gx.chain(gx.clip_by_global_norm(1.0), gx.sgd(0.1))
      >>> [name for name, _ in gx.telemetry_records(tx.init({"w": jnp.zeros(2)}))]
      ['clip']
    """
    kinds = {
        HealthState: "health",
        ClipState: "clip",
        AdaptiveGradClipState: "agc",
        AutoClipState: "autoclip",
        ZClipState: "zclip",
        ScaleBySpamState: "spam",
        SkipIfState: "skip",
        DynamicLossScaleState: "loss_scale",
        LbfgsRecord: "lbfgs",
        LinesearchRecord: "linesearch",
    }
    seen: dict[str, int] = {}
    named = []
    for record in find_states(opt_state, tuple(kinds)):
        kind = kinds[type(record)]
        seen[kind] = seen.get(kind, -1) + 1
        heavy = {f: None for f in ("inner", "mu", "nu") if f in record._fields}
        named.append(
            (kind if seen[kind] == 0 else f"{kind}_{seen[kind]}", record._replace(**heavy))
        )
        if "inner" in heavy:
            named.extend(telemetry_records(record.inner))  # inner chains hold their own records
    return named


def _fetched_records(opt_state: Any) -> list[tuple[str, Any]]:
    """`telemetry_records`, copied to the host in one transfer that leaves the moments behind."""
    named = telemetry_records(opt_state)
    return list(zip([n for n, _ in named], jax.device_get([r for _, r in named]), strict=True))


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


def _flat(prefix: str, tree: Any, out: dict[str, float], slots: Any = None) -> None:
    """`out[prefix/name] = value` for the leaves of `tree`, or, with `slots`, for the entries
    of the per-unit vector `tree` (named `Dense_0/kernel`, `layers/w[7]`)."""
    if slots is not None:
        for i, name in enumerate(unit_names(slots)):
            out[f"{prefix}/{name}" if name else prefix] = _scalar(np.asarray(tree)[..., i])
        return
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        name = _leaf_name(path)
        out[f"{prefix}/{name}" if name else prefix] = _scalar(leaf)


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
      {'clip/norm': 5.0, 'clip/threshold': 1.0, 'clip/clipped': 1.0}
    """
    out: dict[str, float] = {}
    fetched = _fetched_records(opt_state)
    if any(isinstance(record, SkipIfState) for _, record in fetched):
        out["skip/stalled"] = float(_stalled(opt_state, fetched) is not None)
    for name, record in fetched:
        if isinstance(record, HealthState):
            for field in (
                "global_norm",
                "nonfinite",
                "zero_fraction",
                "z_score",
                "growth",
                "count",
            ):
                out[f"{name}/{field}"] = _scalar(getattr(record, field))
            for field in ("exploding", "vanishing", "vanishing_streak"):
                out[f"{name}/{field}"] = _scalar(getattr(record, field))
            _flat(f"{name}/grad_norm", record.leaf_norms, out, record.leaves)
            _flat(f"{name}/update_ratio", record.update_ratios, out, record.leaves)
        else:
            for field, value in record._asdict().items():
                if field in _UNLOGGED:
                    continue
                if isinstance(value, ClipRecord):
                    for sub in ("norm", "threshold", "clipped"):
                        slots = None if sub == "threshold" else value.leaves  # per-leaf clips
                        _flat(f"{name}/{sub}", getattr(value, sub), out, slots)
                elif isinstance(value, Moments):
                    out[f"{name}/{field}_mean"] = _scalar(value.mean)
                    out[f"{name}/{field}_std"] = math.sqrt(max(_scalar(value.var), 0.0))
                else:
                    out[f"{name}/{field}"] = _scalar(value)
    return out


# ----------------------------------------------------------------------------- assertions


class GradientHealthError(RuntimeError):
    """Base class of the errors `assert_healthy` raises."""


class NonFiniteGradientError(GradientHealthError):
    """A gradient value was NaN or infinite."""


class GradientExplosionError(GradientHealthError):
    """The gradient norm jumped far above its running history or past an absolute bound."""


class VanishingGradientError(GradientHealthError):
    """Some layers' gradients stayed negligible compared with the others' for many steps."""


class StalledTrainingError(GradientHealthError):
    """A guard skips every step and will go on doing so: training has silently stopped."""


def _stalled(opt_state: Any, fetched: list[tuple[str, Any]]) -> str | None:
    """Why the guarded steps can no longer be accepted, or None (`fetched`: the host copies
    of `telemetry_records(opt_state)`).

    A guard inside `optax.MultiSteps` sees the accumulated gradient: one non-finite micro-batch
    makes the accumulator non-finite for good, and the guard then skips every later step. A
    guard that has skipped a whole window of consecutive steps is reported too.
    """
    for multi in find_states(opt_state, optax.MultiStepsState):
        guarded = find_states(multi.inner_opt_state, SkipIfState)
        if guarded and not bool(jnp.isfinite(global_norm(multi.acc_grads))):
            return (
                "a guard inside `optax.MultiSteps`, whose gradient accumulator now holds "
                "NaN/inf: every later step will be skipped. Put the guard outside the "
                "accumulation, `gx.skip_if(optax.MultiSteps(opt, k))`, so it refuses the bad "
                "micro-batch before it is accumulated"
            )
    for skip in (record for _, record in fetched if isinstance(record, SkipIfState)):
        window, consecutive = skip.norms.shape[-1], int(np.max(skip.consecutive))
        if window and consecutive >= window:  # (a record whose history was dropped: no window)
            return (
                f"{consecutive} consecutive steps skipped, a whole window of {window}: check "
                "the data and the loss for NaN/inf, or pass `give_up_after=` to accept a "
                "lasting change of scale"
            )
    return None


def _top(tree: Any, k: int = 3, reverse: bool = True) -> list[tuple[str, float]]:
    items = [(_leaf_name(p), _scalar(x)) for p, x in jax.tree_util.tree_leaves_with_path(tree)]
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
      gradxform.telemetry.NonFiniteGradientError: Non-finite gradient at step 1: ...
    """
    fetched = _fetched_records(opt_state)
    reason = _stalled(opt_state, fetched) if check_stalled else None
    if reason is not None:
        raise StalledTrainingError(f"Training has stalled: {reason}.")
    for name, record in fetched:
        if not isinstance(record, HealthState):
            continue
        errors = (
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
    leaf_norms = _top(record.per_leaf("leaf_norms"), k=10**9)
    bad = [n for n, v in leaf_norms if not math.isfinite(v)]
    return NonFiniteGradientError(
        f"Non-finite gradient at step {int(_scalar(record.count))}: "
        f"{int(_scalar(record.nonfinite))} NaN/inf values, in "
        f"{', '.join(bad) or 'the global norm'} ({name}). Remedies: lower the learning rate or "
        "add warm-up, clip (`gx.clip_by_global_norm`, `gx.zclip`), guard the step "
        "(`gx.skip_if`, `gx.stable`), use loss scaling in low precision."
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
    culprits = ", ".join(f"{n} (norm {v:.3g})" for n, v in _top(record.per_leaf("leaf_norms")))
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
    flags = jax.tree_util.tree_leaves_with_path(record.per_leaf("vanishing_leaves"))
    low = [_leaf_name(path) for path, flag in flags if bool(_scalar(flag))]
    leaf_norms = _top(record.per_leaf("leaf_norms"), reverse=False)
    smallest = ", ".join(f"{n} (norm {v:.3g})" for n, v in leaf_norms)
    return VanishingGradientError(
        f"Vanishing gradients at step {int(_scalar(record.count))}: {len(low)} leaves "
        f"({', '.join(low[:5])}{', ...' if len(low) > 5 else ''}) below the bounds for "
        f"{int(_scalar(record.vanishing_streak))} steps; smallest: {smallest} ({name}). "
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
      Non-finite gradient at step 1: 1 NaN/inf values (global norm inf)...
    """
    for record in find_states(opt_state, HealthState):
        kw = {"step": record.count, "norm": record.global_norm}
        checkify.check(
            record.nonfinite == 0,
            "Non-finite gradient at step {step}: {n} NaN/inf values (global norm {norm})",
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
