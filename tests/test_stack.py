import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from hypothesis import given, strategies as st

import stackrnn
from stackrnn._dropout import dropout
from stackrnn.testing import (
    check_finite_clipped_grads,
    check_jit_consistent,
    check_vmap_consistent,
    Config,
    inputs,
    make_cells,
)

from .helpers import (
    by_hand,
    call,
    random_state,
    seeds,
    stack_by_hand,
    stack_of,
    structures,
    TOL32,
    tree_allclose,
    tree_equal,
)


# Fixed shapes, every cell kind, one to four layers, with and without biases: the
# examples of one shape draw only values, and reuse its compiled programs.
# `fast`: False for the reference path, None for the default (by width).
SHAPES = [
    (Config("rnn_tanh", 3, (4,), True, 5), False),
    (Config("rnn_relu", 2, (5, 3), False, 5), None),
    (Config("gru", 3, (4, 6, 2, 4), True, 5), None),
    (Config("lstm", 3, (4,), False, 5), False),
    (Config("lstm_proj", 2, (4, 6, 4), True, 5), None),
    (Config("gru_ln", 3, (3, 3), True, 5), None),
    (Config("lstm_ln", 2, (4,), True, 5), False),
]


@pytest.mark.parametrize("cfg, fast", SHAPES, ids=[c.kind for c, _ in SHAPES])
@given(seed=seeds)
def test_stack_equals_its_cells_run_by_hand(cfg, fast, seed):
    """Layer `l` reads layer `l - 1`'s outputs, from the given initial state, and a
    stack of one layer is its cell stepped over the sequence: outputs and final
    states equal the Python loops of `stack_by_hand`. Compiled scan versus one
    unrolled loop: the same operations, equal to f32 rounding."""
    kc, kx, ks = jr.split(jr.key(seed), 3)
    stack = stack_of(make_cells(cfg, kc), fast=fast)
    xs = inputs(cfg, kx)
    state = random_state(stack, ks)
    assert tree_allclose(call(stack, xs, state), by_hand(stack, xs, state), **TOL32)


@eqx.filter_jit
def _depth_one_and_scan(cell, xs, state):
    """A one-layer stack on the reference path, and its cell in a `jax.lax.scan`
    written here: one program, so both compile alike."""

    def step(s, x):
        s = cell(x, s)
        return s, cell.output(s)

    final, ys = jax.lax.scan(step, state, xs)
    stack = stack_of([cell], fast=False)
    got = stack(xs, jax.tree.map(lambda s: s[None], state))
    return got, (ys, jax.tree.map(lambda s: s[None], final))


DEPTH_ONE = [(cfg, fast) for cfg, fast in SHAPES if cfg.num_layers == 1]


@pytest.mark.parametrize("cfg", [c for c, _ in DEPTH_ONE], ids=lambda c: c.kind)
@given(seed=seeds)
def test_depth_one_equals_its_cell_bit_for_bit(cfg, seed):
    """The reference path is the cell's step in a `jax.lax.scan`, no other
    operation: bit for bit. (The faster paths agree to rounding: test_fast.py,
    test_fused.py.)"""
    kc, kx, ks = jr.split(jr.key(seed), 3)
    (cell,) = make_cells(cfg, kc)
    state = random_state(stack_of([cell]), ks)
    state = jax.tree.map(lambda s: s[0], state)
    got, want = _depth_one_and_scan(cell, inputs(cfg, kx), state)
    assert tree_equal(got, want)


def test_miswired_stack_is_caught(getkey):
    """d2l's JAX `GRU(num_layers)` feeds the raw input to every layer but the last.
    For a stack of three, that wiring gives other numbers than ours: the by-hand
    reference catches it."""
    cells = [stackrnn.GRUCell(4, 4, key=getkey()) for _ in range(3)]
    xs = jr.normal(getkey(), (5, 4))
    ys, _ = stack_of(cells)(xs)
    want, _ = stack_by_hand(stack_of(cells), xs)
    assert tree_allclose(ys, want, **TOL32)
    below, _ = stack_by_hand(stack_of(cells[1:2]), xs)
    miswired, _ = stack_by_hand(stack_of(cells[2:]), below)
    assert not np.allclose(want, miswired, atol=1e-3)


