"""`StackedRNN(checkpoint=...)`: time in `jax.checkpoint`-ed chunks. The same values,
final states and gradients as the plain stack for every cell, direction and sequence
option; dropout masks drawn per chunk as documented; the checkpoint really in the
program; compiled memory growing sublinearly in time; bad values refused."""

import math

import equinox as eqx
import jax
import jax.extend.core.primitives as primitives
import jax.numpy as jnp
import jax.random as jr
import pytest
from hypothesis import example, given, strategies as st

import stackrnn
from stackrnn._chunked import chunk_length

from .helpers import (
    Config,
    configs,
    fewer,
    inputs,
    make_cell,
    make_cells,
    tree_allclose,
    x64,
)


DIRECTIONS = ("forward", "reverse", "bidirectional")
# In float64 the two programs differ only in the order of float additions (weight
# gradients summed per chunk, then over chunks), far below this tolerance.
RTOL = ATOL = 1e-10
# Float32, for dropout and the constructors: rounding of reordered sums.
TOL32 = dict(rtol=1e-5, atol=1e-6)


def _stack(cfg, key, direction, **options):
    if direction != "bidirectional":
        cells = make_cells(cfg, key)
        return stackrnn.StackedRNN(cells, reverse=direction == "reverse", **options)
    cells, backward = [], []
    size = cfg.input_size
    for width, k in zip(cfg.widths, jr.split(key, cfg.num_layers)):
        kf, kb = jr.split(k)
        cells.append(make_cell(cfg.kind, size, width, bias=cfg.bias, key=kf))
        backward.append(make_cell(cfg.kind, size, width, bias=cfg.bias, key=kb))
        size = cells[-1].output_size + backward[-1].output_size
    return stackrnn.StackedRNN(cells, backward_cells=backward, **options)


def _with(stack, **options):
    """`stack`'s cells in a new stack with its options, updated by `options`."""
    kwargs = dict(
        backward_cells=stack.backward_cells,
        dropout=stack.dropout,
        unroll=stack.unroll,
        reverse=stack.reverse,
        fast=stack.fast,
        checkpoint=stack.checkpoint,
    )
    return stackrnn.StackedRNN(stack.cells, **{**kwargs, **options})


def _random_state(stack, key):
    leaves, treedef = jax.tree.flatten(stack.init_state())
    keys = jr.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef, [jr.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    )


def _weighted_sum(tree):
    """A sum that weighs every element differently, so that no gradient entry is
    symmetric by accident."""
    total = 0.0
    for leaf in jax.tree.leaves(tree):
        weights = jnp.arange(1, leaf.size + 1, dtype=leaf.dtype).reshape(leaf.shape)
        total = total + jnp.sum(jnp.sin(leaf) * weights / leaf.size)
    return total


chunks = st.one_of(st.just(True), st.integers(1, 10))


