"""Sequence features of `StackedRNN`: bidirectional stacks, lengths, resets, `step`,
all-layer outputs and reverse stacks, each against an independent construction."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from hypothesis import given, strategies as st

import stackrnn
import stackrnn.lm

from .helpers import (
    Config,
    configs,
    fewer,
    inputs,
    make_cells,
    make_stack,
    stack_of,
    tree_allclose,
    tree_equal,
)


DIRECTIONS = ("forward", "reverse", "bidirectional")
# Eager op-by-op dispatch or another scan order versus one compiled scan: the same
# operations, but XLA may fuse them differently, so equality holds to f32 rounding.
TOL = dict(rtol=1e-5, atol=1e-6)


def _random_state(stack, key):
    zeros = stack.init_state()
    leaves, treedef = jax.tree.flatten(zeros)
    keys = jr.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef, [jr.normal(k, leaf.shape) for k, leaf in zip(keys, leaves)]
    )


def _loop(cell, xs, state, *, backwards=False):
    """A cell run over a sequence by a Python loop, one eager call per step."""
    order = range(len(xs) - 1, -1, -1) if backwards else range(len(xs))
    ys = [None] * len(xs)
    for t in order:
        state = cell(xs[t], state)
        ys[t] = cell.output(state)
    return jnp.stack(ys), state


def _reads_forwards(stack, index):
    """Whether the state at `index` (PyTorch's order) belongs to a cell that reads
    time forwards."""
    return not stack.reverse and (not stack.bidirectional or index % 2 == 0)


def _by_hand(stack, xs, state):
    """The stack computed by hand: Python loops over layers, directions and steps."""
    states = iter(stack._split(state))
    hs, finals = xs, []
    for i in range(stack.num_layers):
        cells = [stack.cells[i]]
        if stack.bidirectional:
            cells.append(stack.backward_cells[i])
        ys = []
        for direction, cell in enumerate(cells):
            backwards = stack.reverse or direction == 1
            y, final = _loop(cell, hs, next(states), backwards=backwards)
            ys.append(y)
            finals.append(final)
        hs = jnp.concatenate(ys, axis=-1)
    return hs, stack._join(finals)


# Each example compiles a stack and builds its reference by hand, so these tests run
# half the examples of the active profile (ci: 4, thorough: 100).
directions = st.sampled_from(DIRECTIONS)
seeds = st.integers(0, 2**16)


@fewer()
@given(cfg=configs(max_layers=2, max_time=5), seed=seeds)
def test_bidirectional_equals_hand_built_directions(cfg, seed):
    kc, kx, ks = jr.split(jr.key(seed), 3)
    stack = make_stack(cfg, kc, "bidirectional")
    xs = inputs(cfg, kx)
    state = _random_state(stack, ks)
    ys, final = eqx.filter_jit(stack)(xs, state)

    hs, finals = xs, []
    given_states = stack._split(state)
    for i, (f, b) in enumerate(zip(stack.cells, stack.backward_cells)):
        ys_f, final_f = _loop(f, hs, given_states[2 * i])
        ys_b, final_b = _loop(b, hs, given_states[2 * i + 1], backwards=True)
        hs = jnp.concatenate([ys_f, ys_b], axis=-1)
        finals += [final_f, final_b]
    assert tree_allclose(ys, hs, **TOL)
    assert tree_allclose(final, stack._join(finals), **TOL)
    # The same for the helper the other tests use as their reference.
    assert tree_allclose((ys, final), _by_hand(stack, xs, state), **TOL)


@fewer()
@given(cfg=configs(max_layers=3), seed=seeds)
def test_reverse_equals_flipping_input_and_output(cfg, seed):
    kc, kx, ks = jr.split(jr.key(seed), 3)
    cells = make_cells(cfg, kc)
    backwards = stack_of(cells, reverse=True)
    forwards = stack_of(cells)
    xs = inputs(cfg, kx)
    state = _random_state(forwards, ks)
    ys, final = eqx.filter_jit(backwards)(xs, state)
    ys_flip, final_flip = eqx.filter_jit(forwards)(xs[::-1], state)
    assert tree_allclose(ys, ys_flip[::-1], **TOL)
    assert tree_allclose(final, final_flip, **TOL)


@fewer()
@given(
    cfg=configs(max_layers=2, max_time=5),
    direction=directions,
    lengths=st.lists(st.integers(1, 5), min_size=3, max_size=3),
    seed=seeds,
)
def test_length_equals_truncating_each_example(cfg, direction, lengths, seed):
    kc, kx, ks = jr.split(jr.key(seed), 3)
    stack = make_stack(cfg, kc, direction)
    lengths = [min(n, cfg.time) for n in lengths]
    # Random padding, not zeros: it must be ignored whatever it holds.
    xs = inputs(cfg, kx, batch=len(lengths))
    states = jax.vmap(lambda k: _random_state(stack, k))(jr.split(ks, len(lengths)))
    run = jax.jit(jax.vmap(lambda x, s, n: stack(x, s, length=n)))
    ys, finals = run(xs, states, jnp.array(lengths))
    for b, n in enumerate(lengths):
        state = jax.tree.map(lambda s: s[b], states)
        ys_want, final_want = _by_hand(stack, xs[b, :n], state)
        assert tree_allclose(ys[b, :n], ys_want, **TOL)
        assert tree_equal(ys[b, n:], jnp.zeros_like(ys[b, n:]))
        assert tree_allclose(jax.tree.map(lambda s: s[b], finals), final_want, **TOL)


def test_traced_lengths_outside_the_range(getkey):
    stack = stackrnn.GRU(3, 4, num_layers=2, bidirectional=True, key=getkey())
    xs = jr.normal(getkey(), (5, 3))
    state = _random_state(stack, getkey())
    run = jax.jit(lambda n: stack(xs, state, length=n))
    for n in (0, -3):
        ys, final = run(n)
        assert tree_equal(ys, jnp.zeros_like(ys)) and tree_equal(final, state)
    everything = stack(xs, state)
    assert tree_allclose(run(9), everything, **TOL)
    # Concrete, the full length is accepted and the same as no length, in any
    # integer dtype.
    for n in (5, np.int64(5), jnp.uint8(5), jnp.int16(5)):
        assert tree_allclose(stack(xs, state, length=n), everything, **TOL)


@fewer()
@given(
    kind=st.sampled_from(stackrnn.testing.KINDS),
    direction=directions,
    fill=st.sampled_from([np.nan, np.inf, -np.inf, 1e30]),
    length=st.integers(1, 5),
    flags=st.lists(st.booleans(), min_size=6, max_size=6),
    seed=seeds,
)
def test_padding_never_reaches_values_or_gradients(
    kind, direction, fill, length, flags, seed
):
    """Whatever the padding holds, the values and the gradients with respect to the
    parameters, the inputs and the initial state are the truncated sequence's."""
    cfg = Config(kind=kind, input_size=3, widths=(4, 4), bias=True, time=6)
    kc, kx, ks = jr.split(jr.key(seed), 3)
    stack = make_stack(cfg, kc, direction)
    xs = inputs(cfg, kx).at[length:].set(fill)
    state = _random_state(stack, ks)
    resets = jnp.array(flags)

    @eqx.filter_jit
    @eqx.filter_value_and_grad
    def loss(args, n, resets):
        stack, xs, state = args
        ys, final = stack(xs, state, length=n, resets=resets)
        return jnp.sum(jnp.sin(ys)) + sum(
            jnp.sum(jnp.cos(f)) for f in jax.tree.leaves(final)
        )

    value, (d_stack, d_xs, d_state) = loss((stack, xs, state), length, resets)
    want, (want_stack, want_xs, want_state) = loss(
        (stack, xs[:length], state), None, resets[:length]
    )
    finite = jax.tree.leaves((value, d_stack, d_xs, d_state))
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in finite)
    assert tree_allclose(value, want, **TOL)
    assert tree_allclose(d_stack, want_stack, **TOL)
    assert tree_allclose(d_state, want_state, **TOL)
    assert tree_allclose(d_xs[:length], want_xs, **TOL)
    assert tree_equal(d_xs[length:], jnp.zeros_like(d_xs[length:]))


