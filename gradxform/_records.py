"""Records a transform keeps of what it saw: per-unit vectors named by buffer-free slots trees
(`Leaf` per params leaf, a tuple of `Layer` per stacked leaf), the clipping record, and the
one walk that finds records in a nested optimizer state.

The record protocol: a state class that carries telemetry is a NamedTuple with a class
attribute `record_kind` (`"health"`, `"clip"`, `"skip"`, ...). `telemetry_records` finds every
such state by that attribute alone, so no module needs to import another's state types to read
them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradxform._checks import Stacked, check_stacked, leaf_name


class Leaf(NamedTuple):
    """Stands for one params leaf in a tree that names the entries of a per-leaf vector.

    A NamedTuple with no fields is a pytree node with no children: a tree of them keeps the
    params' paths (for names in `read_health`) but holds no buffer, so it costs no kernel,
    copy or transfer in a compiled step, and survives `flax.serialization` and `lax.scan`.
    """


class Layer(NamedTuple):
    """Stands for one layer of a stacked leaf (axis 0 a layer axis): a stacked leaf of L
    layers is a tuple of L `Layer()` in the slots tree. Buffer-free, like `Leaf`."""


def _is_unit(x: Any) -> bool:
    return isinstance(x, Leaf | Layer)


def _is_slot(x: Any) -> bool:
    """A params leaf's slot: a `Leaf`, or the tuple of `Layer`s of a stacked leaf."""
    return isinstance(x, Leaf) or (type(x) is tuple and bool(x) and isinstance(x[0], Layer))


def leaf_slots(params: Any, stacked: Stacked = None) -> Any:
    """A tree shaped like `params` with a `Leaf()` for every leaf, or, for a leaf that
    `stacked` marks (a regex on its name or a predicate, see `check_stacked`), a tuple of one
    `Layer()` per index of its axis 0."""
    marks = check_stacked("stacked", stacked)

    def slot(path, leaf):
        name = leaf_name(path)
        if marks is None or not marks(name, leaf):
            return Leaf()
        if np.ndim(leaf) < 1 or np.shape(leaf)[0] < 1:
            raise ValueError(
                f"`stacked` marks leaf {name or '<root>'!r} as stacked layers (axis 0 a layer "
                f"axis), but its shape is {np.shape(leaf)}: a stacked leaf needs at least one "
                "dimension and one layer. Narrow the regex or predicate passed as `stacked`."
            )
        return tuple(Layer() for _ in range(np.shape(leaf)[0]))

    return jax.tree_util.tree_map_with_path(slot, params)


def slots_structure(slots: Any) -> Any:
    """The treedef of `params` that `slots = leaf_slots(params, ...)` was built from."""
    return jax.tree.structure(slots, is_leaf=_is_slot)


def leaf_layers(slots: Any) -> list[int | None]:
    """Per params leaf (`jax.tree.leaves` order): its number of layers if stacked, else None."""
    return [
        None if isinstance(s, Leaf) else len(s) for s in jax.tree.leaves(slots, is_leaf=_is_slot)
    ]


def unit_names(slots: Any) -> list[str]:
    """The name of each entry of a per-unit vector: `Dense_0/kernel`, or `layers/w[7]` for
    layer 7 of a stacked leaf (`""` for a bare array)."""
    units = jax.tree_util.tree_leaves_with_path(slots, is_leaf=_is_unit)
    return [
        f"{leaf_name(path[:-1])}[{path[-1].idx}]" if isinstance(unit, Layer) else leaf_name(path)
        for path, unit in units
    ]


def check_slots(slots: Any, updates: Any, name: str) -> None:
    """Raise unless `updates` has the tree structure `slots` were built from (by `name`)."""
    treedef, expected = jax.tree.structure(updates), slots_structure(slots)
    if treedef != expected:
        raise ValueError(
            f"`updates` do not match the tree `{name}` was initialised with: "
            f"{treedef} vs {expected}."
        )


def unflatten_vector(slots: Any, values: jax.Array) -> Any:
    """`values`' last axis (one entry per unit: per leaf, or per layer of a stacked leaf, in
    `jax.tree.leaves` order) as a params tree; a stacked leaf holds a tuple of its layers'."""
    pieces, i = [], 0
    for layers in leaf_layers(slots):
        if layers is None:
            pieces.append(values[..., i])
            i += 1
        else:
            pieces.append(tuple(values[..., i + j] for j in range(layers)))
            i += layers
    return slots_structure(slots).unflatten(pieces)


