"""`plot_health`: one PNG from a `read_health` history (list of dicts or dict of arrays)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradxform as gx
from gradxform.plots import _figure, _leaves, plot_health

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _params():
    # `Dense_10` sorts before `Dense_2` as a string: the heatmap must still show network order
    return {
        f"Dense_{i}": {"kernel": jnp.full((4, 4), 0.5), "bias": jnp.zeros(4)} for i in (0, 1, 2, 10)
    }


def _history(steps: int = 40) -> list[dict[str, float]]:
    """`read_health` dicts of `gx.stable(sgd)` with a spike at step 30 and a NaN at step 35."""
    params = _params()
    tx = gx.stable(gx.sgd(0.1))
    state, history = tx.init(params), []
    update = jax.jit(tx.update)
    rng = np.random.default_rng(0)
    for step in range(1, steps + 1):
        scale = 1e4 if step == 30 else jnp.nan if step == 35 else 1.0
        grads = {
            name: {
                k: jnp.asarray(rng.normal(size=v.shape) * scale, jnp.float32)
                for k, v in leaf.items()
            }
            for name, leaf in params.items()
        }
        _, state = update(grads, state, params)
        history.append(gx.read_health(state))
    return history


@pytest.fixture(scope="module")
def history() -> list[dict[str, float]]:
    return _history()


def test_plot_health_writes_png_from_read_health_dicts(history, tmp_path):
    assert history[29]["stable/skipped"] == 1.0 and history[34]["health/nonfinite"] > 0
    path = plot_health(history, tmp_path / "health.png", title="stable(sgd)")
    assert path == tmp_path / "health.png"
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 20_000  # three drawn panels, not an empty canvas


def test_plot_health_draws_a_dict_of_arrays_as_the_same_list_of_dicts(history, tmp_path):
    columns = {k: np.array([h[k] for h in history]) for k in history[0]}
    drawn = plot_health(columns, tmp_path / "columns.png").read_bytes()
    assert drawn[:8] == PNG_MAGIC
    assert drawn == plot_health(history, tmp_path / "rows.png").read_bytes()  # same picture


def test_plot_health_draws_a_run_that_is_nonfinite_throughout(tmp_path):
    names = ["health/global_norm", "health/grad_norm/w", "health/update_ratio/w"]
    path = plot_health({k: np.full(5, np.nan) for k in names}, tmp_path / "nan.png")
    assert path.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize(
    "empty", [[], {}, {"health/global_norm": []}], ids=["list", "dict", "arrays"]
)
def test_plot_health_rejects_empty_history(empty, tmp_path):
    with pytest.raises(ValueError, match=r"`history` is empty: pass a list of `gx.read_health"):
        plot_health(empty, tmp_path / "empty.png")
    assert not (tmp_path / "empty.png").exists()


def test_plot_health_names_the_missing_health_record(tmp_path):
    tx = gx.chain(gx.clip_by_global_norm(1.0), gx.sgd(0.1))
    params = {"w": jnp.ones(3)}
    _, state = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
    with pytest.raises(ValueError, match=r"no `health/global_norm`.*\['clip'\].*gx.health\(\)"):
        plot_health([gx.read_health(state)], tmp_path / "clip.png")


def test_plot_health_rejects_arrays_of_different_lengths(tmp_path):
    ragged = {"health/global_norm": np.ones(4), "health/grad_norm/w": np.ones(3)}
    with pytest.raises(ValueError, match=r"one value per step; got lengths \[3, 4\]"):
        plot_health(ragged, tmp_path / "ragged.png")


def test_heatmap_rows_follow_network_order(history):
    names, values = _leaves(
        {k: np.array([h[k] for h in history]) for k in history[0]}, "health/grad_norm/"
    )
    assert names == [f"Dense_{i}/{k}" for i in (0, 1, 2, 10) for k in ("bias", "kernel")]
    assert values.shape == (8, len(history))


def test_plot_health_without_matplotlib_says_how_to_install_it(history, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an absent package looks like
    with pytest.raises(ImportError, match=r"pip install 'gradxform\[plots\]'"):
        plot_health(history, tmp_path / "health.png")


def _axes(fig):
    """The heatmap, global-norm and ratio axes of a `plot_health` figure, by their labels."""
    by_label = {ax.get_ylabel(): ax for ax in fig.axes}
    return fig.axes[0], by_label["global norm"], by_label["||update|| / ||param||"]


def _labels(ax) -> list[str]:
    return [line.get_label() for line in ax.get_lines()]


def _run(tx, grads_at, steps, params):
    state, history = tx.init(params), []
    update = jax.jit(tx.update)
    for t in range(steps):
        _, state = update(grads_at(t), state, params)
        history.append(gx.read_health(state))
    return history


def test_each_threshold_is_drawn_on_the_axis_of_the_quantity_it_bounds():
    params = _params()
    tx = gx.health(
        gx.chain(
            gx.clip_by_global_norm(1.0),  # bounds the global norm
            gx.clip_by_leaf_norm(0.5),  # bounds each leaf's norm: on no plotted axis
            gx.sgd(0.1),
            gx.adaptive_grad_clip(0.01),  # bounds ||u_unit|| / ||p_unit||: the ratio axis
        )
    )
    grads_at = lambda t: jax.tree.map(lambda p: jnp.full_like(p, 1.0 + t), params)
    history = _run(tx, grads_at, 4, params)
    _, ax_norm, ax_ratio = _axes(_figure(history, "health", None))
    assert "clip threshold" in _labels(ax_norm)
    assert not any(label.startswith(("agc", "clip_1")) for label in _labels(ax_norm))
    assert "agc unit ratio bound" in _labels(ax_ratio)
    (agc,) = [line for line in ax_ratio.get_lines() if line.get_label().startswith("agc")]
    np.testing.assert_allclose(agc.get_ydata(), [h["agc/threshold"] for h in history])
    (clip,) = [line for line in ax_norm.get_lines() if line.get_label() == "clip threshold"]
    np.testing.assert_allclose(clip.get_ydata(), [h["clip/threshold"] for h in history])


def _columns_drawn(fig) -> int:
    heat = fig.axes[0].collections[0]  # the heatmap mesh: one column per drawn step
    return heat.get_array().shape[1]


def test_a_run_whose_guard_skips_every_step_after_a_nan_still_plots_every_step():
    # health inside skip_if: its record (and count) freezes once every step is skipped
    params = _params()
    tx = gx.skip_if(gx.health(gx.sgd(0.1)))
    grads_at = lambda t: jax.tree.map(
        lambda p: jnp.full_like(p, jnp.nan if t >= 6 else 0.1 * (t + 1)), params
    )
    history = _run(tx, grads_at, 12, params)
    assert len({h["health/count"] for h in history}) < len(history)  # the frozen count
    fig = _figure(history, "health", None)
    _, ax_norm, _ = _axes(fig)
    assert _columns_drawn(fig) == len(history)
    (line,) = [line for line in ax_norm.get_lines() if line.get_label() == "global norm"]
    np.testing.assert_array_equal(line.get_xdata(), np.arange(1, len(history) + 1))


def test_a_run_whose_last_step_is_nonfinite_plots_every_step_and_marks_the_last(history):
    cut = history[:35]  # the fixture's step 35 holds NaN gradients
    assert not np.isfinite(cut[-1]["health/global_norm"])
    fig = _figure(cut, "health", None)
    _, ax_norm, _ = _axes(fig)
    assert _columns_drawn(fig) == len(cut)
    (marks,) = [line for line in ax_norm.get_lines() if line.get_label() == "non-finite"]
    np.testing.assert_array_equal(marks.get_xdata(), [cut[-1]["health/count"]])


def test_keys_that_start_at_different_steps_are_drawn_at_their_own_steps(history):
    late = [dict(h) for h in history[10:30]]
    for record in late[:5]:  # a guard added at step 6, and counts missing from two records
        for key in [k for k in record if k.startswith("skip/")]:
            del record[key]
    del late[0]["health/count"], late[-1]["health/count"]
    fig = _figure(late, "health", None)
    _, ax_norm, _ = _axes(fig)
    assert _columns_drawn(fig) == len(late)
    (line,) = [line for line in ax_norm.get_lines() if line.get_label() == "global norm"]
    np.testing.assert_array_equal(line.get_xdata(), [h["health/count"] for h in history[10:30]])
