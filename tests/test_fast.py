"""The fast path equals the reference path: values and gradients, for every cell the
fast path takes, under `jit`, `vmap` (both orders of `vmap` and `grad`), reversed, and
from random initial states. In float64, so that the tolerance can be tight: the two
paths sum the same products in different orders, which in float32 differs by rounding
only."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from hypothesis import given

import stackrnn
from stackrnn._fast import scan_fast, supports
from stackrnn._layer import scan_reference

from .helpers import (
    make_cell,
    seeds,
    stack_of,
    TOL32,
    TOL64,
    tree_allclose,
    x64,
)


# One layer of each kind the fast path takes, with and without biases, each read
# forwards and backwards: every example checks all four, at shapes fixed so that
# the examples after the first reuse their compiled programs.
LAYERS = (
    ("rnn_tanh", True, False),  # (kind, bias, reverse)
    ("rnn_relu", False, True),
    ("gru", True, True),
    ("lstm", False, False),
)
INPUT, HIDDEN, TIME, BATCH = 3, 4, 5, 3


def _draw(rng, shapes, scale=1.0):
    """The arrays of `shapes` (a PyTree of arrays or `jax.ShapeDtypeStruct`s, as
    `eqx.filter_eval_shape` gives) drawn from N(0, scale^2) by NumPy: NumPy compiles
    nothing, where JAX's generators compile a program for every new shape."""

    def draw(s):
        if not isinstance(s, jax.ShapeDtypeStruct | jax.Array):
            return s
        return jax.device_put((scale * rng.standard_normal(s.shape)).astype(s.dtype))

    return jax.tree.map(draw, shapes)


def _cell(kind, input_size, bias, rng):
    """A cell of `kind` with `HIDDEN` units and parameters from N(0, 1 / HIDDEN)."""
    shapes = eqx.filter_eval_shape(
        make_cell, kind, input_size, HIDDEN, bias=bias, key=jr.key(0)
    )
    return _draw(rng, shapes, HIDDEN**-0.5)


def _state(cell, rng, *batch):
    """A random initial state for `cell`, with leading axes `batch`."""
    shapes = jax.eval_shape(cell.init_state)
    return _draw(
        rng,
        jax.tree.map(
            lambda s: jax.ShapeDtypeStruct((*batch, *s.shape), s.dtype), shapes
        ),
    )


def _loss(scan, reverse):
    """A loss that weighs every output and the final state differently."""

    def loss(cell, xs, state):
        ys, final = scan(cell, xs, state, reverse=reverse)
        weights = jnp.arange(1, ys.size + 1, dtype=ys.dtype).reshape(ys.shape)
        out = jnp.sum(jnp.sin(ys) * weights)
        return out + sum(jnp.sum(jnp.cos(f)) for f in jax.tree.leaves(final))

    return loss


@eqx.filter_jit
def _values_and_gradients(scan, cell, xs, state, reverse=False):
    """`scan`'s outputs and final state, and the gradients of `_loss` with respect
    to the parameters, the inputs and the initial state."""
    values = scan(cell, xs, state, reverse=reverse)
    return values, jax.grad(_loss(scan, reverse), (0, 1, 2))(cell, xs, state)


@eqx.filter_jit
def _batched_gradients(scan, cell, xs, states, reverse):
    """`grad(vmap(f))`, which sums the examples' weight gradients, and
    `vmap(grad(f))`, which keeps one per example."""
    loss = _loss(scan, reverse)

    def summed(cell, xs, states):
        return jnp.sum(jax.vmap(loss, (None, 0, 0))(cell, xs, states))

    per_example = jax.vmap(jax.grad(loss, (0, 1, 2)), (None, 0, 0))
    return jax.grad(summed, (0, 1, 2))(cell, xs, states), per_example(cell, xs, states)


@given(seed=seeds)
def test_fast_equals_reference_values_and_gradients(seed):
    with x64(True):
        for i, (kind, bias, reverse) in enumerate(LAYERS):
            rng = np.random.default_rng((seed, i))
            cell = _cell(kind, INPUT, bias, rng)
            assert supports(cell) and cell.weight_ih.dtype == jnp.float64
            xs, state = (
                _draw(rng, jax.ShapeDtypeStruct((TIME, INPUT), jnp.float64)),
                _state(cell, rng),
            )
            assert tree_allclose(
                _values_and_gradients(scan_fast, cell, xs, state, reverse),
                _values_and_gradients(scan_reference, cell, xs, state, reverse),
                **TOL64,
            ), (kind, bias, reverse)


@given(seed=seeds)
def test_fast_under_vmap_both_orders(seed):
    """`grad(vmap(f))` sums the examples' weight gradients; `vmap(grad(f))` keeps one
    per example. The fast path must give both, as the reference does, for a state
    that is one array (GRU, read backwards) and one that is a tuple (LSTM)."""
    with x64(True):
        for kind, reverse in (("gru", True), ("lstm", False)):
            rng = np.random.default_rng((seed, reverse))
            cell = _cell(kind, INPUT, True, rng)
            xs = _draw(rng, jax.ShapeDtypeStruct((BATCH, TIME, INPUT), jnp.float64))
            states = _state(cell, rng, BATCH)
            assert tree_allclose(
                _batched_gradients(scan_fast, cell, xs, states, reverse),
                _batched_gradients(scan_reference, cell, xs, states, reverse),
                **TOL64,
            ), kind


