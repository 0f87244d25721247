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
from hypothesis import example, given, strategies as st

import stackrnn

from .helpers import (
    call,
    Config,
    inputs,
    make_stack,
    random_state,
    seeds,
    stack_by_hand,
    stack_of,
    structures,
    to_float64,
    TOL32,
    TOL64,
    tree_allclose,
    with_options,
    x64,
)


def _weighted_sum(tree):
    """A sum that weighs every element differently, so that no gradient entry is
    symmetric by accident."""
    total = 0.0
    for leaf in jax.tree.leaves(tree):
        weights = jnp.arange(1, leaf.size + 1, dtype=leaf.dtype).reshape(leaf.shape)
        total = total + jnp.sum(jnp.sin(leaf) * weights / leaf.size)
    return total


@eqx.filter_jit
def _outputs_and_grads(model, xs, states, options, all_layers):
    """Under `vmap`, the outputs and final states, and the gradients of a weighted
    sum of them with respect to the cells' parameters, the inputs and the initial
    states (compiled once per structure)."""
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss(params, xs, states):
        model = eqx.combine(params, static)
        run = jax.vmap(lambda x, s, o: model(x, s, all_layers=all_layers, **o))
        outputs = run(xs, states, options)
        return _weighted_sum(outputs), outputs

    (_, outputs), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(
        params, xs, states
    )
    d_params, d_xs, d_states = grads
    # The cells' parameters: the two stacks differ in a static field.
    return outputs, (d_params.cells, d_params.backward_cells), d_xs, d_states


# Fixed shapes that together cover every direction, one level of chunks that divide
# the time or not, longer than the sequence or of one step, nested chunks, `length`
# and `resets` (including resets at chunk boundaries, which a backwards read must
# carry from one chunk into the next), `unroll`, every path (`fast`: None for the
# default, by width, True for the fast path; with `length` or `resets` the
# reference path is taken) and `all_layers`. The quick loop runs the first three:
# lengths and resets read backwards in chunks, the fast path reversed, the default
# path. (config, direction, chunks, lengths?, resets?, unroll, fast, all_layers)
CHECKPOINTED = [
    (Config("lstm", 2, (3, 4), True, 7), "reverse", 2, True, True, 1, None, True),
    (Config("lstm", 2, (4, 3), False, 9), "reverse", True, False, False, 2, True, True),
    # The default path (fused, where the accelerator is installed) in chunks
    # longer than the sequence.
    (Config("gru", 2, (4, 4), True, 6), "forward", 10, False, False, 1, None, False),
    (
        Config("rnn_tanh", 2, (3, 4), True, 9),
        "reverse",
        (4, 3),
        True,
        True,
        1,
        None,
        False,
    ),
    (
        Config("gru_ln", 2, (3, 3), True, 8),
        "bidirectional",
        (3, 1),
        True,
        True,
        2,
        True,
        True,
    ),
]


@pytest.mark.parametrize(
    "cfg, direction, chunk, has_lengths, has_resets, unroll, fast, all_layers",
    structures(
        CHECKPOINTED, quick=3, ids=[f"{c[0].kind}-{c[1]}" for c in CHECKPOINTED]
    ),
)
@given(
    lengths=st.lists(st.integers(1, 9), min_size=2, max_size=2),
    flags=st.lists(
        st.lists(st.booleans(), min_size=9, max_size=9), min_size=2, max_size=2
    ),
    seed=seeds,
)
# Resets at the chunk boundaries of the first shape, read backwards, with lengths
# that end inside a chunk.
@example(
    lengths=[6, 7],
    flags=[[False, True, True, False, True, True, True, False, False]] * 2,
    seed=0,
)
def test_checkpointed_equals_plain(
    cfg,
    direction,
    chunk,
    has_lengths,
    has_resets,
    unroll,
    fast,
    all_layers,
    lengths,
    flags,
    seed,
):
    """Values, final states and gradients with respect to parameters, inputs and
    initial states, under `jit` and `vmap`, in float64."""
    with x64(True):
        kc, kx, ks = jr.split(jr.key(seed), 3)
        plain = make_stack(cfg, kc, direction, unroll=unroll, fast=fast)
        plain = to_float64(plain)
        checkpointed = with_options(plain, checkpoint=chunk)
        xs = inputs(cfg, kx, batch=2).astype(jnp.float64)
        states = jax.vmap(lambda k: random_state(plain, k))(jr.split(ks, 2))
        options = {}
        if has_lengths:
            options["length"] = jnp.minimum(jnp.array(lengths), cfg.time)
        if has_resets:
            options["resets"] = jnp.array([f[: cfg.time] for f in flags])
        got = _outputs_and_grads(checkpointed, xs, states, options, all_layers)
        want = _outputs_and_grads(plain, xs, states, options, all_layers)
        # The two programs differ only in the order of float additions (weight
        # gradients summed per chunk, then over chunks).
        assert tree_allclose(got, want, **TOL64)