def _mse(model, xs, target):
    ys, _ = model(xs)
    return jnp.mean((ys - target) ** 2)


# ReLU's unbounded outputs and the LSTM's cell state in the quick loop.
@pytest.mark.parametrize(
    "kind", structures(["rnn_relu", "lstm", "rnn_tanh", "gru"], quick=2)
)
@given(scale=st.sampled_from([1.0, 1e2, 1e3]), seed=seeds)
def test_clipped_gradients_are_finite_and_bounded(kind, scale, seed):
    """Eight layers, inputs up to 1e3: no overflow in the gradients."""
    cfg = Config(kind=kind, input_size=3, widths=(4,) * 8, bias=True, time=5)
    kc, kx, ky = jr.split(jr.key(seed), 3)
    stack = stack_of(make_cells(cfg, kc))
    xs = inputs(cfg, kx, scale=scale)
    target = jr.normal(ky, (cfg.time, stack.output_size))
    check_finite_clipped_grads(stack, _mse, xs, target, max_norm=1.0)


@pytest.mark.parametrize("cfg, fast", SHAPES[1:4], ids=["rnn_relu", "gru", "lstm"])
@given(seed=seeds)
def test_jit_and_vmap_match_eager_per_example(cfg, fast, seed):
    kc, kx = jr.split(jr.key(seed))
    stack = stack_of(make_cells(cfg, kc))
    xs = inputs(cfg, kx, batch=3)
    check_vmap_consistent(eqx.filter_jit(stack), xs)
    check_jit_consistent(stack, xs[0])


# Three layers of one width, so that dropout and residual connections apply.
DEEP = Config("gru", 3, (4, 4, 4), True, 5)


@given(seed=seeds)
def test_dropout_off_equals_no_dropout(seed):
    kc, kx, kd = jr.split(jr.key(seed), 3)
    cells = make_cells(DEEP, kc)
    xs = inputs(DEEP, kx)
    want = call(stack_of(cells), xs)
    assert tree_equal(call(stack_of(cells, dropout=0.0), xs, key=kd), want)
    half = stack_of(cells, dropout=0.5)
    assert tree_equal(call(half, xs, inference=True), want)
    assert tree_equal(call(eqx.nn.inference_mode(half), xs), want)


@pytest.mark.parametrize("variational", [False, True])
@given(seed=seeds)
def test_dropout_is_keyed_and_between_layers_only(variational, seed):
    """The masks drop the inputs of layers 2..L as the reference draws them from
    the key (one mask per element, or per sequence if `variational`): the same key
    the same outputs, another key others; never the top layer's output."""
    kc, kx, k1, k2 = jr.split(jr.key(seed), 4)
    cells = make_cells(DEEP, kc)
    stack = stack_of(cells, dropout=0.5, variational=variational)
    xs = inputs(DEEP, kx)
    ys1, f1 = call(stack, xs, key=k1)
    assert tree_allclose((ys1, f1), by_hand(stack, xs, key=k1), **TOL32)
    assert tree_equal(call(stack, xs, key=k1), (ys1, f1))
    assert not tree_allclose(call(stack, xs, key=k2)[0], ys1)
    assert not tree_allclose(call(stack, xs, inference=True)[0], ys1)
    # The top layer's last output is its final state: no dropout after the last layer.
    top_h = cells[-1].output(jax.tree.map(lambda s: s[-1], f1))
    assert tree_equal(ys1[-1], top_h)


def test_dropout_mask_statistics(getkey):
    x = jnp.full((200_000,), 3.0)
    p = 0.3
    y = dropout(x, p, getkey())
    kept = y != 0
    # Survivors are scaled so that the expectation is unchanged.
    np.testing.assert_allclose(y[kept], 3.0 / (1 - p), rtol=1e-6)
    # Fraction dropped within 5 standard deviations of p.
    sd = np.sqrt(p * (1 - p) / x.size)
    assert abs(float(1 - kept.mean()) - p) < 5 * sd


