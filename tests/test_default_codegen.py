"""conftest.py compiles the suite with cheaper XLA:CPU settings (loop emitters, LLVM -O0). The
programs users run come from XLA's default pipeline: this runs optax parity through it (the
optimizers and the clips that reduce, one seed), in a process that does not read conftest's
flags."""

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

PARITY = """
import os, sys
sys.path.insert(0, sys.argv[1])
from cases import TWINNED, assert_trees_close, make, random_tree, run

assert os.environ["XLA_FLAGS"] == sys.argv[2]  # XLA's defaults but the device count
REDUCING = ("clip_by_global_norm", "adaptive_grad_clip", "scale_by_rss")
chosen = [c for c in TWINNED if c.kind == "optimizer" or c.name in REDUCING]
for case in chosen:
    params = random_tree(0)
    tx, kwargs = make(case, 0)
    ours, our_params, _ = run(tx, params, steps=5)
    theirs, their_params, _ = run(case.twin(**kwargs), params, steps=5)
    tol = {"rtol": case.rtol, "atol": case.rtol / 2}
    for u, v in zip(ours, theirs, strict=True):
        assert_trees_close(u, v, **tol)
    assert_trees_close(our_params, their_params, **tol)
print("matched", len(chosen))
"""


def test_parity_holds_under_xla_cpu_default_compile_pipeline():
    flags = "--xla_force_host_platform_device_count=8"
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", PARITY, str(TESTS), flags],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[0] == "matched" and int(done.stdout.split()[1]) >= 10
