"""The package as users get it: a built wheel installs into a fresh virtual environment (not
this editable checkout), imports, carries its type marker and licence, and computes."""

from __future__ import annotations

import site
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHECK = """
import pathlib, sys
import jax.numpy as jnp
import gradxform as gx
here = pathlib.Path(gx.__file__).resolve()
assert pathlib.Path(sys.prefix).resolve() in here.parents, here  # the wheel's copy, not ROOT's
assert (here.parent / "py.typed").is_file()
tx = gx.adamw(0.1)
u, _ = tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.ones(2)}), {"w": jnp.ones(2)})
print(gx.__version__, float(u["w"][0]))
"""


def run(*cmd, cwd):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_built_wheel_installs_into_a_fresh_venv_and_imports(tmp_path):
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path, ROOT, cwd=tmp_path)
    (wheel,) = tmp_path.glob("gradxform-*.whl")
    env = tmp_path / "venv"
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    # The new environment sees this one's dependencies (jax, optax, ...) through a .pth line;
    # .pth files inside that folder are not read, so the editable gradxform stays invisible.
    purelib = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))",
                       cwd=tmp_path).strip())  # fmt: skip
    (purelib / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel,
        cwd=tmp_path)  # fmt: skip
    out = run(python, "-c", CHECK, cwd=tmp_path)
    version, update = out.split()
    assert version == "0.1.0" and float(update) < 0
    licence = next(purelib.glob("gradxform-*.dist-info")).rglob("LICENSE")
    assert "Apache License" in next(licence).read_text()