def _segments(resets):
    starts = [0] + [t for t in range(1, len(resets)) if resets[t]]
    return list(zip(starts, starts[1:] + [len(resets)]))


@fewer()
@given(
    cfg=configs(max_layers=2, max_time=6),
    direction=directions,
    flags=st.lists(
        st.lists(st.booleans(), min_size=6, max_size=6), min_size=2, max_size=2
    ),
    seed=seeds,
)
def test_resets_equal_splitting_into_fresh_segments(cfg, direction, flags, seed):
    kc, kx, ks = jr.split(jr.key(seed), 3)
    stack = make_stack(cfg, kc, direction)
    resets = jnp.array([f[: cfg.time] for f in flags])
    xs = inputs(cfg, kx, batch=len(flags))
    state = _random_state(stack, ks)
    run = jax.jit(jax.vmap(lambda x, r: stack(x, state, resets=r)))
    ys, finals = run(xs, resets)

    fresh, given_states = stack._split(stack.init_state()), stack._split(state)
    for b in range(len(flags)):
        parts = _segments(np.asarray(resets[b]))
        ys_want, part_finals = [], []
        for p, (start, stop) in enumerate(parts):
            # The call's state is where each direction starts reading: the first
            # segment forwards, the last one backwards; the others start fresh.
            # A reset at step 0 discards the call's state in the forward direction.
            first = p == 0 and not resets[b, 0]
            part_state = [
                given_states[i]
                if (first if _reads_forwards(stack, i) else p == len(parts) - 1)
                else fresh[i]
                for i in range(len(fresh))
            ]
            y, f = _by_hand(stack, xs[b, start:stop], stack._join(part_state))
            ys_want.append(y)
            part_finals.append(stack._split(f))
        final_want = [
            part_finals[-1 if _reads_forwards(stack, i) else 0][i]
            for i in range(len(fresh))
        ]
        assert tree_allclose(ys[b], jnp.concatenate(ys_want), **TOL)
        assert tree_allclose(
            jax.tree.map(lambda s: s[b], finals), stack._join(final_want), **TOL
        )


