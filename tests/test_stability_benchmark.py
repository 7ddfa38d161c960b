"""The stability benchmark (`benchmarks/stability.py`) at tiny size: its JSON, table and plots,
and the behaviour it exists to show (NaN gradients kill plain optax, not `gx.stable`)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parent.parent


def _load():
    spec = importlib.util.spec_from_file_location("stability", ROOT / "benchmarks" / "stability.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["stability"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


sb = _load()

TINY = sb.Arch(depth=2, width=16)
ROW_FIELDS = {
    "setting", "group", "row", "seeds", "fail_fraction", "median_test_accuracy",
    "loss_spikes_per_run", "max_grad_norm", "nonfinite_runs", "nonfinite_flagged_before",
    "median_flag_lead_steps", "exploding_flags_per_run",
    "exploding_flags_outside_injections_per_run", "injections_flagged",
    "vanishing_flags_per_run", "first_vanishing_step", "vanishing_within_100",
    "early_update_ratio_first_layer", "max_z", "max_growth", "vanishing_trigger_rms_by_100",
    "vanishing_trigger_ratio_by_100", "vanishing_trigger_rms", "vanishing_trigger_ratio",
    "clipped_fraction", "skipped_per_run", "per_seed",
}  # fmt: skip


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("stability")
    opts = sb.Options(
        seeds=2,
        settings=[
            sb.Setting("healthy", "healthy", "sgd", 0.05, TINY, steps=60),
            sb.Setting("nan", "inject", "sgd", 0.05, TINY, steps=60, nan_every=20),
        ],
        rows=["optax", "gx.stable()"],
        plots={"nan": ("gx.stable()", "nan")},
    )
    return sb.run_benchmark(opts, out, log=lambda _: None), out


def _row(result, setting, row):
    return next(t for t in result["rows"] if t["setting"] == setting and t["row"] == row)


def test_benchmark_writes_json_summary_and_health_plot(result):
    res, out = result
    on_disk = json.loads((out / "stability.json").read_text())
    assert set(on_disk) >= {"machine", "options", "runtime_s", "goals", "rows", "plots"}
    assert on_disk["machine"]["cpu_count"] >= 1 and on_disk["options"]["seeds"] == 2
    assert [(t["setting"], t["row"]) for t in on_disk["rows"]] == [
        ("healthy", "optax"), ("healthy", "gx.stable()"), ("nan", "optax"), ("nan", "gx.stable()")
    ]  # fmt: skip
    for t in on_disk["rows"]:
        assert set(t) == ROW_FIELDS
        assert len(t["per_seed"]["test_accuracy"]) == 2
    for png in ("stability.png", "stability_health_nan.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "== nan" in sb.format_table(res["rows"])


def test_nan_injection_kills_plain_optax_but_not_stable(result):
    res, _ = result
    plain, stable = _row(res, "nan", "optax"), _row(res, "nan", "gx.stable()")
    assert plain["fail_fraction"] == 1.0
    assert plain["nonfinite_runs"] == 2 == plain["nonfinite_flagged_before"]
    assert stable["fail_fraction"] == 0.0 and stable["nonfinite_runs"] == 0
    assert stable["skipped_per_run"] == 3.0  # steps 20, 40, 60
    assert stable["injections_flagged"] == "6/6"
    assert stable["median_test_accuracy"] > 0.5


def test_healthy_reference_trains_without_flags(result):
    res, _ = result
    plain = _row(res, "healthy", "optax")
    assert plain["fail_fraction"] == 0.0 and plain["exploding_flags_per_run"] == 0.0
    assert res["goals"]["healthy_reference_accuracy"] == plain["median_test_accuracy"]


def test_loss_spikes_need_twice_the_median_and_half_a_unit_above_it():
    flat = np.ones(40)
    spike, small, relative_only = flat.copy(), flat.copy(), np.full(40, 0.1)
    spike[30] = 2.6  # > 2x and > +0.5
    small[30] = 1.9  # > +0.5 but < 2x
    relative_only[30] = 0.55  # > 2x but < +0.5
    counts = sb.loss_spikes(np.stack([flat, spike, small, relative_only]))
    assert counts.tolist() == [0, 1, 0, 0]


def test_vanishing_trigger_is_the_bound_held_for_twenty_consecutive_steps():
    long_dip = np.r_[np.ones(30), np.full(25, 1e-5), np.ones(30)]
    short_dip = np.r_[np.ones(30), np.full(15, 1e-5), np.ones(40)]
    nonfinite = np.r_[np.ones(30), np.full(25, np.nan), np.ones(30)]
    triggers = sb._vanishing_trigger(np.stack([long_dip, short_dip, nonfinite]))
    assert triggers.tolist() == [1e-5, 1.0, 1.0]
