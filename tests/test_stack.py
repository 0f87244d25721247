import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import stackrnn
from stackrnn._dropout import dropout
from stackrnn.testing import (
    check_finite_clipped_grads,
    check_jit_consistent,
    check_vmap_consistent,
    Config,
    configs,
    inputs,
    make_cells,
)

from .helpers import stack_of, tree_allclose, tree_equal


def _scan_by_hand(cell, xs, state):
    def step(s, x):
        s = cell(x, s)
        return s, cell.output(s)

    final, ys = jax.lax.scan(step, state, xs)
    return ys, final


def _loop_by_hand(cell, xs, state):
    ys = []
    for x in xs:
        state = cell(x, state)
        ys.append(cell.output(state))
    return jnp.stack(ys), state


@given(cfg=configs(max_layers=1), seed=st.integers(0, 2**16))
def test_depth_one_equals_its_cell_bit_for_bit(cfg, seed):
    kc, kx, ks = jr.split(jr.key(seed), 3)
    (cell,) = make_cells(cfg, kc)
    # The reference path: the same operations as the loop by hand (the faster paths
    # agree to rounding, tests/test_fast.py and tests/test_fused.py).
    stack = stack_of([cell], fast=False)
    xs = inputs(cfg, kx)
    state0 = jax.tree.map(lambda s: jr.normal(ks, s.shape), cell.init_state())
    ys, final = stack(xs, jax.tree.map(lambda s: s[None], state0))
    ys_ref, final_ref = _scan_by_hand(cell, xs, state0)
    assert tree_equal(ys, ys_ref)
    assert tree_equal(final, jax.tree.map(lambda s: s[None], final_ref))


@given(cfg=configs(max_layers=4), seed=st.integers(0, 2**16))
def test_stack_feeds_each_layer_the_layer_below(cfg, seed):
    kc, kx = jr.split(jr.key(seed))
    cells = make_cells(cfg, kc)
    stack = stack_of(cells)
    xs = inputs(cfg, kx)
    ys, final = stack(xs)

    hs, finals = xs, []
    for cell in cells:
        hs, f = _loop_by_hand(cell, hs, cell.init_state())
        finals.append(f)
    # Eager op-by-op dispatch versus one compiled scan: same operations, but XLA may
    # fuse them differently, so equality holds to f32 rounding only.
    assert tree_allclose(ys, hs, rtol=1e-5, atol=1e-6)
    want = stack._join(finals)
    assert tree_allclose(final, want, rtol=1e-5, atol=1e-6)


def test_miswired_stack_is_caught(getkey):
    """d2l's JAX `GRU(num_layers)` feeds the raw input to every layer but the last.
    For a stack of three, that wiring gives other numbers than ours: the by-hand
    reference above would catch it."""
    cells = [
        stackrnn.GRUCell(4, 4, key=getkey()),
        stackrnn.GRUCell(4, 4, key=getkey()),
        stackrnn.GRUCell(4, 4, key=getkey()),
    ]
    xs = jr.normal(getkey(), (5, 4))
    ys, _ = stack_of(cells)(xs)
    hs = xs
    for cell in cells[:-1]:
        hs, _ = _loop_by_hand(cell, xs, cell.init_state())
    miswired, _ = _loop_by_hand(cells[-1], hs, cells[-1].init_state())
    assert not np.allclose(ys, miswired, atol=1e-3)


@settings(max_examples=6)
@given(
    kind=st.sampled_from(["rnn_tanh", "rnn_relu", "gru", "lstm"]),
    depth=st.integers(1, 8),
    scale=st.sampled_from([1.0, 1e2, 1e3]),
    seed=st.integers(0, 2**16),
)
def test_clipped_gradients_are_finite_and_bounded(kind, depth, scale, seed):
    cfg = Config(kind=kind, input_size=3, widths=(4,) * depth, bias=True, time=5)
    kc, kx, ky = jr.split(jr.key(seed), 3)
    stack = stack_of(make_cells(cfg, kc))
    xs = inputs(cfg, kx, scale=scale)
    target = jr.normal(ky, (cfg.time, stack.output_size))

    def loss(model, xs):
        ys, _ = model(xs)
        return jnp.mean((ys - target) ** 2)

    check_finite_clipped_grads(stack, loss, xs, max_norm=1.0)


@given(cfg=configs(max_layers=3, max_time=5), seed=st.integers(0, 2**16))
def test_jit_and_vmap_match_eager_per_example(cfg, seed):
    kc, kx = jr.split(jr.key(seed))
    stack = stack_of(make_cells(cfg, kc))
    xs = inputs(cfg, kx, batch=3)
    check_vmap_consistent(eqx.filter_jit(stack), xs)
    check_jit_consistent(stack, xs[0])


@given(cfg=configs(max_layers=3, same_width=True), seed=st.integers(0, 2**16))
def test_dropout_off_equals_no_dropout(cfg, seed):
    kc, kx, kd = jr.split(jr.key(seed), 3)
    cells = make_cells(cfg, kc)
    plain = stack_of(cells)
    xs = inputs(cfg, kx)
    want = plain(xs)
    p0 = stack_of(cells, dropout=0.0)
    assert tree_equal(p0(xs, key=kd), want)
    if cfg.num_layers > 1:
        half = stack_of(cells, dropout=0.5)
        assert tree_equal(half(xs, inference=True), want)
        assert tree_equal(eqx.nn.inference_mode(half)(xs), want)


@given(
    cfg=configs(max_layers=3, max_width=8).filter(lambda c: c.num_layers > 1),
    seed=st.integers(0, 2**16),
)
def test_dropout_is_keyed_and_between_layers_only(cfg, seed):
    kc, kx, k1, k2 = jr.split(jr.key(seed), 4)
    cells = make_cells(cfg, kc)
    stack = stack_of(cells, dropout=0.5)
    xs = inputs(cfg, kx)
    ys1, f1 = stack(xs, key=k1)
    ys1b, _ = stack(xs, key=k1)
    ys2, _ = stack(xs, key=k2)
    assert tree_equal(ys1, ys1b)
    # Different keys draw different masks, so the outputs differ.
    assert not tree_equal(ys1, ys2)
    ys_off, _ = stack(xs, inference=True)
    assert not tree_equal(ys1, ys_off)
    # The top layer's last output is its final state: no dropout after the last layer.
    top_h = cells[-1].output(stack._split(f1)[-1])
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
    xs = jr.normal(getkey(), (1024, 32, 28))
    keys = jr.split(getkey(), 1024)
    ys, state = jax.jit(jax.vmap(lambda x, k: gru(x, key=k)))(xs, keys)
    assert ys.shape == (1024, 32, 32) and state.shape == (1024, 2, 32)
    ys, state = gru(xs[0], key=getkey())
    assert ys.shape == (32, 32) and state.shape == (2, 32)

    lstm = stackrnn.LSTM(3, 6, num_layers=3, proj_size=2, key=getkey())
    ys, (h, c) = lstm(jr.normal(getkey(), (7, 3)))
    assert ys.shape == (7, 2) and h.shape == (3, 2) and c.shape == (3, 6)

    ragged = stackrnn.RNN(3, [6, 4], num_layers=2, key=getkey())
    ys, state = ragged(jr.normal(getkey(), (7, 3)))
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
    assert tree_equal(stack(xs), stack(xs, zeros))
    assert not tree_allclose(stack(xs)[0], stack(xs, ones)[0])
