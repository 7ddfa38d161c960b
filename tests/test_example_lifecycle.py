"""What a user of the example meets over a run's life: flag errors, Ctrl-C, resuming and
extending a run, a torn metrics line, the verdict and its exit status, the output files."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradxform as gx
from examples import config, data, main, models, runlog, train
from examples.config import Config, UsageError

QUIET = ["--no-progress", "--no-plots"]  # no progress bar, no PNGs at the end
CLI = ["--model", "mlp", "--depth", "1", "--width", "32", "--batch-size", "64", "--lr", "0.01",
       "--lr-schedule", "constant", "--warmup", "0", "--log-every", "1",
       "--eval-every", "0"]  # fmt: skip


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def _summary(path: Path) -> dict:
    return json.loads((path / "summary.json").read_text())


# ----------------------------------------------------------------------------- flags


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--width", "0"], "`--width` must be at least 1; got 0."),
        (["--channels", "0,0"], "`--channels` must be two positive integers like 32,64; got 0,0."),
        (["--channels", "8"], "`--channels` must be two positive integers like 32,64; got 8."),
        (["--channels", "a,b"], "argument --channels: expected integers like 32,64, got 'a,b'"),
        (["--seed", "-1"], "`--seed` must be in [0, 4294967295]; got -1."),
        (["--dropout", "1.5"], "`--dropout` must be in [0, 1); got 1.5."),
        (["--depth", "-1"], "`--depth` must be at least 0; got -1."),
        (["--warmup", "-5"], "`--warmup` must be at least 0; got -5."),
        (["--checkpoint-every", "-1"], "`--checkpoint-every` must be at least 0; got -1."),
        (["--eval-every", "-1"], "`--eval-every` must be at least 0; got -1."),
        (["--lr", "nan"], "`--lr` must be greater than 0; got nan."),
        (["--b2", "1"], "`--b2` must be in [0, 1); got 1.0."),
        (["--width", "abc"], "argument --width: invalid int value: 'abc'"),
        (["--steps", "10", "--warmup", "10"], "`--warmup` (10) must be smaller than `--steps`"),
        *[
            (["--optimizer", "lbfgs", *flag], f"`{flag[0]}` does not apply to `--optimizer lbfgs`")
            for flag in (
                ["--batch-size", "64"],
                ["--parallel", "sharded"],
                ["--on-instability", "skip"],
                ["--lr-schedule", "constant"],
                ["--warmup", "5"],
                ["--lr", "0.1"],
                ["--momentum", "0.9"],
                ["--clip-global-norm", "1"],
                ["--stable"],
                ["--batch-norm"],
                ["--dropout", "0.1"],
                ["--log-every", "5"],
                ["--check"],
                ["--distributed"],
            )
        ],
        (
            ["--optimizer", "lbfgs", "--batch-size", "64"],
            "`--batch-size` does not apply to `--optimizer lbfgs`, which uses the whole training "
            "set in every step; drop it.",
        ),
    ],
)
def test_every_bad_flag_is_one_line_naming_it_and_nothing_is_created(
    flags, message, tmp_path, capsys
):
    status = main.main([*flags, "--run-dir", str(tmp_path / "run"), *QUIET])
    err = capsys.readouterr().err
    assert status == 2
    assert message in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_default_warmup_fits_short_runs():
    assert Config().warmup == 50  # the README's 500-step run is unchanged
    assert Config(steps=50).warmup == 5 and Config(steps=2000).warmup == 50
    assert Config(steps=1).warmup == 0
    assert Config(optimizer="lbfgs").warmup == 0  # none: its line search picks the steps
    with pytest.raises(UsageError, match="`--warmup` \\(50\\) must be smaller"):
        Config(steps=50, warmup=50)


# ----------------------------------------------------------------------------- Ctrl-C, resume


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("whole") / "run"
    assert main.main([*CLI, "--steps", "6", "--run-dir", str(path), *QUIET]) == 0
    return path


def test_no_plots_leaves_out_the_pngs_only(uninterrupted, tmp_path):
    assert (uninterrupted / "summary.json").is_file()
    assert not list(uninterrupted.glob("*.png"))
    path = tmp_path / "plotted"
    assert main.main([*CLI, "--steps", "2", "--run-dir", str(path), "--no-progress"]) == 0
    assert sorted(p.name for p in path.glob("*.png")) == ["curves.png", "grad_norms.png"]


def test_ctrl_c_saves_a_checkpoint_writes_summary_and_prints_the_resume_command(
    uninterrupted, tmp_path, monkeypatch, capsys
):
    real_batch = data.batch

    def batch(dataset, order, step):  # Ctrl-C arrives while step 4 (0-based 3) starts
        if step == 3:
            raise KeyboardInterrupt
        return real_batch(dataset, order, step)

    monkeypatch.setattr(data, "batch", batch)
    path = tmp_path / "run"
    assert main.main([*CLI, "--steps", "6", "--run-dir", str(path), *QUIET]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"--resume {path}" in err and "at step 3" in err
    assert (path / "checkpoints" / "step_00000003.msgpack").is_file()  # --checkpoint-every 0
    summary = _summary(path)
    assert summary["status"] == "interrupted" and summary["steps_done"] == 3

    monkeypatch.setattr(data, "batch", real_batch)
    assert main.main(["--resume", str(path), *QUIET]) == 0
    assert (path / "metrics.jsonl").read_bytes() == (uninterrupted / "metrics.jsonl").read_bytes()
    assert _summary(path)["status"] == "completed" and _summary(path)["resumed_from"] == 3


def test_resume_may_train_longer_but_not_change_the_numbers(uninterrupted, tmp_path, capsys):
    path = tmp_path / "run"
    short = [*CLI, "--steps", "4", "--checkpoint-every", "2", *QUIET]
    assert main.main([*short, "--run-dir", str(path)]) == 0
    assert main.main(["--resume", str(path), "--steps", "4"]) == 2
    assert "`--steps` 4 must exceed the checkpoint's step 4" in capsys.readouterr().err
    assert main.main(["--resume", str(path), "--width", "64"]) == 2
    assert "'width': (64, 32)" in capsys.readouterr().err
    # A cut-off last line (the disk filled up after the checkpoint) is dropped on resume.
    with open(path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.2')
    assert main.main(["--resume", str(path), "--steps", "6", *QUIET]) == 0
    assert Config.load(path / "config.json").steps == 6  # the next resume knows the length
    # A constant schedule: extending equals asking for 6 steps from the start (but for the
    # evaluation at the end of the first part).
    train_only = lambda rows: [{k: v for k, v in r.items() if "test" not in k} for r in rows]
    assert train_only(_records(path)) == train_only(_records(uninterrupted))


def test_metrics_reader_drops_only_a_torn_last_line(tmp_path):
    rd = runlog.RunDir(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert rd.read_metrics() == [{"step": 1}, {"step": 2}]
    assert rd.truncate_metrics(1) == [{"step": 1}]
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"ste\n{"step": 3}\n')
    with pytest.raises(UsageError, match=r"metrics\.jsonl line 2 is corrupt"):
        rd.read_metrics()


# ----------------------------------------------------------------------------- verdict, output


def test_run_that_skips_every_step_says_failed_and_exits_1(tmp_path, capsys):
    path = tmp_path / "run"
    flags = ["--on-instability", "skip", "--max-grad-norm", "1e-6", "--steps", "4"]
    assert main.main([*CLI, *flags, "--run-dir", str(path), *QUIET]) == 1
    summary = _summary(path)
    assert summary["status"] == "failed" and summary["skipped_steps"] == 4
    assert summary["health"].startswith("FAILED: ")
    assert "gradient health  FAILED: " in capsys.readouterr().out


def test_failure_rules_at_chance_mostly_skipped_nonfinite():
    ok = {"test_accuracy": 0.9, "train_loss": 0.3, "steps": 500, "resumed_from": None,
          "skipped_steps": 10}  # fmt: skip
    assert runlog.failure(ok, 10) is None
    assert "at chance" in runlog.failure({**ok, "test_accuracy": 0.1056}, 10)
    assert runlog.failure({**ok, "test_accuracy": 0.16}, 10) is None
    assert "493 of 500 steps were skipped" in runlog.failure({**ok, "skipped_steps": 493}, 10)
    assert "loss is nan" in runlog.failure({**ok, "train_loss": float("nan")}, 10)


def _exploding_record() -> gx.HealthState:
    params = {"w": jnp.zeros(3)}
    tx = gx.health(optax.sgd(0.1), max_norm=10.0)
    _, state = tx.update({"w": jnp.full(3, 1e3)}, tx.init(params), params)
    return state


def test_stop_hint_leaves_out_flags_already_given():
    record = _exploding_record()
    plain = str(runlog.check(record, 1.0, Config()))
    assert "`--clip-global-norm 1.0`" in plain and "`--on-instability skip`" in plain
    given = Config(clip_global_norm=1.0, agc=0.01, on_instability="skip")
    hint = str(runlog.check(record, 1.0, given)).split("\n")[1]
    assert "--clip-global-norm" not in hint and "--agc" not in hint
    assert "--on-instability" not in hint and "`--stable`" in hint


def test_stop_writes_summary_and_exits_1(tmp_path, capsys):
    path = tmp_path / "run"
    flags = ["--optimizer", "sgd", "--lr", "30", "--momentum", "0.9", "--max-grad-norm", "10"]
    flags += ["--clip-global-norm", "1.0", "--steps", "6"]
    assert main.main([*CLI, *flags, "--run-dir", str(path), *QUIET]) == 1
    err = capsys.readouterr().err
    assert "stopped: Gradient explosion" in err and "`--clip-global-norm 1.0`" not in err
    assert _summary(path)["status"] == "stopped"


def test_progress_prints_lines_not_carriage_returns_off_a_terminal(tmp_path, capsys):
    assert main.main([*CLI, "--steps", "20", "--run-dir", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if " step " in line]
    assert [line.split(" step ")[1].split()[0] for line in lines] == [
        f"{s}/20" for s in range(2, 21, 2)
    ]


# ----------------------------------------------------------------------------- model remedies


def test_model_remedies_are_flags_of_both_models():
    assert "leaky_relu" in config.ACTIVATIONS
    x = np.ones((4, 8, 8, 1), np.float32)
    mlp = models.build("mlp", (8, 8, 1), 10, seed=0, activation="leaky_relu", batch_norm=True)
    assert len(mlp.layers_bn) == 2 and mlp.layers[0].bias is None
    assert np.isfinite(np.asarray(mlp(x))).all()
    kernels = [
        np.asarray(models.build("cnn", (8, 8, 1), 10, seed=0, init_scale=s).conv1.kernel[...])
        for s in (1.0, 0.5)
    ]
    np.testing.assert_allclose(kernels[1], 0.5 * kernels[0], rtol=1e-6)


def test_train_state_of_a_batch_norm_mlp_holds_its_statistics():
    digits = data.load("digits")
    _, state = train.create_train_state(Config(model="mlp", batch_norm=True), digits)
    assert state[0]["layers_bn"][0]["mean"][...].shape == (128,)
