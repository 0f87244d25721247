"""The fused path (the `stackrnn-kernels` accelerator) equals the reference path:
values and gradients with respect to parameters, inputs and initial states, for every
cell it takes, with and without biases, reversed, under `jit` and both orders of
`vmap` and `grad`; float64 to 1e-10, float32 to 1e-5. Without the accelerator, the
same calls take the pure-JAX paths."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from hypothesis import given

import stackrnn
from stackrnn import _fused
from stackrnn._kinds import CELL_KINDS
from stackrnn._layer import run_layer, scan_reference

from .helpers import make_cell, random_state, seeds, tree_allclose, x64


needs_kernels = pytest.mark.skipif(
    not _fused.available(),
    reason="the stackrnn-kernels accelerator is not installed (pip install ./kernels)",
)

# (kind, (batch, time, input_size, hidden_size), bias, reverse). The kernel's
# products walk `gates * hidden_size` columns in SIMD vectors of 16 float32 or 8
# float64, in groups of four, then one of three, two or one, then single columns:
# these layers have 5, 32, 60 and 80 columns, which take every group size and leave
# 0, 4, 5 and 12 single columns. 37 rows split over threads into blocks of 4 and a
# remainder; 2 and 3 rows make a single short block.
# Every example runs each layer at both precisions; the shapes stay fixed so that
# the examples after the first reuse their compiled programs.
LAYERS = (
    ("rnn_tanh", (3, 4, 3, 5), True, False),
    ("rnn_relu", (2, 5, 4, 32), False, True),
    ("gru", (37, 3, 6, 20), True, True),
    ("lstm", (37, 3, 6, 20), False, False),
)
# float32 against the float64 reference: the kernel's float32 arithmetic, and its
# inputs rounded to float32.
TOLERANCE = {jnp.float64: 1e-10, jnp.float32: 1e-5}


def _loss(scan, reverse):
    def loss(cell, xs, state):
        ys, final = scan(cell, xs, state, reverse=reverse)
        return jnp.sum(jnp.sin(ys)) + sum(
            jnp.sum(jnp.cos(f)) for f in jax.tree.leaves(final)
        )

    return loss


@eqx.filter_jit
def _batched(scan, cell, xs, states, reverse):
    """The outputs under `vmap`; `grad(vmap(f))`, the examples' weight gradients
    summed; and `vmap(grad(f))`, one weight gradient per example: with respect to
    parameters, inputs and initial states."""
    outputs = jax.vmap(lambda x, s: scan(cell, x, s, reverse=reverse))(xs, states)
    loss = _loss(scan, reverse)

    def summed(cell, xs, states):
        return jnp.sum(jax.vmap(loss, (None, 0, 0))(cell, xs, states))

    per_example = jax.vmap(jax.grad(loss, (0, 1, 2)), (None, 0, 0))
    return (
        outputs,
        jax.grad(summed, (0, 1, 2))(cell, xs, states),
        per_example(cell, xs, states),
    )


def _numpy_cell(kind, input_size, hidden_size, bias, rng):
    """A cell of `kind` whose parameters NumPy draws from N(0, 1 / hidden_size), as
    NumPy arrays: NumPy compiles nothing, where JAX's generators compile a program
    for every new shape."""
    shapes = eqx.filter_eval_shape(
        make_cell, kind, input_size, hidden_size, bias=bias, key=jr.key(0)
    )
    return jax.tree.map(
        lambda p: rng.standard_normal(p.shape) / hidden_size**0.5, shapes
    )


def _as(dtype, tree):
    return jax.tree.map(lambda a: jax.device_put(a.astype(dtype)), tree)


@needs_kernels
@given(seed=seeds)
def test_fused_equals_reference(seed):
    with x64(True):
        for i, (kind, shape, bias, reverse) in enumerate(LAYERS):
            batch, time, input_size, hidden_size = shape
            rng = np.random.default_rng((seed, i))
            cell = _numpy_cell(kind, input_size, hidden_size, bias, rng)
            xs = rng.standard_normal((batch, time, input_size))
            states = jax.tree.map(
                lambda s: rng.standard_normal((batch, *s.shape)),
                jax.eval_shape(cell.init_state),
            )
            want = _batched(
                scan_reference, *_as(jnp.float64, (cell, xs, states)), reverse
            )
            for dtype, tol in TOLERANCE.items():
                args = _as(dtype, (cell, xs, states))
                assert stackrnn.ByWidth().choose(args[0]) == "fused"
                got = _batched(_fused.scan_fused, *args, reverse)
                assert jax.tree.leaves(got)[0].dtype == dtype
                assert tree_allclose(got, want, rtol=tol, atol=tol), (kind, dtype)


@eqx.filter_jit
def _stack_values_and_gradients(stack, xs):
    def loss(stack):
        ys, state = stack(xs)
        return jnp.sum(ys**2) + sum(jnp.sum(s) for s in jax.tree.leaves(state))

    return stack(xs), eqx.filter_grad(loss)(stack).cells


@needs_kernels
def test_stack_takes_the_fused_path_by_default():
    """A whole stack with a layer of every kind, the default path policy, single
    examples and unbatched initial states (the weights and the state reach the
    kernel without batch axes)."""
    rng = np.random.default_rng(0)
    cells, size = [], 5
    for kind in CELL_KINDS:
        cells.append(_as(jnp.float32, _numpy_cell(kind, size, 8, True, rng)))
        size = cells[-1].output_size
    xs = jax.device_put(rng.standard_normal((6, 5)).astype(np.float32))
    assert all(stackrnn.ByWidth().choose(c) == "fused" for c in cells)
    fused = stackrnn.StackedRNN(cells)
    reference = stackrnn.StackedRNN(
        cells, scan=stackrnn.Scan(path=stackrnn.Reference())
    )
    assert tree_allclose(
        _stack_values_and_gradients(fused, xs),
        _stack_values_and_gradients(reference, xs),
        rtol=1e-5,
        atol=1e-5,
    )


def test_without_the_accelerator_layers_take_the_jax_paths(monkeypatch):
    """The same call, the accelerator removed: the reference path below `ByWidth`'s
    `min_hidden`, with the reference's numbers (and the fused path's, where it is
    installed)."""
    rng = np.random.default_rng(0)
    cell, xs = _as(
        jnp.float32, (_numpy_cell("gru", 5, 8, True, rng), rng.normal(size=(6, 5)))
    )
    state = random_state(cell, jr.key(2))
    with_kernels = run_layer(cell, xs, state)
    monkeypatch.setattr(_fused, "kernels", None)
    assert not _fused.available()
    assert stackrnn.ByWidth().choose(cell) == "reference"
    assert stackrnn.Fused().choose(cell) == "fast"
    without = run_layer(cell, xs, state)
    assert tree_allclose(without, scan_reference(cell, xs, state), rtol=0, atol=0)
    assert tree_allclose(without, with_kernels, rtol=1e-5, atol=1e-5)


def test_cells_the_kernels_lack_take_the_jax_paths(monkeypatch):
    """An LSTM with `proj_size`, the layer-normalised cells and layers wider than
    `ByWidth`'s `max_fused` are not fused; neither is a layer with `length` or
    `resets`, nor one whose policy forces another path."""
    rng = np.random.default_rng(0)
    by_width = stackrnn.ByWidth()
    for kind, width in (("lstm_proj", 4), ("gru_ln", 4), ("lstm_ln", 4), ("gru", 256)):
        cell = _as(jnp.float32, _numpy_cell(kind, 3, width, True, rng))
        assert by_width.choose(cell) == "reference", kind
    gru = _as(jnp.float32, _numpy_cell("gru", 3, 4, True, rng))
    assert by_width.choose(gru) == "fused"
    assert stackrnn.Fast().choose(gru) == "fast"
    assert stackrnn.Reference().choose(gru) == "reference"

    def refuse(*args, **kwargs):
        raise AssertionError("the fused path was taken")

    monkeypatch.setattr(stackrnn._layer, "scan_fused", refuse)
    xs, state = jnp.ones((3, 3)), gru.init_state()
    fused = stackrnn.Fused()
    # Traced, not run: the path is chosen at trace time.
    jax.eval_shape(lambda: run_layer(gru, xs, state, length=2, path=fused))
    resets = jnp.zeros(3, bool)
    jax.eval_shape(lambda: run_layer(gru, xs, state, resets=resets, path=fused))


@needs_kernels
def test_fused_under_checkpoint_and_vmap():
    """`jax.checkpoint` inside `jax.vmap` (as a checkpointed stack runs its layers)
    with an unbatched initial state: every cotangent keeps its example's batch."""
    rng = np.random.default_rng(0)
    cell, xs = _as(
        jnp.float32, (_numpy_cell("gru", 3, 4, True, rng), rng.normal(size=(2, 5, 3)))
    )

    def loss(scan):
        def per_example(cell, x):
            ys, _ = jax.checkpoint(scan)(cell, x, cell.init_state())
            return jnp.sum(jnp.sin(ys))

        return jax.grad(lambda c: jnp.sum(jax.vmap(per_example, (None, 0))(c, xs)))

    got = jax.jit(loss(_fused.scan_fused))(cell)
    want = jax.jit(loss(scan_reference))(cell)
    assert tree_allclose(got, want, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_fused_under_nested_vmap(kind):
    """Two levels of `jax.vmap`: the outer over two cells (per-example weights) and
    their initial states, the inner over three sequences each (sharing the cell and
    the state): gradients with respect to the cells, the inputs and the states,
    float64. Every argument then reaches the kernels with two batch axes, some of
    them of size 1."""
    rng = np.random.default_rng(1)
    with x64(True):
        cells = [_numpy_cell(kind, 3, 4, True, rng) for _ in range(2)]
        cells = _as(jnp.float64, jax.tree.map(lambda *a: np.stack(a), *cells))
        xs = jnp.asarray(rng.standard_normal((2, 3, 5, 3)))
        states = jax.tree.map(
            lambda s: jnp.asarray(rng.standard_normal((2, *s.shape))),
            jax.eval_shape(jax.tree.map(lambda a: a[0], cells).init_state),
        )

        def run(scan):
            loss = _loss(scan, False)

            def per_cell(cell, xs, state):
                inner = jax.vmap(loss, (None, 0, None))
                return jax.grad(lambda *a: jnp.sum(inner(*a)), (0, 1, 2))(
                    cell, xs, state
                )

            return jax.jit(jax.vmap(per_cell))(cells, xs, states)

        got, want = run(_fused.scan_fused), run(scan_reference)
        assert tree_allclose(got, want, rtol=1e-10, atol=1e-10)
