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

import stackrnn
from stackrnn._fast import supports
from stackrnn.testing import check_layer_wiring, check_step_matches_scan

from .helpers import (
    assert_derivatives_match,
    Config,
    inputs,
    make_cells,
    stack_of,
    tree_equal,
    x64,
)


KEY = jr.key(0)


def _randomised(cell, seed):
    """`cell` with every array, gains and shifts included, redrawn from N(0, 1), so
    that no parameter is left at a value (1, 0) that would hide its misuse."""
    arrays, rest = eqx.partition(cell, eqx.is_array)
    leaves, treedef = jax.tree.flatten(arrays)
    keys = jr.split(jr.key(seed), len(leaves))
    leaves = [jr.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    return eqx.combine(jax.tree.unflatten(treedef, leaves), rest)


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


@given(
    lstm=st.booleans(),
    input_size=st.integers(1, 4),
    hidden_size=st.integers(2, 5),
    time=st.integers(1, 4),
    bias=st.booleans(),
    project=st.booleans(),
    eps=st.sampled_from([1e-5, 0.5]),
    seed=st.integers(0, 2**16),
)
def test_matches_a_numpy_reference(
    lstm, input_size, hidden_size, time, bias, project, eps, seed
):
    """Gains, shifts and weights all random, the initial state too; the stack runs
    with `fast=True`, which these cells must decline."""
    with x64(True):
        kc, kx, ks = jr.split(jr.key(seed), 3)
        if lstm:
            proj_size = hidden_size // 2 if project else 0
            cell = stackrnn.LayerNormLSTMCell(
                input_size, hidden_size, proj_size=proj_size, bias=bias, eps=eps, key=kc
            )
        else:
            cell = stackrnn.LayerNormGRUCell(
                input_size, hidden_size, bias=bias, eps=eps, key=kc
            )
        cell = _randomised(cell, seed)
        xs = jr.normal(kx, (time, input_size))
        state = jax.tree.map(
            lambda s: jr.normal(ks, s.shape, s.dtype), cell.init_state()
        )
        ys, final = stack_of([cell], fast=True)(
            xs, jax.tree.map(lambda s: s[None], state)
        )
        reference = _lstm_reference if lstm else _gru_reference
        want_ys, want_final = reference(cell, xs, jax.tree.map(_np, state), eps)
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


@given(lstm=st.booleans(), hidden_size=st.integers(2, 4), seed=st.integers(0, 2**16))
def test_step_derivatives_match_the_formula(lstm, hidden_size, seed):
    """A step's hand-written derivatives (the GRU update; the LSTM's sigmoids and
    tanhs) give autodiff's numbers for the equations above in forward mode, reverse
    mode and at second order, gains and shifts random."""
    with x64(True):
        make = stackrnn.LayerNormLSTMCell if lstm else stackrnn.LayerNormGRUCell
        cell = _randomised(make(1, hidden_size, key=jr.key(0)), seed)
        k1, k2, k3, k4 = jr.split(jr.key(seed), 4)
        gates = cell.weight_ih.shape[0]
        state = jax.tree.map(lambda s: jr.normal(k3, s.shape), cell.init_state())
        primals = (jr.normal(k1, (gates,)), jr.normal(k2, (gates,)), state)
        formula = _lstm_ln_formula if lstm else _gru_ln_formula
        assert_derivatives_match(
            cell.pointwise, lambda *args: formula(cell, *args), primals, k4
        )


@given(
    lstm=st.booleans(),
    scale_ih=st.floats(1e-2, 1e2),
    scale_hh=st.floats(1e-2, 1e2),
    seed=st.integers(0, 2**16),
)
def test_invariant_to_the_scale_of_the_weights(lstm, scale_ih, scale_hh, seed):
    """LN(c W x) = LN(W x) for c > 0 (up to `eps`, here negligible): the outputs do
    not depend on the scale of `weight_ih` or `weight_hh`."""
    with x64(True):
        kc, kx = jr.split(jr.key(seed))
        make = stackrnn.LayerNormLSTMCell if lstm else stackrnn.LayerNormGRUCell
        cell = _randomised(make(3, 4, eps=1e-30, key=kc), seed)
        scaled = eqx.tree_at(
            lambda c: (c.weight_ih, c.weight_hh),
            cell,
            (scale_ih * cell.weight_ih, scale_hh * cell.weight_hh),
        )
        xs = jr.normal(kx, (5, 3))
        ys, _ = stack_of([cell])(xs)
        ys_scaled, _ = stack_of([scaled])(xs)
        np.testing.assert_allclose(ys_scaled, ys, rtol=1e-9, atol=1e-12)


def test_unnormalised_cells_are_not_scale_invariant():
    """The property above is a property of the normalisation: a GRU fails it."""
    cell = stackrnn.GRUCell(3, 4, key=KEY)
    scaled = eqx.tree_at(lambda c: c.weight_ih, cell, 10 * cell.weight_ih)
    xs = jr.normal(KEY, (5, 3))
    ys, _ = stack_of([cell])(xs)
    ys_scaled, _ = stack_of([scaled])(xs)
    assert not np.allclose(ys, ys_scaled, atol=1e-3)


@pytest.mark.parametrize("proj_size", [0, 2])
def test_take_the_reference_path_even_when_fast(proj_size, monkeypatch):
    """Their gains and shifts are parameters the fast path does not handle: `fast=True`
    runs them on the reference path, values and gradients as with `fast=False`."""
    cells = [
        stackrnn.LayerNormGRUCell(3, 4, key=KEY),
        stackrnn.LayerNormLSTMCell(3, 4, proj_size=proj_size, key=KEY),
    ]
    assert not any(supports(c) for c in cells)

    def no_fast_path(*args, **kwargs):
        raise AssertionError("the fast path ran")

    monkeypatch.setattr("stackrnn._layer.scan_fast", no_fast_path)
    xs = jr.normal(KEY, (6, 3))
    for cell in cells:

        def loss(stack):
            ys, _ = stack(xs)
            return jnp.sum(ys**2)

        value, grads = eqx.filter_value_and_grad(loss)(stack_of([cell], fast=True))
        want_value, want_grads = eqx.filter_value_and_grad(loss)(
            stack_of([cell], fast=False)
        )
        assert tree_equal((value, grads.cells), (want_value, want_grads.cells))
        # The gains and shifts are trained: their gradients are not zero.
        for norm in (grads.cells[0].norm_ih, grads.cells[0].norm_hh):
            assert float(jnp.abs(norm.weight).sum()) > 0
            assert float(jnp.abs(norm.bias).sum()) > 0


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
    for cell in (
        stackrnn.LayerNormGRUCell(3, 4, dtype=jnp.bfloat16, key=KEY),
        stackrnn.LayerNormLSTMCell(3, 4, dtype=jnp.bfloat16, key=KEY),
    ):
        assert {x.dtype for x in jax.tree.leaves(cell)} == {jnp.dtype(jnp.bfloat16)}
        ys, final = stack_of([cell])(jnp.ones((5, 3), jnp.bfloat16))
        assert ys.dtype == jnp.bfloat16
        assert {x.dtype for x in jax.tree.leaves(final)} == {jnp.dtype(jnp.bfloat16)}


def test_constructors_build_layer_normalised_stacks():
    gru = stackrnn.GRU(3, [4, 5, 6], num_layers=3, layer_norm=True, key=KEY)
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
    ys, (h, c) = lstm(jnp.ones((5, 3)))
    assert ys.shape == (5, 4) and h.shape == (4, 2) and c.shape == (4, 4)
    # Off by default: the plain cells.
    assert type(stackrnn.GRU(3, 4, key=KEY).cells[0]) is stackrnn.GRUCell
    assert type(stackrnn.LSTM(3, 4, key=KEY).cells[0]) is stackrnn.LSTMCell


@pytest.mark.parametrize("kind", ["gru_ln", "lstm_ln"])
def test_deep_stacks_wire_and_stream_like_the_others(kind):
    """The generic stack properties, on a three-layer stack of each cell (the
    strategies draw these kinds too, among the others)."""
    cfg = Config(kind=kind, input_size=3, widths=(4, 5, 4), bias=True, time=5)
    kc, kx = jr.split(KEY)
    stack = stack_of(make_cells(cfg, kc))
    xs = inputs(cfg, kx)
    check_layer_wiring(stack, xs)
    check_step_matches_scan(stack, xs)
