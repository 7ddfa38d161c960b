"""The performance benchmark at toy size (the fast path it times: tests/test_fast_path.py)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import performance

# ----------------------------------------------------------------------------- the benchmark


def test_benchmark_writes_json_with_sane_numbers(tmp_path):
    result = performance.main(
        [
            "--params", "2e4", "--repeats", "2", "--out", str(tmp_path), "--no-telemetry",
            "--trees", "1 leaf", "transformer (stacked)",
            "--chains", "clip+adamw",
        ]
    )  # fmt: skip
    saved = json.loads((tmp_path / "performance.json").read_text())
    assert [c["chain"] for c in result["cases"]] == [c["chain"] for c in saved["cases"]]
    assert (tmp_path / "performance.png").stat().st_size > 0
    meta = saved["meta"]
    for key in ("device", "jax", "jaxlib", "optax", "gradxform", "params_target", "repeats"):
        assert meta[key], key
    assert [(c["tree"], c["chain"]) for c in saved["cases"]] == [
        ("1 leaf", "clip+adamw"),
        ("transformer (stacked)", "clip+adamw"),
    ]
    for case in saved["cases"]:
        assert 0.4 * 2e4 <= case["params"] <= 1.1 * 2e4  # the stacked tree is coarse at toy size
        assert case["copy_bandwidth_gbps"] > 0 and case["floor_ms"] > 0
        gxr, oxr = case["gradxform"], case["optax"]
        assert case["step_ratio"] == pytest.approx(gxr["step_ms"] / oxr["step_ms"])
        assert case["compile_ratio"] == pytest.approx(
            (gxr["trace_s"] + gxr["compile_s"]) / (oxr["trace_s"] + oxr["compile_s"])
        )
        assert f"{case['step_ratio']:.2f}" in (tmp_path / "performance.md").read_text()
        for lib in ("gradxform", "optax"):
            r = case[lib]
            assert 0 < r["step_ms_p10"] <= r["step_ms"] < 1e4
            assert r["floor_fraction"] > 0
            assert r["trace_s"] > 0 and r["compile_s"] > 0
            assert r["temp_bytes"] >= 0
            assert r["state_bytes"] >= 4 * case["params"]  # at least one float32 moment
    assert saved["state_dtypes"]["gradxform_bf16_ratio"] == pytest.approx(0.5, abs=1e-3)
    assert set(saved["goals"]["gradxform"]) >= {"step <= optax, every case", "temp bytes <= optax"}


def test_parameter_trees_have_the_advertised_leaves_and_sizes():
    n = 25_000_000
    for name, leaves in [("1 leaf", 1), ("resnet50-like", 161), ("1000 leaves", 1000)]:
        shapes = performance.TREES[name](n)
        assert len(performance._shape_leaves(shapes)) == leaves
        assert performance.count(shapes) == pytest.approx(n, rel=0.02)
    stacked = performance.transformer_like(n)
    assert performance.count(stacked) == pytest.approx(n, rel=0.05)
    assert stacked["layers"]["qkv"]["kernel"][0] == 12


@pytest.mark.parametrize("telemetry", [True, False])
def test_guard_cost_compares_stable_with_the_chain_it_guards(tmp_path, telemetry):
    from benchmarks import guard_cost

    flags = [] if telemetry else ["--no-telemetry"]
    argv = ["--params", "2e4", "--repeats", "2", "--compile-repeats", "2", "--trees", "1 leaf"]
    argv += ["--out", str(tmp_path)]
    result = guard_cost.main(argv + flags)
    saved = json.loads((tmp_path / "guard_cost.json").read_text())
    assert saved["meta"]["telemetry"] is telemetry
    assert [(c["tree"], c["donate"]) for c in saved["cases"]] == [
        ("1 leaf", True),
        ("1 leaf", False),
    ]
    for case in result["cases"]:
        ratio = case["step_ms"]["stable(adamw)"] / case["step_ms"]["clip+adamw"]
        assert case["step_ratio"] == pytest.approx(ratio) and case["compile_ratio"] > 0
        for name, times in case["compile_s_all"].items():  # alternated compiles, their median
            assert len(times) == 2 and case["compile_s"][name] == pytest.approx(np.median(times))
    table = (tmp_path / "guard_cost.md").read_text()
    assert ("telemetry=False" in table) is not telemetry
    assert set(saved["goals"]) == {"step_ratio", "compile_ratio_1000_leaves", "temp_fraction"}