@fewer()
@given(
    cfg=configs(max_layers=3, max_time=9),
    direction=st.sampled_from(DIRECTIONS),
    chunk=chunks,
    lengths=st.one_of(st.none(), st.lists(st.integers(1, 9), min_size=2, max_size=2)),
    flags=st.one_of(
        st.none(),
        st.lists(
            st.lists(st.booleans(), min_size=9, max_size=9), min_size=2, max_size=2
        ),
    ),
    unroll=st.integers(1, 2),
    fast=st.sampled_from([None, True, False]),
    all_layers=st.booleans(),
    seed=st.integers(0, 2**16),
)
# Resets at chunk boundaries, read backwards (the flag must cross into the next
# chunk), with lengths that end inside a chunk and a chunk that does not divide time.
@example(
    cfg=Config(kind="lstm", input_size=2, widths=(3, 4), bias=True, time=7),
    direction="reverse",
    chunk=2,
    lengths=[6, 7],
    flags=[[False, True, True, False, True, True, True, False, False]] * 2,
    unroll=1,
    fast=None,
    all_layers=True,
    seed=0,
)
@example(
    cfg=Config(kind="gru", input_size=2, widths=(3, 3), bias=True, time=8),
    direction="bidirectional",
    chunk=3,
    lengths=[5, 8],
    flags=[[False, False, False, True, False, False, True, False, False]] * 2,
    unroll=2,
    fast=True,
    all_layers=False,
    seed=1,
)
def test_checkpointed_equals_plain(
    cfg, direction, chunk, lengths, flags, unroll, fast, all_layers, seed
):
    """Values, final states and gradients with respect to parameters, inputs and
    initial states, under `jit` and `vmap`, for chunks that divide the time or not,
    chunks longer than the sequence, `length`, `resets` (including resets at chunk
    boundaries, which a backwards read must carry from one chunk into the next) and
    every path (`fast`)."""
    with x64(True):
        kc, kx, ks = jr.split(jr.key(seed), 3)
        plain = _stack(cfg, kc, direction, unroll=unroll, fast=fast)
        plain = jax.tree.map(
            lambda p: p.astype(jnp.float64) if eqx.is_inexact_array(p) else p, plain
        )
        checkpointed = _with(plain, checkpoint=chunk)
        xs = inputs(cfg, kx, batch=2).astype(jnp.float64)
        states = jax.vmap(lambda k: _random_state(plain, k))(jr.split(ks, 2))
        options = {}
        if lengths is not None:
            options["length"] = jnp.minimum(jnp.array(lengths), cfg.time)
        if flags is not None:
            options["resets"] = jnp.array([f[: cfg.time] for f in flags])

        def run(model, xs, states):
            return jax.vmap(lambda x, s, o: model(x, s, all_layers=all_layers, **o))(
                xs, states, options
            )

        def grads(model, xs, states):
            params, static = eqx.partition(model, eqx.is_inexact_array)

            def loss(params, xs, states):
                return _weighted_sum(run(eqx.combine(params, static), xs, states))

            # Parameters (of the cells: the stacks differ in a static field),
            # inputs and initial states.
            d_params, d_xs, d_states = jax.grad(loss, (0, 1, 2))(params, xs, states)
            return (d_params.cells, d_params.backward_cells), d_xs, d_states

        for f in (run, grads):
            got = eqx.filter_jit(f)(checkpointed, xs, states)
            want = eqx.filter_jit(f)(plain, xs, states)
            assert tree_allclose(got, want, rtol=RTOL, atol=ATOL)


def _chunk_by_chunk(stack, xs, chunk, key):
    """A unidirectional stack with dropout, run by a Python loop over the chunks
    (last first for a `reverse` stack), each chunk a plain call with key
    `fold_in(key, c)`: the masks `checkpoint` documents."""
    plain = _with(stack, checkpoint=False)
    starts = list(range(0, len(xs), chunk))
    order = reversed(list(enumerate(starts))) if stack.reverse else enumerate(starts)
    state, ys = stack.init_state(), {}
    for c, start in order:
        ys[c], state = plain(xs[start : start + chunk], state, key=jr.fold_in(key, c))
    return jnp.concatenate([ys[c] for c in range(len(starts))]), state


@fewer()
@given(
    cfg=configs(max_layers=3, max_time=9).filter(lambda c: c.num_layers > 1),
    reverse=st.booleans(),
    chunk=chunks,
    seed=st.integers(0, 2**16),
)
def test_dropout_masks_are_drawn_per_chunk(cfg, reverse, chunk, seed):
    kc, kx, kd = jr.split(jr.key(seed), 3)
    stack = stackrnn.StackedRNN(
        make_cells(cfg, kc), reverse=reverse, dropout=0.5, checkpoint=chunk
    )
    xs = inputs(cfg, kx)

    def by_chunks(model, key):
        return _chunk_by_chunk(model, xs, chunk_length(chunk, cfg.time), key)

    def loss(model, key, run):
        outputs = run(model, key)
        return _weighted_sum(outputs), outputs

    # Values, and gradients: the recomputed chunks drop what the forward pass
    # dropped (the masks are deterministic for a fixed key), so the gradient is that
    # of the chunk-by-chunk loop.
    both = eqx.filter_jit(eqx.filter_grad(loss, has_aux=True))
    got = both(stack, kd, lambda m, k: m(xs, key=k))
    assert tree_allclose(got, both(stack, kd, by_chunks), **TOL32)


