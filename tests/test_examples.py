"""End-to-end tests of the example (`examples/`) at tiny size, on 8 virtual CPU devices."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # before jax
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
from flax import nnx  # noqa: E402

import gradxform as gx  # noqa: E402
from examples import config, data, main, runlog, train  # noqa: E402
from examples.config import Config  # noqa: E402

TINY = Config(
    model="mlp", depth=1, width=32, channels=(8, 16), steps=6, batch_size=64, lr=1e-2,
    lr_schedule="constant", warmup=0, log_every=2, eval_every=0,
)  # fmt: skip


def run(cfg: Config, path: Path, *, plot: bool = False, **kw) -> dict:
    return train.train_and_evaluate(cfg, path, progress=False, plot=plot, **kw)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def devices() -> int:
    n = jax.device_count()
    if n < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax starts")
    return n


# ----------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_model_trains_end_to_end_and_writes_run_files(model, tmp_path):
    cfg = replace(TINY, model=model, steps=16, log_every=4)
    summary = run(cfg, tmp_path / "run", plot=model == "cnn")
    rows = records(tmp_path / "run")
    assert [r["step"] for r in rows] == [4, 8, 12, 16]
    # It learns: chance level is a loss of 2.3 and an accuracy of 0.1.
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"]
    assert 0.5 < summary["test_accuracy"] <= 1.0
    assert rows[-1]["lr"] == pytest.approx(1e-2)
    layers = {
        "mlp": ["layers/0/kernel", "out/kernel"],
        "cnn": ["conv1/kernel", "conv2/kernel", "head/kernel"],
    }
    for name in layers[model]:  # gx.read_health's records of the gx.health wrapper
        assert rows[-1][f"health/grad_norm/{name}"] > 0
        assert 0 < rows[-1][f"health/update_ratio/{name}"] < 1
    squares = sum(v**2 for k, v in rows[-1].items() if k.startswith("health/grad_norm/"))
    np.testing.assert_allclose(np.sqrt(squares), rows[-1]["health/global_norm"], rtol=1e-5)
    assert rows[-1]["grad_norm_max"] >= rows[-1]["health/global_norm"]
    assert [r["health/count"] for r in rows] == [4, 8, 12, 16]
    assert summary["health"].startswith("healthy")
    for png in ("curves.png", "grad_norms.png") if model == "cnn" else ():
        assert (tmp_path / "run" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Config.load(tmp_path / "run" / "config.json") == cfg


def _trajectories(cfg: Config, tmp_path: Path) -> dict[str, list[dict]]:
    for mode in config.PARALLEL:
        run(replace(cfg, parallel=mode), tmp_path / mode)
    return {mode: records(tmp_path / mode) for mode in config.PARALLEL}


def _assert_same(runs: dict[str, list[dict]], keys: list[str]) -> None:
    for mode in ("pmap", "sharded"):
        for ours, ref in zip(runs[mode], runs["none"], strict=True):
            got, want = [ours[k] for k in keys], [ref[k] for k in keys]
            np.testing.assert_allclose(
                got, want, rtol=2e-5, err_msg=f"{mode} at step {ref['step']}"
            )


def test_parallel_modes_give_the_same_trajectory_for_a_batch_norm_model(devices, tmp_path):
    # The MLP's batch norm reduces its statistics over replicas as the CNN's does (`bn_axis_name`),
    # at a fraction of the compile time; the CNN trains end to end above.
    cfg = replace(TINY, batch_norm=True, steps=4, log_every=1)
    runs = _trajectories(cfg, tmp_path)
    norms = [k for k in runs["none"][0] if k.startswith(("health/grad_norm", "health/global"))]
    _assert_same(runs, ["loss", "accuracy", "grad_norm_max", *norms])
    assert runs["none"][-1]["loss"] < runs["none"][0]["loss"]


def test_noise_and_skip_guard_act_alike_on_every_replica(devices, tmp_path):
    # lr 30 explodes: steps with norms of 50-300 are skipped, the others are below 3 (wide margins).
    cfg = replace(
        TINY, optimizer="sgd", lr=30.0, momentum=0.9, noise_eta=0.01, on_instability="skip",
        max_grad_norm=10.0, log_every=1,
    )  # fmt: skip
    runs = _trajectories(cfg, tmp_path)
    skipped = {mode: [r["skipped"] for r in rows] for mode, rows in runs.items()}
    assert 0 < sum(skipped["none"]) < len(skipped["none"])
    assert skipped["pmap"] == skipped["none"] == skipped["sharded"]
    assert [r["skip/skipped"] for r in runs["none"]] == skipped["none"]  # gx.skip_if decided
    assert runs["none"][-1]["skip/skipped_norm"] == sum(skipped["none"])
    _assert_same(runs, ["loss", "health/global_norm", "skip/skipped_norm"])


def test_batch_that_does_not_divide_the_devices_is_rejected(devices, tmp_path):
    with pytest.raises(
        ValueError, match=r"`--batch-size` 30 does not divide evenly over 8 devices.*24 or 32"
    ):
        run(replace(TINY, batch_size=30, parallel="sharded"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- determinism, resume


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Config, Path]:
    """An uninterrupted run with dropout (random numbers drawn per step), a schedule, and
    `--stable` with clipping (the most optimizer state to checkpoint: windows, moments, records)."""
    cfg = replace(
        TINY, dropout=0.3, steps=8, checkpoint_every=4, lr_schedule="cosine", warmup=2,
        stable=True, clip_global_norm=1.0,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("finished") / "run"
    run(cfg, path)
    return cfg, path


def test_same_seed_gives_bitwise_identical_metrics(finished_run, tmp_path):
    cfg, path = finished_run
    run(cfg, tmp_path / "again")
    again = (tmp_path / "again" / "metrics.jsonl").read_bytes()
    assert again == (path / "metrics.jsonl").read_bytes()
    digits = data.load("digits")
    states = [train.create_train_state(replace(cfg, seed=seed), digits)[1] for seed in (0, 1)]
    kernels = [state[0]["layers"][0]["kernel"][...] for state in states]  # model, first layer
    assert not np.array_equal(*kernels)


def test_resume_continues_bitwise_identically(finished_run, tmp_path):
    cfg, path = finished_run
    crashed = tmp_path / "crashed"
    shutil.copytree(path, crashed)  # as if killed after step 8, before its checkpoint was written
    (crashed / "checkpoints" / "step_00000008.msgpack").unlink()
    summary = run(cfg, crashed, resume=True)
    assert summary["resumed_from"] == 4
    assert (crashed / "metrics.jsonl").read_bytes() == (path / "metrics.jsonl").read_bytes()


def test_corrupt_or_mismatched_checkpoint_is_rejected_and_nothing_overwritten(
    finished_run, tmp_path
):
    cfg, path = finished_run
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    latest = broken / "checkpoints" / "step_00000008.msgpack"
    before = {p: p.read_bytes() for p in broken.rglob("*") if p.is_file()}
    blob = bytearray(latest.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one flipped byte inside the arrays
    latest.write_bytes(bytes(blob))
    with pytest.raises(runlog.CheckpointError, match=r"step_00000008.msgpack is corrupt.*digest"):
        run(cfg, broken, resume=True)
    latest.write_bytes(b"not a checkpoint")
    with pytest.raises(runlog.CheckpointError, match="corrupt or not a checkpoint"):
        run(cfg, broken, resume=True)
    latest.write_bytes(before[latest])
    assert {p: p.read_bytes() for p in broken.rglob("*") if p.is_file()} == before

    with pytest.raises(
        runlog.CheckpointError, match=r"different configuration.*'width': \(32, 48\)"
    ):
        run(replace(cfg, width=48), broken, resume=True)
    _, _, leaves = runlog.read_checkpoint(latest)
    _, state = train.create_train_state(replace(cfg, width=48), data.load("digits"))
    with pytest.raises(
        runlog.CheckpointError, match=r"leaf '0/layers/0/bias/value' has shape \(32,\).*\(48,\)"
    ):
        runlog.restore_into(state, leaves, latest)
    assert {p: p.read_bytes() for p in broken.rglob("*") if p.is_file()} == before


def test_stable_flag_uses_gx_stable_and_its_records(finished_run):
    last = records(finished_run[1])[-1]
    assert last["health/global_norm"] > 0 and last["health/grad_norm/out/kernel"] > 0
    # gx.stable's own record and its health record (on its accepted-step statistics)
    assert last["stable/skipped"] == 0 and last["stable/step_scale"] == 1.0
    assert last["health_1/global_norm"] == last["health/global_norm"]
    assert last["clip/threshold"] == 1.0 and not any(k.startswith("skip/") for k in last)


def test_fresh_run_refuses_to_overwrite_an_existing_run(finished_run):
    cfg, path = finished_run
    with pytest.raises(FileExistsError, match="--resume"):
        run(cfg, path)


# ----------------------------------------------------------------------------- stability


EXPLOSIVE = replace(TINY, optimizer="sgd", lr=30.0, momentum=0.9, max_grad_norm=10.0, log_every=1)


def test_explosion_stops_the_run_naming_step_and_layer(tmp_path):
    with pytest.raises(
        runlog.InstabilityError,
        match=r"(?s)Gradient explosion at step 2: global norm .* \(> bound 10\); largest in "
        r"(layers/0|out)/(kernel|bias) .*`--clip-global-norm 1.0`.*`--max-grad-norm`",
    ) as raised:
        run(EXPLOSIVE, tmp_path / "run")
    assert isinstance(raised.value.__cause__, gx.GradientExplosionError)  # gx.assert_healthy's
    last = records(tmp_path / "run")[-1]  # the evidence is logged
    assert last["step"] == 2 and last["health/exploding"] == 1.0
    assert last["grad_norm_max"] == last["health/global_norm"] > 10


def test_warn_mode_logs_unstable_steps_of_an_optax_chain_and_finishes(tmp_path, capsys):
    summary = run(replace(EXPLOSIVE, impl="optax", on_instability="warn"), tmp_path / "run")
    # It ends at chance: the verdict says so first, then the unstable steps.
    assert summary["status"] == "failed"
    assert summary["health"].startswith("FAILED: test accuracy 0.1")
    assert (
        "unstable steps, 0 skipped; first: Gradient explosion at step 2: global"
        in summary["health"]
    )
    assert summary["skipped_steps"] == 0
    assert "warning: Gradient explosion at step 2" in capsys.readouterr().out
    rows = records(tmp_path / "run")  # gradxform's health wraps the optax chain
    assert len(rows) == EXPLOSIVE.steps and rows[1]["health/exploding"] == 1.0


def test_skipped_step_keeps_batch_statistics_and_the_schedule_step():
    cfg = replace(TINY, model="cnn", batch_norm=True, on_instability="skip")
    digits = data.load("digits")
    graphdef, state = train.create_train_state(cfg, digits)
    train_step = jax.jit(
        train.make_train_step(graphdef, num_classes=10, seed=0, schedule=train.learning_rate(cfg))
    )
    images, labels = data.batch(digits, data.BatchOrder(len(digits.y_train), 64, 0), 0)
    poisoned = images.copy()
    poisoned[3, 2, 2, 0] = np.nan  # NaN loss, gradients and batch statistics
    outside = nnx.Not(nnx.PathContains("opt_state"))  # model (BN too) and optimizer step
    before = jax.device_get(nnx.filter_state(state, outside))
    state, metrics = train_step(state, poisoned, labels, np.int32(0))
    assert bool(metrics["skipped"]) and int(metrics["health"].nonfinite) > 0
    after = jax.device_get(nnx.filter_state(state, outside))
    jax.tree.map(np.testing.assert_array_equal, after, before)
    err = runlog.check(jax.device_get(metrics["health"]), float(metrics["loss"]), cfg)
    assert isinstance(err.__cause__, gx.NonFiniteGradientError)
    assert "Non-finite gradient at step 1" in str(err) and "conv1/kernel" in str(err)
    state, metrics = train_step(state, images, labels, np.int32(1))
    assert not bool(metrics["skipped"]) and int(state[1]["step"][...]) == 1
    assert gx.read_health(train.optimizer_state(graphdef, state))["skip/skipped_nonfinite"] == 1
    assert not metrics["exploding"] and metrics["nonfinite"] == 0
    error = runlog.check(jax.device_get(metrics["health"]), float("nan"), cfg)  # a NaN loss only
    assert "Non-finite loss (nan) at step 2 with finite gradients" in str(error)


def test_check_mode_runs_the_step_under_chexify(tmp_path):
    summary = run(replace(TINY, check=True, steps=2), tmp_path / "run")
    assert summary["health"].startswith("healthy")


# ----------------------------------------------------------------------------- data


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def _write_mnist(folder: Path, n_train: int = 64, n_test: int = 16, size: int = 12) -> dict:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, size, size)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, size, size)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, array) in enumerate(arrays.items()):
        raw = _idx(array)
        if i % 2:  # mix gzipped and plain files
            (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return arrays


def test_bundled_digits_are_scikit_learns_load_digits():
    from sklearn.datasets import load_digits

    x, y = data._digits_arrays()  # read from the CSV, without importing scikit-learn
    digits = load_digits()
    np.testing.assert_array_equal(x, digits.data)
    np.testing.assert_array_equal(y, digits.target)


def test_idx_reader_reads_plain_and_gzipped_mnist_files(tmp_path):
    arrays = _write_mnist(tmp_path)
    np.testing.assert_array_equal(
        data.read_idx(tmp_path / "train-labels-idx1-ubyte.gz"), arrays["train-labels-idx1-ubyte"]
    )
    ds = data.load("fashion_mnist", tmp_path)
    assert ds.x_train.shape == (64, 12, 12, 1) and ds.x_test.shape == (16, 12, 12, 1)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])
    raw = arrays["train-images-idx3-ubyte"].astype(np.float64)
    np.testing.assert_allclose(
        ds.x_train[..., 0], (raw - raw.mean()) / raw.std(), rtol=1e-4, atol=1e-4
    )


def test_mnist_files_train_through_the_command_line(tmp_path):
    _write_mnist(tmp_path / "mnist")
    args = ["--dataset", "mnist", "--data-dir", str(tmp_path / "mnist"), "--model", "cnn",
            "--channels", "4,8", "--width", "16", "--steps", "4", "--warmup", "0",
            "--batch-size", "16", "--run-dir", str(tmp_path / "run"), "--no-progress"]  # fmt: skip
    assert main.main(args) in (0, 1)  # random labels: it may end at chance, hence FAILED (1)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps_done"] == 4
    assert len(records(tmp_path / "run")) == 1
    contradicting = ["--resume", str(tmp_path / "run"), "--lr", "0.5"]  # config.json says 0.003
    assert main.main(contradicting) == 2


def _cifar_record(label: int, planes: tuple[int, int, int]) -> bytes:
    return bytes([label]) + np.repeat(np.array(planes, np.uint8), 1024).tobytes()


def test_cifar_binary_reader_decodes_label_and_channel_planes(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    for i in range(1, 6):
        (folder / f"data_batch_{i}.bin").write_bytes(
            _cifar_record(i, (10, 20, 30)) + _cifar_record(9, (0, 0, 255))
        )
    (folder / "test_batch.bin").write_bytes(_cifar_record(3, (1, 2, 3)))
    images, labels = data.read_cifar_binary(folder / "data_batch_2.bin")
    assert images.shape == (2, 32, 32, 3) and list(labels) == [2, 9]
    assert images[0, 5, 7].tolist() == [10, 20, 30] and images[1, 31, 0].tolist() == [0, 0, 255]
    ds = data.load("cifar10", tmp_path)  # finds the cifar-10-batches-bin subfolder
    assert ds.x_train.shape == (10, 32, 32, 3) and ds.y_test.tolist() == [3]
    assert ds.num_classes == 10


def test_missing_and_malformed_files_say_what_was_expected(tmp_path):
    with pytest.raises(
        data.DataError,
        match=r"Missing mnist file `train-images-idx3-ubyte` \(or `train-images-idx3-ubyte.gz`\)"
        r".*download",
    ):
        data.load("mnist", tmp_path)
    (tmp_path / "bad-magic").write_bytes(b"\x00\x00\x0d\x03" + bytes(20))
    with pytest.raises(
        data.DataError,
        match=r"not an unsigned-byte IDX file: expected the header 00 00 08 <ndim>, "
        r"got 00 00 0d 03",
    ):
        data.read_idx(tmp_path / "bad-magic")
    (tmp_path / "short").write_bytes(_idx(np.zeros((4, 3, 3)))[:-5])
    with pytest.raises(
        data.DataError,
        match=r"has 47 bytes but its header declares shape \(4, 3, 3\), which needs 52",
    ):
        data.read_idx(tmp_path / "short")
    (tmp_path / "odd.bin").write_bytes(bytes(3000))
    with pytest.raises(
        data.DataError, match="not a positive multiple of the CIFAR-10 binary record size 3073"
    ):
        data.read_cifar_binary(tmp_path / "odd.bin")
    with pytest.raises(
        data.DataError, match=r"Missing CIFAR-10 file `data_batch_1.bin`.*binary version.*pickle"
    ):
        data.load("cifar10", tmp_path)
    with pytest.raises(data.DataError, match="needs `--data-dir`"):
        data.load("cifar10")


def test_batch_order_is_a_permutation_per_epoch_and_a_function_of_seed_and_step():
    order = data.BatchOrder(num_examples=10, batch_size=3, seed=5)
    epoch0 = np.concatenate([order.indices(s) for s in range(3)])
    assert len(set(epoch0.tolist())) == 9  # three disjoint batches; the tenth example waits
    fresh = data.BatchOrder(10, 3, seed=5)
    np.testing.assert_array_equal(fresh.indices(4), order.indices(4))  # no hidden state
    assert order.state(4) == {"seed": 5, "batch_size": 3, "epoch": 1, "position": 1}
    assert not np.array_equal(data.BatchOrder(10, 3, seed=6).indices(0), order.indices(0))


def test_script_entry_point_runs_from_the_repository_root():
    out = subprocess.run(
        [sys.executable, "examples/train.py", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--on-instability" in out.stdout and "jax.distributed.initialize()" in out.stdout
    assert "--coordinator-address" in out.stdout and "JAX_PROCESS_ID" not in out.stdout


def test_distributed_flags_reach_jax_distributed_initialize(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    cluster = ["--coordinator-address", "host0:1234", "--num-processes", "2", "--process-id", "1"]
    assert main.main([*cluster, "--steps", "1"]) == 2  # without --distributed: refused
    assert "only apply with `--distributed`" in capsys.readouterr().err and not calls
    stop = ["--steps", "0", "--run-dir", str(tmp_path / "run")]  # a usage error after initialize
    assert main.main(["--distributed", *cluster, *stop]) == 2
    assert main.main(["--distributed", *stop]) == 2
    assert calls == [
        {"coordinator_address": "host0:1234", "num_processes": 2, "process_id": 1},
        {},  # left to JAX's cluster detection (and JAX_COORDINATOR_ADDRESS)
    ]