@fewer()
@given(
    cfg=configs(max_layers=2, max_time=6),
    direction=directions,
    length=st.integers(1, 6),
    flags=st.lists(st.booleans(), min_size=6, max_size=6),
    seed=seeds,
)
def test_resets_past_the_length_are_ignored(cfg, direction, length, flags, seed):
    kc, kx, ks = jr.split(jr.key(seed), 3)
    stack = make_stack(cfg, kc, direction)
    length = min(length, cfg.time)
    resets = jnp.array(flags[: cfg.time])
    xs = inputs(cfg, kx)
    state = _random_state(stack, ks)
    ys, final = jax.jit(lambda x, r: stack(x, state, length=length, resets=r))(
        xs, resets
    )
    ys_want, final_want = jax.jit(lambda x, r: stack(x, state, resets=r))(
        xs[:length], resets[:length]
    )
    assert tree_allclose(ys[:length], ys_want, **TOL)
    assert tree_allclose(final, final_want, **TOL)


@fewer()
@given(
    cfg=configs(max_layers=3, max_time=5),
    reverse=st.booleans(),
    dropout=st.sampled_from([0.0, 0.5]),
    seed=seeds,
)
def test_step_loop_equals_full_call(cfg, reverse, dropout, seed):
    kc, kx, ks = jr.split(jr.key(seed), 3)
    stack = stack_of(
        make_cells(cfg, kc),
        reverse=reverse,
        dropout=dropout if cfg.num_layers > 1 else 0.0,
    )
    xs = inputs(cfg, kx, batch=2)
    states = jax.vmap(lambda k: _random_state(stack, k))(jr.split(ks, 2))
    ys, finals = jax.jit(jax.vmap(lambda x, s: stack(x, s, inference=True)))(xs, states)
    step = jax.jit(jax.vmap(lambda x, s: stack.step(x, s, inference=True)))
    order = range(cfg.time - 1, -1, -1) if reverse else range(cfg.time)
    state = states
    for t in order:
        y, state = step(xs[:, t], state)
        assert tree_allclose(y, ys[:, t], **TOL)
    assert tree_allclose(state, finals, **TOL)


def test_step_dropout(getkey):
    stack = stackrnn.GRU(3, 4, num_layers=3, dropout=0.5, key=getkey())
    x, state, k1, k2 = jr.normal(getkey(), (3,)), stack.init_state(), getkey(), getkey()
    with pytest.raises(RuntimeError, match="requires a `key`"):
        stack.step(x, state)
    assert tree_equal(stack.step(x, state, key=k1), stack.step(x, state, key=k1))
    assert not tree_equal(stack.step(x, state, key=k1), stack.step(x, state, key=k2))
    # The bottom layer's input is never dropped.
    _, new = stack.step(x, state, key=k1)
    _, quiet = stack.step(x, state, inference=True)
    assert tree_equal(new[0], quiet[0])
    quiet_model = eqx.nn.inference_mode(stack)
    assert tree_equal(quiet_model.step(x, state), stack.step(x, state, inference=True))