@eqx.filter_jit
def _stack_values_and_gradients(stack, xs):
    def loss(stack):
        ys, state = jax.vmap(stack)(xs)
        return jnp.sum(ys**2) + sum(jnp.sum(s) for s in jax.tree.leaves(state))

    return jax.vmap(stack)(xs), eqx.filter_grad(loss)(stack).cells


@given(seed=seeds)
def test_stacks_agree_on_both_paths(seed):
    """A whole stack, batched with `vmap`, whose layers the fast path takes or leaves
    to the reference (an LSTM with `proj_size`; the layer-normalised cells, which
    tests/test_norm_cells.py covers), with and without biases; float32: equal to
    float32 rounding."""
    rng = np.random.default_rng(seed)
    cells, size = [], INPUT
    for kind, bias in (("gru", False), ("lstm_proj", True), ("rnn_relu", True)):
        cells.append(_cell(kind, size, bias, rng))
        size = cells[-1].output_size
    xs = _draw(rng, jax.ShapeDtypeStruct((2, TIME, INPUT), jnp.float32))
    got = _stack_values_and_gradients(stack_of(cells, fast=True), xs)
    want = _stack_values_and_gradients(stack_of(cells, fast=False), xs)
    assert tree_allclose(got[0], want[0], **TOL32)
    assert tree_allclose(got[1], want[1], rtol=1e-4, atol=1e-4)


class _OddGates(stackrnn.AbstractAffineCell):
    """A user's affine cell whose gates are one wider than its state, so not a whole
    number of blocks of `hidden_size`: the fast path reads them as one array."""

    weight_ih: jax.Array
    weight_hh: jax.Array
    bias_ih: jax.Array
    bias_hh: None
    input_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)

    def __init__(self, input_size, hidden_size, key):
        k1, k2, k3 = jr.split(key, 3)
        self.weight_ih = jr.normal(k1, (hidden_size + 1, input_size), jnp.float64)
        self.weight_hh = jr.normal(k2, (hidden_size + 1, hidden_size), jnp.float64)
        self.bias_ih = jr.normal(k3, (hidden_size + 1,), jnp.float64)
        self.bias_hh = None
        self.input_size, self.hidden_size = input_size, hidden_size

    @property
    def output_size(self):
        return self.hidden_size

    def init_state(self):
        return jnp.zeros(self.hidden_size, jnp.float64)

    def pointwise(self, gates_x, gates_h, state):
        gates = gates_x + gates_h
        return jnp.tanh(gates[:-1]) * jax.nn.sigmoid(gates[-1]) + 0.5 * state

    def output(self, state):
        return state


def test_gates_not_in_blocks_of_the_width():
    with x64(True):
        rng = np.random.default_rng(0)
        cell = _draw(rng, eqx.filter_eval_shape(_OddGates, INPUT, HIDDEN, jr.key(0)))
        assert supports(cell)
        xs = _draw(rng, jax.ShapeDtypeStruct((TIME, INPUT), jnp.float64))
        state = _state(cell, rng)
        assert tree_allclose(
            _values_and_gradients(scan_fast, cell, xs, state),
            _values_and_gradients(scan_reference, cell, xs, state),
            **TOL64,
        )


def test_which_cells_take_the_fast_path():
    rng = np.random.default_rng(0)
    assert supports(_cell("rnn_tanh", INPUT, True, rng))
    assert supports(_cell("gru", INPUT, False, rng))
    assert supports(_cell("lstm", INPUT, True, rng))
    # `weight_hr` is a parameter the fast path does not differentiate.
    assert not supports(_cell("lstm_proj", INPUT, True, rng))


@pytest.mark.parametrize("option", ["length", "resets"])
def test_sequence_options_take_the_reference_path(option):
    """`length` and `resets` exist on the reference path only; a stack given them
    gives the reference path's numbers."""
    rng = np.random.default_rng(0)
    cells = [_cell("gru", INPUT, True, rng)]
    xs = _draw(rng, jax.ShapeDtypeStruct((TIME, INPUT), jnp.float32))
    kwargs = dict(length=3) if option == "length" else dict(resets=np.arange(5) == 2)
    fast = stack_of(cells, fast=True)(xs, **kwargs)
    reference = stack_of(cells, fast=False)(xs, **kwargs)
    assert tree_allclose(fast, reference, rtol=0, atol=0)


@pytest.mark.parametrize("width, fast", [(511, False), (512, True)])
def test_default_picks_the_path_by_width(width, fast, monkeypatch):
    """`ByWidth()`, the default path policy, takes the fast path from `hidden_size`
    512 on without the accelerator (tests/test_fused.py covers it; traced, not
    run)."""
    monkeypatch.setattr(stackrnn._fused, "kernels", None)
    shapes = eqx.filter_eval_shape(stackrnn.GRU, 2, width, key=jr.key(0))
    stack = _draw(np.random.default_rng(0), shapes)
    jaxpr = str(jax.make_jaxpr(stack)(np.zeros((2, 2), np.float32)))
    assert ("custom_vjp_call" in jaxpr) == fast


def test_default_takes_the_fast_path_at_every_width_on_a_gpu(monkeypatch):
    """On a GPU (JAX's default backend, faked here: CI has none) `ByWidth()` takes
    the fast path below `min_hidden` too, where the fast path supports the cell."""
    rng = np.random.default_rng(0)
    narrow = _cell("gru", INPUT, True, rng)
    norm = _cell("gru_ln", INPUT, True, rng)
    monkeypatch.setattr(stackrnn._fused, "kernels", None)
    assert stackrnn.ByWidth().choose(narrow) == "reference"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert stackrnn.ByWidth().choose(narrow) == "fast"
    assert stackrnn.ByWidth().choose(norm) == "reference"
