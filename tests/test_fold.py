"""The fold over layers: a run of alike layers folded with `jax.lax.scan`
(`Scan(scan_layers=...)`) computes what the Python loop over layers, the
reference, computes, with the same masks, in every way a stack runs."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest
from hypothesis import given, settings, strategies as st

import stackrnn
from stackrnn._fold import _runs

from .helpers import fewer, make_cell, stack_of, tree_allclose, with_options


# A fixed shape per test, so that examples reuse compiled programs: 4 layers, the
# last three alike, over 5 steps. The scan reorders float32 sums a little.
INPUT, WIDTH, LAYERS, TIME = 3, 4, 4, 5
TOL = dict(rtol=1e-5, atol=1e-5)
options = st.fixed_dictionaries(
    dict(
        kind=st.sampled_from(["rnn_tanh", "gru", "lstm_proj", "gru_ln"]),
        direction=st.sampled_from(["forward", "reverse", "bidirectional"]),
        dropout=st.sampled_from([0.0, 0.3]),
        variational=st.booleans(),
        residual=st.booleans(),
        zoneout=st.sampled_from([0.0, 0.2]),
        recurrent_dropout=st.sampled_from([0.0, 0.2]),
    )
)


def _stacks(opts, seed, **extra):
    """The stack `opts` describe, folded by the Python loop and by the scan."""
    opts = dict(opts)
    kind, direction = opts.pop("kind"), opts.pop("direction")
    if not opts["dropout"]:
        opts["variational"] = False
    keys = jr.split(jr.key(seed), 2 * LAYERS)
    width = 2 * WIDTH if direction == "bidirectional" else WIDTH
    if kind == "lstm_proj":
        width //= 2
    cells = [
        make_cell(kind, INPUT if i == 0 else width, WIDTH, key=keys[i])
        for i in range(LAYERS)
    ]
    backward = None
    if direction == "bidirectional":
        backward = [
            make_cell(kind, c.input_size, WIDTH, key=keys[LAYERS + i])
            for i, c in enumerate(cells)
        ]
    loop = stack_of(
        cells,
        backward_cells=backward,
        reverse=direction == "reverse",
        **opts,
        **extra,
    )
    return loop, with_options(loop, scan_layers=2)


@eqx.filter_jit
def _value_and_grad(stack, xs, **kwargs):
    """The outputs and final state, and the gradients of a loss of both with
    respect to every parameter and input, as a flat list (the two stacks differ in
    a static field, so their trees do)."""

    def loss(args):
        stack, xs = args
        ys, state = stack(xs, **kwargs)
        outputs = ys if isinstance(ys, tuple) else (ys,)
        value = sum(jnp.sum(jnp.sin(y)) for y in outputs)
        return value + sum(jnp.sum(s**2) for s in jax.tree.leaves(state)), (ys, state)

    (_, aux), grads = eqx.filter_value_and_grad(loss, has_aux=True)((stack, xs))
    return aux, jax.tree.leaves(grads)


@fewer()
@given(opts=options, all_layers=st.booleans(), seed=st.integers(0, 2**16))
def test_scan_over_layers_equals_the_loop(opts, all_layers, seed):
    """Outputs (every layer's, or the top's), final states and the gradients of
    parameters and inputs agree, with dropout, variational dropout, residual
    connections, zoneout and recurrent dropout drawn from the same keys."""
    loop, scanned = _stacks(opts, seed)
    xs = jr.normal(jr.key(seed + 1), (TIME, INPUT))
    key = jr.key(seed + 2)
    got = _value_and_grad(scanned, xs, key=key, all_layers=all_layers)
    want = _value_and_grad(loop, xs, key=key, all_layers=all_layers)
    assert tree_allclose(got, want, **TOL)


@settings(max_examples=2)
@given(
    opts=options.filter(lambda o: o["direction"] != "bidirectional"),
    seed=st.integers(0, 2**16),
)
def test_scan_over_layers_equals_the_loop_checkpointed(opts, seed):
    """With `checkpoint`, the layers fold inside each chunk of time (a
    unidirectional stack); `transduce` too."""
    loop, scanned = _stacks(opts, seed, checkpoint=2)
    xs = jr.normal(jr.key(seed + 1), (TIME, INPUT))
    key = jr.key(seed + 2)
    assert tree_allclose(
        _value_and_grad(scanned, xs, key=key), _value_and_grad(loop, xs, key=key), **TOL
    )

    @eqx.filter_jit
    def transduce(stack):
        return stack.transduce(lambda x: x, lambda y, _: jnp.sin(y), xs, key=key)

    assert tree_allclose(transduce(scanned), transduce(loop), **TOL)


@fewer()
@given(
    opts=options,
    length=st.integers(1, TIME),
    flags=st.lists(st.booleans(), min_size=TIME, max_size=TIME),
    seed=st.integers(0, 2**16),
)
def test_scan_over_layers_with_length_and_resets(opts, length, flags, seed):
    loop, scanned = _stacks(opts, seed)
    xs = jr.normal(jr.key(seed + 1), (TIME, INPUT))
    kwargs = dict(
        length=jnp.asarray(length), resets=jnp.array(flags), key=jr.key(seed + 2)
    )
    assert tree_allclose(
        _value_and_grad(scanned, xs, **kwargs),
        _value_and_grad(loop, xs, **kwargs),
        **TOL,
    )


@fewer()
@given(
    opts=options.filter(lambda o: o["direction"] != "bidirectional"),
    inference=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_scan_over_layers_in_step(opts, inference, seed):
    """`step`, streaming, with the masks it draws per step in training."""
    opts = dict(opts, variational=False, recurrent_dropout=0.0)
    loop, scanned = _stacks(opts, seed)
    x = jr.normal(jr.key(seed + 1), (INPUT,))
    state = jax.tree.map(lambda s: s + 0.5, loop.init_state())
    kwargs = dict(key=jr.key(seed + 2), inference=inference)
    assert tree_allclose(
        scanned.step(x, state, **kwargs), loop.step(x, state, **kwargs), **TOL
    )


def test_runs_of_alike_layers(getkey):
    """Layers differing in width, cell type or options split the runs; only runs
    of at least `scan_layers` layers above the first are scanned."""
    widths = [4, 4, 4, 6, 6, 6, 6]
    cells, size = [], 3
    for i, width in enumerate(widths):
        kind = "lstm" if i == 6 else "gru"
        cells.append(make_cell(kind, size, width, key=getkey()))
        size = width
    layers = [(cell,) for cell in cells]
    assert list(_runs(layers, 2)) == [
        (0, 1, False),
        (1, 3, True),
        (3, 4, False),
        (4, 6, True),
        (6, 7, False),
    ]
    assert list(_runs(layers, 3)) == [(i, i + 1, False) for i in range(7)]
    assert list(_runs(layers, None)) == [(i, i + 1, False) for i in range(7)]
    # A wrapper's rate is an option: another rate is another kind of layer.
    wrapped = [
        (stackrnn.Zoneout(cell, 0.1 if i < 2 else 0.2),)
        for i, cell in enumerate(cells[:3])
    ]
    assert list(_runs(wrapped, 2)) == [(i, i + 1, False) for i in range(3)]


def test_scan_over_mixed_runs_equals_the_loop(getkey):
    widths = [4, 4, 4, 6, 6, 6]
    cells, size = [], 3
    for width in widths:
        cells.append(make_cell("gru", size, width, key=getkey()))
        size = width
    loop = stack_of(cells, dropout=0.2)
    xs = jr.normal(getkey(), (TIME, 3))
    key = getkey()
    got = _value_and_grad(with_options(loop, scan_layers=2), xs, key=key)
    assert tree_allclose(got, _value_and_grad(loop, xs, key=key), **TOL)


@pytest.mark.parametrize("scan_layers", [1, 0, 2.0, "2", True])
def test_scan_layers_is_checked(scan_layers):
    with pytest.raises((TypeError, ValueError), match="`scan_layers`"):
        stackrnn.Scan(scan_layers=scan_layers)
