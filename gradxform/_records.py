"""Records a transform keeps of what it saw: per-leaf vectors named by buffer-free `Leaf`
trees, the clipping record, and the one walk that finds records in a nested optimizer state.

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
