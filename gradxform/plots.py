"""Pictures of gradient health: `plot_health` draws a run's telemetry history as one PNG.

matplotlib is an optional dependency (`pip install gradxform[plots]`); it is imported when a
plot is drawn, and drawing uses the Agg canvas directly, so pyplot's global backend and figure
registry are never touched.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

History = Sequence[Mapping[str, float]] | Mapping[str, Any]

_NONFINITE_COLOUR = "#19d3f3"
# `health` divides by max(||p||, 1e-30): a ratio this large means the parameters were all zero
# (a zero-initialised bias on its first step), not a meaningful update size.
_ZERO_PARAM_RATIO = 1e12


def _columns(history: History) -> dict[str, np.ndarray]:
    """`{name: float64[steps]}` from a list of `read_health` dicts or a dict of arrays."""
    if isinstance(history, Mapping):
        columns = {k: np.asarray(v, np.float64).reshape(-1) for k, v in history.items()}
        lengths = {len(v) for v in columns.values()}
        if len(lengths) > 1:
            raise ValueError(
                f"`history` arrays must all have one value per step; got lengths {sorted(lengths)}."
            )
        steps = lengths.pop() if lengths else 0
    else:
        history = list(history)
        steps = len(history)
        names = list(dict.fromkeys(k for record in history for k in record))
        columns = {
            k: np.array([record.get(k, np.nan) for record in history], np.float64) for k in names
        }
    if steps == 0:
        raise ValueError(
            "`history` is empty: pass a list of `gx.read_health(opt_state)` dicts, one per "
            "logged step, or a dict of per-step arrays."
        )
    return columns


def _natural(name: str) -> list:
    """Sort key putting `Dense_2` before `Dense_10` (network order for numbered layers)."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _leaves(columns: dict[str, np.ndarray], prefix: str) -> tuple[list[str], np.ndarray]:
    names = sorted((k for k in columns if k.startswith(prefix)), key=_natural)
    values = np.stack([columns[k] for k in names]) if names else np.zeros((0, 0))
    return [n.removeprefix(prefix) for n in names], values


def _matplotlib():
    """The matplotlib pieces `plot_health` draws with, or an ImportError saying how to get them."""
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ModuleNotFoundError as e:
        raise ImportError(
            "`plot_health` needs matplotlib: `pip install 'gradxform[plots]'` (or matplotlib)."
        ) from e
    return matplotlib, Figure, FigureCanvasAgg


def _cell_edges(steps: np.ndarray) -> np.ndarray:
    """x edges of each step's heatmap cell: midpoints between steps, half a gap at the ends."""
    if len(steps) == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    mids = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[2 * steps[0] - mids[0]], mids, [2 * steps[-1] - mids[-1]]])


