"""What a run leaves behind, and its verdict: the run directory, checkpoints, plots.

The run directory holds `config.json`, `metrics.jsonl` (one JSON object per logged step, nothing
time-dependent: the same seed and flags give a byte-identical file), `summary.json` (written on
every exit: finished, failed, stopped or interrupted), `curves.png`, `grad_norms.png` and
`checkpoints/step_<N>.msgpack`.

Checkpoints are msgpack via `flax.serialization` (never pickle), SHA-256 checked and written
atomically (a temporary name, then a rename). Restoring checks the digest and every leaf's path,
shape and dtype before anything is replaced.

With several processes, only process 0 touches the directory; `from_process_0` runs a function
there and hands its result (or its error) to every process, through JAX's own collectives.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import serialization

import gradxform as gx

from .config import Config, UsageError

FORMAT = "gradxform-example-checkpoint/1"
_NAME = re.compile(r"step_(\d+)\.msgpack$")


class CheckpointError(ValueError):
    """A checkpoint is unreadable, corrupt, or does not match the run it is restored into."""


class InstabilityError(RuntimeError):
    """Training became unstable: a non-finite loss or gradient, or an exploding gradient norm.

    Raised from the `gx.GradientHealthError` that found it (its `__cause__`), if any.
    """


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def dumps(record: dict[str, Any]) -> str:
    """JSON with exact float round-trip (`repr`), `NaN`/`Infinity` kept as Python writes them."""
    return json.dumps(record, allow_nan=True)


# ----------------------------------------------------------------------------- the directory


class RunDir:
    """Files of one run. Call its methods on process 0 only (see `from_process_0`)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.metrics_path = self.path / "metrics.jsonl"
        self.checkpoints = self.path / "checkpoints"

    def start(self, cfg: Config) -> None:
        """Begin a fresh run; refuse to overwrite an existing one."""
        if (self.path / "config.json").exists() or self.metrics_path.exists():
            raise FileExistsError(
                f"{self.path} already holds a run. Continue it with `--resume {self.path}` or "
                "choose another `--run-dir`."
            )
        self.path.mkdir(parents=True, exist_ok=True)
        self.write_config(cfg)
        self.metrics_path.write_text("")

    def write_config(self, cfg: Config) -> None:
        _atomic_write(self.path / "config.json", cfg.to_json())

    def read_metrics(self) -> list[dict[str, Any]]:
        """The logged records; a cut-off last line (full disk, power loss) is dropped."""
        if not self.metrics_path.exists():
            return []
        lines = self.metrics_path.read_text().split("\n")
        records = []
        for i, line in enumerate(lines):
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                if i == len(lines) - 1:  # no newline after it: a write that never finished
                    break
                raise UsageError(f"{self.metrics_path} line {i + 1} is corrupt: {e}.") from e
        return records

    def truncate_metrics(self, step: int) -> list[dict[str, Any]]:
        """Drop records after `step` (written after the resumed checkpoint); return the rest."""
        kept = [r for r in self.read_metrics() if r["step"] <= step]
        _atomic_write(self.metrics_path, "".join(dumps(r) + "\n" for r in kept))
        return kept

    def log(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(dumps(record) + "\n")

    def write_summary(self, summary: dict[str, Any]) -> None:
        _atomic_write(self.path / "summary.json", json.dumps(summary, indent=2) + "\n")


def from_process_0(fn: Callable[[], Any]) -> Any:
    """`fn()` run on process 0 only; its JSON result, or its error, reaches every process.

    Errors of the types the example reports (`UsageError`, `CheckpointError`, `FileExistsError`)
    are raised again on every process with the same message, so all of them exit alike.
    """
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils

    payload = b""
    if jax.process_index() == 0:
        try:
            payload = json.dumps({"ok": fn()}).encode()
        except (UsageError, CheckpointError, FileExistsError) as e:
            payload = json.dumps({"error": type(e).__name__, "message": str(e)}).encode()
    size = int(multihost_utils.broadcast_one_to_all(np.int32(len(payload))))
    raw = np.frombuffer(payload.ljust(size, b"\0"), np.uint8)
    message = json.loads(bytes(multihost_utils.broadcast_one_to_all(raw)).decode())
    if "error" in message:
        errors = (UsageError, CheckpointError, FileExistsError)
        raise {e.__name__: e for e in errors}[message["error"]](message["message"])
    return message["ok"]


# ----------------------------------------------------------------------------- checkpoints


def _path_key(path: tuple) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _is_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def _to_numpy(x: Any) -> np.ndarray:
    return np.asarray(jax.random.key_data(x) if _is_key(x) else x)


def leaves_of(state: Any) -> dict[str, np.ndarray]:
    """Every leaf of a train state as a NumPy array, keyed by its path (keys as key data)."""
    flat = jax.tree_util.tree_leaves_with_path(jax.device_get(state))
    return {_path_key(p): _to_numpy(x) for p, x in flat}


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"step_{step:08d}.msgpack"


def save_checkpoint(
    folder: str | Path, step: int, state: Any, meta: dict[str, Any], keep: int = 2
) -> Path:
    """Write `state` and `meta` for `step` into `folder` atomically; keep the newest `keep`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    payload = serialization.msgpack_serialize(
        {
            "format": FORMAT,
            "step": step,
            "meta": json.dumps(meta, sort_keys=True),
            "leaves": leaves_of(state),
        }
    )
    blob = serialization.msgpack_serialize(
        {"sha256": hashlib.sha256(payload).hexdigest(), "payload": payload}
    )
    path = checkpoint_path(folder, step)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for old in list_checkpoints(folder)[:-keep]:
        old.unlink()
    return path


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Checkpoint files in `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.search(p.name))]
    return [p for _, p in sorted(found)]


def read_checkpoint(path: str | Path) -> tuple[int, dict[str, Any], dict[str, np.ndarray]]:
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
        saved, ref_np = leaves[name], _to_numpy(ref)
        if saved.shape != ref_np.shape or saved.dtype != ref_np.dtype:
            raise CheckpointError(
                f"Checkpoint {path} leaf {name!r} has shape {saved.shape} and dtype {saved.dtype}, "
                f"but this run expects {ref_np.shape} {ref_np.dtype}."
            )
        key_impl = jax.random.key_impl(ref) if _is_key(ref) else None
        out.append(jax.random.wrap_key_data(saved, impl=key_impl) if key_impl else saved)
    return jax.tree_util.tree_unflatten(treedef, out)


# ----------------------------------------------------------------------------- plots


def plot_curves(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Training loss and accuracy per logged step, test accuracy where evaluated.

    The gradient-health picture (`grad_norms.png`) is `gradxform.plots.plot_health`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(steps, [r["loss"] for r in records], label="train")
    ax_acc.plot(steps, [r["accuracy"] for r in records], label="train")
    tested = [r for r in records if "test_loss" in r]
    if tested:
        test_steps = [r["step"] for r in tested]
        ax_loss.plot(test_steps, [r["test_loss"] for r in tested], "o-", label="test")
        ax_acc.plot(test_steps, [r["test_accuracy"] for r in tested], "o-", label="test")
    ax_loss.set(xlabel="step", ylabel="cross-entropy", yscale="log", title="loss")
    ax_acc.set(xlabel="step", ylabel="accuracy", title="accuracy", ylim=(0, 1.01))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


# ----------------------------------------------------------------------------- the verdict

_HINTS = {  # (flag to suggest, Config field that means it is already given)
    gx.NonFiniteGradientError: [
        ("a lower `--lr` or longer `--warmup`", None),
        ("`--clip-global-norm 1.0`", "clip_global_norm"),
    ],
    gx.GradientExplosionError: [
        ("`--clip-global-norm 1.0`", "clip_global_norm"),
        ("`--agc 0.01`", "agc"),
        ("a lower `--lr` or longer `--warmup`", None),
        ("a higher `--max-grad-norm` if such norms are expected", None),
    ],
}


def _hint(cfg: Config, kind: type) -> str:
    """The flags that may help against `kind`, leaving out those `cfg` already has."""
    if cfg.optimizer == "lbfgs":  # it refuses the others (config.FULL_BATCH_REFUSED)
        return "a smaller `--init-scale`, or a higher `--max-grad-norm` if such norms are expected"
    hints = [text for text, field in _HINTS[kind] if field is None or getattr(cfg, field) is None]
    if cfg.on_instability != "skip" and not cfg.stable:
        hints.append("`--on-instability skip`")
    if not cfg.stable:
        hints.append("`--stable`")
    return ", ".join(hints[:-1]) + f" or {hints[-1]}" if len(hints) > 1 else hints[0]


def check(record: gx.HealthState, loss: float, cfg: Config) -> InstabilityError:
    """The problem of a step flagged `exploding` or with a non-finite loss, as an error to raise
    or log: `gx.assert_healthy`'s on the step's record, or one about the loss."""
    try:
        gx.assert_healthy(record, check_vanishing=False)  # vanishing is for the verdict
    except gx.GradientHealthError as e:
        kind = type(e) if type(e) in _HINTS else gx.GradientExplosionError
        error = InstabilityError(f"{e}\nWith this example's flags: {_hint(cfg, kind)}.")
        error.__cause__ = e
        return error
    return InstabilityError(
        f"Non-finite loss ({loss}) at step {int(record.count)} with finite gradients. With this "
        f"example's flags: {_hint(cfg, gx.NonFiniteGradientError)}."
    )


def _vanishing(opt_state: Any) -> str | None:
    try:
        gx.assert_healthy(opt_state, check_nonfinite=False, check_exploding=False)
    except gx.VanishingGradientError as e:
        return str(e)
    return None


def failure(summary: dict[str, Any], num_classes: int) -> str | None:
    """Why a finished run failed: at chance, most steps skipped, or a non-finite loss."""
    acc, loss = summary["test_accuracy"], summary["train_loss"]
    run = summary["steps"] - (summary["resumed_from"] or 0)
    if loss is not None and not np.isfinite(loss):
        return f"the training loss is {loss}"
    if acc is not None and acc < 1.5 / num_classes:
        return f"test accuracy {acc:.4f} is at chance ({1 / num_classes:.2g} for {num_classes})"
    if summary["skipped_steps"] > run / 2:
        return f"{summary['skipped_steps']} of {summary['steps']} steps were skipped"
    return None


def verdict(
    records: Sequence[dict[str, Any]],
    problems: Sequence[InstabilityError],
    opt_state: Any,
    mode: str,
    failed: str | None = None,
) -> str:
    """One line for the summary, from the logged records, the unstable steps seen and the state
    (`failed`: the reason from `failure`, which comes first)."""
    first = str(problems[0]).split("\n")[0] if problems else ""
    if failed:
        skipped = records[-1]["skipped_total"] if records else 0
        seen = f"; {len(problems)} unstable steps, {skipped} skipped; first: {first}"
        return f"FAILED: {failed}{seen if problems else ''}"
    if problems and mode != "skip":
        more = f" ({len(problems)} unstable steps in all)" if len(problems) > 1 else ""
        return f"UNSTABLE: {first}{more}"
    if not records:
        return "no steps logged"
    parts = []
    if problems:
        skipped = records[-1]["skipped_total"]
        parts.append(
            f"RECOVERED: {len(problems)} unstable steps, {skipped} skipped; first: {first}"
        )
    weak = _vanishing(opt_state)
    if weak:
        parts.append(f"VANISHING: {weak}")
    if parts:
        return " | ".join(parts)
    if "grad_norm_max" not in records[-1]:  # full batch: the gradient at each logged step
        first, last = records[0], records[-1]
        return (
            f"healthy: full-batch gradient norm {first['grad_norm']:.3g} at step "
            f"{first['step']}, {last['grad_norm']:.3g} at step {last['step']}"
        )
    peak = max(records, key=lambda r: r["grad_norm_max"])
    return (
        f"healthy: max global grad norm {peak['grad_norm_max']:.3g} (by step {peak['step']}), "
        "no non-finite values"
    )
