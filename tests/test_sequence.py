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
    by_hand,
    call,
    Config,
    directions,
    inputs,
    make_cells,
    make_stack,
    random_state,
    seeds,
    stack_by_hand,
    stack_of,
    structures,
    TOL32,
    tree_allclose,
    tree_equal,
)


# One shape per direction, drawn values: the examples reuse compiled programs.
SHAPES = {
    "forward": Config("lstm_proj", 3, (4, 4), True, 6),
    "reverse": Config("gru", 3, (4, 5), False, 6),
    "bidirectional": Config("lstm", 2, (4, 3), True, 6),
}
flags = st.lists(st.booleans(), min_size=6, max_size=6)


@eqx.filter_jit
def call_each(model, xs, state, **options):
    """`model` under `jax.vmap` over `xs`, `state` and the array options."""
    arrays = {k: v for k, v in options.items() if eqx.is_array(v)}
    fixed = {k: v for k, v in options.items() if k not in arrays}
    return jax.vmap(lambda x, s, a: model(x, s, **a, **fixed))(xs, state, arrays)


def _example(tree, b):
    return jax.tree.map(lambda a: a[b], tree)


@pytest.mark.parametrize("direction", directions())
@given(
    lengths=st.lists(st.integers(1, 6), min_size=2, max_size=2),
    flags=st.lists(flags, min_size=2, max_size=2),
    seed=seeds,
)
def test_length_equals_truncating_each_example(direction, lengths, flags, seed):
    """Under `jit` and `vmap`, one length and one set of resets per example, from
    random initial states: the outputs and final state are the reference's on the
    truncated sequence (the backward direction starts at the last step read, resets
    past the length are ignored), the outputs past the length zeros, whatever the
    padding holds."""
    cfg = SHAPES[direction]
    kc, kx, ks = jr.split(jr.key(seed), 3)
    stack = make_stack(cfg, kc, direction)
    xs = inputs(cfg, kx, batch=2)
    states = jax.vmap(lambda k: random_state(stack, k))(jr.split(ks, 2))
    resets = jnp.array(flags)
    ys, finals = call_each(stack, xs, states, length=jnp.array(lengths), resets=resets)
    for b, n in enumerate(lengths):
        want = stack_by_hand(
            stack, xs[b, :n], _example(states, b), resets=resets[b, :n]
        )
        assert tree_allclose((ys[b, :n], _example(finals, b)), want, **TOL32)
        assert tree_equal(ys[b, n:], jnp.zeros_like(ys[b, n:]))


@pytest.mark.parametrize(
    "direction, fast", [("reverse", None), ("reverse", True), ("bidirectional", None)]
)
@given(seed=seeds)
def test_directions_equal_the_reference(direction, fast, seed):
    """The backward direction of a bidirectional stack, and every layer of a reverse
    one, read the sequence last step first from the given initial state; the next
    layer reads both directions side by side, forward first. On the default path
    and on the fast path."""
    cfg = SHAPES[direction]
    kc, kx, ks = jr.split(jr.key(seed), 3)
    stack = make_stack(cfg, kc, direction, fast=fast)
    xs = inputs(cfg, kx)
    state = random_state(stack, ks)
    assert tree_allclose(call(stack, xs, state), by_hand(stack, xs, state), **TOL32)


@given(seed=seeds)
def test_reverse_equals_flipping_input_and_output(seed):
    cfg = SHAPES["reverse"]
    kc, kx, ks = jr.split(jr.key(seed), 3)
    cells = make_cells(cfg, kc)
    backwards = stack_of(cells, reverse=True)
    forwards = stack_of(cells)
    xs = inputs(cfg, kx)
    state = random_state(forwards, ks)
    ys, final = call(backwards, xs, state)
    ys_flip, final_flip = call(forwards, xs[::-1], state)
    assert tree_allclose(ys, ys_flip[::-1], **TOL32)
    assert tree_allclose(final, final_flip, **TOL32)


