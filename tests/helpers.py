import contextlib
import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from hypothesis import strategies as st

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
    random_state as random_state,
    stack_by_hand as stack_by_hand,
)


# One place for what many test files share.
DIRECTIONS = ("forward", "reverse", "bidirectional")
TOL32 = dict(rtol=1e-5, atol=1e-6)  # float32: compiled versus op by op
TOL64 = dict(rtol=1e-10, atol=1e-10)  # float64: two algorithms, same math
seeds = st.integers(0, 2**16)


def structures(cases, *, quick: int, ids=None):
    """`cases` for `pytest.mark.parametrize`, every one but the first `quick` marked
    `slow`. Each structure compiles programs of its own, the quick loop's main cost:
    `pytest -m "not slow"` checks the property on the first ones, the full suite on
    all (order a list so that the first ones catch what matters most). A tuple case
    holds the arguments of several parameter names, or of one that is a tuple."""
    ids = [None] * len(cases) if ids is None else list(ids)
    return [
        pytest.param(
            *(case if isinstance(case, tuple) else (case,)),
            id=ident,
            marks=[pytest.mark.slow] if i >= quick else [],
        )
        for i, (case, ident) in enumerate(zip(cases, ids, strict=True))
    ]


def directions():
    """`DIRECTIONS` for `pytest.mark.parametrize`, bidirectional alone in the quick
    loop: one stack that reads both ways."""
    return structures(sorted(DIRECTIONS, key=lambda d: d != "bidirectional"), quick=1)


@eqx.filter_jit
def call(model, xs, state=None, **options):
    """`model(xs, state, **options)`, compiled once per structure of its arguments
    (array options traced, the others static): a property test's examples of one
    shape reuse one program, where a new closure under `jit` would compile anew."""
    return model(xs, state, **options)


# The by-hand reference, compiled likewise (its Python loops unrolled once per
# structure); eager, it dispatches every operation of every step on its own.
by_hand = eqx.filter_jit(stack_by_hand)


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
        # Cut from one draw: a program compiled per total size, not per leaf shape.
        leaves, treedef = jax.tree.flatten(tree)
        sizes = [math.prod(x.shape) for x in leaves]
        flat = np.asarray(jr.normal(key, (sum(sizes),)))
        parts = np.split(flat, np.cumsum(sizes)[:-1])
        return treedef.unflatten(
            [jax.device_put(p.reshape(x.shape)) for p, x in zip(parts, leaves)]
        )

    k1, k2 = jr.split(key)
    tangents = draw(k1, primals)
    cotangent = draw(k2, jax.eval_shape(formula, *primals))

    got = _derivatives(update, primals, tangents, cotangent)
    want = _derivatives(formula, primals, tangents, cotangent)
    for order, (a, b) in enumerate(zip(got, want)):
        tol = 1e-10 if order == 2 else 1e-12
        assert tree_allclose(a, b, rtol=tol, atol=tol), ("jvp", "vjp", "hessian")[order]


@eqx.filter_jit
def _derivatives(f, primals, tangents, cotangent):
    """`f`'s jvp, vjp and Hessian (of a scalar made of its outputs) at `primals`, in
    one program compiled per function and shapes: every example reuses it, where the
    same derivatives taken eagerly compiled a program per operation and shape."""

    def scalar(*args):
        return sum(jnp.sum(jnp.sin(y)) for y in jax.tree.leaves(f(*args)))

    return (
        jax.jvp(f, primals, tangents),
        jax.vjp(f, *primals)[1](cotangent),
        jax.hessian(scalar, tuple(range(len(primals))))(*primals),
    )


def tree_equal(x, y) -> bool:
    """Bit-for-bit equality of two PyTrees of arrays."""
    if jax.tree.structure(x) != jax.tree.structure(y):
        return False
    return all(
        jnp.shape(a) == jnp.shape(b) and np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y))
    )