@fewer()
@given(cfg=configs(max_layers=3, max_time=5), direction=directions, seed=seeds)
def test_all_layers_equal_shallower_stacks(cfg, direction, seed):
    kc, kx, kd = jr.split(jr.key(seed), 3)
    stack = make_stack(cfg, kc, direction, dropout=0.5 if cfg.num_layers > 1 else 0.0)
    xs = inputs(cfg, kx)
    both = jax.jit(
        lambda x: (stack(x, inference=True, all_layers=True), stack(x, inference=True))
    )
    (outputs, final), top_only = both(xs)
    assert isinstance(outputs, tuple) and len(outputs) == cfg.num_layers
    assert tree_equal((outputs[-1], final), top_only)
    for i in range(cfg.num_layers):
        backward = stack.backward_cells
        shallow = stack_of(
            stack.cells[: i + 1],
            backward_cells=None if backward is None else backward[: i + 1],
            reverse=stack.reverse,
        )
        assert tree_allclose(
            outputs[i], _by_hand(shallow, xs, shallow.init_state())[0], **TOL
        )
    # Outputs are taken before dropout, which acts on the next layer's input: the
    # bottom layer's outputs are the same with dropout on.
    if cfg.num_layers > 1:
        trained, _ = stack(xs, key=kd, all_layers=True)
        assert tree_allclose(trained[0], outputs[0], **TOL)


