"""The fused path (the `stackrnn-kernels` accelerator) equals the reference path:
values and gradients with respect to parameters, inputs and initial states, for every
cell it takes, with and without biases, reversed, under `jit` and both orders of
`vmap` and `grad`; float64 to 1e-10, float32 to 1e-5. Without the accelerator, the
same calls take the pure-JAX paths."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest
from hypothesis import given, strategies as st

import stackrnn
from stackrnn import _fused
from stackrnn._layer import run_layer, scan_reference

from .helpers import tree_allclose, x64


needs_kernels = pytest.mark.skipif(
    not _fused.available(),
    reason="the stackrnn-kernels accelerator is not installed (pip install ./kernels)",
)

KINDS = ("tanh", "relu", "gru", "lstm")
# (batch, time, input_size, hidden_size): widths below, at and off the 16 floats of
# a SIMD vector; 37 rows split over threads into blocks of 4 and a remainder.
SHAPES = ((3, 4, 3, 5), (37, 3, 6, 20), (2, 5, 4, 32))
TOLERANCE = {jnp.float64: 1e-10, jnp.float32: 1e-5}


def _cell(kind, input_size, hidden_size, bias, dtype, key):
    if kind in ("tanh", "relu"):
        return stackrnn.ElmanCell(
            input_size, hidden_size, nonlinearity=kind, bias=bias, dtype=dtype, key=key
        )
    make = stackrnn.GRUCell if kind == "gru" else stackrnn.LSTMCell
    return make(input_size, hidden_size, bias=bias, dtype=dtype, key=key)


def _random_state(cell, key):
    leaves, tree = jax.tree.flatten(cell.init_state())
    keys = jr.split(key, len(leaves))
    return tree.unflatten(
        [jr.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    )


def _loss(scan, reverse):
    def loss(cell, xs, state):
        ys, final = scan(cell, xs, state, reverse=reverse)
        return jnp.sum(jnp.sin(ys)) + sum(
            jnp.sum(jnp.cos(f)) for f in jax.tree.leaves(final)
        )

    return loss


@needs_kernels
@given(
    kind=st.sampled_from(KINDS),
    shape=st.sampled_from(SHAPES),
    dtype=st.sampled_from((jnp.float64, jnp.float32)),
    bias=st.booleans(),
    reverse=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fused_equals_reference(kind, shape, dtype, bias, reverse, seed):
    with x64(True):
        batch, time, input_size, hidden_size = shape
        kc, kx, ks = jr.split(jr.key(seed), 3)
        cell = _cell(kind, input_size, hidden_size, bias, dtype, kc)
        assert stackrnn.ByWidth().choose(cell) == "fused"
        xs = jr.normal(kx, (batch, time, input_size), dtype)
        states = jax.vmap(lambda k: _random_state(cell, k))(jr.split(ks, batch))
        tol = dict(rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])

        def outputs(scan):
            def run(cell, xs, states):
                return jax.vmap(lambda x, s: scan(cell, x, s, reverse=reverse))(
                    xs, states
                )

            return run

        def summed(scan):  # grad(vmap(f)): the examples' weight gradients summed
            loss = jax.vmap(_loss(scan, reverse), (None, 0, 0))
            return jax.grad(lambda *a: jnp.sum(loss(*a)), (0, 1, 2))

        def per_example(scan):  # vmap(grad(f)): one weight gradient per example
            return jax.vmap(jax.grad(_loss(scan, reverse), (0, 1, 2)), (None, 0, 0))

        for make in (outputs, summed, per_example):
            got = jax.jit(make(_fused.scan_fused))(cell, xs, states)
            want = make(scan_reference)(cell, xs, states)
            assert tree_allclose(got, want, **tol), make.__name__


@needs_kernels
@pytest.mark.parametrize("kind", KINDS)
def test_stack_takes_the_fused_path_by_default(kind):
    """A whole stack with the default path policy, single examples and unbatched
    initial states
    (the weights and the state reach the kernel without batch axes)."""
    key = jr.key(0)
    cells = tuple(
        _cell(kind, i, 8, True, jnp.float32, k) for i, k in zip((5, 8), jr.split(key))
    )
    xs = jr.normal(jr.key(1), (6, 5))
    assert all(stackrnn.ByWidth().choose(c) == "fused" for c in cells)
    fused = stackrnn.StackedRNN(cells)
    reference = stackrnn.StackedRNN(
        cells, scan=stackrnn.Scan(path=stackrnn.Reference())
    )

    def loss(model):
        ys, state = model(xs)
        return jnp.sum(ys**2) + sum(jnp.sum(s) for s in jax.tree.leaves(state))

    assert tree_allclose(fused(xs), reference(xs), rtol=1e-5, atol=1e-5)
    got = eqx.filter_jit(eqx.filter_grad(loss))(fused).cells
    want = eqx.filter_grad(loss)(reference).cells
    assert tree_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_without_the_accelerator_layers_take_the_jax_paths(monkeypatch):
    """The same call, the accelerator removed: the reference path below `ByWidth`'s
    `min_hidden`, with the reference's numbers (and the fused path's, where it is
    installed)."""
    cell = stackrnn.GRUCell(5, 8, key=jr.key(0))
    xs = jr.normal(jr.key(1), (6, 5))
    state = _random_state(cell, jr.key(2))
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
    key = jr.key(0)
    by_width = stackrnn.ByWidth()
    projected = stackrnn.LSTMCell(3, 4, proj_size=2, key=key)
    assert by_width.choose(projected) == "reference"
    assert by_width.choose(stackrnn.LayerNormGRUCell(3, 4, key=key)) == "reference"
    assert by_width.choose(stackrnn.GRUCell(3, 256, key=key)) == "reference"
    gru = stackrnn.GRUCell(3, 4, key=key)
    assert stackrnn.Fast().choose(gru) == "fast"
    assert stackrnn.Reference().choose(gru) == "reference"

    def refuse(*args, **kwargs):
        raise AssertionError("the fused path was taken")

    monkeypatch.setattr(stackrnn._layer, "scan_fused", refuse)
    xs, state = jnp.ones((3, 3)), gru.init_state()
    fused = stackrnn.Fused()
    run_layer(gru, xs, state, length=2, path=fused)
    run_layer(gru, xs, state, resets=jnp.zeros(3, bool), path=fused)


@needs_kernels
def test_fused_under_checkpoint_and_vmap():
    """`jax.checkpoint` inside `jax.vmap` (as a checkpointed stack runs its layers)
    with an unbatched initial state: every cotangent keeps its example's batch."""
    cell = stackrnn.GRUCell(3, 4, key=jr.key(0))
    xs = jr.normal(jr.key(1), (2, 5, 3))

    def loss(scan):
        def per_example(cell, x):
            ys, _ = jax.checkpoint(scan)(cell, x, cell.init_state())
            return jnp.sum(jnp.sin(ys))

        return jax.grad(lambda c: jnp.sum(jax.vmap(per_example, (None, 0))(c, xs)))

    got = jax.jit(loss(_fused.scan_fused))(cell)
    want = loss(scan_reference)(cell)
    assert tree_allclose(got, want, rtol=1e-5, atol=1e-5)
