"""Per-leaf gradient statistics in one pass: what `health`'s telemetry and `stable`'s guards
both read, computed once."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradxform._tree import SMALL_GROUP, SMALL_LEAF, abs_sq, is_sharded


class LeafStats(NamedTuple):
    """Sums over each leaf of the gradient (and of the params and updates, when given), in
    float32, one entry per leaf in `jax.tree.leaves` order; `psum`-ed over `axis_name`."""

    sq: jax.Array  # float32[leaves]: sum |g|**2
    nonfinite: jax.Array  # int32[leaves]: 1 where g holds NaN/inf (its squared sum is not finite)
    zeros: jax.Array | None  # float32[leaves]: exact zeros of g, or None when not counted
    p_sq: jax.Array | None  # float32[leaves]: sum |p|**2, or None without params
    u_sq: jax.Array | None  # float32[leaves]: sum |u|**2, or None without updates
    sizes: np.ndarray | jax.Array  # float32[leaves]: elements per leaf (at least 1), whole model
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
) -> LeafStats:
    """`LeafStats` of lists of leaves: one reduction per large leaf and array (g, p, u), and a
    few for all the small leaves together; `zeros=False` leaves out the count of exact zeros
    (a second read of g).

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
    sums = [_per_leaf_sums(xs, term) for xs, term in columns]
    shards = 1
    if axis_name is not None:
        sums, shards = jax.lax.psum((sums, 1), axis_name)
    sq, *rest = sums
    p_sq = rest.pop(0) if params is not None else None
    u_sq = rest.pop(0) if updates is not None else None
    true_sizes = np.array([g.size for g in grads], np.float32) * shards
    zero_count = true_sizes - rest.pop(0) if zeros else None
    sizes = np.array([max(g.size, 1) for g in grads], np.float32) * shards
    nonfinite = (~jnp.isfinite(sq)).astype(jnp.int32)
    total = sum(g.size for g in grads) * shards
    return LeafStats(sq, nonfinite, zero_count, p_sq, u_sq, sizes, total)


def _per_leaf_sums(leaves: list, term) -> jax.Array:
    """float32[leaves]: `sum(term(x))` of each leaf.

    Large leaves get a reduction each; the small ones (biases, scales: most of a network's
    leaves) are zero-padded to one width and stacked, in groups whose padding at most doubles
    their size and that hold at most `SMALL_GROUP` padded elements, and reduced row by row:
    a few kernels instead of one per leaf. (`term(0)` must be 0: the padding adds nothing.)
    """
    f32 = lambda x: x.astype(jnp.float32)  # x64: the statistics stay float32
    n = len(leaves)
    if n == 0:
        return jnp.zeros([0], jnp.float32)
    alone = [i for i in range(n) if is_sharded(leaves[i])]  # cannot be flattened or stacked
    large = [i for i in range(n) if leaves[i].size > SMALL_LEAF and i not in alone]
    groups: list[list[int]] = []
    real = 0  # elements of the open group, before padding
    for i in sorted(set(range(n)) - set(large) - set(alone), key=lambda i: leaves[i].size):
        padded = (len(groups[-1]) + 1) * leaves[i].size if groups else 0
        if not groups or padded > SMALL_GROUP or padded > 2 * (real + leaves[i].size):
            groups.append([])
            real = 0
        groups[-1].append(i)
        real += leaves[i].size
    pieces = []
    for idx in groups:
        width = max(leaves[i].size for i in idx)
        rows = [jnp.pad(leaves[i].reshape(-1), (0, width - leaves[i].size)) for i in idx]
        pieces.append(f32(jnp.sum(term(jnp.stack(rows)), axis=1)))
    pieces += [f32(jnp.sum(term(leaves[i]))).reshape(1) for i in large + alone]
    order = np.argsort([i for idx in groups for i in idx] + large + alone)  # leaves order
    return jnp.concatenate(pieces)[order]