PER_SEQUENCE = [
    dict(dropout=0.5, variational=True, residual=True),
    dict(recurrent_dropout=0.4, weight_drop=0.3),
]


def _loss(model, xs, key):
    outputs = model(xs, key=key)
    return _weighted_sum(outputs), outputs


_grads_and_outputs = eqx.filter_jit(eqx.filter_grad(_loss, has_aux=True))


@pytest.mark.parametrize(
    "cfg, direction, chunk, regularisers",
    structures(
        [
            (
                Config("rnn_relu", 3, (4, 4), False, 7),
                "bidirectional",
                (3, 2),
                dict(dropout=0.5, zoneout=0.3, recurrent_dropout=0.2, residual=True),
            ),
            (Config("gru", 3, (4, 4), True, 7), "forward", 3, PER_SEQUENCE[0]),
            (Config("lstm", 3, (4, 4, 4), True, 7), "reverse", 2, PER_SEQUENCE[1]),
        ],
        quick=1,
        ids=["bidirectional", "forward", "reverse"],
    ),
)
@given(seed=seeds)
def test_sequence_masks_are_the_plain_ones(cfg, direction, chunk, regularisers, seed):
    """The masks drawn once per sequence (variational dropout, recurrent dropout,
    weight drop) are those of the plain stack, and so are all masks of a
    bidirectional stack (drawn outside its per-layer chunks): the same values and
    gradients. (Unidirectional stacks draw per-step masks per chunk: the next
    test.)"""
    kc, kx, kd = jr.split(jr.key(seed), 3)
    plain = make_stack(cfg, kc, direction, **regularisers)
    checkpointed = with_options(plain, checkpoint=chunk)
    xs = inputs(cfg, kx)
    got_grads, got = _grads_and_outputs(checkpointed, xs, kd)
    want_grads, want = _grads_and_outputs(plain, xs, kd)
    assert tree_allclose(got, want, **TOL32)
    assert tree_allclose(
        (got_grads.cells, got_grads.backward_cells),
        (want_grads.cells, want_grads.backward_cells),
        **TOL32,
    )


def _reference_loss(model, xs, key):
    outputs = stack_by_hand(model, xs, key=key)
    return _weighted_sum(outputs), outputs


_reference_grads_and_outputs = eqx.filter_jit(
    eqx.filter_grad(_reference_loss, has_aux=True)
)


@pytest.mark.parametrize(
    "cfg, reverse, chunk",
    structures(
        [
            (Config("gru", 2, (3, 4), True, 7), False, (3, 2)),
            (Config("lstm", 2, (3, 4), True, 5), True, True),
        ],
        quick=1,
        ids=["forward", "reverse"],
    ),
)
@given(seed=seeds)
def test_step_masks_are_drawn_per_chunk(cfg, reverse, chunk, seed):
    """Dropout between layers and zoneout draw fresh masks per innermost chunk, from
    their key folded with the chunk's first step, as documented and as the
    reference draws them; deterministic for a fixed key, so the recomputed chunks
    drop what the forward pass dropped and the gradient is that of the loops."""
    kc, kx, kd = jr.split(jr.key(seed), 3)
    stack = stack_of(
        make_stack(cfg, kc, "forward").cells,
        reverse=reverse,
        dropout=0.5,
        zoneout=0.3,
        checkpoint=chunk,
    )
    xs = inputs(cfg, kx)
    got = _grads_and_outputs(stack, xs, kd)
    want = _reference_grads_and_outputs(stack, xs, kd)
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


@pytest.mark.slow
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
        want = call(make(3, 4, 2, key=key), xs)
        assert tree_allclose(call(checkpointed, xs), want, **TOL32)


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
