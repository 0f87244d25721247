import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from hypothesis import given
from jax.ad_checkpoint import print_saved_residuals
from jax.tree_util import Partial

import stackrnn
from stackrnn._gates import gru_update

from .helpers import assert_derivatives_match, seeds, x64


KEY = jr.key(0)
# The derivative tests draw values at one size, and differentiate functions jitted
# once here, so that their examples reuse the programs compiled for the first.
SIZE = 3


@eqx.filter_jit
def _pointwise(cell, gates_x, gates_h, state):
    return cell.pointwise(gates_x, gates_h, state)


def _normal(rng, *shapes):
    """Arrays of `shapes` from N(0, 4), drawn by NumPy (JAX's generators compile a
    program for every new shape)."""
    return tuple(jax.device_put(2 * rng.standard_normal(shape)) for shape in shapes)


@pytest.mark.parametrize("bias", [True, False])
def test_parameter_shapes_follow_pytorch(bias):
    i, h, p = 3, 8, 5
    # Shapes only: traced, not drawn.
    elman = eqx.filter_eval_shape(stackrnn.ElmanCell, i, h, bias=bias, key=KEY)
    gru = eqx.filter_eval_shape(stackrnn.GRUCell, i, h, bias=bias, key=KEY)
    lstm = eqx.filter_eval_shape(
        stackrnn.LSTMCell, i, h, proj_size=p, bias=bias, key=KEY
    )
    for cell, gates, recurrent in ((elman, 1, h), (gru, 3, h), (lstm, 4, p)):
        assert cell.weight_ih.shape == (gates * h, i)
        assert cell.weight_hh.shape == (gates * h, recurrent)
        if bias:
            assert cell.bias_ih.shape == cell.bias_hh.shape == (gates * h,)
        else:
            assert cell.bias_ih is None and cell.bias_hh is None
    assert lstm.weight_hr.shape == (p, h)
    assert eqx.filter_eval_shape(stackrnn.LSTMCell, i, h, key=KEY).weight_hr is None


@pytest.mark.parametrize(
    "cell",
    [
        stackrnn.ElmanCell(5, 64, key=KEY),
        stackrnn.GRUCell(5, 64, key=KEY),
        stackrnn.LSTMCell(5, 64, proj_size=16, key=KEY),
    ],
    ids=["elman", "gru", "lstm"],
)
def test_pytorch_uniform_init(cell):
    bound = 1 / math.sqrt(64)
    for leaf in map(np.asarray, jax.tree.leaves(cell)):
        assert np.max(np.abs(leaf)) <= bound
        # U(-b, b) fills its range: the extremes of a few hundred draws come close.
        assert np.max(leaf) > 0.9 * bound
        assert np.min(leaf) < -0.9 * bound
        assert abs(np.std(leaf) - bound / math.sqrt(3)) < 0.2 * bound


def test_dtype_follows_argument():
    cell = eqx.filter_eval_shape(stackrnn.GRUCell, 2, 3, dtype=jnp.bfloat16, key=KEY)
    assert cell.weight_ih.dtype == jnp.bfloat16
    assert jax.eval_shape(cell.init_state).dtype == jnp.bfloat16


def _torch_pair(kind, bias, proj_size, seed):
    torch = pytest.importorskip("torch")
    torch.manual_seed(seed)
    i, h = 3, 5
    # The cell's shapes only (traced, not drawn): every parameter comes from PyTorch.
    shape_of = functools.partial(eqx.filter_eval_shape, bias=bias, key=KEY)
    if kind == "elman_tanh" or kind == "elman_relu":
        nl = kind.split("_")[1]
        ref = torch.nn.RNN(i, h, bias=bias, nonlinearity=nl)
        cell = shape_of(stackrnn.ElmanCell, i, h, nonlinearity=nl)
    elif kind == "gru":
        ref = torch.nn.GRU(i, h, bias=bias)
        cell = shape_of(stackrnn.GRUCell, i, h)
    else:
        ref = torch.nn.LSTM(i, h, bias=bias, proj_size=proj_size)
        cell = shape_of(stackrnn.LSTMCell, i, h, proj_size=proj_size)
    params = {
        k[: -len("_l0")]: jax.device_put(v.detach().numpy())
        for k, v in ref.state_dict().items()
    }
    for name, value in params.items():
        assert getattr(cell, name).shape == value.shape, name
        cell = _replace(cell, name, value)
    return torch, ref, cell


def _replace(cell, name, value):
    return eqx.tree_at(lambda c: getattr(c, name), cell, value)


@pytest.mark.parametrize(
    "kind, proj_size",
    [("elman_tanh", 0), ("elman_relu", 0), ("gru", 0), ("lstm", 0), ("lstm", 2)],
)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("path", [stackrnn.Reference(), stackrnn.ByWidth()])
@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
def test_matches_pytorch_with_its_weights(kind, proj_size, bias, path):
    """With PyTorch's weights copied in unchanged, a cell scanned over time gives
    PyTorch's outputs: same parameter layout, gate order and bias placement. On the
    reference path (the cell's own math) and on the default one, which is the fused
    loop where the accelerator is installed."""
    torch, ref, cell = _torch_pair(kind, bias, proj_size, seed=1)
    xs = np.random.default_rng(0).standard_normal((7, 3)).astype(np.float32)
    with torch.no_grad():
        want, _ = ref(torch.from_numpy(xs))
    stack = stackrnn.StackedRNN([cell], scan=stackrnn.Scan(path=path))
    ys, _ = stack(jax.device_put(xs))
    np.testing.assert_allclose(ys, want.numpy(), rtol=1e-5, atol=1e-6)


