"""The layer-normalised cells against hand-written NumPy float64 references of their
equations, their invariance to the scale of the weights, and their path through a
layer."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from hypothesis import given, strategies as st
from jax.tree_util import Partial

import stackrnn
from stackrnn._fast import supports
from stackrnn.testing import check_layer_wiring, check_step_matches_scan

from .helpers import (
    assert_derivatives_match,
    make_cell,
    seeds,
    stack_of,
    tree_equal,
    x64,
)


KEY = jr.key(0)


def _randomised(cell, rng):
    """`cell` (or its shapes, as `eqx.filter_eval_shape` gives them) with every
    array, gains and shifts included, drawn from N(0, 1), so that no parameter is
    left at a value (1, 0) that would hide its misuse. NumPy draws them: it compiles
    nothing, where JAX's generators compile a program for every new shape."""

    def draw(x):
        if not isinstance(x, jax.ShapeDtypeStruct | jax.Array):
            return x
        return jax.device_put(rng.standard_normal(x.shape).astype(x.dtype))

    return jax.tree.map(draw, cell)


def _cell(make, rng, *args, **kwargs):
    """`make(*args, **kwargs)`, a cell, with `_randomised` parameters."""
    return _randomised(eqx.filter_eval_shape(make, *args, key=KEY, **kwargs), rng)


def _np(x):
    return None if x is None else np.asarray(x, np.float64)


def _ln(a, norm, eps):
    """Layer normalisation as Ba et al. write it: over all entries of `a`."""
    mean = a.mean()
    var = ((a - mean) ** 2).mean()
    out = _np(norm.weight) * (a - mean) / np.sqrt(var + eps)
    return out if norm.bias is None else out + _np(norm.bias)


def _sigmoid(a):
    return 1 / (1 + np.exp(-a))


def _gru_reference(cell, xs, h, eps):
    w_ih, w_hh, hs = _np(cell.weight_ih), _np(cell.weight_hh), []
    for x in _np(xs):
        x_r, x_z, x_n = np.split(_ln(w_ih @ x, cell.norm_ih, eps), 3)
        h_r, h_z, h_n = np.split(_ln(w_hh @ h, cell.norm_hh, eps), 3)
        r = _sigmoid(x_r + h_r)
        z = _sigmoid(x_z + h_z)
        n = np.tanh(x_n + r * h_n)
        h = (1 - z) * n + z * h
        hs.append(h)
    return np.stack(hs), h


def _lstm_reference(cell, xs, state, eps):
    w_ih, w_hh, w_hr = _np(cell.weight_ih), _np(cell.weight_hh), _np(cell.weight_hr)
    (h, c), hs = state, []
    for x in _np(xs):
        gates = _ln(w_ih @ x, cell.norm_ih, eps) + _ln(w_hh @ h, cell.norm_hh, eps)
        i, f, g, o = np.split(gates, 4)
        c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
        h = _sigmoid(o) * np.tanh(_ln(c, cell.norm_c, eps))
        if w_hr is not None:
            h = w_hr @ h
        hs.append(h)
    return np.stack(hs), (h, c)


# Each cell with and without shifts, each `eps` with each cell (0.5 is large enough
# to show where it enters); every example checks all four, at shapes fixed so that
# the examples after the first reuse their compiled programs.
NORMALISED = (
    (stackrnn.LayerNormGRUCell, dict(bias=True, eps=0.5)),
    (stackrnn.LayerNormGRUCell, dict(bias=False, eps=1e-5)),
    (stackrnn.LayerNormLSTMCell, dict(proj_size=2, bias=True, eps=1e-5)),
    (stackrnn.LayerNormLSTMCell, dict(bias=False, eps=0.5)),
)


@eqx.filter_jit
def _run_fast(cell, xs, state):
    return stack_of([cell], fast=True)(xs, state)


