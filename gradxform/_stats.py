"""Per-leaf gradient statistics in one pass: what `health`'s telemetry and `stable`'s guards
both read, computed once."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradxform._tree import SMALL_GROUP, SMALL_LEAF, abs_sq, is_sharded, once_per_shape


class LeafStats(NamedTuple):
    """Sums over each unit of the gradient (and of the params and updates, when given), in
    float32, one entry per unit (a leaf, or a layer of a stacked leaf) in `jax.tree.leaves`
    order; `psum`-ed over `axis_name`."""

    sq: jax.Array  # float32[units]: sum |g|**2
    nonfinite: jax.Array  # int32[units]: 1 where g holds NaN/inf (its squared sum is not finite)
    zeros: jax.Array | None  # float32[units]: exact zeros of g, or None when not counted
    p_sq: jax.Array | None  # float32[units]: sum |p|**2, or None without params
    u_sq: jax.Array | None  # float32[units]: sum |u|**2, or None without updates
    sizes: np.ndarray | jax.Array  # float32[units]: elements per unit (at least 1), whole model
    total: float | jax.Array  # elements of the whole model

    @property
    def norm(self) -> jax.Array:
        """||g||, float32."""
        return jnp.sqrt(jnp.sum(self.sq))

    @property
    def finite(self) -> jax.Array:
        """No NaN/inf anywhere in g (a squared sum overflowing to inf counts too)."""
        return jnp.isfinite(jnp.sum(self.sq))


def leaf_statistics(
    grads: list,
    params: list | None = None,
    updates: list | None = None,
    axis_name: str | None = None,
    *,
    zeros: bool = True,
    layers: list[int | None] | None = None,
) -> LeafStats:
    """`LeafStats` of lists of leaves: one reduction per large leaf and array (g, p, u), and a
    few for all the small leaves together; `zeros=False` leaves out the count of exact zeros
    (a second read of g). `layers` (`_records.leaf_layers`) gives, per leaf, its number of
    stacked layers (None: not stacked): a stacked leaf's sums are per layer, over axes 1..

    One single-operand reduction per array, not one kernel summing several: XLA:CPU runs a
    `jnp.sum` through its vectorised (and pairwise, so accurate) reduction, and a variadic
    `lax.reduce` through a scalar loop 5-20x slower.

    With `axis_name`, each device holds a slice of every leaf: the sums and sizes are added
    up over the axis in one collective, so every device sees the whole model's statistics.
    """
    squares = lambda x: abs_sq(x.astype(jnp.promote_types(x.dtype, jnp.float32)))
    nonzero = lambda x: (x != 0).astype(jnp.float32)  # (0 on the zero padding, as it must)
    columns = [(grads, squares)] + [(xs, squares) for xs in (params, updates) if xs is not None]
    if zeros:
        columns.append((grads, nonzero))
    rows = [1 if n is None else n for n in layers or [None] * len(grads)]
    sums = [_per_leaf_sums(xs, term, rows) for xs, term in columns]
    shards = 1
    if axis_name is not None:
        sums, shards = jax.lax.psum((sums, 1), axis_name)
    sq, *rest = sums
    p_sq = rest.pop(0) if params is not None else None
    u_sq = rest.pop(0) if updates is not None else None
    true_sizes = np.repeat([g.size // r for g, r in zip(grads, rows, strict=True)], rows)
    true_sizes = true_sizes.astype(np.float32) * shards
    zero_count = true_sizes - rest.pop(0) if zeros else None
    sizes = np.maximum(true_sizes, shards)
    nonfinite = (~jnp.isfinite(sq)).astype(jnp.int32)
    total = sum(g.size for g in grads) * shards
    return LeafStats(sq, nonfinite, zero_count, p_sq, u_sq, sizes, total)


def _per_leaf_sums(leaves: list, term, rows: list[int]) -> jax.Array:
    """float32[units]: `sum(term(x))` of each leaf, or of each of the `rows[i]` layers of a
    stacked leaf (over its axes 1..), in leaves order.

    Large leaves get a reduction each; the small ones (biases, scales: most of a network's
    leaves) are zero-padded to one width, one row per unit, and stacked, in groups whose
    padding at most doubles their size and that hold at most `SMALL_GROUP` padded elements,
    and reduced row by row: a few kernels instead of one per leaf. (`term(0)` must be 0: the
    padding adds nothing.)
    """
    f32 = lambda x: x.astype(jnp.float32)  # x64: the statistics stay float32
    n = len(leaves)
    if n == 0:
        return jnp.zeros([0], jnp.float32)
    width = [x.size // r for x, r in zip(leaves, rows, strict=True)]  # elements per unit
    alone = [i for i in range(n) if is_sharded(leaves[i])]  # cannot be flattened or stacked
    large = [i for i in range(n) if leaves[i].size > SMALL_LEAF and i not in alone]
    groups: list[list[int]] = []
    real = held = 0  # elements (before padding) and rows of the open group
    for i in sorted(set(range(n)) - set(large) - set(alone), key=lambda i: width[i]):
        padded = (held + rows[i]) * width[i]
        if not groups or padded > SMALL_GROUP or padded > 2 * (real + leaves[i].size):
            groups.append([])
            real = held = 0
        groups[-1].append(i)
        real, held = real + leaves[i].size, held + rows[i]
    pieces = []
    for idx in groups:
        w = max(width[i] for i in idx)
        pad = lambda i, w=w: jnp.pad(
            leaves[i].reshape(rows[i], width[i]), ((0, 0), (0, w - width[i]))
        )
        pieces.append(f32(jnp.sum(term(jnp.concatenate([pad(i) for i in idx])), axis=1)))
    # each traced once per shape; a stacked leaf: one sum per layer (over axes 1..), one pass
    whole = once_per_shape(lambda x: f32(jnp.sum(term(x))).reshape(1), leaves)
    by_layer = once_per_shape(lambda x: f32(jnp.sum(term(x), axis=tuple(range(1, x.ndim)))), leaves)
    pieces += [(whole if rows[i] == 1 else by_layer)(leaves[i]) for i in large + alone]
    done = [i for idx in groups for i in idx] + large + alone
    start = dict(zip(done, np.cumsum([0] + [rows[i] for i in done])[:-1], strict=True))
    order = np.concatenate([np.arange(start[i], start[i] + rows[i]) for i in range(n)])
    return jnp.concatenate(pieces)[order]