def test_bidirectional_dropout_masks_are_the_plain_ones(getkey):
    """A bidirectional stack applies dropout to whole layer outputs, outside the
    chunks: the masks are those of the plain stack."""
    plain = stackrnn.GRU(
        3, 4, num_layers=3, dropout=0.5, bidirectional=True, key=getkey()
    )
    checkpointed = _with(plain, checkpoint=2)
    xs, key = jr.normal(getkey(), (7, 3)), getkey()
    run = eqx.filter_jit(lambda m, x, k: m(x, key=k))
    assert tree_allclose(run(checkpointed, xs, key), run(plain, xs, key), **TOL32)
    with pytest.raises(RuntimeError, match="requires a `key`"):
        checkpointed(xs)


def _primitives(jaxpr):
    """The primitives of a jaxpr and of every jaxpr nested in it."""
    found = set()
    for eqn in jaxpr.eqns:
        found.add(eqn.primitive)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    sub = sub.jaxpr
                if isinstance(sub, jax.extend.core.Jaxpr):
                    found |= _primitives(sub)
    return found


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("checkpoint", [False, True, 3])
def test_the_checkpoint_is_in_the_program(bidirectional, checkpoint, getkey):
    stack = stackrnn.LSTM(
        3,
        4,
        num_layers=2,
        bidirectional=bidirectional,
        checkpoint=checkpoint,
        key=getkey(),
    )
    jaxpr = jax.make_jaxpr(lambda x: stack(x))(jnp.ones((10, 3)))
    assert (primitives.remat_p in _primitives(jaxpr.jaxpr)) == (checkpoint is not False)


def _temp_bytes(stack, time):
    """XLA's temporary buffer size for the gradient of a loss on the final state,
    under `vmap` over 2 examples: what the backward pass keeps (compiled, not run)."""
    params, static = eqx.partition(stack, eqx.is_array)

    def loss(params, xs):
        _, state = jax.vmap(eqx.combine(params, static))(xs)
        return jnp.sum(state**2)

    xs = jnp.zeros((2, time, stack.input_size))
    compiled = jax.jit(jax.grad(loss)).lower(params, xs).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_compiled_memory_grows_sublinearly_with_checkpointing(getkey):
    """16x the steps: without checkpointing the backward pass keeps every step
    (about 16x the memory); with it, about sqrt(16) = 4x."""
    stack = stackrnn.GRU(4, 32, num_layers=2, key=getkey())
    plain = [_temp_bytes(stack, t) for t in (256, 4096)]
    checkpointed = [_temp_bytes(_with(stack, checkpoint=True), t) for t in (256, 4096)]
    assert plain[1] / plain[0] > 12
    assert checkpointed[1] / checkpointed[0] < 6
    assert checkpointed[1] < plain[1] / 8


def test_chunk_length():
    assert [chunk_length(True, t) for t in (1, 2, 4, 5, 16, 17, 16384)] == [
        1,
        2,
        2,
        3,
        4,
        5,
        128,
    ]
    assert all(chunk_length(True, t) == math.ceil(math.sqrt(t)) for t in range(1, 999))
    assert chunk_length(7, 3) == 7 and chunk_length(False, 3) is None


def test_constructors_pass_checkpoint_on(getkey):
    xs = jr.normal(getkey(), (9, 3))
    for make in (stackrnn.RNN, stackrnn.GRU, stackrnn.LSTM):
        key = getkey()
        checkpointed = make(3, 4, num_layers=2, checkpoint=4, key=key)
        assert checkpointed.checkpoint == 4
        assert tree_allclose(checkpointed(xs), make(3, 4, 2, key=key)(xs), **TOL32)


def test_bad_checkpoint_values(getkey):
    cells = [stackrnn.GRUCell(3, 4, key=getkey())]
    for bad in (0, -2):
        with pytest.raises(
            ValueError, match=rf"`checkpoint` must be a chunk.*got {bad}"
        ):
            stackrnn.StackedRNN(cells, checkpoint=bad)
    for bad in (2.5, "yes", None):
        with pytest.raises(TypeError, match=r"`checkpoint` must be True, False or"):
            stackrnn.StackedRNN(cells, checkpoint=bad)
    with pytest.raises(ValueError, match="`checkpoint`"):
        stackrnn.LSTM(3, 4, checkpoint=0, key=getkey())
