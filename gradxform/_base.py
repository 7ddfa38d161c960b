"""Protocol types, argument checks and float32 tree reductions shared by every transform.

gradxform speaks optax's protocol unchanged: a transform is an
`optax.GradientTransformationExtraArgs` and `chain` is `optax.chain`, so gradxform and optax
transforms mix freely in either library's combinators.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.interpreters.partial_eval import DynamicJaxprTracer

GradientTransformation = optax.GradientTransformation
GradientTransformationExtraArgs = optax.GradientTransformationExtraArgs
EmptyState = optax.EmptyState
chain = optax.chain

PyTree = Any
Params = Updates = PyTree
Scalar = float | jax.Array
ScalarOrSchedule = float | jax.Array | Callable[[jax.Array], jax.Array]


class Leaf(NamedTuple):
    """Stands for one params leaf in a tree that names the entries of a per-leaf vector.

    A NamedTuple with no fields is a pytree node with no children: a tree of them keeps the
    params' paths (for names in `read_health`) but holds no buffer, so it costs no kernel,
    copy or transfer in a compiled step, and survives `flax.serialization` and `lax.scan`.
    """


def leaf_slots(params: Any) -> Any:
    """A tree shaped like `params` with a `Leaf()` for every leaf."""
    return jax.tree.map(lambda _: Leaf(), params)


def slots_structure(slots: Any) -> Any:
    """The treedef of `params` that `slots = leaf_slots(params)` was built from."""
    return jax.tree.structure(slots, is_leaf=lambda x: isinstance(x, Leaf))


def check_slots(slots: Any, updates: Any, name: str) -> None:
    """Raise unless `updates` has the tree structure `slots` were built from (by `name`)."""
    treedef, expected = jax.tree.structure(updates), slots_structure(slots)
    if treedef != expected:
        raise ValueError(
            f"`updates` do not match the tree `{name}` was initialised with: "
            f"{treedef} vs {expected}."
        )


def unflatten_vector(slots: Any, values: jax.Array) -> Any:
    """`values`' last axis (one entry per leaf, `jax.tree.leaves` order) as a params tree."""
    treedef = slots_structure(slots)
    return treedef.unflatten([values[..., i] for i in range(treedef.num_leaves)])


def stack_scalars(scalars: Sequence[jax.Array], dtype: Any) -> jax.Array:
    """One vector of per-leaf scalars (one buffer in state instead of one per leaf)."""
    return jnp.stack(scalars).astype(dtype) if scalars else jnp.zeros([0], dtype)


class ClipRecord(NamedTuple):
    """What a clipping transform saw and did on its last step. Per-leaf clips hold vectors,
    one entry per leaf in `jax.tree.leaves` order, named by `leaves` (`per_leaf` gives
    trees); `leaves` is None for the others."""

    norm: jax.Array  # float32 statistic compared with the threshold, before clipping
    threshold: jax.Array  # float32 threshold in force on that step (one for all leaves)
    clipped: jax.Array  # bool, True where the update was scaled down
    leaves: Any = None  # per-leaf clips: `leaf_slots(params)`

    def per_leaf(self, field: str) -> Any:
        """`norm` or `clipped` of a per-leaf clip as a tree shaped like the params."""
        return unflatten_vector(self.leaves, getattr(self, field))


def no_clip_record(params: Any = None) -> ClipRecord:
    """An all-zero record; with `params`, a per-leaf record with one entry per leaf."""
    if params is None:
        return ClipRecord(
            jnp.zeros([], jnp.float32), jnp.zeros([], jnp.float32), jnp.zeros([], bool)
        )
    n = len(jax.tree.leaves(params))
    return ClipRecord(
        jnp.zeros([n], jnp.float32), jnp.zeros([], jnp.float32), jnp.zeros([n], bool),
        leaf_slots(params),
    )  # fmt: skip


# ----------------------------------------------------------------------------- hyperparameters


def _interval(low, high, low_open, high_open) -> str:
    lo = "-inf" if low is None else f"{low:g}"
    hi = "inf" if high is None else f"{high:g}"
    left = "(" if low_open or low is None else "["
    right = ")" if high_open or high is None else "]"
    return f"{left}{lo}, {hi}{right}"


