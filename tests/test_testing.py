"""`stackrnn.testing`: the strategies draw what they promise, and every check passes
on a correct model and fails on a deliberately broken one."""

import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import stackrnn
from stackrnn.testing import (
    check_depth_one_matches_cell,
    check_finite_clipped_grads,
    check_jit_consistent,
    check_layer_wiring,
    check_step_matches_scan,
    check_vmap_consistent,
    KINDS,
    lengths,
    make_cell,
    sequences,
    stacks,
    states,
)

from .helpers import seeds, stack_of


KEY = jr.key(0)


@pytest.mark.slow
def test_hypothesis_is_optional():
    code = (
        "import sys; sys.modules['hypothesis'] = None\n"
        "import stackrnn\n"
        "try:\n"
        "    import stackrnn.testing\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "install the `testing` extra" in out and "stackrnn[testing]" in out


@eqx.filter_jit
def _padded_and_truncated(stack, xs, state, length):
    """`stack` over `xs` padded after `length` steps, and over `xs[:length]`: one
    program where two eager calls compile a scan per layer each."""
    return stack(xs, state, length=length), stack(xs[:length], state)


@settings(max_examples=4)
@given(data=st.data())
def test_strategies_draw_valid_inputs(data):
    stack = data.draw(stacks(KEY, max_layers=2))
    xs = data.draw(sequences(stack.input_size, max_time=5))
    state = data.draw(states(stack))
    length = data.draw(lengths(xs.shape[0]))
    assert 1 <= xs.shape[0] <= 5 and 1 <= length <= xs.shape[0]
    (ys, final), (_, want) = _padded_and_truncated(stack, xs, state, length)
    assert ys.shape == (xs.shape[0], stack.output_size)
    # A padded sequence's final state is the state after its last real step.
    assert jax.tree.structure(final) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(want)):
        assert jnp.allclose(a, b, rtol=1e-5, atol=1e-6)


MADE = [
    ("rnn_tanh", stackrnn.ElmanCell, dict(nonlinearity="tanh")),
    ("rnn_relu", stackrnn.ElmanCell, dict(nonlinearity="relu")),
    ("gru", stackrnn.GRUCell, {}),
    ("lstm", stackrnn.LSTMCell, dict(proj_size=0)),
    ("lstm_proj", stackrnn.LSTMCell, dict(proj_size=2)),
    ("gru_ln", stackrnn.LayerNormGRUCell, {}),
    ("lstm_ln", stackrnn.LayerNormLSTMCell, dict(proj_size=0)),
]


def test_kinds_are_the_seven():
    assert KINDS == tuple(kind for kind, _, _ in MADE)


@pytest.mark.parametrize(("kind", "cls", "options"), MADE)
def test_make_cell_builds_each_kind(kind, cls, options, getkey):
    cell = make_cell(kind, 3, 5, bias=False, key=getkey())
    assert type(cell) is cls and cell.bias_ih is None
    assert {name: getattr(cell, name) for name in options} == options


def test_make_cell_rejects_other_kinds(getkey):
    with pytest.raises(ValueError, match="`kind` must be one of .*got 'rnn'"):
        make_cell("rnn", 3, 5, key=getkey())


# Each check: passes on the library's own stack, fails on a broken one.


TIME = 5


@pytest.fixture(scope="module")
def cells():
    """A cell of every kind, with and without biases, each reading the outputs of
    the one before: the layers of one stack. Built once: the examples below draw
    values for shapes already compiled. Parameters from N(0, 1/4), drawn by NumPy
    (JAX's generators compile a program for every new shape)."""
    rng = np.random.default_rng(0)
    made, size = [], 3
    for i, kind in enumerate(KINDS):
        shapes = eqx.filter_eval_shape(
            make_cell, kind, size, 4, bias=i % 2 == 0, key=KEY
        )
        made.append(
            jax.tree.map(
                lambda s: jax.device_put(rng.normal(0, 0.5, s.shape).astype(s.dtype)),
                shapes,
            )
        )
        size = made[-1].output_size
    return made


def _sequence(seed, input_size):
    """`TIME` steps of N(0, 1) inputs, drawn by NumPy (JAX's generators compile a
    program for every new shape)."""
    xs = np.random.default_rng(seed).standard_normal((TIME, input_size))
    return jax.device_put(xs.astype(np.float32))


class _Compiled(stackrnn.StackedRNN):
    """The library's stack with its calls compiled once per structure: called
    eagerly, a layer on the reference path traces and compiles its scan anew at
    every call."""

    __call__ = eqx.filter_jit(stackrnn.StackedRNN.__call__)
    step = eqx.filter_jit(stackrnn.StackedRNN.step)


@given(seed=seeds, data=st.data())
def test_depth_one_check(cells, seed, data):
    for cell in cells:
        state = data.draw(states(cell))
        xs = _sequence(seed, cell.input_size)
        check_depth_one_matches_cell(cell, xs, state, stack=_Compiled)


