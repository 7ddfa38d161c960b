"""End-to-end tests of the example's full-batch mode (`--optimizer lbfgs`, `gx.minimize`) at
tiny size. A file of its own so that pytest-xdist (`--dist loadfile`) can run it beside
`test_examples.py`: each compiles its own L-BFGS loop, the costliest programs of the example."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import optax
import pytest
from flax import nnx

import gradxform as gx
from examples import data, main, train
from examples.config import Config


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- full batch (L-BFGS)

LBFGS = ["--optimizer", "lbfgs", "--depth", "1", "--width", "32", "--no-progress"]


def _summary(path: Path) -> dict:
    return json.loads((path / "summary.json").read_text())


def _minimize_here(cfg: Config):
    """`gx.minimize` of the mean cross-entropy over the whole training set, written here."""
    digits = data.load("digits")
    graphdef, state = train.create_train_state(cfg, digits)
    model_def, params = nnx.split(nnx.merge(graphdef, state)[0], nnx.Param)

    def loss(params, images, labels):
        logits = nnx.merge(model_def, params)(images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    args = (digits.x_train, digits.y_train)
    tx = train.create_optimizer(cfg)
    return gx.minimize(loss, nnx.as_pure(params), args=args, tx=tx, max_steps=cfg.steps)


@pytest.mark.parametrize("impl", ["gradxform", "optax"])
def test_lbfgs_fits_the_whole_training_set_with_gx_minimize(impl, tmp_path, capsys):
    path = tmp_path / "run"
    flags = ["--model", "mlp", "--impl", impl, "--steps", "100", "--eval-every", "0", *LBFGS]
    assert main.main([*flags, "--run-dir", str(path)]) == 0
    s = _summary(path)
    # Far above chance (0.1) on the test set; the training set is fitted, the gradient ~0.
    assert s["test_accuracy"] > 0.9 and s["train_loss"] < 1e-3
    assert s["converged"] and s["stop_reason"] == "converged" and s["grad_norm"] <= s["tol"]
    assert s["status"] == "completed" and s["health"].startswith("healthy: full-batch gradient")
    # The same steps, evaluations and loss as gx.minimize on the loss written above.
    cfg = Config(model="mlp", optimizer="lbfgs", impl=impl, depth=1, width=32, steps=100)
    ref = _minimize_here(cfg)
    assert (s["steps_done"], s["fun_evals"]) == (int(ref.steps), int(ref.fun_evals))
    assert s["steps_done"] < 100 and s["fun_evals"] > s["steps_done"]
    np.testing.assert_allclose(s["train_loss"], float(ref.value), rtol=1e-6)
    rows = records(path)
    assert [r["step"] for r in rows] == [0, s["steps_done"]]  # the start, then the one chunk
    assert rows[0]["loss"] > 2.0 and rows[0]["test_accuracy"] < 0.3  # near log(10), chance
    assert rows[-1]["accuracy"] == 1.0 and rows[-1]["loss"] == s["train_loss"]
    assert rows[-1]["health/count"] == s["steps_done"]  # gx.health saw every step
    if impl == "gradxform":  # the records of gx.lbfgs's last step
        assert rows[-1]["linesearch/step_size"] > 0 and rows[-1]["lbfgs/pair_skipped"] == 0
    out = capsys.readouterr().out
    stats = f"L-BFGS           {s['steps_done']} steps, {s['fun_evals']} loss evaluations"
    assert f"{stats}, converged (gradient norm " in out


def test_lbfgs_chunks_log_checkpoint_and_resume_exactly(tmp_path, capsys):
    path, solve = tmp_path / "run", sys.modules["gradxform.minimize"]._solve
    flags = ["--model", "mlp", "--steps", "30", "--eval-every", "10", "--checkpoint-every", "20"]
    compiled = solve._cache_size()
    assert main.main([*flags, *LBFGS, "--run-dir", str(path)]) == 0
    assert solve._cache_size() == compiled + 1  # one compiled loop serves every chunk
    rows = records(path)
    assert [r["step"] for r in rows] == [0, 10, 20, 30]
    assert [r["health/count"] for r in rows[1:]] == [10, 10, 10]  # each chunk starts afresh
    losses, evals = [r["loss"] for r in rows], [r["fun_evals"] for r in rows]
    assert losses == sorted(losses, reverse=True) and evals == sorted(evals) and evals[-1] > 30
    assert all("test_accuracy" in r for r in rows)
    assert [p.name for p in (path / "checkpoints").iterdir()] == ["step_00000020.msgpack"]
    assert _summary(path)["stop_reason"] == "steps" and not _summary(path)["converged"]

    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    assert main.main(["--resume", str(copy), "--eval-every", "5"]) == 2  # chunks end there
    assert "'eval_every': (5, 10)" in capsys.readouterr().err
    assert main.main(["--resume", str(copy), "--no-progress"]) == 0  # from step 20
    assert _summary(copy)["resumed_from"] == 20
    assert (copy / "metrics.jsonl").read_bytes() == (path / "metrics.jsonl").read_bytes()


def test_lbfgs_stops_at_a_gradient_norm_above_max_grad_norm(tmp_path, capsys):
    path = tmp_path / "run"
    flags = ["--model", "mlp", "--steps", "5", "--max-grad-norm", "0.01", *LBFGS]
    assert main.main([*flags, "--run-dir", str(path)]) == 1
    err = capsys.readouterr().err
    assert "stopped: Gradient explosion at step 5" in err
    assert "`--init-scale`" in err and "--clip-global-norm" not in err  # a flag lbfgs takes
    assert _summary(path)["status"] == "stopped" and records(path)[-1]["health/exploding"] == 1


def test_lbfgs_trains_the_cnn_too(tmp_path):
    path = tmp_path / "run"
    flags = ["--model", "cnn", "--channels", "2,4", "--width", "8", "--steps", "10", *LBFGS]
    assert main.main([*flags, "--run-dir", str(path)]) == 0
    first, last = records(path)
    assert last["step"] == 10 and last["loss"] < 0.8 * first["loss"]
    assert last["test_accuracy"] > 0.3 > first["test_accuracy"]  # chance: 0.1