def check_range(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    finite: bool = True,
    optional: bool = False,
) -> None:
    """Raise `ValueError` naming `name` unless `value` is a real scalar in the interval.

    Any real dtype is accepted (Python and NumPy numbers, 0-d arrays, bfloat16). With `finite`,
    +-inf is refused even where the interval is open-ended; with `optional`, `None` is
    accepted (it then means "off"). Schedules (callables) and traced values (e.g. under
    `optax.inject_hyperparams`) are not checked: their value is unknown at construction.
    """
    if callable(value) or isinstance(value, jax.core.Tracer) or (optional and value is None):
        return
    v = np.asarray(value)
    if v.ndim != 0:
        raise ValueError(f"`{name}` must be a scalar (float or 0-d array), got shape {v.shape}.")
    real = jnp.issubdtype(v.dtype, jnp.floating) or jnp.issubdtype(v.dtype, jnp.integer)
    if not real or v.dtype == np.bool_:
        raise ValueError(f"`{name}` must be a real number, got {value!r}.")
    x = float(v)
    ok = not math.isnan(x) and (math.isfinite(x) or not finite)
    if low is not None:
        ok &= x > low if low_open else x >= low
    if high is not None:
        ok &= x < high if high_open else x <= high
    if not ok:
        kind = "finite and " if finite and high is None else ""
        raise ValueError(
            f"`{name}` must be {kind}in {_interval(low, high, low_open, high_open)}, got {value!r}."
        )


def check_decay(name: str, value: Any, **kwargs: Any) -> None:
    """A decay rate or beta: in [0, 1]. 1 (never forget) is degenerate for a debiased moment
    but valid in optax, and it is what 0.999 becomes when `optax.inject_hyperparams` casts
    it to bfloat16 params."""
    check_range(name, value, 0.0, 1.0, **kwargs)


def check_nonnegative(name: str, value: Any, **kwargs: Any) -> None:
    check_range(name, value, 0.0, **kwargs)


def check_positive(name: str, value: Any, **kwargs: Any) -> None:
    check_range(name, value, 0.0, low_open=True, **kwargs)


def check_integer(name: str, value: Any, low: int, high: Any = None, *, optional=False) -> None:
    """Raise `ValueError` naming `name` unless `value` is an integer in [low, high]: a Python or
    NumPy int or a 0-d integer array (as `optax.inject_hyperparams` passes it), not a bool.
    Traced values are not checked."""
    if (optional and value is None) or isinstance(value, jax.core.Tracer):
        return
    dtype = np.asarray(value).dtype if hasattr(value, "dtype") else None
    integral = isinstance(value, int) and not isinstance(value, bool)
    if dtype is not None and np.ndim(value) == 0:
        integral = jnp.issubdtype(dtype, jnp.integer)
    in_range = integral and low <= int(value) and (high is None or int(value) <= high)
    if not in_range:
        upper = "" if high is None else f" and <= {high!r}"
        raise ValueError(f"`{name}` must be an integer >= {low}{upper}, got {value!r}.")


def check_dtype(name: str, dtype: Any) -> Any:
    """The canonical dtype named by `dtype` (None stays None), or `ValueError` naming `name`
    unless it is a real floating dtype (a moment stored as int or bool truncates to 0)."""
    if dtype is None:
        return None
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or not jnp.issubdtype(resolved, jnp.floating):
        raise ValueError(
            f"`{name}` must be None or a real floating dtype such as `jnp.float32` or "
            f"`jnp.bfloat16`, got {dtype!r}."
        )
    return jax.dtypes.canonicalize_dtype(resolved)


def check_transform(name: str, value: Any) -> None:
    """Raise `TypeError` naming `name` unless `value` is a gradient transformation."""
    if isinstance(value, GradientTransformation | GradientTransformationExtraArgs):
        return
    if callable(getattr(value, "init", None)) and callable(getattr(value, "update", None)):
        return
    hint = " Call the factory first, e.g. `gx.sgd(0.1)`, not `gx.sgd`." if callable(value) else ""
    raise TypeError(
        f"`{name}` must be a gradient transformation (an object with `init` and `update`, "
        f"e.g. `gx.adam(1e-3)`), got {value!r}.{hint}"
    )


def resolve(value: ScalarOrSchedule, count: jax.Array) -> Any:
    """The value of a hyperparameter at step `count`: a schedule is called, a constant returned."""
    return value(count) if callable(value) else value


