"""The fold over layers: a run of alike layers folded with `jax.lax.scan`
(`Scan(scan_layers=...)`) computes what the Python loop over layers, the
reference, computes, with the same masks, in every way a stack runs."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from hypothesis import given, strategies as st

import stackrnn
from stackrnn._fold import _runs

from .helpers import (
    make_cell,
    seeds,
    stack_of,
    structures,
    tree_allclose,
    with_options,
)


# Fixed structures, so that examples reuse compiled programs; between them they hold
# every cell family, direction, kind of dropout and wrapper, and runs that are
# scanned beside layers that are not (the first two in the quick loop). The scan
# reorders float32 sums a little.
INPUT, TIME = 3, 5
TOL = dict(rtol=1e-5, atol=1e-5)
STRUCTURES = {
    # Widths 4, 4, 4, 6: layers 1-2 are scanned, 0 and 3 are not.
    "gru-bidirectional": dict(
        kind="gru",
        widths=(4, 4, 4, 6),
        direction="bidirectional",
        dropout=0.3,
        variational=True,
        residual=False,
        zoneout=0.2,
    ),
    "lstm_proj-reverse": dict(
        kind="lstm_proj",
        widths=(4, 4, 4, 4),
        direction="reverse",
        dropout=0.3,
        residual=True,
        recurrent_dropout=0.2,
    ),
    "gru_ln-forward": dict(
        kind="gru_ln",
        widths=(4, 4, 4, 4),
        direction="forward",
        residual=True,
        zoneout=0.2,
        recurrent_dropout=0.2,
    ),
    "rnn_tanh-forward": dict(
        kind="rnn_tanh", widths=(4, 4, 4), direction="forward", dropout=0.3
    ),
}


def _stacks(name, seed, **extra):
    """Structure `name` with parameters drawn from `seed`, folded by the Python
    loop and by the scan."""
    options = dict(STRUCTURES[name], **extra)
    kind, widths = options.pop("kind"), options.pop("widths")
    direction = options.pop("direction")
    keys = iter(jr.split(jr.key(seed), 2 * len(widths)))

    def layers():
        cells, size = [], INPUT
        for width in widths:
            cells.append(make_cell(kind, size, width, key=next(keys)))
            size = cells[-1].output_size * (2 if direction == "bidirectional" else 1)
        return cells

    cells = layers()
    backward = layers() if direction == "bidirectional" else None
    loop = stack_of(
        cells, backward_cells=backward, reverse=direction == "reverse", **options
    )
    return loop, with_options(loop, scan_layers=2)


def _draw(seed, shape):
    return jax.device_put(np.random.default_rng(seed).normal(size=shape).astype("f4"))


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


@pytest.mark.parametrize("name", structures(list(STRUCTURES), quick=2))
@given(
    seed=seeds,
    length=st.integers(1, TIME),
    flags=st.lists(st.booleans(), min_size=TIME, max_size=TIME),
)
def test_scan_over_layers_equals_the_loop(name, seed, length, flags):
    """Outputs (every layer's on two structures, the top's on the others), final
    states and the gradients of parameters and inputs agree, with lengths, resets,
    dropout (per element and variational), residual connections, zoneout and
    recurrent dropout drawn from the same keys."""
    loop, scanned = _stacks(name, seed)
    kwargs = dict(
        length=jnp.asarray(length),
        resets=jnp.asarray(flags),
        key=jr.key(seed + 1),
        all_layers=name in ("gru-bidirectional", "gru_ln-forward"),
    )
    xs = _draw(seed, (TIME, INPUT))
    got = _value_and_grad(scanned, xs, **kwargs)
    assert tree_allclose(got, _value_and_grad(loop, xs, **kwargs), **TOL)


@jax.jit
def _piece(y, _):
    return jnp.sin(y)


@given(seed=seeds)
def test_scan_over_layers_equals_the_loop_checkpointed(seed):
    """With `checkpoint`, the layers fold inside each chunk of time (a
    unidirectional stack); `transduce` too."""
    loop, scanned = _stacks("rnn_tanh-forward", seed, checkpoint=2)
    xs, key = _draw(seed, (TIME, INPUT)), jr.key(seed + 1)
    assert tree_allclose(
        _value_and_grad(scanned, xs, key=key), _value_and_grad(loop, xs, key=key), **TOL
    )
    assert tree_allclose(
        _transduce(scanned, xs, key=key), _transduce(loop, xs, key=key), **TOL
    )


@eqx.filter_jit
def _transduce(stack, xs, **kwargs):
    return stack.transduce(lambda x: x, _piece, xs, **kwargs)


@eqx.filter_jit
def _step(stack, x, state, **kwargs):
    return stack.step(x, state, **kwargs)


@given(seed=seeds)
def test_scan_over_layers_in_step(seed):
    """`step`, streaming, in training (with the masks it draws per step) and at
    inference."""
    loop, scanned = _stacks("gru_ln-forward", seed, recurrent_dropout=0.0, dropout=0.3)
    x = _draw(seed, (INPUT,))
    state = jax.tree.map(lambda s: s + 0.5, loop.init_state())
    for inference in (False, True):
        kwargs = dict(key=jr.key(seed + 1), inference=inference)
        assert tree_allclose(
            _step(scanned, x, state, **kwargs), _step(loop, x, state, **kwargs), **TOL
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


@pytest.mark.parametrize("scan_layers", [1, 0, 2.0, "2", True])
def test_scan_layers_is_checked(scan_layers):
    with pytest.raises((TypeError, ValueError), match="`scan_layers`"):
        stackrnn.Scan(scan_layers=scan_layers)
