"""Tree maths shared by the transforms: scalar leaves as arrays, per-shape tracing of leaf
rules, |x|**2 for real and complex leaves, and float32 norms."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradxform._checks import is_inexact

PyTree = Any


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


@functools.cache
def _staging_tracer() -> type:
    """The tracer type of values being staged out (`jit`, `scan`, `pmap` bodies), found through
    public API: jax keeps the class itself internal."""
    seen = []
    jax.make_jaxpr(lambda x: seen.append(type(x)) or x)(0.0)
    return seen[0]


def once_per_shape(fn: Callable, leaves: Sequence[Any]) -> Callable:
    """`fn`, traced once per distinct leaf shape and dtype when `leaves` are being staged.

    Under `jit` every `jnp` call costs Python time per leaf; through `jax.jit` a per-leaf rule
    is traced once per shape and then reused (XLA inlines the calls, so the compiled program
    and its results are unchanged). Eagerly, and under an eager `vmap` or `grad`, `fn` runs as
    it is: `jit` of a fresh closure would compile on every step. Worth it for rules of many
    operations (Adam's: trace 2.9 -> 0.85 s at 1000 leaves); a one-operation map gains nothing.
    """
    staged = any(isinstance(x, _staging_tracer()) for x in leaves)  # jit, scan, pmap bodies
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