# ----------------------------------------------------------------------------- tree checks


def path_name(path: Sequence[Any]) -> str:
    """`Dense_0/kernel` for the key path of a leaf (`<root>` for a bare array)."""
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/") or "<root>"


def _dtype(leaf: Any) -> np.dtype:
    return np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else jnp.result_type(leaf)


def is_inexact(leaf: Any) -> bool:
    """A real or complex floating leaf: one that has a gradient update."""
    return bool(jnp.issubdtype(_dtype(leaf), jnp.inexact))


def check_floating(tree: PyTree, name: str) -> None:
    """Raise `TypeError` naming the first leaf of `tree` that is not a floating array."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        dtype = _dtype(leaf)
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"`{name}` must hold floating-point arrays, but leaf {path_name(path)!r} has "
                f"dtype {dtype}. Integer and boolean leaves have no gradient update: give them "
                "a `None` gradient (they then pass through untouched, as in optax), keep them "
                "out of the optimized tree (e.g. `optax.masked` or a Flax filter) or cast "
                "them to a float dtype."
            )


def as_arrays(tree: PyTree) -> PyTree:
    """Python and NumPy scalars and arrays in `tree` as JAX arrays of their canonical dtype
    (strongly typed, so a state built from them keeps its dtype); other leaves unchanged."""

    def convert(x):
        if isinstance(x, int | float | complex | np.generic | np.ndarray):
            return jnp.asarray(x, jax.dtypes.canonicalize_dtype(np.result_type(x)))
        return x

    return jax.tree.map(convert, tree)


def trainable(params: PyTree) -> PyTree:
    """`params` with its integer and boolean leaves (buffers, step counters) set to `None`.

    `None` is an empty subtree: transforms neither keep state for these leaves nor return
    an update for them, matching their `None` gradient.
    """
    return jax.tree.map(lambda x: x if is_inexact(x) else None, as_arrays(params))


def check_same_structure(tree: PyTree, ref: PyTree, name: str, ref_name: str) -> None:
    """Raise `ValueError` unless `tree` has exactly `ref`'s structure and leaf shapes."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    ref_leaves, ref_treedef = jax.tree_util.tree_flatten_with_path(ref)
    if treedef != ref_treedef:
        paths = {path_name(p) for p, _ in leaves}
        ref_paths = {path_name(p) for p, _ in ref_leaves}
        extra, missing = sorted(paths - ref_paths), sorted(ref_paths - paths)
        if extra or missing:
            detail = "; ".join(
                part
                for part in (
                    f"leaves {extra} are not in `{ref_name}`" if extra else "",
                    f"leaves {missing} of `{ref_name}` are missing" if missing else "",
                )
                if part
            )
        else:
            detail = f"same leaf paths but different containers:\n  {treedef}\nvs\n  {ref_treedef}"
        raise ValueError(f"`{name}` does not match the tree structure of `{ref_name}`: {detail}.")
    for (path, leaf), (_, ref_leaf) in zip(leaves, ref_leaves, strict=True):
        if np.shape(leaf) != np.shape(ref_leaf):
            raise ValueError(
                f"`{name}` leaf {path_name(path)!r} has shape {np.shape(leaf)} but `{ref_name}` "
                f"has {np.shape(ref_leaf)}; shapes must match exactly (no broadcasting)."
            )


def find_states(tree: PyTree, types: type | tuple[type, ...]) -> list[Any]:
    """The states of `types` anywhere in a nested optimizer state, outermost first."""
    found = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, types))
    return [x for x in found if isinstance(x, types)]


def gradient_transformation(
    init: Callable[[Params], Any],
    update: Callable[..., tuple[Updates, Any]],
    *,
    extra_args: bool = False,
) -> GradientTransformationExtraArgs:
    """Wrap a transform's `init`/`update` pair with gradxform's input normalisation and checks.

    One step for every transform, in Python at trace time (free inside a compiled step):
    Python and NumPy scalar leaves become JAX arrays; integer and boolean params leaves become
    `None` (no state, and their `None` gradient passes through); updates must be floating
    point (real or complex) and match the params' tree and shapes. `update` receives the extra
    keyword arguments (e.g. `loss=`) only when `extra_args=True`.
    """

    def checked_init(params):
        return init(trainable(params))

    def checked_update(updates, state, params=None, **kwargs):
        updates = as_arrays(updates)
        check_floating(updates, "updates")
        if params is not None:
            params = trainable(params)
            check_same_structure(updates, params, "updates", "params")
        if extra_args:
            return update(updates, state, params, **kwargs)
        return update(updates, state, params)

    return GradientTransformationExtraArgs(checked_init, checked_update)


