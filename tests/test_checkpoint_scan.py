"""`Scan(checkpoint=Chunks(...))`: time in `jax.checkpoint`-ed chunks. The same values,
final states and gradients as the plain stack for every cell, direction and sequence
option; regularisers' masks as documented; the checkpoint really in the
program; compiled memory growing sublinearly in time; bad values refused."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest
from hypothesis import assume, example, given, strategies as st

import stackrnn
from stackrnn._dropout import dropout
from stackrnn._fold import split_keys

from .helpers import (
    Config,
    configs,
    fewer,
    inputs,
    make_cells,
    make_stack,
    stack_of,
    to_float64,
    tree_allclose,
    with_options,
    x64,
)


DIRECTIONS = ("forward", "reverse", "bidirectional")
# In float64 the two programs differ only in the order of float additions (weight
# gradients summed per chunk, then over chunks), far below this tolerance.
RTOL = ATOL = 1e-10
# Float32, for dropout and the constructors: rounding of reordered sums.
TOL32 = dict(rtol=1e-5, atol=1e-6)


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


# One level (`True`, a length) or nested levels (a tuple of lengths, outermost first).
chunks = st.one_of(
    st.just(True),
    st.integers(1, 10),
    st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple),
)


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
# Nested chunks that do not divide each other or time, read backwards with resets
# at inner and outer chunk boundaries.
@example(
    cfg=Config(kind="gru", input_size=2, widths=(3, 4), bias=True, time=9),
    direction="reverse",
    chunk=(4, 3),
    lengths=[8, 9],
    flags=[[False, False, False, True, True, False, False, True, False]] * 2,
    unroll=1,
    fast=None,
    all_layers=False,
    seed=2,
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
        plain = make_stack(cfg, kc, direction, unroll=unroll, fast=fast)
        plain = to_float64(plain)
        checkpointed = with_options(plain, checkpoint=chunk)
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


AFFINE = ("rnn_tanh", "rnn_relu", "gru", "lstm")
PER_SEQUENCE = [
    dict(dropout=0.5, variational=True, residual=True),
    dict(recurrent_dropout=0.4, weight_drop=0.3),
]


@fewer()
@given(
    cfg=configs(kinds=AFFINE, max_layers=3, max_time=9, same_width=True),
    direction=st.sampled_from(DIRECTIONS),
    chunk=chunks,
    regularisers=st.sampled_from(
        [*PER_SEQUENCE, dict(dropout=0.5, zoneout=0.3, recurrent_dropout=0.2)]
    ),
    seed=st.integers(0, 2**16),
)
@example(
    cfg=Config(kind="gru", input_size=3, widths=(4, 4), bias=True, time=7),
    direction="forward",
    chunk=3,
    regularisers=PER_SEQUENCE[0],
    seed=0,
)
@example(
    cfg=Config(kind="lstm", input_size=3, widths=(4, 4), bias=True, time=7),
    direction="reverse",
    chunk=2,
    regularisers=PER_SEQUENCE[1],
    seed=0,
)
def test_sequence_masks_are_the_plain_ones(cfg, direction, chunk, regularisers, seed):
    """The masks drawn once per sequence (variational dropout, recurrent dropout,
    weight drop) are those of the plain stack, and so are all masks of a
    bidirectional stack (drawn outside its per-layer chunks): the same values and
    gradients."""
    # Unidirectional stacks draw per-step masks per chunk: the next test.
    assume(direction == "bidirectional" or regularisers in PER_SEQUENCE)
    if cfg.num_layers == 1:
        regularisers = dict(
            regularisers, dropout=0.0, variational=False, residual=False
        )
    kc, kx, kd = jr.split(jr.key(seed), 3)
    plain = make_stack(cfg, kc, direction, **regularisers)
    checkpointed = with_options(plain, checkpoint=chunk)
    xs = inputs(cfg, kx)

    def loss(model, key):
        outputs = model(xs, key=key)
        return _weighted_sum(outputs), outputs

    both = eqx.filter_jit(eqx.filter_grad(loss, has_aux=True))
    (got_grads, got), (want_grads, want) = both(checkpointed, kd), both(plain, kd)
    assert tree_allclose(got, want, **TOL32)
    assert tree_allclose(
        (got_grads.cells, got_grads.backward_cells),
        (want_grads.cells, want_grads.backward_cells),
        **TOL32,
    )


def _innermost_chunks(time, lengths, offset=0):
    """`(first step, size)` of every innermost chunk of `time` steps cut into
    chunks of `lengths[0]` steps, each of those into chunks of `lengths[1]`, and so
    on; in time order."""
    found = []
    for start in range(0, time, lengths[0]):
        size = min(lengths[0], time - start)
        if len(lengths) > 1:
            found += _innermost_chunks(size, lengths[1:], offset + start)
        else:
            found.append((offset + start, size))
    return found


def _zoneout_loop(cell, hs, state, keeps, backwards):
    """Zoneout by hand: each unit of the state keeps its previous value where its
    mask `keeps[j][t]` (array `j` of the state, step `t`) is 1."""
    out = [None] * len(hs)
    for t in range(len(hs) - 1, -1, -1) if backwards else range(len(hs)):
        new = cell(hs[t], state)
        leaves = zip(keeps, jax.tree.leaves(state), jax.tree.leaves(new))
        mixed = [jnp.where(k[t], s, n) for k, s, n in leaves]
        state = jax.tree.unflatten(jax.tree.structure(state), mixed)
        out[t] = cell.output(state)
    return jnp.stack(out), state


def _by_chunks(stack, xs, lengths, key):
    """A unidirectional stack with dropout and a `Zoneout` cell per layer (no other
    regulariser), by Python loops over the innermost chunks (last first for
    `reverse`), layers and steps: the chunk from step `s` draws the input dropout of
    layer `l` from `fold_in(dropout key of l, s)` and its zoneout masks from
    `fold_in(zoneout key of l, s)`, the keys being those the plain stack splits
    from `key` (a cell's wrappers take `split(cell key, 3)`, zoneout the third)."""
    input_keys, cell_keys = split_keys(key, stack.num_layers, 1)
    state = stack._split(stack.init_state())
    pieces = _innermost_chunks(len(xs), lengths)
    ys = {}
    for start, size in pieces[:: -1 if stack.reverse else 1]:
        hs = xs[start : start + size]
        for i, zoneout in enumerate(stack.cells):
            cell, rates = zoneout.cell, zoneout.rates
            if i > 0:
                hs = dropout(hs, stack.dropout, jr.fold_in(input_keys[i - 1], start))
            k_zoneout = jr.fold_in(jr.split(cell_keys[i][0], 3)[2], start)
            leaves = jax.tree.leaves(cell.init_state())
            keeps = [
                jr.bernoulli(k, p, (size, leaf.size))
                for k, p, leaf in zip(jr.split(k_zoneout, len(leaves)), rates, leaves)
            ]
            hs, state[i] = _zoneout_loop(cell, hs, state[i], keeps, stack.reverse)
        ys[start] = hs
    return jnp.concatenate([ys[s] for s, _ in pieces]), stack._join(state)


@fewer()
@given(
    cfg=configs(max_layers=3, max_time=9).filter(lambda c: c.num_layers > 1),
    reverse=st.booleans(),
    chunk=chunks,
    seed=st.integers(0, 2**16),
)
def test_step_masks_are_drawn_per_chunk(cfg, reverse, chunk, seed):
    """Dropout between layers and zoneout draw fresh masks per chunk, as
    documented; deterministic for a fixed key, so the recomputed chunks drop what
    the forward pass dropped and the gradient is that of the loops."""
    kc, kx, kd = jr.split(jr.key(seed), 3)
    stack = stack_of(
        make_cells(cfg, kc), reverse=reverse, dropout=0.5, zoneout=0.3, checkpoint=chunk
    )
    xs = inputs(cfg, kx)
    lengths = stackrnn.Chunks.from_flag(chunk).for_time(cfg.time)

    def loss(model, key, run):
        outputs = run(model, key)
        return _weighted_sum(outputs), outputs

    both = eqx.filter_jit(eqx.filter_grad(loss, has_aux=True))
    got = both(stack, kd, lambda m, k: m(xs, key=k))
    want = both(stack, kd, lambda m, k: _by_chunks(m, xs, lengths, k))
    assert tree_allclose(got, want, **TOL32)
    with pytest.raises(RuntimeError, match="requires a `key`"):
        stack(xs)


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
@pytest.mark.parametrize("checkpoint", [False, True, 3, (4, 2)])
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
    # `jax.checkpoint`'s primitive, found as it appears in a program of its own.
    (eqn,) = jax.make_jaxpr(jax.checkpoint(jnp.sin))(1.0).eqns
    remat = eqn.primitive
    assert (remat in _primitives(jaxpr.jaxpr)) == (checkpoint is not False)


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
    checkpointed = [
        _temp_bytes(with_options(stack, checkpoint=True), t) for t in (256, 4096)
    ]
    assert plain[1] / plain[0] > 12
    assert checkpointed[1] / checkpointed[0] < 6
    assert checkpointed[1] < plain[1] / 8


def test_chunk_lengths():
    sqrt = stackrnn.Chunks.sqrt()
    assert [sqrt.for_time(t) for t in (1, 2, 4, 5, 16, 17, 16384)] == [
        (1,),
        (2,),
        (2,),
        (3,),
        (4,),
        (5,),
        (128,),
    ]
    assert all(sqrt.for_time(t) == (math.ceil(math.sqrt(t)),) for t in range(1, 999))
    assert stackrnn.Chunks(7).for_time(3) == (7,)
    assert stackrnn.Chunks(8, 2).for_time(3) == (8, 2)
    assert stackrnn.Chunks.from_flag(True) == sqrt
    assert stackrnn.Chunks.from_flag((8, 2)) == stackrnn.Chunks(8, 2)
    assert stackrnn.Chunks.from_flag(False) is None


def test_constructors_pass_checkpoint_on(getkey):
    xs = jr.normal(getkey(), (9, 3))
    for make in (stackrnn.RNN, stackrnn.GRU, stackrnn.LSTM):
        key = getkey()
        checkpointed = make(3, 4, num_layers=2, checkpoint=4, key=key)
        assert checkpointed.scan.checkpoint == stackrnn.Chunks(4)
        assert tree_allclose(checkpointed(xs), make(3, 4, 2, key=key)(xs), **TOL32)


def test_bad_checkpoint_values(getkey):
    for bad in ((0,), (-2,), (4, 0), (4, 2.0), (4, True)):
        with pytest.raises(ValueError, match=r"`Chunks`'s lengths must be integers"):
            stackrnn.Chunks(*bad)
    with pytest.raises(TypeError, match=r"`Chunks.sqrt\(\)`"):
        stackrnn.Chunks()
    for bad in (2.5, "yes", (), [4, 2]):
        with pytest.raises(TypeError, match=r"`checkpoint` must be True, False, a"):
            stackrnn.LSTM(3, 4, checkpoint=bad, key=getkey())
    with pytest.raises(ValueError, match="`Chunks`"):
        stackrnn.LSTM(3, 4, checkpoint=0, key=getkey())
    with pytest.raises(TypeError, match="`checkpoint` must be None or a"):
        stackrnn.Scan(checkpoint=4)