def _draw_leaf_norms(mpl, fig, ax, cax, steps, leaf_names, grad_norms) -> None:
    """Panel 1: per-leaf gradient norms as a log-scaled heatmap, input at the top."""
    from matplotlib.colors import LogNorm

    rows = max(len(leaf_names), 1)
    finite = np.isfinite(grad_norms)
    positive = grad_norms[finite & (grad_norms > 0)]
    if positive.size:
        cmap = mpl.colormaps["magma"].with_extremes(bad=_NONFINITE_COLOUR)
        shown = np.where(finite, np.maximum(grad_norms, positive.min()), np.nan)
        mesh = ax.pcolormesh(
            _cell_edges(steps), np.arange(len(leaf_names) + 1) - 0.5,
            np.ma.masked_invalid(shown),
            cmap=cmap, norm=LogNorm(positive.min(), positive.max()), shading="flat",
        )  # fmt: skip
        fig.colorbar(mesh, cax=cax, label="gradient norm")
        ax.set_ylim(len(leaf_names) - 0.5, -0.5)
    else:
        ax.text(0.5, 0.5, "no finite per-leaf norms", transform=ax.transAxes, ha="center")
        cax.set_axis_off()
    ax.set_yticks(range(len(leaf_names)), leaf_names, fontsize=max(4, min(8, 400 // rows)))
    nonfinite_note = ", cyan: non-finite" if (~finite).any() else ""
    ax.set_title(f"per-leaf gradient norm (input at the top{nonfinite_note})", fontsize=10)
    ax.tick_params(labelbottom=False)


def _draw_step_marks(ax, steps, columns, record, global_norm) -> None:
    """Non-finite norms (x), `exploding` flags (triangles) and skipped steps (red lines)."""
    top, n = ax.get_xaxis_transform(), len(steps)
    bad = ~np.isfinite(global_norm)
    if bad.any():
        ax.plot(
            steps[bad], np.full(bad.sum(), 0.97), "x", color=_NONFINITE_COLOUR, transform=top,
            label="non-finite",
        )  # fmt: skip
    flagged = columns.get(f"{record}/exploding", np.zeros(n)) > 0
    if flagged.any():
        ax.plot(
            steps[flagged], np.full(flagged.sum(), 0.9), "v", ms=4, color="tab:orange",
            transform=top, label="exploding flag",
        )  # fmt: skip
    skipped = np.zeros(n, bool)
    for key in columns:
        if key.endswith("/skipped"):
            skipped |= columns[key] > 0
    if skipped.any():
        ax.vlines(
            steps[skipped], 0, 1, transform=top, colors="tab:red", lw=0.6, alpha=0.6,
            label="skipped step",
        )  # fmt: skip


def _steps(columns: dict[str, np.ndarray], record: str, n: int) -> np.ndarray:
    """The x of each logged record: `<record>/count`, a record without one (a key that starts
    late, a non-finite last record) placed one step per record from its neighbours; the
    record's index 1..n when the counts do not increase (a health record frozen by a guard
    that skips every step after an instability)."""
    index = np.arange(1, n + 1, dtype=np.float64)
    count = columns.get(f"{record}/count", np.full(n, np.nan))
    known = np.isfinite(count)
    if not known.any():
        return index
    steps = index + np.interp(index, index[known], (count - index)[known])
    return steps if np.all(np.diff(steps) > 0) else index


def _thresholds(columns: dict[str, np.ndarray], panel: str) -> list[str]:
    """The `<kind>/threshold` keys of the bounds drawn on `panel`: `"norm"` for the bounds on
    the global norm (`clip_by_global_norm`, `zclip`, `autoclip`), `"ratio"` for AGC's bound
    on ||g_unit|| / ||p_unit||. A per-leaf clip's bound (on each leaf's norm or RMS: its
    record has `<kind>/norm/<leaf>` entries) is on neither axis, so it is not drawn."""
    keys = []
    for key in sorted(columns, key=_natural):
        kind, _, field = key.partition("/")
        if field != "threshold":
            continue
        on = "ratio" if re.fullmatch(r"agc(_\d+)?", kind) else "norm"
        per_leaf = any(k.startswith(f"{kind}/norm/") for k in columns)
        if on == panel and (on == "ratio" or not per_leaf):
            keys.append(key)
    return keys


def _draw_thresholds(ax, steps, columns, panel: str, label: str) -> None:
    """Dashed lines of the bounds `_thresholds` puts on `panel` (inf: not clipping, left out)."""
    for key in _thresholds(columns, panel):
        shown = np.isfinite(columns[key]) & (columns[key] > 0)
        if shown.any():
            kind = key.partition("/")[0]
            ax.plot(
                steps, np.where(shown, columns[key], np.nan), "--", lw=0.9, label=f"{kind} {label}"
            )


def _draw_global_norm(ax, steps, columns, record) -> None:
    """Panel 2: the global norm (log scale), the bounds on it, and the step marks."""
    global_norm = columns[f"{record}/global_norm"]
    ok = np.isfinite(global_norm) & (global_norm > 0)
    ax.plot(steps, np.where(ok, global_norm, np.nan), lw=0.9, color="black", label="global norm")
    _draw_thresholds(ax, steps, columns, "norm", "threshold")
    _draw_step_marks(ax, steps, columns, record, global_norm)
    if ok.any():
        ax.set_yscale("log")
    ax.set_ylabel("global norm")
    ax.legend(fontsize=7, loc="lower left", bbox_to_anchor=(0, 1), ncol=6, frameon=False)
    ax.grid(alpha=0.3)
    ax.tick_params(labelbottom=False)


def _draw_update_ratios(mpl, fig, ax, cax, steps, columns, record) -> None:
    """Panel 3: each leaf's update-to-parameter ratio, coloured input to output, AGC's bound on
    the unit ratio, and the steps flagged `vanishing` shaded."""
    from matplotlib.colors import Normalize

    ratio_names, ratios = _leaves(columns, f"{record}/update_ratio/")
    order = Normalize(0, max(len(ratio_names) - 1, 1))
    cmap = mpl.colormaps["viridis"]
    drawn = False
    for i, values in enumerate(ratios):
        ok = np.isfinite(values) & (values > 0) & (values < _ZERO_PARAM_RATIO)
        drawn |= bool(ok.any())
        ax.plot(steps, np.where(ok, values, np.nan), lw=0.7, color=cmap(order(i)))
    _draw_thresholds(ax, steps, columns, "ratio", "unit ratio bound")
    vanishing = columns.get(f"{record}/vanishing", np.zeros(len(steps))) > 0
    if vanishing.any():
        ax.fill_between(
            steps, 0, 1, where=vanishing, step="mid", transform=ax.get_xaxis_transform(),
            color="tab:blue", alpha=0.12, label="vanishing flag",
        )  # fmt: skip
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=7, loc="lower left", bbox_to_anchor=(0, 1), ncol=4, frameon=False)
    if drawn:
        ax.set_yscale("log")
    if ratio_names:
        bar = fig.colorbar(mpl.cm.ScalarMappable(order, cmap), cax=cax)
        bar.set_ticks(
            [0, len(ratio_names) - 1], labels=[ratio_names[0], ratio_names[-1]], fontsize=7
        )
    else:
        cax.set_axis_off()
        ax.text(
            0.5, 0.5, "update ratios not recorded (gx.stable reads no updates: see health(opt))",
            transform=ax.transAxes, ha="center", va="center", fontsize=8, color="0.4",
        )  # fmt: skip
    ax.set_ylabel("||update|| / ||param||")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)


def plot_health(
    history: History, path: str | Path, *, record: str = "health", title: str | None = None
) -> Path:
    """Draw a run's gradient-health telemetry to a PNG at `path`; return the path.

    Three panels over the logged steps:

    1. per-leaf gradient norm heatmap, log colour scale, leaves in network order (natural
       sort of the leaf paths, input at the top): vanishing gradients show as a dark band at
       the early layers, an explosion as a bright column; non-finite norms in cyan;
    2. the global gradient norm (log scale) with the thresholds on it (`clip/threshold` of
       `clip_by_global_norm`, `zclip/threshold`, `autoclip/threshold`), steps flagged
       `exploding` (triangles) and skipped steps (`skip/skipped`, `loss_scale/skipped`: red
       lines);
    3. each leaf's update-to-parameter ratio (log scale, coloured input to output), with
       AGC's bound on the unit ratio (`agc/threshold`) and the steps flagged `vanishing`
       shaded (ratios of all-zero parameters, e.g. a zero-initialised bias on its first step,
       are left out).

    Per-leaf clips' bounds (`clip_by_leaf_norm`, `clip_by_block_rms`) bound each leaf, not a
    plotted axis, and are not drawn. Every logged record is a column, also when the run
    stopped on an instability: records after it that hold NaN/inf are drawn as such (cyan),
    and when the health record's count stops increasing (a guard skipping every step) the
    x axis is the record's index.

    Args:
      history: a list of `gx.read_health(opt_state)` dicts, one per logged step, or a dict of
        per-step arrays under the same names. The step axis is `<record>/count` when present.
      path: the PNG file to write.
      record: which health record to draw (`"health"`, or `"health_1"` for a second one).
      title: optional figure title.

    Examples:
      >>> import gradxform as gx, jax.numpy as jnp, tempfile, os
      >>> from gradxform.plots import plot_health
      >>> tx = gx.health(gx.sgd(0.1))
      >>> params, state, history = {"w": jnp.ones(3)}, tx.init({"w": jnp.ones(3)}), []
      >>> for step in range(5):
      ...     _, state = tx.update({"w": jnp.full(3, 0.1 * step)}, state, params)
      ...     history.append(gx.read_health(state))
      >>> png = plot_health(history, os.path.join(tempfile.mkdtemp(), "health.png"))
      >>> png.stat().st_size > 0
      True
    """
    path = Path(path)
    _figure(history, record, title).savefig(path, dpi=100)
    return path


def _figure(history: History, record: str, title: str | None) -> Any:
    """`plot_health`'s matplotlib `Figure` (its axes: heatmap, global norm, ratios, bars)."""
    mpl, Figure, FigureCanvasAgg = _matplotlib()
    columns = _columns(history)
    norm_key = f"{record}/global_norm"
    if norm_key not in columns:
        found = sorted({k.split("/", 1)[0] for k in columns})
        raise ValueError(
            f"`history` has no `{norm_key}`: it holds records {found}. Put `gx.health()` in the "
            "chain (or use `gx.stable`), log `gx.read_health(opt_state)` each step, or pass "
            "`record=` naming one of the health records."
        )
    steps = _steps(columns, record, len(columns[norm_key]))
    leaf_names, grad_norms = _leaves(columns, f"{record}/grad_norm/")

    rows = max(len(leaf_names), 1)
    fig = Figure(figsize=(11, 2.0 + 0.16 * rows + 5.0), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(
        3, 2, height_ratios=[max(2.0, 0.16 * rows), 2.5, 2.5], width_ratios=[60, 1]
    )
    ax_heat = fig.add_subplot(grid[0, 0])
    ax_norm = fig.add_subplot(grid[1, 0], sharex=ax_heat)
    ax_ratio = fig.add_subplot(grid[2, 0], sharex=ax_heat)
    if title:
        fig.suptitle(title)
    _draw_leaf_norms(mpl, fig, ax_heat, fig.add_subplot(grid[0, 1]), steps, leaf_names, grad_norms)
    _draw_global_norm(ax_norm, steps, columns, record)
    _draw_update_ratios(mpl, fig, ax_ratio, fig.add_subplot(grid[2, 1]), steps, columns, record)
    fig.add_subplot(grid[1, 1]).set_axis_off()
    return fig