# ----------------------------------------------------------------------------- tree maths


def once_per_shape(fn: Callable, leaves: Sequence[Any]) -> Callable:
    """`fn`, traced once per distinct leaf shape and dtype when `leaves` are being staged.

    Under `jit` every `jnp` call costs Python time per leaf; through `jax.jit` a per-leaf rule
    is traced once per shape and then reused (XLA inlines the calls, so the compiled program
    and its results are unchanged). Eagerly, and under an eager `vmap` or `grad`, `fn` runs as
    it is: `jit` of a fresh closure would compile on every step. Worth it for rules of many
    operations (Adam's: trace 2.9 -> 0.85 s at 1000 leaves); a one-operation map gains nothing.
    """
    staged = any(isinstance(x, DynamicJaxprTracer) for x in leaves)  # jit, scan, pmap bodies
    return jax.jit(fn) if staged else fn


def tree_map_unzip(
    fn: Callable[..., tuple], tree: PyTree, *rest: PyTree, n: int, per_shape: bool = True
) -> tuple:
    """Map `fn` (returning an `n`-tuple) over the leaves of trees shaped like `tree`; unzip.

    This is how a one-array update rule is lifted to pytrees once: `fn(g, m, v) -> (u, m, v)`,
    traced once per distinct leaf shape and dtype (see `once_per_shape`) unless `per_shape` is
    False (rules of two or three operations compile faster inlined).
    """
    leaves, treedef = jax.tree.flatten(tree)
    rest_leaves = [treedef.flatten_up_to(r) for r in rest]
    if per_shape:
        fn = once_per_shape(fn, leaves)
    outs = [fn(*xs) for xs in zip(leaves, *rest_leaves, strict=True)]
    columns = list(zip(*outs, strict=True)) if outs else [()] * n
    return tuple(treedef.unflatten(col) for col in columns)


def zeros_like(tree: PyTree, dtype: Any = None) -> PyTree:
    """Zeros shaped (and sharded) like `tree`; works on `jax.ShapeDtypeStruct` leaves."""
    return jax.tree.map(lambda x: jnp.zeros_like(x, dtype=dtype), tree)


def abs_sq(x: jax.Array) -> jax.Array:
    """|x|**2, real: `x * x`, or `re(x)**2 + im(x)**2` for complex `x` (optax's `abs_sq`)."""
    if jnp.iscomplexobj(x):
        return jnp.square(x.real) + jnp.square(x.imag)
    return jnp.square(x)


def moment_square(g: jax.Array, moment: jax.Array) -> jax.Array:
    """|g|**2 formed in the promoted dtype of `g` and the `moment` it feeds: a float16 square
    underflows (1e-4**2 -> 0) before a float32 moment could hold it. Real for complex `g`."""
    return abs_sq(g.astype(jnp.promote_types(g.dtype, moment.dtype)))


def sum_of_squares(x: jax.Array) -> jax.Array:
    """`sum(|x|**2)` accumulated in float32 whatever `x`'s dtype (a float16 sum overflows at
    256²); real, also for complex `x`."""
    return jnp.sum(abs_sq(x.astype(jnp.promote_types(x.dtype, jnp.float32))))


def is_sharded(x: Any) -> bool:
    """Whether `x`'s type carries a partitioned sharding (explicit sharding, `jax.set_mesh`).

    Such leaves cannot be flattened and concatenated with others (the reshape is refused), so
    they are reduced on their own.
    """
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    return spec is not None and any(axis is not None for axis in spec)


# Leaves of at most SMALL_LEAF elements are squared-and-summed together, in concatenations of
# at most SMALL_GROUP elements (a 4 MiB float32 operand, fused into its reduction).
SMALL_LEAF = 1 << 14
SMALL_GROUP = 1 << 20


