"""The fast path equals the reference path: values and gradients, for every cell the
fast path takes, under `jit`, `vmap` (both orders of `vmap` and `grad`), reversed, and
from random initial states. In float64, so that the tolerance can be tight: the two
paths sum the same products in different orders, which in float32 differs by rounding
only."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest
from hypothesis import given, strategies as st

import stackrnn
from stackrnn._fast import scan_fast, supports
from stackrnn._layer import scan_reference

from .helpers import Config, configs, fewer, make_cells, stack_of, tree_allclose, x64


FAST_KINDS = ("rnn_tanh", "rnn_relu", "gru", "lstm")
RTOL = ATOL = 1e-10  # float64


def _random_state(cell, key):
    leaves = jax.tree.leaves(cell.init_state())
    keys = jr.split(key, len(leaves))
    return jax.tree.unflatten(
        jax.tree.structure(cell.init_state()),
        [jr.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)],
    )


def _loss(scan, reverse):
    """A loss that weighs every output and the final state differently."""

    def loss(cell, xs, state):
        ys, final = scan(cell, xs, state, reverse=reverse)
        weights = jnp.arange(1, ys.size + 1, dtype=ys.dtype).reshape(ys.shape)
        out = jnp.sum(jnp.sin(ys) * weights)
        return out + sum(jnp.sum(jnp.cos(f)) for f in jax.tree.leaves(final))

    return loss


@given(
    cfg=configs(max_layers=1, max_time=5).filter(lambda c: c.kind in FAST_KINDS),
    reverse=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fast_equals_reference_values_and_gradients(cfg, reverse, seed):
    with x64(True):
        kc, kx, ks = jr.split(jr.key(seed), 3)
        (cell,) = make_cells(cfg, kc)
        cell = jax.tree.map(lambda p: p.astype(jnp.float64), cell)
        assert supports(cell)
        xs = jr.normal(kx, (cfg.time, cfg.input_size), jnp.float64)
        state = _random_state(cell, ks)

        fast = jax.jit(scan_fast, static_argnames="reverse")
        assert tree_allclose(
            fast(cell, xs, state, reverse=reverse),
            scan_reference(cell, xs, state, reverse=reverse),
            rtol=RTOL,
            atol=ATOL,
        )
        argnums = (0, 1, 2)  # parameters, inputs, initial state
        got = jax.jit(jax.grad(_loss(scan_fast, reverse), argnums))(cell, xs, state)
        want = jax.grad(_loss(scan_reference, reverse), argnums)(cell, xs, state)
        assert tree_allclose(got, want, rtol=RTOL, atol=ATOL)


@fewer()
@given(
    kind=st.sampled_from(FAST_KINDS),
    batch=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_fast_under_vmap_both_orders(kind, batch, seed):
    """`grad(vmap(f))` sums the examples' weight gradients; `vmap(grad(f))` keeps one
    per example. The fast path must give both, as the reference does."""
    with x64(True):
        cfg = Config(kind=kind, input_size=3, widths=(4,), bias=True, time=4)
        kc, kx, ks = jr.split(jr.key(seed), 3)
        (cell,) = make_cells(cfg, kc)
        cell = jax.tree.map(lambda p: p.astype(jnp.float64), cell)
        xs = jr.normal(kx, (batch, cfg.time, cfg.input_size), jnp.float64)
        states = jax.vmap(lambda k: _random_state(cell, k))(jr.split(ks, batch))

        def summed(scan):
            loss = _loss(scan, False)
            return jax.grad(
                lambda c, xs, s: jnp.sum(jax.vmap(loss, (None, 0, 0))(c, xs, s)),
                (0, 1, 2),
            )

        def per_example(scan):
            return jax.vmap(jax.grad(_loss(scan, False), (0, 1, 2)), (None, 0, 0))

        for make in (summed, per_example):
            got = jax.jit(make(scan_fast))(cell, xs, states)
            want = make(scan_reference)(cell, xs, states)
            assert tree_allclose(got, want, rtol=RTOL, atol=ATOL)


@fewer()
@given(cfg=configs(max_layers=2, max_time=4), seed=st.integers(0, 99))
def test_stacks_agree_on_both_paths(cfg, seed):
    """Whole stacks (any cell, including LSTM with `proj_size`, which the fast path
    leaves to the reference), float32: equal to float32 rounding."""
    kc, kx = jr.split(jr.key(seed))
    cells = make_cells(cfg, kc)
    fast = stack_of(cells, fast=True)
    reference = stack_of(cells, fast=False)
    xs = jr.normal(kx, (2, cfg.time, cfg.input_size))

    def loss(model):
        ys, state = jax.vmap(model)(xs)
        return jnp.sum(ys**2) + sum(jnp.sum(s) for s in jax.tree.leaves(state))

    assert tree_allclose(
        jax.vmap(fast)(xs), jax.vmap(reference)(xs), rtol=1e-5, atol=1e-5
    )
    got = eqx.filter_jit(eqx.filter_grad(loss))(fast)
    want = eqx.filter_grad(loss)(reference)
    assert tree_allclose(got.cells, want.cells, rtol=1e-4, atol=1e-4)


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
        kc, kx, ks = jr.split(jr.key(0), 3)
        cell = _OddGates(3, 4, kc)
        assert supports(cell)
        xs = jr.normal(kx, (5, 3), jnp.float64)
        state = jr.normal(ks, (4,), jnp.float64)
        assert tree_allclose(
            jax.jit(scan_fast)(cell, xs, state),
            scan_reference(cell, xs, state),
            rtol=RTOL,
            atol=ATOL,
        )
        argnums = (0, 1, 2)
        got = jax.jit(jax.grad(_loss(scan_fast, False), argnums))(cell, xs, state)
        want = jax.grad(_loss(scan_reference, False), argnums)(cell, xs, state)
        assert tree_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_which_cells_take_the_fast_path():
    key = jr.key(0)
    assert supports(stackrnn.ElmanCell(2, 3, key=key))
    assert supports(stackrnn.GRUCell(2, 3, bias=False, key=key))
    assert supports(stackrnn.LSTMCell(2, 3, key=key))
    # `weight_hr` is a parameter the fast path does not differentiate.
    assert not supports(stackrnn.LSTMCell(2, 3, proj_size=1, key=key))


@pytest.mark.parametrize("option", ["length", "resets"])
def test_sequence_options_take_the_reference_path(option, getkey):
    """`length` and `resets` exist on the reference path only; a stack given them
    gives the reference path's numbers."""
    cells = [stackrnn.GRUCell(3, 4, key=getkey())]
    xs = jr.normal(getkey(), (5, 3))
    kwargs = dict(length=3) if option == "length" else dict(resets=jnp.arange(5) == 2)
    fast = stack_of(cells, fast=True)(xs, **kwargs)
    reference = stack_of(cells, fast=False)(xs, **kwargs)
    assert tree_allclose(fast, reference, rtol=0, atol=0)