def test_traced_lengths_outside_the_range(getkey):
    stack = stackrnn.GRU(3, 4, num_layers=2, bidirectional=True, key=getkey())
    xs = jr.normal(getkey(), (5, 3))
    state = random_state(stack, getkey())
    for n in (0, -3):
        ys, final = call(stack, xs, state, length=jnp.asarray(n))
        assert tree_equal(ys, jnp.zeros_like(ys)) and tree_equal(final, state)
    everything = call(stack, xs, state)
    assert tree_allclose(
        call(stack, xs, state, length=jnp.asarray(9)), everything, **TOL32
    )
    # Concrete, the full length is accepted and the same as no length, in any
    # integer dtype.
    for n in (5, np.int64(5), jnp.uint8(5), jnp.int16(5)):
        assert tree_allclose(stack(xs, state, length=n), everything, **TOL32)


def _loss(args, n, resets):
    stack, xs, state = args
    ys, final = stack(xs, state, length=n, resets=resets)
    return jnp.sum(jnp.sin(ys)) + sum(
        jnp.sum(jnp.cos(f)) for f in jax.tree.leaves(final)
    )


_value_and_grad = eqx.filter_jit(eqx.filter_value_and_grad(_loss))


# Every cell kind and direction somewhere, each with a length inside the sequence;
# the first three (one per direction) in the quick loop.
PADDED = [
    ("rnn_tanh", "bidirectional", 1),
    ("rnn_relu", "reverse", 4),
    ("gru", "forward", 3),
    ("lstm", "bidirectional", 5),
    ("lstm_proj", "reverse", 2),
    ("gru_ln", "bidirectional", 4),
    ("lstm_ln", "forward", 5),
]


@pytest.mark.parametrize("kind, direction, length", structures(PADDED, quick=3))
@given(fill=st.sampled_from([np.nan, np.inf, -np.inf, 1e30]), flags=flags, seed=seeds)
def test_padding_never_reaches_values_or_gradients(
    kind, direction, length, fill, flags, seed
):
    """Whatever the padding holds, the values and the gradients with respect to the
    parameters, the inputs and the initial state are the truncated sequence's."""
    cfg = Config(kind=kind, input_size=3, widths=(4, 4), bias=True, time=6)
    kc, kx, ks = jr.split(jr.key(seed), 3)
    stack = make_stack(cfg, kc, direction)
    xs = inputs(cfg, kx).at[length:].set(fill)
    state = random_state(stack, ks)
    resets = jnp.array(flags)

    value, (d_stack, d_xs, d_state) = _value_and_grad(
        (stack, xs, state), jnp.asarray(length), resets
    )
    want, (want_stack, want_xs, want_state) = _value_and_grad(
        (stack, xs[:length], state), None, resets[:length]
    )
    finite = jax.tree.leaves((value, d_stack, d_xs, d_state))
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in finite)
    # Gradients summed over the padded steps too (each adding zero): float32 sums
    # in another order, whose rounding shows in the entries near zero.
    tol = dict(rtol=1e-5, atol=1e-5)
    assert tree_allclose(value, want, **tol)
    assert tree_allclose(d_stack, want_stack, **tol)
    assert tree_allclose(d_state, want_state, **tol)
    assert tree_allclose(d_xs[:length], want_xs, **tol)
    assert tree_equal(d_xs[length:], jnp.zeros_like(d_xs[length:]))


def _segments(resets):
    starts = [0] + [t for t in range(1, len(resets)) if resets[t]]
    return list(zip(starts, starts[1:] + [len(resets)]))


def _reads_forwards(stack, index):
    """Whether the state at `index` (PyTorch's order) belongs to a cell that reads
    time forwards."""
    return not stack.reverse and (not stack.bidirectional or index % 2 == 0)


@pytest.mark.parametrize("direction", directions())
@given(flags=st.lists(flags, min_size=2, max_size=2), seed=seeds)
def test_resets_equal_splitting_into_fresh_segments(direction, flags, seed):
    cfg = SHAPES[direction]
    kc, kx, ks = jr.split(jr.key(seed), 3)
    stack = make_stack(cfg, kc, direction)
    resets = jnp.array(flags)
    xs = inputs(cfg, kx, batch=len(flags))
    state = random_state(stack, ks)
    states = jax.tree.map(lambda s: jnp.stack([s, s]), state)
    ys, finals = call_each(stack, xs, states, resets=resets)

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
            y, f = stack_by_hand(stack, xs[b, start:stop], stack._join(part_state))
            ys_want.append(y)
            part_finals.append(stack._split(f))
        final_want = [
            part_finals[-1 if _reads_forwards(stack, i) else 0][i]
            for i in range(len(fresh))
        ]
        assert tree_allclose(ys[b], jnp.concatenate(ys_want), **TOL32)
        assert tree_allclose(_example(finals, b), stack._join(final_want), **TOL32)