def stack_scalars(scalars: Sequence[jax.Array], dtype: Any) -> jax.Array:
    """One vector of per-leaf scalars (one buffer in state instead of one per leaf)."""
    return jnp.stack(scalars).astype(dtype) if scalars else jnp.zeros([0], dtype)


def stack_units(values: Sequence[jax.Array], dtype: Any) -> jax.Array:
    """One vector of per-unit values: a scalar per leaf, or a vector per stacked leaf."""
    if not values:
        return jnp.zeros([0], dtype)
    return jnp.concatenate([jnp.reshape(v, -1).astype(dtype) for v in values])


class ClipRecord(NamedTuple):
    """What a clipping transform saw and did on its last step. Per-leaf clips hold vectors,
    one entry per leaf (per layer for a stacked leaf) in `jax.tree.leaves` order, named by
    `leaves` (`per_leaf` gives trees); `leaves` is None for the others."""

    norm: jax.Array  # float32 statistic compared with the threshold, before clipping
    threshold: jax.Array  # float32 threshold in force on that step (one for all leaves)
    clipped: jax.Array  # bool, True where the update was scaled down
    clipped_total: jax.Array  # int32 steps on which anything was clipped (saturating)
    leaves: Any = None  # per-leaf clips: `leaf_slots(params, stacked)`

    def per_leaf(self, field: str) -> Any:
        """`norm` or `clipped` of a per-leaf clip as a tree shaped like the params."""
        return unflatten_vector(self.leaves, getattr(self, field))

    def next(self, norm: jax.Array, threshold: jax.Array, clipped: jax.Array) -> ClipRecord:
        """This step's record (same `leaves`), the total counted on."""
        total = self.clipped_total
        total = jnp.where(jnp.any(clipped), optax.safe_increment(total), total)
        as_f32 = lambda x: jnp.asarray(x, jnp.float32)
        return ClipRecord(as_f32(norm), as_f32(threshold), clipped, total, self.leaves)


def no_clip_record(params: Any = None, stacked: Stacked = None) -> ClipRecord:
    """An all-zero record; with `params`, a per-leaf record with one entry per unit (per leaf,
    or per layer of the leaves `stacked` marks)."""
    if params is None:
        return ClipRecord(
            jnp.zeros([], jnp.float32), jnp.zeros([], jnp.float32), jnp.zeros([], bool),
            jnp.zeros([], jnp.int32),
        )  # fmt: skip
    slots = leaf_slots(params, stacked)
    n = len(unit_names(slots))
    return ClipRecord(
        jnp.zeros([n], jnp.float32),
        jnp.zeros([], jnp.float32),
        jnp.zeros([n], bool),
        jnp.zeros([], jnp.int32),
        slots,
    )


def find_states(tree: Any, types: type | tuple[type, ...]) -> list[Any]:
    """The states of `types` anywhere in a nested optimizer state, outermost first."""
    found = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, types))
    return [x for x in found if isinstance(x, types)]


def is_record(x: Any) -> bool:
    """Whether `x` is a telemetry record: a state whose class declares `record_kind`."""
    return isinstance(getattr(type(x), "record_kind", None), str) and hasattr(x, "_fields")


# Fields a record keeps for the transform's own use, never logged: the wrapped state and
# moments (large), and nested records (read on their own).
_HEAVY = ("inner", "mu", "nu")


def telemetry_records(opt_state: Any) -> list[tuple[str, Any]]:
    """Every telemetry record in `opt_state`, named as `read_health` names them.

    The one walk over optimizer states that `read_health`, `assert_healthy`, `check_healthy`,
    the plots, the benchmarks and the example share. A record is the state of `health`, a clip,
    a guard, loss scaling or L-BFGS (any state with a `record_kind`), with its inner state,
    moments and nested records left out (`None`), so it is small; nested records follow their
    parent. Names are the kind, numbered from the second of a kind on: `health`, `clip`,
    `clip_1`, `skip`, ... Works on traced states too (inside `jit` or `lax.scan`), and a
    tuple of records is itself a state `read_health` reads.

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
    seen: dict[str, int] = {}

    def walk(tree: Any) -> list[tuple[str, Any]]:
        named = []
        for record in jax.tree.leaves(tree, is_leaf=is_record):
            if not is_record(record):
                continue
            kind = type(record).record_kind
            seen[kind] = seen.get(kind, -1) + 1
            nested = {f: v for f, v in record._asdict().items() if f in _HEAVY or is_record(v)}
            name = kind if seen[kind] == 0 else f"{kind}_{seen[kind]}"
            named.append((name, record._replace(**dict.fromkeys(nested))))
            for field, value in nested.items():
                if field not in ("mu", "nu"):
                    named.extend(walk(value))
        return named

    return walk(opt_state)
