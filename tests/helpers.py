import contextlib

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from hypothesis import settings

import stackrnn

# The strategies are public, in `stackrnn.testing`; these names stay importable from
# here for the tests that use them.
from stackrnn.testing import (
    Config as Config,
    configs as configs,
    inputs as inputs,
    KINDS as KINDS,
    make_cell as make_cell,
    make_cells as make_cells,
)


@contextlib.contextmanager
def x64(enabled: bool):
    """JAX's 64-bit mode on or off inside the block, restored after it."""
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", enabled)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", before)


def tree_allclose(x, y, *, rtol=1e-6, atol=1e-6) -> bool:
    """Same structure and all leaves close (exact when rtol = atol = 0)."""
    if jax.tree.structure(x) != jax.tree.structure(y):
        return False
    return all(
        jnp.shape(a) == jnp.shape(b)
        and np.allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)
        for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y))
    )


def tree_equal(x, y) -> bool:
    """Bit-for-bit equality of two PyTrees of arrays."""
    if jax.tree.structure(x) != jax.tree.structure(y):
        return False
    return all(
        jnp.shape(a) == jnp.shape(b) and np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y))
    )


def fewer():
    """Half the active profile's examples, for the property tests that compile most
    (each example compiles anew)."""
    return settings(max_examples=max(1, settings.default.max_examples // 2))


def make_stack(cfg: Config, key, direction: str, **kwargs) -> stackrnn.StackedRNN:
    """A stack of `cfg`'s cells reading `"forward"`, `"reverse"` or
    `"bidirectional"` (each backward cell drawn with its own key)."""
    if direction != "bidirectional":
        cells = make_cells(cfg, key)
        return stackrnn.StackedRNN(cells, reverse=direction == "reverse", **kwargs)
    cells, backward = [], []
    size = cfg.input_size
    for width, k in zip(cfg.widths, jr.split(key, cfg.num_layers)):
        kf, kb = jr.split(k)
        cells.append(make_cell(cfg.kind, size, width, bias=cfg.bias, key=kf))
        backward.append(make_cell(cfg.kind, size, width, bias=cfg.bias, key=kb))
        size = cells[-1].output_size + backward[-1].output_size
    return stackrnn.StackedRNN(cells, backward_cells=backward, **kwargs)