@eqx.filter_jit
def _step_each(stack, x, state):
    return jax.vmap(lambda x, s: stack.step(x, s, inference=True))(x, state)


@pytest.mark.parametrize("kind, reverse", [("gru", False), ("lstm_proj", True)])
@given(seed=seeds)
def test_step_loop_equals_full_call(kind, reverse, seed):
    cfg = Config(kind, 3, (4, 4, 4), True, 5)
    kc, kx, ks = jr.split(jr.key(seed), 3)
    stack = stack_of(make_cells(cfg, kc), reverse=reverse, dropout=0.5)
    xs = inputs(cfg, kx, batch=2)
    states = jax.vmap(lambda k: random_state(stack, k))(jr.split(ks, 2))
    ys, finals = call_each(stack, xs, states, inference=True)
    order = range(cfg.time - 1, -1, -1) if reverse else range(cfg.time)
    state = states
    for t in order:
        y, state = _step_each(stack, xs[:, t], state)
        assert tree_allclose(y, ys[:, t], **TOL32)
    assert tree_allclose(state, finals, **TOL32)


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


@pytest.mark.parametrize("direction", directions())
@given(seed=seeds)
def test_all_layers_are_each_layers_outputs_before_dropout(direction, seed):
    """With `all_layers`, one output per layer, the last the top layer's: each
    layer's outputs (the reference's), taken before the dropout that acts on the
    next layer's input, at inference and in training."""
    cfg = Config("gru", 2, (4, 4, 4), True, 5)
    kc, kx, kd = jr.split(jr.key(seed), 3)
    stack = make_stack(cfg, kc, direction, dropout=0.5)
    xs = inputs(cfg, kx)
    outputs, final = call(stack, xs, inference=True, all_layers=True)
    assert isinstance(outputs, tuple) and len(outputs) == cfg.num_layers
    assert tree_equal((outputs[-1], final), call(stack, xs, inference=True))
    want = stack_by_hand(stack, xs, inference=True, all_layers=True)
    assert tree_allclose((outputs, final), want, **TOL32)
    trained = call(stack, xs, key=kd, all_layers=True)
    want = stack_by_hand(stack, xs, key=kd, all_layers=True)
    assert tree_allclose(trained, want, **TOL32)
    # The bottom layer's outputs are the same with dropout on.
    assert tree_allclose(trained[0][0], outputs[0], **TOL32)


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


# The unrolling of each direction's shape, one beyond its length.
UNROLL = {"forward": 2, "reverse": 3, "bidirectional": 7}


@eqx.filter_jit
def _both(stack, unrolled, xs, options):
    return stack(xs, **options), unrolled(xs, **options)


@pytest.mark.parametrize("direction", directions())
@given(length=st.integers(1, 6), flags=flags, seed=seeds)
def test_unroll_reaches_every_scan_and_keeps_results(direction, length, flags, seed):
    cfg, unroll = SHAPES[direction], UNROLL[direction]
    kc, kx = jr.split(jr.key(seed))
    stack = make_stack(cfg, kc, direction)
    unrolled = make_stack(cfg, kc, direction, unroll=unroll)
    xs = inputs(cfg, kx)
    options = dict(length=jnp.asarray(length), resets=jnp.array(flags))
    jaxpr = jax.make_jaxpr(lambda x: unrolled(x, **options))(xs)
    scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    assert len(scans) == len(stack._all_cells())
    assert all(e.params["unroll"] == unroll for e in scans)
    want, got = _both(stack, unrolled, xs, options)
    assert tree_allclose(got, want, **TOL32)


def test_language_model_refuses_stacks_that_read_the_future(getkey):
    bidi = stackrnn.GRU(5, 4, num_layers=2, bidirectional=True, key=getkey())
    with pytest.raises(ValueError, match="`rnn` must read time forwards.*bidirect"):
        stackrnn.lm.RNNLM(bidi, 5, key=getkey())
    backwards = stack_of(stackrnn.GRU(5, 4, key=getkey()).cells, reverse=True)
    with pytest.raises(ValueError, match="`rnn` must read time forwards.*reverse"):
        stackrnn.lm.RNNLM(backwards, 5, key=getkey())
