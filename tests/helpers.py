import contextlib
import dataclasses

import equinox as eqx
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


def assert_derivatives_match(update, formula, primals, key):
    """`update`, a function with a hand-written derivative, gives the numbers of
    JAX's autodiff of `formula` in forward mode, reverse mode and at second order, at
    `primals` (a tuple of arguments) and at tangents and cotangents drawn from `key`.
    Run it in x64 mode, where the tolerances mean something."""

    def draw(key, tree):
        leaves, treedef = jax.tree.flatten(tree)
        keys = jr.split(key, len(leaves))
        return treedef.unflatten([jr.normal(k, x.shape) for k, x in zip(keys, leaves)])

    k1, k2 = jr.split(key)
    tangents = draw(k1, primals)
    cotangent = draw(k2, jax.eval_shape(formula, *primals))

    got, want = jax.jvp(update, primals, tangents), jax.jvp(formula, primals, tangents)
    assert tree_allclose(got, want, rtol=1e-12, atol=1e-12)

    got = jax.vjp(update, *primals)[1](cotangent)
    want = jax.vjp(formula, *primals)[1](cotangent)
    assert tree_allclose(got, want, rtol=1e-12, atol=1e-12)

    def curvature(f):
        def scalar(*args):
            return sum(jnp.sum(jnp.sin(y)) for y in jax.tree.leaves(f(*args)))

        return jax.hessian(scalar, tuple(range(len(primals))))

    got, want = curvature(update)(*primals), curvature(formula)(*primals)
    assert tree_allclose(got, want, rtol=1e-10, atol=1e-10)


def tree_equal(x, y) -> bool:
    """Bit-for-bit equality of two PyTrees of arrays."""
    if jax.tree.structure(x) != jax.tree.structure(y):
        return False
    return all(
        jnp.shape(a) == jnp.shape(b) and np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y))
    )


def with_options(stack, **options) -> stackrnn.StackedRNN:
    """`stack` with some of its options changed."""
    fields = {f.name: getattr(stack, f.name) for f in dataclasses.fields(stack)}
    return stackrnn.StackedRNN(**{**fields, **options})


def to_float64(tree):
    """Every floating-point array of `tree` cast to float64 (needs `x64(True)`)."""
    return jax.tree.map(
        lambda p: p.astype(jnp.float64) if eqx.is_inexact_array(p) else p, tree
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