_gru_update = jax.jit(gru_update)


@jax.jit
def _gru_formula(gates_x, gates_h, h):
    """PyTorch's GRU update as documented, left to JAX's autodiff: the reference for
    the hand-written derivative."""
    size = h.shape[0]
    r_x, z_x, n_x = (gates_x[i * size : (i + 1) * size] for i in range(3))
    r_h, z_h, n_h = (gates_h[i * size : (i + 1) * size] for i in range(3))
    r = 1 / (1 + jnp.exp(-(r_x + r_h)))
    z = 1 / (1 + jnp.exp(-(z_x + z_h)))
    n = jnp.tanh(n_x + r * n_h)
    return (1 - z) * n + z * h


@given(seed=seeds)
def test_gru_update_derivatives_match_the_formula(seed):
    """The GRU update's hand-written derivative gives autodiff's numbers in forward
    mode, reverse mode and at second order."""
    with x64(True):
        rng = np.random.default_rng(seed)
        primals = _normal(rng, (3 * SIZE,), (3 * SIZE,), (SIZE,))
        assert_derivatives_match(_gru_update, _gru_formula, primals, jr.key(seed))


def test_gru_update_keeps_four_arrays_for_the_backward_pass(capsys):
    """Reverse mode keeps `r`, `z`, `n` and `h_n` besides the state: a layer's scan
    stacks every kept array over time, and at small widths writing those stacks is
    what the backward pass pays for (autodiff of the formula kept 8 besides it)."""
    print_saved_residuals(gru_update, jnp.zeros(6), jnp.zeros(6), jnp.zeros(2))
    kept = capsys.readouterr().out.splitlines()
    assert len(kept) == 5
    assert sum("from the argument" in line for line in kept) == 1


def _sigmoid_formula(a):
    return 1 / (1 + jnp.exp(-a))


def _elman_tanh_formula(gates_x, gates_h, h):
    del h
    return jnp.tanh(gates_x + gates_h)


def _lstm_formula(gates_x, gates_h, state):
    """PyTorch's LSTM step as documented, left to JAX's autodiff."""
    _, c = state
    size = c.shape[0]
    i, f, g, o = (
        gates_x[k * size : (k + 1) * size] + gates_h[k * size : (k + 1) * size]
        for k in range(4)
    )
    c = _sigmoid_formula(f) * c + _sigmoid_formula(i) * jnp.tanh(g)
    return _sigmoid_formula(o) * jnp.tanh(c), c


_FORMULAS = {"rnn_tanh": jax.jit(_elman_tanh_formula), "lstm": jax.jit(_lstm_formula)}


def _cell(kind, size):
    """A cell of `kind` for its `pointwise`, which reads no parameter (the LSTM has no
    projection): their shapes only, traced, not drawn."""
    make = stackrnn.ElmanCell if kind == "rnn_tanh" else stackrnn.LSTMCell
    return eqx.filter_eval_shape(make, 1, size, key=KEY)


@pytest.mark.parametrize("kind", ["rnn_tanh", "lstm"])
@given(seed=seeds)
def test_activation_derivatives_match_the_formula(kind, seed):
    """The Elman (tanh) and LSTM steps, whose sigmoids and tanhs have hand-written
    derivatives, give autodiff's numbers in forward mode, reverse mode and at second
    order."""
    with x64(True):
        cell = _cell(kind, SIZE)
        rng = np.random.default_rng(seed)
        gates = cell.weight_ih.shape[:1]
        state = jax.tree.map(
            lambda s: _normal(rng, s.shape)[0], jax.eval_shape(cell.init_state)
        )
        assert_derivatives_match(
            Partial(_pointwise, cell),
            _FORMULAS[kind],
            (*_normal(rng, gates, gates), state),
            jr.key(seed),
        )


@pytest.mark.parametrize(
    "kind, kept, from_argument", [("rnn_tanh", 1, 0), ("lstm", 6, 1)]
)
def test_steps_keep_one_array_per_activation(kind, kept, from_argument, capsys):
    """Reverse mode keeps each sigmoid's and tanh's output and nothing else (autodiff of
    `jax.nn.sigmoid` and `jnp.tanh` kept `1 - s` and `1 - t` besides): the Elman step
    keeps `tanh`, the LSTM step `sigmoid(i)`, `sigmoid(f)`, `tanh(g)`, `sigmoid(o)`,
    `tanh(c')` and the memory `c` (autodiff of the formula kept 11 in all)."""
    cell = _cell(kind, 2)
    gates = jnp.zeros(cell.weight_ih.shape[0])
    print_saved_residuals(cell.pointwise, gates, gates, cell.init_state())
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == kept
    assert sum("from the argument" in line for line in lines) == from_argument