@pytest.mark.parametrize("width, fast", [(511, False), (512, True)])
def test_default_picks_the_path_by_width(width, fast, monkeypatch):
    """`ByWidth()`, the default path policy, takes the fast path from `hidden_size`
    512 on without the accelerator (tests/test_fused.py covers it; traced, not
    run)."""
    monkeypatch.setattr(stackrnn._fused, "kernels", None)
    stack = stackrnn.GRU(2, width, key=jr.key(0))
    jaxpr = str(jax.make_jaxpr(stack)(jnp.zeros((2, 2))))
    assert ("custom_vjp_call" in jaxpr) == fast


def test_default_takes_the_fast_path_at_every_width_on_a_gpu(monkeypatch, getkey):
    """On a GPU (JAX's default backend, faked here: CI has none) `ByWidth()` takes
    the fast path below `min_hidden` too, where the fast path supports the cell."""
    narrow = stackrnn.GRUCell(2, 4, key=getkey())
    norm = stackrnn.LayerNormGRUCell(2, 4, key=getkey())
    monkeypatch.setattr(stackrnn._fused, "kernels", None)
    assert stackrnn.ByWidth().choose(narrow) == "reference"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert stackrnn.ByWidth().choose(narrow) == "fast"
    assert stackrnn.ByWidth().choose(norm) == "reference"