def test_stack_state_layout(getkey):
    gru = stackrnn.GRU(28, 32, num_layers=2, dropout=0.5, key=getkey())
    xs = jr.normal(getkey(), (4, 32, 28))
    keys = jr.split(getkey(), 4)
    ys, state = jax.jit(jax.vmap(lambda x, k: gru(x, key=k)))(xs, keys)
    assert ys.shape == (4, 32, 32) and state.shape == (4, 2, 32)
    ys, state = call(gru, xs[0], key=getkey())
    assert ys.shape == (32, 32) and state.shape == (2, 32)

    lstm = stackrnn.LSTM(3, 6, num_layers=3, proj_size=2, key=getkey())
    ys, (h, c) = call(lstm, jr.normal(getkey(), (7, 3)))
    assert ys.shape == (7, 2) and h.shape == (3, 2) and c.shape == (3, 6)

    ragged = stackrnn.RNN(3, [6, 4], num_layers=2, key=getkey())
    ys, state = call(ragged, jr.normal(getkey(), (7, 3)))
    assert ys.shape == (7, 4)
    assert isinstance(state, tuple) and [s.shape for s in state] == [(6,), (4,)]


def test_d2l_scratch_init(getkey):
    """d2l's StackedRNNScratch: tanh cells, weights N(0, 0.01^2), zero biases."""
    rnn = stackrnn.RNN(
        28, 256, num_layers=2, init=stackrnn.NormalInit(0.01), key=getkey()
    )
    for cell in rnn.cells:
        assert cell.nonlinearity == "tanh"
        assert not jnp.any(cell.bias_ih) and not jnp.any(cell.bias_hh)
        for w in (cell.weight_ih, cell.weight_hh):
            assert abs(float(jnp.std(w)) - 0.01) < 0.001
            assert abs(float(jnp.mean(w))) < 0.001


class _Classifier(eqx.Module):
    rnn: stackrnn.StackedRNN
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jr.split(key)
        self.rnn = stackrnn.LSTM(3, 5, num_layers=2, dropout=0.25, key=k1)
        self.head = eqx.nn.Linear(5, 2, key=k2)

    def __call__(self, xs, *, key=None):
        ys, _ = self.rnn(xs, key=key)
        return self.head(ys[-1])


def test_equinox_transforms_and_serialisation(getkey, tmp_path):
    model = _Classifier(getkey())
    xs = jr.normal(getkey(), (6, 3))
    key = getkey()

    eager = model(xs, key=key)
    assert tree_allclose(eqx.filter_jit(model)(xs, key=key), eager, rtol=1e-5)

    @eqx.filter_grad
    def grad(m):
        return jnp.sum(m(xs, key=key) ** 2)

    grads = grad(model)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert any(bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads.rnn))

    path = tmp_path / "model.eqx"
    eqx.tree_serialise_leaves(path, model)
    like = _Classifier(getkey())
    loaded = eqx.tree_deserialise_leaves(path, like)
    assert tree_equal(eqx.filter(loaded, eqx.is_array), eqx.filter(model, eqx.is_array))
    assert tree_equal(loaded(xs, key=key), eager)

    # inference_mode finds the stack's `inference` field inside a user's model.
    quiet = eqx.nn.inference_mode(model)
    assert quiet.rnn.inference
    assert tree_equal(quiet(xs), quiet(xs, key=key))


@pytest.mark.parametrize("kind", ["rnn_tanh", "gru", "lstm_proj"])
def test_initial_state_is_used(kind, getkey):
    cfg = Config(kind=kind, input_size=2, widths=(4, 4), bias=True, time=3)
    stack = stack_of(make_cells(cfg, getkey()))
    xs = inputs(cfg, getkey())
    zeros = stack.init_state()
    ones = jax.tree.map(jnp.ones_like, zeros)
    assert tree_equal(call(stack, xs), call(stack, xs, zeros))
    assert not tree_allclose(call(stack, xs)[0], call(stack, xs, ones)[0])