def test_depth_one_check_fails_on_a_stack_that_reads_backwards(getkey):
    cell = stackrnn.GRUCell(3, 4, key=getkey())
    xs = jr.normal(getkey(), (5, 3))

    def backwards(cells):
        return stack_of(cells, reverse=True)

    with pytest.raises(AssertionError, match="depth-1 stack outputs vs the cell"):
        check_depth_one_matches_cell(cell, xs, stack=backwards)


@given(seed=seeds)
def test_layer_wiring_check(cells, seed):
    check_layer_wiring(_Compiled(cells), _sequence(seed, cells[0].input_size))


class _D2LWiring(stackrnn.StackedRNN):
    """d2l's JAX `GRU(num_layers)`: every layer but the last reads the raw input."""

    def __call__(self, xs, state=None, **kwargs):
        def run(cell, xs):
            def step(s, x):
                s = cell(x, s)
                return s, s

            return jax.lax.scan(step, cell.init_state(), xs)[::-1]

        hs = xs
        for cell in self.cells[:-1]:
            hs, _ = run(cell, xs)
        return run(self.cells[-1], hs)


def test_layer_wiring_check_fails_on_d2ls_wiring(getkey):
    cells = [stackrnn.GRUCell(4, 4, key=getkey()) for _ in range(3)]
    xs = jr.normal(getkey(), (5, 4))
    check_layer_wiring(stack_of(cells), xs)
    with pytest.raises(AssertionError, match="its layers applied in order"):
        check_layer_wiring(_D2LWiring(cells), xs)


@given(seed=seeds, data=st.data())
def test_step_check(cells, seed, data):
    # Stacks of up to three layers: over all seven, float32 rounding (of the steps
    # and the scan, compiled apart) adds up past the check's default tolerance.
    for layers in (cells[:3], cells[3:5], cells[5:]):
        stack = _Compiled(layers)
        xs = _sequence(seed, stack.input_size)
        check_step_matches_scan(stack, xs, data.draw(states(stack)))


class _ForgetfulStep(eqx.Module):
    """A wrapper whose `step` drops the state it is given."""

    rnn: stackrnn.StackedRNN

    def init_state(self):
        return self.rnn.init_state()

    def __call__(self, xs, state=None, **kwargs):
        return self.rnn(xs, state, **kwargs)

    def step(self, x, state, **kwargs):
        return self.rnn.step(x, self.rnn.init_state(), **kwargs)


def test_step_check_fails_on_a_step_that_forgets(getkey):
    xs = jr.normal(getkey(), (4, 3))
    rnn = stackrnn.LSTM(3, 5, num_layers=2, key=getkey())
    with pytest.raises(AssertionError, match="`step` outputs vs `__call__`"):
        check_step_matches_scan(_ForgetfulStep(rnn), xs)


def test_clipped_grads_check_fails_on_nan_gradients(getkey):
    rnn = stackrnn.GRU(3, 4, num_layers=2, key=getkey())
    xs = jr.normal(getkey(), (5, 3))

    def fine(model, xs):
        return jnp.mean(model(xs)[0] ** 2)

    def norm_at_zero(model, xs):
        # The gradient of a Euclidean norm at the zero vector is NaN.
        ys, _ = model(xs)
        return jnp.linalg.norm(ys - jax.lax.stop_gradient(ys))

    check_finite_clipped_grads(rnn, fine, xs)
    # Every entry of the first parameter, (3 gates x 4 units) x 3 inputs, is NaN.
    with pytest.raises(
        AssertionError, match=r"\.cells\[0\]\.weight_ih has 36 non-finite entries"
    ):
        check_finite_clipped_grads(rnn, norm_at_zero, xs)


def test_vmap_check_fails_on_a_wrong_batching_rule(getkey):
    rnn = stackrnn.GRU(3, 4, num_layers=2, key=getkey())
    xs = jr.normal(getkey(), (3, 5, 3))

    @jax.custom_batching.custom_vmap
    def outputs(xs):
        return rnn(xs)[0]

    @outputs.def_vmap
    def _rule(axis_size, in_batched, xs):
        # The bug: examples come back in the wrong order.
        return jax.vmap(lambda x: rnn(x)[0])(xs)[::-1], True

    check_vmap_consistent(lambda xs: rnn(xs)[0], xs)
    with pytest.raises(AssertionError, match="example 0"):
        check_vmap_consistent(outputs, xs)


def test_jit_check_fails_on_python_side_effects(getkey):
    rnn = stackrnn.GRU(3, 4, num_layers=2, key=getkey())
    xs = jr.normal(getkey(), (5, 3))
    calls = [0]

    def counting(xs):
        # Runs at every eager call but only once, at trace time, under jit.
        calls[0] += 1
        return rnn(xs)[0] * calls[0]

    check_jit_consistent(rnn, xs)
    with pytest.raises(AssertionError, match="jitted output vs eager"):
        check_jit_consistent(counting, xs)
