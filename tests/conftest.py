import gc
import os
import pathlib
import shutil


# The suite checks what programs compute, not how fast they run: XLA compiles them
# without LLVM's optimisations, with its older elementwise emitter, in one piece
# (not split for parallel code generation, which the two workers' cores cannot use)
# and with its preset for fast compiles, which together halve the suite's time. The
# rounding of some float products changes with it (no fused multiply-adds), so the
# tests marked `bit_exact`, which compare with bits saved by XLA's default compiler,
# what users run, are skipped here and run by `test_bit_exact.py` in a process of
# its own with the default flags. (Set before JAX starts its CPU backend, which reads
# the flags once.)
FAST_COMPILE = (
    "--xla_backend_optimization_level=0",
    "--xla_cpu_use_fusion_emitters=false",
    "--xla_cpu_parallel_codegen_split_count=1",
    "--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_COMPILE",
)
DEFAULT_OPTIMISATION = os.environ.get("STACKRNN_TEST_DEFAULT_OPTIMISATION") == "1"
if not DEFAULT_OPTIMISATION:
    os.environ["XLA_FLAGS"] = " ".join(
        [os.environ.get("XLA_FLAGS", ""), *FAST_COMPILE]
    ).strip()

import jax  # noqa: E402
import jax.random as jr  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402


# Compiled programs go to a cache on disk, in the repository and ignored by git, and
# every program counts, however fast it compiled: a program that another module (after
# the clearing below), the other worker or an earlier run compiled is loaded, not
# compiled again. JAX keys each entry by the program, the XLA flags and its own
# version, so a changed program is compiled anew. In this process only: the tests'
# subprocesses compile afresh (a four-device program loaded from the cache crashed
# one with a segmentation fault).
COMPILE_CACHE = pathlib.Path(__file__).resolve().parent.parent / ".jax_cache"
COMPILE_CACHE_LIMIT = 2**30  # bytes; past it the next session starts an empty cache
jax.config.update("jax_compilation_cache_dir", str(COMPILE_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

# Every dtype promotion must be explicit in the library: strict mode turns a silent
# float32 -> float64 upcast into an error.
jax.config.update("jax_numpy_dtype_promotion", "strict")

# JAX compiles once per new shape, so examples are few and deadlines off. The
# `thorough` profile is for long runs: STACKRNN_HYPOTHESIS_PROFILE=thorough pytest
settings.register_profile(
    "ci",
    max_examples=8,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("STACKRNN_HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def getkey():
    """A fresh PRNG key at every call (Equinox's tests/ idiom)."""
    key = jr.key(0)

    def _getkey():
        nonlocal key
        key, sub = jr.split(key)
        return sub

    return _getkey


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops every compiled program after each test module. JAX keeps them all for
    the life of the process, and XLA:CPU maps memory for each: held for the whole
    suite, they would take several times the memory and, in one process (`-n 0`),
    half of Linux's limit of 65530 mappings (`vm.max_map_count`), past which XLA's
    compiler crashes. Keeping them saves no time: a later module loads the programs
    it shares with an earlier one from the disk cache."""
    yield
    jax.clear_caches()
    gc.collect()


def pytest_configure(config):
    """Empties the compile cache when it has grown past its limit (once per session,
    before the workers start; entries of programs that changed are never read again)."""
    if hasattr(config, "workerinput") or not COMPILE_CACHE.is_dir():
        return
    size = sum(f.stat().st_size for f in COMPILE_CACHE.iterdir() if f.is_file())
    if size > COMPILE_CACHE_LIMIT:
        shutil.rmtree(COMPILE_CACHE)


def pytest_collection_finish(session):
    """Hides what the imports and the collection made (JAX, PyTorch, the tests'
    modules) from Python's garbage collector, and lets it run less often: tracing
    makes many short-lived objects, and each full collection walked all of those
    that live for the session."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 50, 100)


def pytest_collection_modifyitems(config, items):
    if DEFAULT_OPTIMISATION:
        return
    skip = pytest.mark.skip(
        reason="bit-exact: run by tests/test_bit_exact.py at XLA's default optimisation"
    )
    for item in items:
        if item.get_closest_marker("bit_exact"):
            item.add_marker(skip)


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per core, at most eight (each holds its own JAX)."""
    return min(os.cpu_count() or 1, 8)
