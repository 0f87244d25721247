import gc
import os

import jax
import jax.random as jr
import pytest
from hypothesis import HealthCheck, settings


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
    the life of the process, and XLA:CPU maps memory for each: the whole suite
    compiles enough of them to pass Linux's limit of 65530 mappings per process
    (`vm.max_map_count`), after which XLA's compiler crashes."""
    yield
    jax.clear_caches()
    gc.collect()