@given(seed=seeds)
def test_matches_a_numpy_reference(seed):
    """Gains, shifts and weights all random, the initial state too; the stack runs
    with `fast=True`, which these cells must decline."""
    with x64(True):
        for i, (make, kwargs) in enumerate(NORMALISED):
            rng = np.random.default_rng((seed, i))
            cell = _cell(make, rng, 3, 4, **kwargs)
            xs = jax.device_put(rng.standard_normal((4, 3)))
            state = _randomised(jax.eval_shape(cell.init_state), rng)
            ys, final = _run_fast(cell, xs, jax.tree.map(lambda s: s[None], state))
            lstm = make is stackrnn.LayerNormLSTMCell
            reference = _lstm_reference if lstm else _gru_reference
            state = jax.tree.map(_np, state)
            want_ys, want_final = reference(cell, xs, state, kwargs["eps"])
            assert ys.dtype == jnp.float64
            np.testing.assert_allclose(ys, want_ys, rtol=1e-12, atol=1e-12)
            for got, want in zip(jax.tree.leaves(final), jax.tree.leaves(want_final)):
                np.testing.assert_allclose(got[0], want, rtol=1e-12, atol=1e-12)


def _ln_formula(a, norm):
    mean = jnp.mean(a)
    var = jnp.mean((a - mean) ** 2)
    return norm.weight * (a - mean) / jnp.sqrt(var + norm.eps) + norm.bias


def _split_formula(a, parts):
    size = a.shape[0] // parts
    return [a[k * size : (k + 1) * size] for k in range(parts)]


def _gru_ln_formula(cell, gates_x, gates_h, h):
    x_r, x_z, x_n = _split_formula(_ln_formula(gates_x, cell.norm_ih), 3)
    h_r, h_z, h_n = _split_formula(_ln_formula(gates_h, cell.norm_hh), 3)
    r = 1 / (1 + jnp.exp(-(x_r + h_r)))
    z = 1 / (1 + jnp.exp(-(x_z + h_z)))
    n = jnp.tanh(x_n + r * h_n)
    return (1 - z) * n + z * h


def _lstm_ln_formula(cell, gates_x, gates_h, state):
    _, c = state
    gates = _ln_formula(gates_x, cell.norm_ih) + _ln_formula(gates_h, cell.norm_hh)
    i, f, g, o = _split_formula(gates, 4)
    i, f, o = (1 / (1 + jnp.exp(-a)) for a in (i, f, o))
    c = f * c + i * jnp.tanh(g)
    return o * jnp.tanh(_ln_formula(c, cell.norm_c)), c


@eqx.filter_jit
def _pointwise(cell, gates_x, gates_h, state):
    return cell.pointwise(gates_x, gates_h, state)


_FORMULAS = {
    stackrnn.LayerNormGRUCell: eqx.filter_jit(_gru_ln_formula),
    stackrnn.LayerNormLSTMCell: eqx.filter_jit(_lstm_ln_formula),
}


@pytest.mark.parametrize("make", list(_FORMULAS), ids=["gru_ln", "lstm_ln"])
@given(seed=seeds)
def test_step_derivatives_match_the_formula(make, seed):
    """A step's hand-written derivatives (the GRU update; the LSTM's sigmoids and
    tanhs) give autodiff's numbers for the equations above in forward mode, reverse
    mode and at second order, gains and shifts random. One width, functions jitted:
    the examples after the first reuse the programs compiled for it."""
    with x64(True):
        rng = np.random.default_rng(seed)
        cell = _cell(make, rng, 1, 3)
        gates = jax.ShapeDtypeStruct(cell.weight_ih.shape[:1], jnp.float64)
        state = jax.eval_shape(cell.init_state)
        primals = _randomised((gates, gates, state), rng)
        assert_derivatives_match(
            Partial(_pointwise, cell),
            Partial(_FORMULAS[make], cell),
            primals,
            jr.key(seed),
        )


@eqx.filter_jit
def _scaled_outputs(cell, xs, scale_ih, scale_hh):
    """The outputs of a stack of `cell` with `weight_ih` and `weight_hh` scaled."""
    cell = eqx.tree_at(
        lambda c: (c.weight_ih, c.weight_hh),
        cell,
        (scale_ih * cell.weight_ih, scale_hh * cell.weight_hh),
    )
    return stack_of([cell])(xs)[0]


