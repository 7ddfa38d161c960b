"""Test configuration: 8 virtual CPU devices, set before JAX is imported anywhere, and a
compilation cache private to this test process.

Many tests compile the same program again in a fresh `jax.jit` (each run of the example builds
its train step anew; parity tests compile optax's twin of a chain another test compiled). JAX's
persistent cache, keyed on the program text and compile options, turns those repeats into a
load. The folder is new for every process (so pytest-xdist workers and the subprocesses some
tests start never share or race on it) and removed at exit: nothing carries over between runs.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")

_CACHE = tempfile.mkdtemp(prefix="gradxform-tests-xla-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _CACHE)
# Programs that compile in under 0.3 s are not written: most of the reuse is in the example's
# programs (0.3-3 s), and writing every small eager-op program costs more than it saves.
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.3)