# The path policies by the one-liners' former `fast` flag.
PATHS = {None: stackrnn.ByWidth(), True: stackrnn.Fast(), False: stackrnn.Reference()}
_SCAN = ("reverse", "unroll", "fast", "checkpoint", "scan_layers")
_CELL = ("recurrent_dropout", "zoneout", "weight_drop")


def wrap(cell, *, recurrent_dropout=0.0, zoneout=0.0, weight_drop=0.0):
    """`cell` in the public wrappers its rates ask for, as the one-liners build."""
    if weight_drop:
        cell = stackrnn.WeightDrop(cell, weight_drop)
    if recurrent_dropout:
        cell = stackrnn.RecurrentDropout(cell, recurrent_dropout)
    if any(zoneout) if isinstance(zoneout, tuple) else zoneout:
        cell = stackrnn.Zoneout(cell, zoneout)
    return cell


def _scan(
    scan=None,
    *,
    reverse=None,
    unroll=None,
    fast="keep",
    checkpoint="keep",
    scan_layers="keep",
):
    scan = stackrnn.Scan() if scan is None else scan
    changes = dict(reverse=reverse, unroll=unroll)
    if fast != "keep":
        changes["path"] = PATHS[fast]
    if checkpoint != "keep":
        changes["checkpoint"] = stackrnn.Chunks.from_flag(checkpoint)
    scan = dataclasses.replace(
        scan, **{k: v for k, v in changes.items() if v is not None}
    )
    if scan_layers != "keep":
        scan = dataclasses.replace(scan, scan_layers=scan_layers)
    return scan


def stack_of(cells, *, backward_cells=None, **options) -> stackrnn.StackedRNN:
    """A stack of `cells` with the options by their one-liner names: the per-cell
    rates wrap every cell, `reverse`, `unroll`, `fast` and `checkpoint` make its
    `Scan`, the rest go to `StackedRNN`."""
    rates = {k: options.pop(k) for k in _CELL if k in options}
    scan = _scan(**{k: options.pop(k) for k in _SCAN if k in options})
    cells = [wrap(c, **rates) for c in cells]
    if backward_cells is not None:
        backward_cells = [wrap(c, **rates) for c in backward_cells]
    return stackrnn.StackedRNN(
        cells, backward_cells=backward_cells, scan=scan, **options
    )


def with_options(stack, **options) -> stackrnn.StackedRNN:
    """`stack` with some of its between-layer or `Scan` options changed."""
    scan = _scan(stack.scan, **{k: options.pop(k) for k in _SCAN if k in options})
    fields = dict(
        dropout=stack.dropout,
        variational=stack.variational,
        residual=stack.residual,
        inference=stack.inference,
    )
    return stackrnn.StackedRNN(
        stack.cells,
        backward_cells=stack.backward_cells,
        scan=scan,
        **{**fields, **options},
    )


def to_float64(tree):
    """Every floating-point array of `tree` cast to float64 (needs `x64(True)`)."""
    return jax.tree.map(
        lambda p: p.astype(jnp.float64) if eqx.is_inexact_array(p) else p, tree
    )


def make_stack(cfg: Config, key, direction: str, **kwargs) -> stackrnn.StackedRNN:
    """A stack of `cfg`'s cells reading `"forward"`, `"reverse"` or
    `"bidirectional"` (each backward cell drawn with its own key)."""
    if direction != "bidirectional":
        cells = make_cells(cfg, key)
        return stack_of(cells, reverse=direction == "reverse", **kwargs)
    cells, backward = [], []
    size = cfg.input_size
    for width, k in zip(cfg.widths, jr.split(key, cfg.num_layers)):
        kf, kb = jr.split(k)
        cells.append(make_cell(cfg.kind, size, width, bias=cfg.bias, key=kf))
        backward.append(make_cell(cfg.kind, size, width, bias=cfg.bias, key=kb))
        size = cells[-1].output_size + backward[-1].output_size
    return stack_of(cells, backward_cells=backward, **kwargs)