def _squared_sums(leaves: Sequence[jax.Array]) -> list[jax.Array]:
    """Float32 (at least) `sum(x**2)` of the leaves: large leaves one by one, small ones grouped.

    A network's biases and normalisation scales are most of its leaves and few of its values;
    one reduction per group of them instead of one (or two) per leaf is fewer kernels to
    compile and to launch. Large leaves keep their own reduction: concatenating them would
    cost a copy.
    """
    sums, group, size = [], [], 0

    def close_group():
        if group:
            sums.append(sum_of_squares(group[0] if len(group) == 1 else jnp.concatenate(group)))
        group.clear()

    for x in leaves:
        if x.size > SMALL_LEAF or is_sharded(x):
            sums.append(sum_of_squares(x))
            continue
        x = x.reshape(-1).astype(jnp.promote_types(x.dtype, jnp.float32))
        if group and (size + x.size > SMALL_GROUP or group[0].dtype != x.dtype):
            close_group()
            size = 0
        group.append(x)
        size += x.size
    close_group()
    return sums


def global_norm(tree: PyTree, axis_name: str | None = None) -> jax.Array:
    """The L2 norm of all leaves together, in float32 (at least).

    Small leaves (biases, normalisation scales) are reduced together, a few kernels for all of
    them. With `axis_name`, the squared sums are `psum`-ed over that mapped axis first, so when
    parameters are sharded across it the result is the norm of the whole, unsharded tree.

    Args:
      tree: a pytree of arrays.
      axis_name: optional mapped axis to sum over.

    Examples:
      >>> import gradxform as gx, jax.numpy as jnp
      >>> gx.global_norm({"a": jnp.array([3.0]), "b": jnp.array([4.0], jnp.float16)})
      Array(5., dtype=float32)
    """
    total = sum(_squared_sums(jax.tree.leaves(tree)), jnp.zeros([], jnp.float32))
    if axis_name is not None:
        total = jax.lax.psum(total, axis_name)
    return jnp.sqrt(total)


def scale_leaf(x: jax.Array, factor: jax.Array) -> jax.Array:
    """`x * factor` computed in at least float32 and returned in `x`'s dtype (one rounding)."""
    return (x.astype(jnp.promote_types(x.dtype, jnp.float32)) * factor).astype(x.dtype)


def safe_increment(count: jax.Array) -> jax.Array:
    """`count + 1`, saturating at the dtype's maximum instead of wrapping (optax's rule)."""
    return optax.safe_increment(count)


def step_counter() -> jax.Array:
    return jnp.zeros([], jnp.int32)


# ----------------------------------------------------------------------------- running moments


class Moments(NamedTuple):
    """Running mean and variance of a scalar: exact over a warm-up, exponential after it."""

    n: jax.Array  # int32 observations absorbed (saturating)
    mean: jax.Array  # float32
    var: jax.Array  # float32 population variance


def moments_init() -> Moments:
    return Moments(step_counter(), jnp.zeros([], jnp.float32), jnp.zeros([], jnp.float32))


def moments_update(m: Moments, x: jax.Array, decay: float, warmup: int, accept=True) -> Moments:
    """Absorb `x` where `accept`: Welford's exact mean/variance for the first `warmup`
    observations, then the exponentially weighted mean and variance with rate `1 - decay`.

    Both are  mean += w * d;  var += w * ((1 - w) * d**2 - var),  d = x - mean,
    with w = 1/n during warm-up and w = 1 - decay after it.
    """
    n = safe_increment(m.n)
    w = jnp.where(m.n < warmup, 1.0 / n.astype(jnp.float32), 1.0 - decay)
    d = x - m.mean
    new = Moments(n, m.mean + w * d, m.var + w * ((1 - w) * d * d - m.var))
    return optax.tree.where(accept, new, m)


# Floor on the spread of log||g|| in z-scores (`health`, `skip_if`): z > 4 then means at least
# e**1 (~2.7x) above the running level, however steady the history has been.
LOG_NORM_MIN_STD = 0.25


def moments_zscore(m: Moments, x: jax.Array, warmup: int, min_std: float = 1e-6) -> jax.Array:
    """`(x - mean) / max(std, min_std)`, or 0 before `warmup` observations (no basis yet).

    `min_std` keeps a very steady history from turning a small wobble into a large z-score.
    """
    z = (x - m.mean) / jnp.maximum(jnp.sqrt(jnp.maximum(m.var, 0.0)), min_std)
    return jnp.where(m.n >= warmup, z, 0.0)