@given(
    scale_ih=st.floats(1e-2, 1e2),
    scale_hh=st.floats(1e-2, 1e2),
    seed=seeds,
)
def test_invariant_to_the_scale_of_the_weights(scale_ih, scale_hh, seed):
    """LN(c W x) = LN(W x) for c > 0 (up to `eps`, here negligible): the outputs do
    not depend on the scale of `weight_ih` or `weight_hh`."""
    with x64(True):
        rng = np.random.default_rng(seed)
        one, scales = np.float64(1), (np.float64(scale_ih), np.float64(scale_hh))
        for make in (stackrnn.LayerNormGRUCell, stackrnn.LayerNormLSTMCell):
            cell = _cell(make, rng, 3, 4, eps=1e-30)
            xs = jax.device_put(rng.standard_normal((5, 3)))
            ys = _scaled_outputs(cell, xs, one, one)
            ys_scaled = _scaled_outputs(cell, xs, *scales)
            np.testing.assert_allclose(ys_scaled, ys, rtol=1e-9, atol=1e-12)


def test_unnormalised_cells_are_not_scale_invariant():
    """The property above is a property of the normalisation: a GRU fails it."""
    rng = np.random.default_rng(0)
    cell = _cell(stackrnn.GRUCell, rng, 3, 4)
    xs = jax.device_put(rng.standard_normal((5, 3)).astype(np.float32))
    one, ten = np.float32(1), np.float32(10)
    ys = _scaled_outputs(cell, xs, one, one)
    assert not np.allclose(ys, _scaled_outputs(cell, xs, ten, one), atol=1e-3)


def test_take_the_reference_path_even_when_fast(monkeypatch):
    """Their gains and shifts are parameters the fast path does not handle: `fast=True`
    runs them on the reference path, the same program (so the same values and
    gradients) as with `fast=False`."""
    rng = np.random.default_rng(0)
    cells = [
        _cell(stackrnn.LayerNormGRUCell, rng, 3, 4),
        _cell(stackrnn.LayerNormLSTMCell, rng, 4, 4),
        _cell(stackrnn.LayerNormLSTMCell, rng, 4, 4, proj_size=2),
    ]
    assert not any(supports(c) for c in cells)

    def no_fast_path(*args, **kwargs):
        raise AssertionError("the fast path ran")

    monkeypatch.setattr("stackrnn._layer.scan_fast", no_fast_path)
    xs = jax.device_put(rng.standard_normal((6, 3)).astype(np.float32))

    def loss(stack):
        ys, _ = stack(xs)
        return jnp.sum(ys**2)

    value_and_grad = eqx.filter_value_and_grad(loss)
    fast, reference = stack_of(cells, fast=True), stack_of(cells, fast=False)
    jaxpr = eqx.filter_make_jaxpr(value_and_grad)
    assert str(jaxpr(fast)[0]) == str(jaxpr(reference)[0])
    # The gains and shifts are trained: their gradients are not zero.
    _, grads = eqx.filter_jit(value_and_grad)(fast)
    for cell in grads.cells:
        for norm in (cell.norm_ih, cell.norm_hh):
            assert np.abs(norm.weight).sum() > 0 and np.abs(norm.bias).sum() > 0


def test_same_weights_as_the_plain_cells_for_a_key():
    init = stackrnn.NormalInit(0.5)
    pairs = [
        (stackrnn.GRUCell, stackrnn.LayerNormGRUCell, {}),
        (stackrnn.LSTMCell, stackrnn.LayerNormLSTMCell, {}),
        (stackrnn.LSTMCell, stackrnn.LayerNormLSTMCell, {"proj_size": 2}),
    ]
    for plain, normed, kwargs in pairs:
        a = plain(3, 4, init=init, key=KEY, **kwargs)
        b = normed(3, 4, init=init, key=KEY, **kwargs)
        assert tree_equal(
            (a.weight_ih, a.weight_hh, getattr(a, "weight_hr", None)),
            (b.weight_ih, b.weight_hh, getattr(b, "weight_hr", None)),
        )
        assert b.bias_ih is None and b.bias_hh is None


