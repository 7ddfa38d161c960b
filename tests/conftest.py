"""Test configuration: 8 virtual CPU devices and a cheap XLA:CPU compile, set before JAX is
imported anywhere, and a compilation cache private to this test process.

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

# Eight virtual CPU devices, and a cheaper XLA:CPU compile. The suite compiles thousands of small
# programs (every eager op of every case is one), and on those XLA:CPU's compile, not the run,
# is the time: with the older loop emitters and LLVM at -O0 a small program compiles in about
# half the time, and the suite takes half the CPU (1310 s -> 590 s on the 2-core machine). The
# programs compute the same maths; only instruction selection differs (an FMA here or there:
# tolerances are relative to each leaf's scale); tests/test_default_codegen.py runs optax parity
# through XLA's default pipeline. LLVM's module is compiled whole, not split for parallel
# codegen: on programs this small the split costs more than it saves, and two workers already
# fill two cores (test_protocol.py 88 s -> 72 s). A flag the caller already set is kept.
_XLA_FLAGS = {
    "--xla_force_host_platform_device_count": "8",
    "--xla_cpu_use_fusion_emitters": "false",
    "--xla_backend_optimization_level": "0",
    "--xla_cpu_parallel_codegen_split_count": "1",
}
_given = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join(
    [_given] + [f"{k}={v}" for k, v in _XLA_FLAGS.items() if k not in _given]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402 (after XLA_FLAGS)

jax.config.update("jax_numpy_rank_promotion", "raise")

_CACHE = tempfile.mkdtemp(prefix="gradxform-tests-xla-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _CACHE)
# Programs that compile in under 0.3 s are not written: most of the reuse is in the example's
# programs (0.3-3 s), and writing every small eager-op program costs more than it saves.
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.3)

# pytest-xdist (`--dist loadfile`) hands each worker one module at a time, in collection order.
# By default it orders modules by their number of tests, which leaves the few-test, long-running
# ones (a subprocess run of the example, the default-compiler parity) for the end, where one
# worker runs them while the other idles. Longest first (as measured below) keeps
# both workers busy to the end; `--no-loadscope-reorder` in pyproject.toml keeps this order.
_LONGEST_FIRST = (  # seconds in a run of the whole suite on 2 cores
    "test_protocol.py",  # 81
    "test_parity.py",  # 58
    "test_lbfgs.py",  # 39
    "test_examples.py",  # 33
    "test_clients.py",  # 29
    "test_docs.py",  # 28
    "test_examples_full_batch.py",  # 27
    "test_distributed_example.py",  # 19: two processes
    "test_stable.py",  # 18
    "test_stacked.py",  # 18
    "test_default_codegen.py",  # 13: one subprocess
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: rest in place
