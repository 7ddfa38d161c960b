"""Checkpoints: msgpack via `flax.serialization` (never pickle), SHA-256 checked, atomic writes.

A checkpoint file `checkpoints/step_<N>.msgpack` holds every leaf of the train state (model
params and statistics, optimizer state, step counters) keyed by its path, plus JSON metadata: the
step, the data-order state and the run configuration. Files are written to a temporary name and
renamed, so a crash never leaves a half-written checkpoint under a real name. Restoring checks the
digest, the configuration and every leaf's path, shape and dtype before anything is replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import serialization

FORMAT = "gradxform-example-checkpoint/1"
_NAME = re.compile(r"step_(\d+)\.msgpack$")


class CheckpointError(ValueError):
    """A checkpoint is unreadable, corrupt, or does not match the run it is restored into."""


def _path_key(path: tuple) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _is_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def _to_numpy(x: Any) -> np.ndarray:
    return np.asarray(jax.random.key_data(x) if _is_key(x) else x)


def path_for(folder: Path, step: int) -> Path:
    return folder / f"step_{step:08d}.msgpack"


def save(folder: str | Path, step: int, state: Any, meta: dict[str, Any], keep: int = 2) -> Path:
    """Write `state` and `meta` for `step` into `folder` atomically; keep the newest `keep`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    leaves = {
        _path_key(p): _to_numpy(x)
        for p, x in jax.tree_util.tree_leaves_with_path(jax.device_get(state))
    }
    payload = serialization.msgpack_serialize(
        {"format": FORMAT, "step": step, "meta": json.dumps(meta, sort_keys=True), "leaves": leaves}
    )
    blob = serialization.msgpack_serialize(
        {"sha256": hashlib.sha256(payload).hexdigest(), "payload": payload}
    )
    path = path_for(folder, step)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        old.unlink()
    return path


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Checkpoint files in `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.search(p.name))]
    return [p for _, p in sorted(found)]


def read(path: str | Path) -> tuple[int, dict[str, Any], dict[str, np.ndarray]]:
    """`(step, meta, leaves)` from a checkpoint file, after checking its format and digest."""
    path = Path(path)
    fix = f"delete {path} to resume from an earlier checkpoint, or start a new run"
    try:
        outer = serialization.msgpack_restore(path.read_bytes())
        payload = outer["payload"]
        digest_ok = hashlib.sha256(payload).hexdigest() == outer["sha256"]
    except Exception as e:  # msgpack raises several types on garbage; all mean "corrupt"
        raise CheckpointError(
            f"Checkpoint {path} is corrupt or not a checkpoint ({e!r}); {fix}."
        ) from e
    if not digest_ok:
        raise CheckpointError(
            f"Checkpoint {path} is corrupt: its SHA-256 digest does not match; {fix}."
        )
    try:
        inner = serialization.msgpack_restore(payload)
        if inner["format"] != FORMAT:
            raise CheckpointError(
                f"Checkpoint {path} has format {inner['format']!r}, expected {FORMAT!r}."
            )
        return int(inner["step"]), json.loads(inner["meta"]), dict(inner["leaves"])
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"Checkpoint {path} is malformed ({e!r}); {fix}.") from e


def restore_into(target: Any, leaves: dict[str, np.ndarray], path: str | Path) -> Any:
    """`target`'s tree with every leaf replaced by the saved one, after checking all of them."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(target)
    names = [_path_key(p) for p, _ in flat]
    missing, extra = sorted(set(names) - set(leaves)), sorted(set(leaves) - set(names))
    if missing or extra:
        raise CheckpointError(
            f"Checkpoint {path} does not match this model/optimizer: missing leaves {missing[:5]}, "
            f"unexpected leaves {extra[:5]}. Resume with the configuration that wrote it."
        )
    out = []
    for name, (_, ref) in zip(names, flat, strict=True):
        saved = leaves[name]
        ref_np = _to_numpy(ref) if not isinstance(ref, jax.ShapeDtypeStruct) else ref
        if saved.shape != ref_np.shape or saved.dtype != ref_np.dtype:
            raise CheckpointError(
                f"Checkpoint {path} leaf {name!r} has shape {saved.shape} and dtype {saved.dtype}, "
                f"but this run expects {ref_np.shape} {ref_np.dtype}."
            )
        out.append(
            jax.random.wrap_key_data(saved, impl=jax.random.key_impl(ref))
            if _is_key(ref)
            else saved
        )
    return jax.tree_util.tree_unflatten(treedef, out)
