"""The stability suite (`benchmarks/stability.py`) at tiny size: its JSON and reports, the guard
rates read from the records, failure detection, and the tune / held-out split."""

from __future__ import annotations

import json
from collections import Counter

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradxform as gx
from benchmarks import stability as sb
from benchmarks.suite_models import SETTINGS, Setting

SMALL_MLP = (("depth", 2), ("width", 16))
TINY = [
    Setting("mlp", "healthy", "healthy", "tune", "sgd", 0.05, model=SMALL_MLP),
    Setting("mlp", "nan /10", "nan", "held-out", "sgd", 0.05, "healthy", SMALL_MLP, every=10),
    Setting("lstm", "healthy", "healthy", "held-out", "adam", 3e-3, model=(("hidden", 8),)),
]
STEPS = 40


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("stability")
    opts = sb.Options(seeds=2, steps_scale=STEPS / 600, settings=TINY, timing_reps=0)
    return sb.run_benchmark(opts, out, log=lambda _: None), out


def _row(result, setting, row):
    return next(
        t for t in result["rows"] if f"{t['family']}/{t['setting']}" == setting and t["row"] == row
    )


def test_suite_writes_json_markdown_and_png(result):
    res, out = result
    on_disk = json.loads((out / "stability.json").read_text())
    assert set(on_disk) >= {"machine", "options", "runtime_s", "summary", "rows", "healthy"}
    assert set(on_disk["summary"]) == {"tune", "held-out"}
    assert [(t["family"], t["setting"], t["row"]) for t in on_disk["rows"]] == [
        (s.family, s.name, row) for s in TINY for row in sb.ROWS
    ]
    for t in on_disk["rows"]:
        assert len(t["per_seed"]["quality"]) == 2 and t["split"] in ("tune", "held-out")
    assert [h["setting"] for h in on_disk["healthy"]] == ["healthy", "healthy"]
    assert (out / "stability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "mlp/nan /10" in (out / "stability.md").read_text()
    assert "mlp/nan /10" in sb.format_table(res["rows"])


def test_guard_flags_read_every_clipped_and_skipped_field():
    """Each guard in the state is reported under its record's name, acting or not."""
    tx = gx.chain(
        gx.clip_by_leaf_norm(1e3),  # does not act
        gx.skip_if(gx.chain(gx.zclip(), optax.sgd(10.0), gx.adaptive_grad_clip(1e-2))),
        gx.clip_by_global_norm(1e-3),  # acts
    )
    params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
    grads = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
    _, state = tx.update(grads, tx.init(params), params)
    flags = {k: bool(v) for k, v in sb.guard_flags(state).items()}
    logged = gx.read_health(state)  # an independent reader: per-leaf flags as `agc/clipped/w`
    assert flags == {
        name: any(v for k, v in logged.items() if k == name or k.startswith(name + "/"))
        for name in ("clip/clipped", "clip_1/clipped", "skip/skipped", "zclip/clipped",
                     "agc/clipped")
    }  # fmt: skip
    assert flags["clip_1/clipped"] and flags["agc/clipped"] and not flags["clip/clipped"]
    _, state = tx.update({"w": grads["w"], "b": jnp.array([jnp.nan, 1.0])}, state, params)
    assert bool(sb.guard_flags(state)["skip/skipped"])


def test_step_time_times_both_rows_of_one_step():
    t = sb.step_time(TINY[0], reps=3)
    assert t["optax_ms"] > 0 and t["stable_ms"] > 0
    assert t["ratio"] == pytest.approx(t["stable_ms"] / t["optax_ms"])


def test_guard_rates_in_the_run_come_from_the_records(result):
    res, _ = result
    assert _row(res, "mlp/nan /10", "optax")["guard_rates"] == {}
    rates = _row(res, "mlp/nan /10", "gx.stable")["guard_rates"]
    assert {"stable/skipped", "stable/clipped"} <= set(rates)
    assert rates["stable/skipped"] == pytest.approx(4 / STEPS)  # the NaN steps 10, 20, 30, 40


def test_nan_batches_fail_plain_optax_and_are_judged_against_the_healthy_run(result):
    res, _ = result
    plain, stable = _row(res, "mlp/nan /10", "optax"), _row(res, "mlp/nan /10", "gx.stable")
    assert plain["failures"] == 2 and plain["within_1"] is False and plain["gap"] > 10
    assert stable["failures"] == 0 and stable["gap"] is not None
    assert stable["reference"] == "healthy"


def test_failures_need_a_finite_clean_loss_and_quality_within_the_bound():
    setting = TINY[1]
    o = {
        "loss": np.ones((STEPS, 4)),
        "injected": sb.injections(setting, STEPS),
        "quality": np.array([0.9, 0.9, 0.9, 0.1]),
        "finite": np.array([True, True, False, True]),
    }
    o["loss"][9, 0] = np.nan  # an injected step: not a failure
    o["loss"][10, 1] = np.inf  # a clean step: a failure
    assert sb.failures(setting, o, 0.2, "accuracy").tolist() == [False, True, True, True]
    assert sb.failures(setting, {**o, "quality": np.full(4, 3.0)}, 2.5, "loss").all()


def test_split_covers_every_family_and_kind_in_both_parts():
    families = {s.family for s in SETTINGS}
    assert len(families) >= 6
    for split in ("tune", "held-out"):
        assert {s.family for s in SETTINGS if s.split == split} == families
    kinds = Counter(s.kind for s in SETTINGS if s.kind != "healthy")
    assert set(kinds) == {"lr", "warmup", "corrupt", "nan", "recurrent", "fp16"}
    for kind in kinds:
        assert kinds[kind] >= 2
        assert {s.split for s in SETTINGS if s.kind == kind} == {"tune", "held-out"}
    healthy = {s.key: s for s in SETTINGS if s.kind == "healthy"}
    for s in SETTINGS:
        if s.kind != "healthy":
            assert healthy[f"{s.family}/{s.reference}"].optimizer == s.optimizer, s.key


def test_loss_spikes_need_twice_the_median_and_half_a_unit_above_it():
    flat = np.ones(40)
    spike, small, relative_only = flat.copy(), flat.copy(), np.full(40, 0.1)
    spike[30] = 2.6  # > 2x and > +0.5
    small[30] = 1.9  # > +0.5 but < 2x
    relative_only[30] = 0.55  # > 2x but < +0.5
    counts = sb.loss_spikes(np.stack([flat, spike, small, relative_only]))
    assert counts.tolist() == [0, 1, 0, 0]


def test_the_reference_clip_row_clips_at_norm_one_and_is_trained_on_request():
    tx = sb.build_row(sb.CLIP_ROW, sb.base_optimizer("sgd", 1.0))
    params = {"w": jnp.zeros(4)}
    g = {"w": jnp.full(4, 5.0)}  # ||g|| = 10
    u, _ = tx.update(g, tx.init(params), params, loss=jnp.float32(1.0))
    np.testing.assert_allclose(u["w"], -np.full(4, 0.5), rtol=1e-6)  # -lr * g / ||g||
    assert sb.Options().rows == sb.ROWS
    opts = sb.Options(seeds=1, steps_scale=STEPS / 600, settings=TINY[:1], timing_reps=0,
                      reference_clip=True)  # fmt: skip
    res = sb.run_benchmark(opts, log=lambda _: None)
    assert [t["row"] for t in res["rows"]] == [*sb.ROWS, sb.CLIP_ROW]


def test_the_tanh_rnn_gradient_explodes_back_through_time_above_radius_one():
    """`cell="tanh"`: h = tanh(x wx + h wh + b), one gate. Through 16 steps the gradient on
    the first input is far above the last input's when the recurrent kernel's scale is 3 and
    far below it at 0.5: the exploding (and vanishing) gradients the suite's setting needs."""
    import jax

    from benchmarks.suite_models import lstm

    def first_and_last_input_grads(scale):
        model = lstm(steps=16, cell="tanh", recurrent_scale=scale)
        p = model.init(jax.random.key(0))
        x, y = jnp.asarray(model.task.x_train[:32]), jnp.asarray(model.task.y_train[:32])
        dx = jax.grad(lambda x: model.loss(p, x, y))(x).reshape(32, 16, 4)
        return p, float(jnp.linalg.norm(dx[:, 0])), float(jnp.linalg.norm(dx[:, -1]))

    p, first, last = first_and_last_input_grads(0.5)
    assert p["wh"].shape == (32, 32) and p["wx"].shape == (4, 32) and p["b"].shape == (32,)
    assert first < 1e-3 * last
    _, first, last = first_and_last_input_grads(3.0)
    assert first > 10 * last
    with pytest.raises(ValueError, match="cell must be"):
        lstm(cell="gru")


def test_loss_zscores_are_health_z_scores_of_the_log_loss():
    """0 through the 20-step warm-up, then (log loss - running mean) / max(std, 0.25); a
    non-finite loss is not absorbed."""
    from benchmarks import stability_signals as sig

    loss = np.ones((40, 2), np.float32)
    loss[30, 0] = np.e  # log: 1 above a steady history -> z = 1 / 0.25
    loss[25, 1] = np.nan
    loss[26, 1] = np.e**-0.5
    z = np.asarray(sig.loss_zscores(jnp.asarray(loss)))
    assert z.shape == (40, 2) and np.all(z[:20] == 0)
    assert z[30, 0] == pytest.approx(4.0) and np.all(z[20:30, 0] == 0)
    assert z[26, 1] == pytest.approx(-2.0)  # the NaN step left the moments at log 1 = 0


def test_signal_summaries_give_the_largest_value_and_first_step_past_the_bound():
    from benchmarks import stability_signals as sig

    steps = 60
    series = {name: np.zeros(steps) for name in sig.SIGNALS}
    series["norm_z"][[5, 33, 50]] = [9.0, 4.5, 7.0]  # step 5 is inside the warm-up: ignored
    series["climb"][40] = np.nan
    series["loss_z"][45] = np.inf
    out = sig.describe_run(series)
    assert out["norm_z"] == {"max": 7.0, "first": 33}
    assert out["climb"] == {"max": 0.0, "first": None}
    assert out["loss_z"] == {"max": np.inf, "first": 45}
    healthy = {"kind": "healthy", "runs": [out]}
    unstable = {"kind": "lr", "runs": [sig.describe_run(series)],
                "series": {k: v[:, None] for k, v in series.items()}}  # fmt: skip
    top = sig.healthy_maxima([healthy, unstable])
    assert top == {"norm_z": 7.0, "climb": 0.0, "loss_z": np.inf}
    sig.mark_past_healthy([healthy, unstable], {**top, "norm_z": 5.0})
    assert unstable["runs"][0]["norm_z"]["past_healthy"] == 50
    assert "past_healthy" not in out["norm_z"]  # healthy runs are the reference


def test_signals_are_read_from_a_health_record_that_changes_nothing():
    """The `optax+health` row trains as `optax` does (same quality, paired seeds), and its
    record gives per-run signals."""
    from benchmarks import stability_signals as sig

    row = sig.run_setting(TINY[0], seeds=2, steps_scale=STEPS / 600)
    plain = sb.train_group([TINY[0]], "optax", 2, STEPS)[0]
    assert row["quality"] == plain["quality"].tolist()
    assert len(row["runs"]) == 2 and set(row["runs"][0]) == set(sig.SIGNALS)
    assert all(0 < r["climb"]["max"] < 10 and np.isfinite(r["norm_z"]["max"]) for r in row["runs"])
