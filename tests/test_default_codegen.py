"""conftest.py compiles the suite with cheaper XLA:CPU settings (loop emitters, LLVM -O0). The
programs users run come from XLA's default pipeline: this runs optax parity through it (the
optimizers and the clips that reduce, one seed), in a process that does not read conftest's
flags."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PARITY = """
import os, sys
sys.path.insert(0, sys.argv[1])
from tests.cases import TWINNED
from tests.test_parity import test_matches_optax_float32

assert os.environ["XLA_FLAGS"] == sys.argv[2]  # XLA's defaults but the device count
REDUCING = ("clip_by_global_norm", "adaptive_grad_clip", "scale_by_rss")
chosen = [c for c in TWINNED if c.kind == "optimizer" or c.name in REDUCING]
for case in chosen:
    test_matches_optax_float32(case, seed=0)
print("matched", len(chosen))
"""


def test_parity_holds_under_xla_cpu_default_compile_pipeline():
    flags = "--xla_force_host_platform_device_count=8"
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", PARITY, str(ROOT), flags],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[0] == "matched" and int(done.stdout.split()[1]) >= 10