@pytest.mark.parametrize("bias", [True, False])
def test_gains_start_at_one_and_shifts_at_zero(bias):
    gru = stackrnn.LayerNormGRUCell(3, 4, bias=bias, key=KEY)
    lstm = stackrnn.LayerNormLSTMCell(3, 4, bias=bias, key=KEY)
    norms = [(gru.norm_ih, 12), (gru.norm_hh, 12)]
    norms += [(lstm.norm_ih, 16), (lstm.norm_hh, 16), (lstm.norm_c, 4)]
    for norm, size in norms:
        assert tree_equal(norm.weight, jnp.ones(size))
        if bias:
            assert tree_equal(norm.bias, jnp.zeros(size))
        else:
            assert norm.bias is None


def test_forget_bias_sets_the_forget_block_of_the_input_shift():
    cell = stackrnn.LayerNormLSTMCell(3, 4, forget_bias=1.5, key=KEY)
    want = np.zeros(16)
    want[4:8] = 1.5
    np.testing.assert_array_equal(cell.norm_ih.bias, want)
    np.testing.assert_array_equal(cell.norm_hh.bias, np.zeros(16))
    np.testing.assert_array_equal(cell.norm_c.bias, np.zeros(4))


def test_low_precision_parameters_and_state():
    rng = np.random.default_rng(0)
    for make in (stackrnn.LayerNormGRUCell, stackrnn.LayerNormLSTMCell):
        cell = _cell(make, rng, 3, 4, dtype=jnp.bfloat16)
        assert {x.dtype for x in jax.tree.leaves(cell)} == {jnp.dtype(jnp.bfloat16)}
        ys, final = stack_of([cell])(np.ones((5, 3), jnp.bfloat16))
        assert ys.dtype == jnp.bfloat16
        assert {x.dtype for x in jax.tree.leaves(final)} == {jnp.dtype(jnp.bfloat16)}


def test_constructors_build_layer_normalised_stacks():
    # Where only types and shapes are read, traced, not drawn.
    shape_of = eqx.filter_eval_shape
    gru = shape_of(stackrnn.GRU, 3, [4, 5, 6], num_layers=3, layer_norm=True, key=KEY)
    assert all(type(c) is stackrnn.LayerNormGRUCell for c in gru.cells)
    lstm = stackrnn.LSTM(
        3,
        4,
        num_layers=2,
        proj_size=2,
        forget_bias=1.0,
        layer_norm=True,
        bidirectional=True,
        key=KEY,
    )
    for cell in lstm.cells + lstm.backward_cells:
        assert type(cell) is stackrnn.LayerNormLSTMCell
        assert cell.proj_size == 2
        np.testing.assert_array_equal(cell.norm_ih.bias[4:8], np.ones(4))
    assert lstm.cells[1].input_size == 4
    ys, (h, c) = jax.eval_shape(lstm, np.ones((5, 3), np.float32))
    assert ys.shape == (5, 4) and h.shape == (4, 2) and c.shape == (4, 4)
    # Off by default: the plain cells.
    assert type(shape_of(stackrnn.GRU, 3, 4, key=KEY).cells[0]) is stackrnn.GRUCell
    assert type(shape_of(stackrnn.LSTM, 3, 4, key=KEY).cells[0]) is stackrnn.LSTMCell


@pytest.mark.parametrize("kind", ["gru_ln", "lstm_ln"])
def test_deep_stacks_wire_and_stream_like_the_others(kind):
    """The generic stack properties, on a three-layer stack of each cell (the
    strategies draw these kinds too, among the others). Every layer as wide as the
    input: a stack that fed the input to a layer above the first would run, and
    differ."""
    rng = np.random.default_rng(0)
    shapes = [eqx.filter_eval_shape(make_cell, kind, 4, 4, key=KEY) for _ in range(3)]
    stack = stack_of([_randomised(cell, rng) for cell in shapes])
    xs = jax.device_put(rng.standard_normal((5, 4)).astype(np.float32))
    check_layer_wiring(stack, xs)
    check_step_matches_scan(stack, xs)