def _from_torch(ref, stack):
    """`stack` with the parameters of the PyTorch module `ref` copied in unchanged:
    `weight_ih_l1_reverse` is `backward_cells[1].weight_ih`."""
    for name, value in ref.state_dict().items():
        role, layer = name.split("_l")
        layer, _, reverse = layer.partition("_")

        def where(s, role=role, layer=int(layer), reverse=bool(reverse)):
            return getattr((s.backward_cells if reverse else s.cells)[layer], role)

        assert where(stack).shape == tuple(value.shape), name
        stack = eqx.tree_at(where, stack, jnp.asarray(value.detach().numpy()))
    return stack


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_bidirectional_lengths_match_pytorch_packed_sequences(kind, getkey):
    """PyTorch's bidirectional stack over packed sequences of different lengths (the
    way to get its backward direction to start at each sequence's end): outputs,
    zero padding and final states in its order, layer * 2 + direction."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    make = {"gru": (torch.nn.GRU, stackrnn.GRU), "lstm": (torch.nn.LSTM, stackrnn.LSTM)}
    torch_cls, ours = make[kind]
    ref = torch_cls(3, 4, num_layers=2, bidirectional=True, batch_first=True)
    stack = _from_torch(ref, ours(3, 4, num_layers=2, bidirectional=True, key=getkey()))
    lengths = [5, 2, 7, 1]
    xs = np.random.default_rng(0).standard_normal((4, 7, 3)).astype(np.float32)
    with torch.no_grad():
        packed = torch.nn.utils.rnn.pack_padded_sequence(
            torch.from_numpy(xs), torch.tensor(lengths), True, enforce_sorted=False
        )
        out, final = ref(packed)
        want, _ = torch.nn.utils.rnn.pad_packed_sequence(out, True, total_length=7)
    ys, state = jax.vmap(lambda x, n: stack(x, length=n))(xs, jnp.array(lengths))
    np.testing.assert_allclose(ys, want.numpy(), rtol=1e-5, atol=1e-6)
    # PyTorch's states are (layers * 2, batch, hidden); ours are vmapped per example.
    want_state = jax.tree.map(lambda s: np.swapaxes(s.numpy(), 0, 1), final)
    if kind == "lstm":
        want_state = tuple(want_state)
    assert tree_allclose(state, want_state, rtol=1e-5, atol=1e-6)


def test_bad_sequence_options(getkey):
    stack = stackrnn.GRU(3, 4, num_layers=2, key=getkey())
    xs = jnp.ones((5, 3))
    for n in (0, -1, 6):
        with pytest.raises(ValueError, match=rf"`length` must be in \[1, 5\].*got {n}"):
            stack(xs, length=n)
    with pytest.raises(ValueError, match="`length` must be a scalar integer.*float32"):
        stack(xs, length=jnp.float32(3))
    with pytest.raises(ValueError, match=r"`length`.*under `jax.vmap`.*shape \(2,\)"):
        stack(xs, length=jnp.array([2, 3]))
    with pytest.raises(ValueError, match=r"`resets` must be a boolean array of shape"):
        stack(xs, resets=jnp.zeros((5,), jnp.int32))
    with pytest.raises(ValueError, match=r"`resets`.*shape \(5,\).*got shape \(4,\)"):
        stack(xs, resets=jnp.zeros((4,), bool))

    bidi = stackrnn.GRU(3, 4, num_layers=2, bidirectional=True, key=getkey())
    with pytest.raises(ValueError, match="`step` needs a unidirectional stack"):
        bidi.step(xs[0], bidi.init_state())
    with pytest.raises(ValueError, match="`reverse=True` applies to unidirectional"):
        stack_of(bidi.cells, backward_cells=bidi.backward_cells, reverse=True)
    with pytest.raises(ValueError, match=r"one cell per layer \(=2\), got 1"):
        stack_of(bidi.cells, backward_cells=bidi.backward_cells[:1])
    wrong = stackrnn.GRUCell(5, 4, key=getkey())
    with pytest.raises(ValueError, match=r"`backward_cells\[0\].input_size` \(=5\)"):
        stack_of(bidi.cells, backward_cells=[wrong, bidi.backward_cells[1]])
    with pytest.raises(
        ValueError,
        match=r"`cells\[1\].input_size` \(=4\) must equal `cells\[0\].output_size` "
        r"\+ `backward_cells\[0\].output_size` \(=8\)",
    ):
        cells = stackrnn.GRU(3, 4, num_layers=2, key=getkey()).cells
        stack_of(cells, backward_cells=cells)
    with pytest.raises(TypeError, match="`bidirectional` must be a bool"):
        stackrnn.LSTM(3, 4, bidirectional=1, key=getkey())


def test_bidirectional_state_layout(getkey):
    lstm = stackrnn.LSTM(
        3, 6, num_layers=3, proj_size=2, bidirectional=True, key=getkey()
    )
    ys, (h, c) = lstm(jr.normal(getkey(), (7, 3)))
    assert ys.shape == (7, 4) and h.shape == (6, 2) and c.shape == (6, 6)
    assert lstm.cells[1].input_size == 4 and lstm.output_size == 4
    outputs, _ = lstm(jr.normal(getkey(), (7, 3)), all_layers=True)
    assert [o.shape for o in outputs] == [(7, 4)] * 3
    ragged = stackrnn.RNN(3, [6, 4], num_layers=2, bidirectional=True, key=getkey())
    ys, state = ragged(jr.normal(getkey(), (7, 3)))
    assert ys.shape == (7, 8)
    assert [s.shape for s in state] == [(6,), (6,), (4,), (4,)]


@fewer()
@given(
    cfg=configs(max_layers=2, max_time=6),
    direction=directions,
    unroll=st.integers(2, 7),
    length=st.integers(1, 6),
    flags=st.lists(st.booleans(), min_size=6, max_size=6),
    seed=seeds,
)
def test_unroll_reaches_every_scan_and_keeps_results(
    cfg, direction, unroll, length, flags, seed
):
    kc, kx = jr.split(jr.key(seed))
    stack = make_stack(cfg, kc, direction)
    unrolled = make_stack(cfg, kc, direction, unroll=unroll)
    xs = inputs(cfg, kx)
    options = dict(length=min(length, cfg.time), resets=jnp.array(flags[: cfg.time]))
    jaxpr = jax.make_jaxpr(lambda x: unrolled(x, **options))(xs)
    scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    assert len(scans) == len(stack._all_cells())
    assert all(e.params["unroll"] == unroll for e in scans)
    run = jax.jit(lambda x: (stack(x, **options), unrolled(x, **options)))
    want, got = run(xs)
    assert tree_allclose(got, want, **TOL)


def test_language_model_refuses_stacks_that_read_the_future(getkey):
    bidi = stackrnn.GRU(5, 4, num_layers=2, bidirectional=True, key=getkey())
    with pytest.raises(ValueError, match="`rnn` must read time forwards.*bidirect"):
        stackrnn.lm.RNNLM(bidi, 5, key=getkey())
    backwards = stack_of(stackrnn.GRU(5, 4, key=getkey()).cells, reverse=True)
    with pytest.raises(ValueError, match="`rnn` must read time forwards.*reverse"):
        stackrnn.lm.RNNLM(backwards, 5, key=getkey())
