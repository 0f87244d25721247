"""The stack's regularisers, each against an independent construction: variational
and recurrent dropout, zoneout, weight drop and residual connections.

The masks are drawn inside the stack, so most checks recover them from what the stack
computes: through probe cells whose outputs show their inputs or their recurrent
weights, by trying every possible mask, or unit by unit (zoneout keeps or updates
each unit).
"""

import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from hypothesis import given, strategies as st

import stackrnn

from .helpers import (
    call,
    Config,
    directions,
    inputs,
    make_cells,
    make_stack,
    seeds,
    stack_by_hand,
    stack_of,
    structures,
    TOL32 as TOL,
    tree_allclose,
    tree_equal,
    x64,
)


class _Echo(stackrnn.AbstractCell):
    """Outputs its input: the layer's output shows what the layer read."""

    input_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)

    def __init__(self, size):
        self.input_size = self.hidden_size = size

    @property
    def output_size(self):
        return self.hidden_size

    def init_state(self):
        return jnp.zeros(self.hidden_size)

    def project_input(self, x):
        return x

    def recur(self, gates_x, state):
        return gates_x

    def output(self, state):
        return state


class _Linear(stackrnn.AbstractAffineCell):
    """`h' = weight_ih @ x + weight_hh @ h`: from a unit state and a zero input, the
    next output is a column of the `weight_hh` the step used."""

    weight_ih: jax.Array
    weight_hh: jax.Array
    bias_ih: None
    bias_hh: None
    input_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)

    def __init__(self, input_size, hidden_size, key):
        k1, k2 = jr.split(key)
        self.weight_ih = jr.normal(k1, (hidden_size, input_size))
        self.weight_hh = jr.normal(k2, (hidden_size, hidden_size))
        self.bias_ih = self.bias_hh = None
        self.input_size, self.hidden_size = input_size, hidden_size

    @property
    def output_size(self):
        return self.hidden_size

    def init_state(self):
        return jnp.zeros(self.hidden_size)

    def pointwise(self, gates_x, gates_h, state):
        return gates_x + gates_h

    def output(self, state):
        return state


def _base(cell):
    """The cell inside every wrapper of `cell`."""
    while isinstance(cell, stackrnn.AbstractWrappedCell):
        cell = cell.cell
    return cell


def _directions(stack, i):
    """Layer `i`'s cells (inside their wrappers), each with whether it reads
    backwards and the slice of the layer's output it writes."""
    cells = [_base(stack.cells[i])]
    if stack.bidirectional:
        cells.append(_base(stack.backward_cells[i]))
    start = 0
    for d, cell in enumerate(cells):
        stop = start + cell.output_size
        yield cell, stack.reverse or d == 1, slice(start, stop)
        start = stop


def _order(time, backwards):
    return range(time - 1, -1, -1) if backwards else range(time)


def _with_cells(stack, change):
    """`stack` with `change(cell)` in place of each cell inside its wrappers."""
    backward = stack.backward_cells
    return stackrnn.StackedRNN(
        [change(_base(c)) for c in stack.cells],
        backward_cells=None
        if backward is None
        else [change(_base(c)) for c in backward],
        residual=stack.residual,
        scan=stack.scan,
    )


def _layer(cell, *, reverse=False):
    """A one-layer stack of `cell`, for the reference to run it."""
    return stackrnn.StackedRNN([cell], scan=stackrnn.Scan(reverse=reverse))


def _units(state):
    return [leaf.size for leaf in jax.tree.leaves(state)]


# Each regulariser's step written out, as a cell for the reference to run.


class _GalDropout(stackrnn.AbstractWrappedCell):
    """Gal's recurrent dropout: the previous output, masked by `mask`, enters the
    recurrent product; the state is carried as the cell computes it."""

    cell: stackrnn.AbstractAffineCell
    mask: jax.Array

    def project_input(self, x):
        return self.cell.project_input(x)

    def recur(self, gates_x, state):
        gates_h = self.cell.weight_hh @ (self.mask * self.cell.output(state))
        if self.cell.bias_hh is not None:
            gates_h = gates_h + self.cell.bias_hh
        return self.cell.pointwise(gates_x, gates_h, state)


class _ZoneoutKeeps(stackrnn.AbstractWrappedCell):
    """Zoneout with the keep masks of every step given, `keeps` of shape `(time,
    units)` (the units of the state's arrays side by side): each unit keeps its
    previous value where its mask is 1. The masks travel with the inputs, as
    `for_sequence` allows."""

    cell: stackrnn.AbstractCell
    keeps: jax.Array

    def project_input(self, x):
        return self.cell.project_input(x)

    def recur(self, gates_x, state):
        return self.cell.recur(gates_x, state)

    def for_sequence(self, xs, *, key, inference, start=None, streaming=False):
        keeps = self.keeps.astype(xs.dtype)
        return _ReadsKeeps(self.cell), jnp.concatenate([xs, keeps], axis=-1)


class _ReadsKeeps(stackrnn.AbstractWrappedCell):
    """`cell` reading each step's keep masks after its input."""

    cell: stackrnn.AbstractCell

    @property
    def input_size(self):
        return self.cell.input_size + sum(_units(self.cell.init_state()))

    def project_input(self, x):
        return x

    def recur(self, x, state):
        n = self.cell.input_size
        new = self.cell(x[:n], state)
        keeps = jnp.split(x[n:], list(itertools.accumulate(_units(state)))[:-1])
        kept = [
            jnp.where(k != 0, s, v)
            for k, s, v in zip(keeps, jax.tree.leaves(state), jax.tree.leaves(new))
        ]
        return jax.tree.unflatten(jax.tree.structure(state), kept)


class _ZoneoutMean(stackrnn.AbstractWrappedCell):
    """Zoneout at inference: each array of the state is `p * previous + (1 - p) *
    new`, with its rate `p`."""

    cell: stackrnn.AbstractCell
    rates: tuple = eqx.field(static=True)

    def project_input(self, x):
        return self.cell.project_input(x)

    def recur(self, gates_x, state):
        new = self.cell.recur(gates_x, state)
        leaves = zip(self.rates, jax.tree.leaves(state), jax.tree.leaves(new))
        mixed = [p * s + (1 - p) * n for p, s, n in leaves]
        return jax.tree.unflatten(jax.tree.structure(state), mixed)


# --------------------------------------------------------------------------- rate 0


# One shape per direction (same widths, for residual connections), drawn values:
# the examples reuse compiled programs.
SHAPES = {
    "forward": Config("lstm", 3, (4, 4, 4), True, 4),
    "reverse": Config("gru", 2, (4, 4), False, 4),
    "bidirectional": Config("lstm_proj", 3, (4, 4), True, 4),
}


@pytest.mark.parametrize("direction", directions())
@given(seed=seeds)
def test_zero_rates_equal_the_plain_stack_bit_for_bit(direction, seed):
    cfg = SHAPES[direction]
    kc, kx, kd = jr.split(jr.key(seed), 3)
    xs = inputs(cfg, kx)
    want = call(make_stack(cfg, kc, direction), xs)
    off = make_stack(
        cfg, kc, direction, recurrent_dropout=0.0, zoneout=0.0, weight_drop=0
    )
    assert tree_equal(call(off, xs, key=kd), want)
    assert tree_equal(call(off, xs, inference=True), want)
    with pytest.warns(UserWarning, match="`variational=True` has no effect"):
        variational = make_stack(cfg, kc, direction, variational=True)
    assert tree_equal(call(variational, xs, key=kd), want)
    if cfg.kind.startswith("lstm"):
        pair = make_stack(cfg, kc, direction, zoneout=(0.0, 0.0))
        assert tree_equal(call(pair, xs, key=kd), want)
    # Regularisers that draw masks are off at inference.
    on = make_stack(
        cfg,
        kc,
        direction,
        dropout=0.5,
        variational=True,
        recurrent_dropout=0.5,
        weight_drop=0.5,
    )
    assert tree_equal(call(on, xs, inference=True), want)
    assert tree_equal(call(eqx.nn.inference_mode(on), xs), want)


# ---------------------------------------------------------- variational dropout


@pytest.mark.parametrize("variational", [True, False])
def test_variational_dropout_is_one_mask_per_sequence(variational, getkey):
    p = 0.5
    stack = stack_of(
        [stackrnn.ElmanCell(3, 8, key=getkey()), _Echo(8)],
        dropout=p,
        variational=variational,
    )
    xs = jr.normal(getkey(), (10, 3))
    key = getkey()
    (below, dropped), _ = stack(xs, key=key, all_layers=True)
    kept = np.asarray(dropped != 0)
    # Inverted dropout of the layer below's outputs.
    want = jnp.where(kept, below / (1 - p), 0.0)
    assert tree_allclose(dropped, want, rtol=1e-6, atol=0)
    same_over_time = (kept == kept[0]).all()
    assert same_over_time == variational
    # Another key, another mask; the same key, the same.
    (_, again), _ = stack(xs, key=key, all_layers=True)
    assert tree_equal(again, dropped)
    (_, other), _ = stack(xs, key=getkey(), all_layers=True)
    assert not np.array_equal(np.asarray(other != 0), kept)


def test_variational_dropout_under_vmap_draws_per_example_masks(getkey):
    stack = stack_of(
        [stackrnn.ElmanCell(3, 8, key=getkey()), _Echo(8)],
        dropout=0.5,
        variational=True,
    )
    xs = jr.normal(getkey(), (4, 6, 3))
    keys = jr.split(getkey(), 4)
    ys, _ = jax.vmap(lambda x, k: stack(x, key=k))(xs, keys)
    masks = np.asarray(ys != 0)
    assert (masks == masks[:, :1]).all()  # constant over time in each example
    assert len({m[0].tobytes() for m in masks}) > 1  # different across examples


# ---------------------------------------------------------------- residual


@pytest.mark.parametrize("direction", directions())
@given(seed=seeds)
def test_residual_equals_the_hand_written_sum(direction, seed):
    cfg = SHAPES[direction]
    kc, kx = jr.split(jr.key(seed))
    stack = make_stack(cfg, kc, direction, residual=True)
    xs = inputs(cfg, kx)
    outputs, final = call(stack, xs, all_layers=True)
    want = stack_by_hand(stack, xs, all_layers=True)
    assert tree_allclose((outputs, final), want, **TOL)
    assert tree_equal(call(stack, xs)[0], outputs[-1])


def test_residual_adds_the_input_before_dropout(getkey):
    p = 0.5
    stack = stack_of(
        [stackrnn.ElmanCell(3, 6, key=getkey()), _Echo(6)], dropout=p, residual=True
    )
    (below, ys), _ = stack(jr.normal(getkey(), (5, 3)), key=getkey(), all_layers=True)
    # Echo outputs its dropped input; the residual adds the undropped one.
    kept = np.isclose(ys, below / (1 - p) + below, rtol=1e-6)
    dropped = np.isclose(ys, below, rtol=1e-6)
    assert (kept | dropped).all() and kept.any() and dropped.any()


# ------------------------------------------------------------ recurrent dropout


@eqx.filter_jit
def _runs_per_mask(stack, xs, outputs, candidates):
    """For every layer and direction of `stack`, reading what the stack's layer below
    output, the outputs under each candidate mask of recurrent dropout."""
    runs, layer_input = [], xs
    for i, ys in enumerate(outputs):
        for cell, backwards, _ in _directions(stack, i):

            def run(mask, cell=cell, backwards=backwards, hs=layer_input):
                layer = _layer(_GalDropout(cell, mask), reverse=backwards)
                return stack_by_hand(layer, hs)[0]

            runs.append(jax.vmap(run)(candidates[cell.output_size]))
        layer_input = ys
    return runs


@pytest.mark.parametrize(
    "kind", structures(["gru", "lstm_proj", "rnn_tanh", "lstm"], quick=2)
)
def test_recurrent_dropout_is_one_mask_per_sequence(kind, getkey):
    """Trying every mask in {0, 1/(1-p)}^output on every layer and direction: exactly
    one, held over the whole sequence, gives the stack's outputs."""
    p = 0.5
    cfg = Config(kind=kind, input_size=2, widths=(3, 3), bias=True, time=5)
    stack = make_stack(cfg, getkey(), "bidirectional", recurrent_dropout=p)
    xs = inputs(cfg, getkey())
    candidates = {
        n: jnp.array(list(itertools.product([0.0, 1 / (1 - p)], repeat=n)))
        for n in {c.output_size for c in stack._all_cells()}
    }
    masks_seen = []
    for key in jr.split(getkey(), 3):
        outputs, _ = call(stack, xs, key=key, all_layers=True)
        runs = iter(_runs_per_mask(stack, xs, outputs, candidates))
        for i, ys in enumerate(outputs):
            for _, backwards, part in _directions(stack, i):
                tried = next(runs)
                match = [
                    j
                    for j in range(len(tried))
                    if np.allclose(tried[j], ys[:, part], **TOL)
                ]
                assert len(match) == 1, match
                masks_seen.append((i, backwards, match[0]))
    # Each key draws its own masks, and so does each direction.
    per_key = np.array([m[2] for m in masks_seen]).reshape(3, 2, 2)
    assert not (per_key == per_key[0]).all()
    assert not (per_key[..., 0] == per_key[..., 1]).all()


# ----------------------------------------------------------------------- zoneout


def _check_keeps_or_updates(prev, now, new):
    """Each unit of `now` is its previous value or the cell's new one. Returns where
    it kept the previous value, among the units where the two differ."""
    prev, now, new = (np.asarray(a) for a in (prev, now, new))
    kept = np.isclose(now, prev, **TOL)
    updated = np.isclose(now, new, **TOL)
    assert (kept | updated).all()
    return kept[~updated]


# Elman and GRU cells, which output their state.
STATE_OUT = {
    "forward": Config("gru", 3, (4, 3), True, 5),
    "reverse": Config("rnn_tanh", 2, (4, 4), False, 5),
    "bidirectional": Config("gru", 2, (3, 4), True, 5),
}


@pytest.mark.parametrize("direction", directions())
@given(length=st.integers(1, 5), seed=seeds)
def test_zoneout_keeps_or_updates_each_unit(direction, length, seed):
    """Elman and GRU cells output their state, so every step can be checked: each
    unit holds its previous value or takes the cell's new one. With `length`, the
    steps from `length` on are not read."""
    cfg = STATE_OUT[direction]
    kc, kx, kd = jr.split(jr.key(seed), 3)
    stack = make_stack(cfg, kc, direction, zoneout=0.5)
    xs = inputs(cfg, kx)
    outputs, final = call(
        stack, xs, key=kd, length=jnp.asarray(length), all_layers=True
    )
    layer_input, finals = xs, []
    for i, ys in enumerate(outputs):
        for cell, backwards, part in _directions(stack, i):
            prev = cell.init_state()
            for t in _order(length, backwards):
                _check_keeps_or_updates(prev, ys[t, part], cell(layer_input[t], prev))
                prev = ys[t, part]
            assert not jnp.any(ys[length:, part])
            finals.append(prev)
        layer_input = ys
    assert tree_allclose(final, stack._join(finals), **TOL)


def test_zoneout_masks_are_fresh_each_step_at_rate_p(getkey):
    p = 0.3
    stack = stackrnn.GRU(4, 64, zoneout=p, key=getkey())
    xs = jr.normal(getkey(), (40, 4))
    ys, _ = stack(xs, key=getkey())
    cell, prev, kept, clear = stack.cells[0], stack.init_state()[0], [], []
    for t in range(len(xs)):
        new = cell(xs[t], prev)
        kept.append(np.isclose(ys[t], prev, **TOL) & ~np.isclose(ys[t], new, **TOL))
        # Where the previous and new values differ, the output shows the mask.
        clear.append(~np.isclose(prev, new, rtol=1e-3, atol=1e-3))
        prev = ys[t]
    kept, clear = np.array(kept), np.array(clear)
    # Fresh masks: units kept at some steps are updated at others.
    changes = [len(set(k[c])) == 2 for k, c in zip(kept.T, clear.T)]
    assert np.mean(changes) > 0.5
    rate, n = kept[clear].mean(), clear.sum()
    assert abs(rate - p) < 5 * np.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("rates", [(0.5, 0.5), (0.0, 0.5), (0.5, 0.0)])
def test_zoneout_on_lstm_hidden_and_cell_states(rates, getkey):
    """One step from a random state: `h` and `c` each keep or update unit by unit at
    their own rate, and the new `h` is computed from the new, un-zoned `c`
    (Krueger et al.'s LSTM)."""
    cell = stackrnn.LSTMCell(3, 16, key=getkey())
    stack = stack_of([cell], zoneout=rates)
    h0, c0 = jr.normal(getkey(), (2, 16))
    x = jr.normal(getkey(), (1, 3))
    _, (h1, c1) = stack(x, (h0[None], c0[None]), key=getkey())
    new_h, new_c = cell(x[0], (h0, c0))
    for rate, prev, now, new in (
        (rates[0], h0, h1[0], new_h),
        (rates[1], c0, c1[0], new_c),
    ):
        kept = _check_keeps_or_updates(prev, now, new)
        assert kept.any() == (rate > 0)


@pytest.mark.parametrize("direction", directions())
@given(seed=seeds)
def test_zoneout_at_inference_is_the_expectation(direction, seed):
    """One rate, or (LSTMs) one for `h` and one for `c`."""
    cfg = SHAPES[direction]
    rates = (0.3, 0.6) if cfg.kind.startswith("lstm") else (0.4,)
    kc, kx = jr.split(jr.key(seed))
    stack = make_stack(
        cfg, kc, direction, zoneout=rates if len(rates) == 2 else rates[0]
    )
    xs = inputs(cfg, kx)
    outputs = call(stack, xs, inference=True, all_layers=True)
    mean = _with_cells(stack, lambda cell: _ZoneoutMean(cell, rates))
    assert tree_allclose(outputs, stack_by_hand(mean, xs, all_layers=True), **TOL)


def test_zoneout_respects_resets(getkey):
    """A reset restarts every segment from `init_state()`: at inference, the same as
    running the segments one by one."""
    stack = stackrnn.LSTM(3, 5, 2, zoneout=(0.2, 0.4), key=getkey())
    xs = jr.normal(getkey(), (7, 3))
    ys, state = call(stack, xs, resets=jnp.arange(7) == 3, inference=True)
    ys_a, _ = call(stack, xs[:3], inference=True)
    ys_b, state_b = call(stack, xs[3:], inference=True)
    assert tree_allclose(ys, jnp.concatenate([ys_a, ys_b]), **TOL)
    assert tree_allclose(state, state_b, **TOL)


# ------------------------------------------------------------------- weight drop


@pytest.mark.parametrize("fast", [True, False])
def test_weight_drop_is_one_mask_per_sequence(fast, getkey):
    """A linear cell from the unit states e_j and zero inputs: its first outputs are
    the columns of the masked `weight_hh`, and every later step multiplies by the
    same masked matrix. The batch shares one key, so one mask."""
    p, size = 0.5, 5
    cell = _Linear(1, size, getkey())
    stack = stack_of([cell], weight_drop=p, fast=fast)
    xs = jnp.zeros((3, 1))

    def masked_weights(key):
        ys, _ = jax.vmap(lambda s: stack(xs, s[None], key=key))(jnp.eye(size))
        weights = ys[:, 0].T  # column j is the output from e_j
        for t in (1, 2):  # the same matrix at every step
            assert tree_allclose(ys[:, t], ys[:, t - 1] @ weights.T, **TOL)
        return weights

    key = getkey()
    weights = masked_weights(key)
    scaled = cell.weight_hh / (1 - p)
    dropped = np.isclose(weights, 0.0)
    assert (dropped | np.isclose(weights, scaled, **TOL)).all()
    assert 0 < dropped.mean() < 1
    assert tree_equal(masked_weights(key), weights)
    assert not tree_allclose(masked_weights(getkey()), weights)


def test_weight_drop_under_vmap_with_a_key_per_example(getkey):
    """Batched keys draw one mask per example."""
    cell = _Linear(1, 6, getkey())
    stack = stack_of([cell], weight_drop=0.5)
    unit = jnp.zeros((1, 6)).at[0, 0].set(1.0)
    keys = jr.split(getkey(), 4)
    ys, _ = jax.vmap(lambda k: stack(jnp.zeros((1, 1)), unit, key=k))(keys)
    columns = np.asarray(ys[:, 0])
    assert len({c.tobytes() for c in columns}) > 1


@pytest.mark.parametrize("bidirectional", [False, True])
def test_drop_weights_draws_the_masks_once(bidirectional, getkey):
    """`drop_weights` masks every cell's `weight_hh` (entries 0 or W/(1-p), one mask
    per layer and direction) and nothing else; the result, without `WeightDrop`,
    reads every sequence with those weights, so identical sequences of a batch give
    identical outputs with a key each."""
    p = 0.5
    stack = stackrnn.GRU(
        3, 6, num_layers=2, weight_drop=p, bidirectional=bidirectional, key=getkey()
    )
    key = getkey()
    shared = stackrnn.drop_weights(stack, key)
    assert shared.bidirectional == bidirectional
    masks = []
    for wrapped, after in zip(stack._all_cells(), shared._all_cells()):
        assert isinstance(wrapped, stackrnn.WeightDrop)
        before = wrapped.cell
        assert type(after) is type(before)
        w, dropped = np.asarray(before.weight_hh), np.asarray(after.weight_hh)
        zero = dropped == 0
        assert np.allclose(dropped[~zero], w[~zero] / (1 - p), rtol=1e-6)
        assert 0 < zero.mean() < 1
        masks.append(zero)
        rest = lambda c: (c.weight_ih, c.bias_ih, c.bias_hh)  # noqa: E731
        assert tree_equal(rest(before), rest(after))
    assert len({m.tobytes() for m in masks}) == len(masks)
    assert tree_equal(stackrnn.drop_weights(stack, key), shared)
    assert not tree_equal(stackrnn.drop_weights(stack, getkey()), shared)

    xs = jnp.broadcast_to(jr.normal(getkey(), (7, 3)), (4, 7, 3))
    ys, _ = jax.vmap(lambda x, k: shared(x, key=k))(xs, jr.split(getkey(), 4))
    assert all(tree_equal(ys[0], y) for y in ys[1:])
    # The stack itself draws a mask per sequence: identical sequences differ.
    ys, _ = jax.vmap(lambda x, k: stack(x, key=k))(xs, jr.split(getkey(), 4))
    assert not tree_allclose(ys[0], ys[1])


def test_drop_weights_without_weight_drop_is_the_stack(getkey):
    stack = stackrnn.LSTM(3, 5, num_layers=2, dropout=0.2, key=getkey())
    assert stackrnn.drop_weights(stack, getkey()) is stack


@pytest.mark.parametrize("kind", structures(["gru", "lstm"], quick=1))
def test_weight_drop_fast_path_equals_reference(kind, getkey):
    """Values and gradients under `vmap` with a key per example (one masked weight
    matrix each), in float64."""
    with x64(True):
        cfg = Config(kind=kind, input_size=3, widths=(4, 4), bias=True, time=4)
        cells = jax.tree.map(lambda a: a.astype(jnp.float64), make_cells(cfg, getkey()))
        xs = jr.normal(getkey(), (2, 4, 3), jnp.float64)
        keys = jr.split(getkey(), 2)

        def loss(model):
            ys, state = jax.vmap(lambda x, k: model(x, key=k))(xs, keys)
            out = jnp.sum(jnp.sin(ys))
            return out + sum(jnp.sum(s**2) for s in jax.tree.leaves(state))

        fast = stack_of(cells, weight_drop=0.4, fast=True)
        reference = stack_of(cells, weight_drop=0.4, fast=False)
        value_and_grad = eqx.filter_jit(eqx.filter_value_and_grad(loss))
        got, d_got = value_and_grad(fast)
        want, d_want = value_and_grad(reference)
        assert tree_allclose(got, want, rtol=1e-10, atol=1e-10)
        assert tree_allclose(d_got.cells, d_want.cells, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- paths


def _reads_fast_path(stack, **kwargs):
    jaxpr = str(jax.make_jaxpr(lambda x: stack(x, **kwargs))(jnp.zeros((2, 2))))
    return "custom_vjp_call" in jaxpr


@pytest.mark.parametrize(
    "option, fast",
    [
        (dict(weight_drop=0.5), True),
        (dict(residual=True, dropout=0.5, variational=True), True),
        (dict(recurrent_dropout=0.5), False),
        (dict(zoneout=0.5), False),
    ],
)
def test_which_options_keep_the_fast_path(option, fast):
    """Traced, not run, at a width that takes the fast path by default."""
    stack = stackrnn.GRU(2, 512, num_layers=2, key=jr.key(0), **option)
    assert _reads_fast_path(stack, key=jr.key(1)) == fast
    if "zoneout" in option:  # the expectation also runs on the reference path
        assert not _reads_fast_path(stack, inference=True)


@pytest.mark.parametrize("option", ["recurrent_dropout", "zoneout"])
def test_loop_options_take_the_reference_path(option, getkey):
    """Asked for the fast path, the options that act inside the loop give the
    reference path's numbers."""
    cells = [stackrnn.GRUCell(3, 4, key=getkey())]
    xs = jr.normal(getkey(), (5, 3))
    key = getkey()
    fast = stack_of(cells, fast=True, **{option: 0.5})(xs, key=key)
    reference = stack_of(cells, fast=False, **{option: 0.5})(xs, key=key)
    assert tree_equal(fast, reference)


# ------------------------------------------------- keys, transforms and step


ALL_ON = dict(
    dropout=0.3,
    variational=True,
    recurrent_dropout=0.3,
    zoneout=0.3,
    weight_drop=0.3,
    residual=True,
)


# The shapes of the stacks with every option on: cells the wrappers of products
# accept (affine), equal widths for residual connections.
AFFINE = {
    "forward": Config("gru", 3, (4, 4), True, 4),
    "reverse": Config("lstm", 2, (4, 4, 4), True, 4),
    "bidirectional": Config("rnn_tanh", 3, (3, 3), False, 4),
}


def _squares(model, xs, keys):
    ys, state = jax.vmap(lambda x, k: model(x, key=k))(xs, keys)
    total = jnp.sum(ys**2) + sum(jnp.sum(s**2) for s in jax.tree.leaves(state))
    return total, (ys, state)


# The batched outputs and the gradients, in one compiled program.
_grad_each = eqx.filter_jit(eqx.filter_grad(_squares, has_aux=True))


@pytest.mark.parametrize("direction", directions())
@given(seed=seeds)
def test_keyed_and_consistent_under_jit_vmap_and_grad(direction, seed):
    """Every option on: the masks are the reference's, drawn from the key as
    documented; the same key the same outputs, another key others; `vmap` with a key
    per example equals each example alone; the gradients are finite."""
    cfg = AFFINE[direction]
    kc, kx, k1, k2 = jr.split(jr.key(seed), 4)
    stack = make_stack(cfg, kc, direction, **ALL_ON)
    xs = inputs(cfg, kx, batch=3)
    keys = jr.split(k1, 3)
    one = call(stack, xs[0], key=keys[0])
    assert tree_allclose(one, stack_by_hand(stack, xs[0], key=keys[0]), **TOL)
    assert tree_equal(call(stack, xs[0], key=keys[0]), one)
    assert not tree_allclose(call(stack, xs[0], key=k2), one)
    grads, batched = _grad_each(stack, xs, keys)
    for b in range(3):
        example = jax.tree.map(lambda a: a[b], batched)
        assert tree_allclose(example, call(stack, xs[b], key=keys[b]), **TOL)
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert any(bool(jnp.any(g != 0)) for g in leaves)


@eqx.filter_jit
def _step(stack, x, state):
    return stack.step(x, state, inference=True)


@pytest.mark.parametrize("kind, reverse", [("gru", False), ("lstm", True)])
@given(seed=seeds)
def test_step_at_inference_equals_the_call_with_every_option(kind, reverse, seed):
    cfg = Config(kind, 3, (4, 4, 4), True, 4)
    kc, kx = jr.split(jr.key(seed))
    stack = stack_of(make_cells(cfg, kc), reverse=reverse, **ALL_ON)
    xs = inputs(cfg, kx)
    ys, final = call(stack, xs, inference=True)
    state = stack.init_state()
    for t in _order(cfg.time, reverse):
        y, state = _step(stack, xs[t], state)
        assert tree_allclose(y, ys[t], **TOL)
    assert tree_allclose(state, final, **TOL)


def test_step_in_training(getkey):
    """Zoneout, dropout and residual connections step with a key per step; the
    options that hold one mask per sequence are refused."""
    stack = stackrnn.GRU(3, 4, 3, dropout=0.5, zoneout=0.5, residual=True, key=getkey())
    x, state, k1, k2 = jr.normal(getkey(), (3,)), stack.init_state(), getkey(), getkey()
    with pytest.raises(RuntimeError, match=r"`dropout` \(=0.5\) requires a `key`"):
        stack.step(x, state)
    assert tree_equal(stack.step(x, state, key=k1), stack.step(x, state, key=k1))
    assert not tree_equal(stack.step(x, state, key=k1), stack.step(x, state, key=k2))
    for option, name in (
        ("variational", "`variational` dropout"),
        ("recurrent_dropout", r"`RecurrentDropout\(p=0.5\)`"),
        ("weight_drop", r"`WeightDrop\(p=0.5\)`"),
    ):
        value = True if option == "variational" else 0.5
        per_sequence = stackrnn.GRU(3, 4, 2, dropout=0.5, key=k1, **{option: value})
        with pytest.raises(ValueError, match=f"{name} draws one mask per sequence"):
            per_sequence.step(x, per_sequence.init_state(), key=k2)
        per_sequence.step(x, per_sequence.init_state(), inference=True)
        eqx.nn.inference_mode(per_sequence).step(x, per_sequence.init_state())


# ----------------------------------------------------------------- errors


def test_missing_key_names_the_options(getkey):
    stack = stackrnn.LSTM(3, 4, zoneout=(0.1, 0.2), weight_drop=0.3, key=getkey())
    with pytest.raises(RuntimeError) as info:
        stack(jnp.ones((2, 3)))
    message = str(info.value)
    assert "`WeightDrop(p=0.3)` requires a `key`" in message
    assert "`inference=True`" in message


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(recurrent_dropout=1.0), ("`recurrent_dropout`", "[0, 1)", "got 1.0")),
        (dict(weight_drop=-0.1), ("`weight_drop`", "[0, 1)", "got -0.1")),
        (dict(zoneout="0.1"), ("`zoneout`", "number", "got '0.1'")),
        (dict(zoneout=(0.1, 1.0)), ("`zoneout[1]`", "[0, 1)", "got 1.0")),
        (dict(zoneout=(0.1, 0.2)), ("`rates` (=(0.1, 0.2))", "2 rates", "1 array")),
        (dict(variational=1), ("`variational`", "bool", "got 1")),
        (dict(residual="yes"), ("`residual`", "bool", "got 'yes'")),
    ],
)
def test_bad_regulariser_options(kwargs, words):
    with pytest.raises((ValueError, TypeError)) as info:
        stackrnn.GRU(3, 4, 2, dropout=0.1, key=jr.key(0), **kwargs)
    for word in words:
        assert word in str(info.value)


def test_residual_needs_equal_widths(getkey):
    with pytest.raises(ValueError) as info:
        stackrnn.GRU(3, [4, 5], 2, residual=True, key=getkey())
    for word in ("`residual=True`", "layer 1", "`cells[1]`", "reads 4", "outputs 5"):
        assert word in str(info.value)
    # The bottom layer may change the width.
    stackrnn.GRU(3, 4, 2, residual=True, key=getkey())


@pytest.mark.parametrize("wrapper", [stackrnn.RecurrentDropout, stackrnn.WeightDrop])
def test_product_wrappers_need_affine_cells(wrapper, getkey):
    name = wrapper.__name__
    with pytest.raises(TypeError, match=f"`{name}` acts on .* but `cell` is a _Echo"):
        wrapper(_Echo(4), 0.2)
    with pytest.raises(TypeError, match=f"`{name}` acts on"):
        wrapper(stackrnn.Zoneout(stackrnn.GRUCell(3, 4, key=getkey()), 0.1), 0.2)
    stackrnn.Zoneout(_Echo(4), 0.2)  # zoneout works with any cell
    # Recurrent dropout runs on a weight-dropped cell.
    stackrnn.RecurrentDropout(
        stackrnn.WeightDrop(stackrnn.GRUCell(3, 4, key=getkey()), 0.2), 0.2
    )


def test_options_without_effect_warn(getkey):
    with pytest.warns(UserWarning, match="`variational=True` has no effect"):
        stackrnn.GRU(3, 4, 2, variational=True, key=getkey())
    with pytest.warns(UserWarning, match="`residual=True` has no effect"):
        stackrnn.GRU(3, 4, 1, residual=True, key=getkey())


def test_constructors_pass_the_options(getkey):
    for make in (stackrnn.RNN, stackrnn.GRU, stackrnn.LSTM):
        stack = make(3, 4, 2, key=getkey(), **ALL_ON)
        assert (stack.dropout, stack.variational, stack.residual) == (0.3, True, True)
        for cell in stack.cells:
            assert isinstance(cell, stackrnn.Zoneout) and set(cell.rates) == {0.3}
            assert isinstance(cell.cell, stackrnn.RecurrentDropout)
            assert cell.cell.p == 0.3
            assert isinstance(cell.cell.cell, stackrnn.WeightDrop)
            assert cell.cell.cell.p == 0.3
        plain = make(3, 4, 2, key=getkey())
        assert not any(isinstance(c, stackrnn.AbstractWrappedCell) for c in plain.cells)


def test_pytorch_module_refuses_what_it_cannot_compute(getkey):
    pytest.importorskip("torch")
    from stackrnn.interop.torch import to_torch, to_torch_module

    residual = stackrnn.GRU(3, 4, 2, residual=True, key=getkey())
    with pytest.raises(ValueError, match="no `residual`"):
        to_torch_module(residual)
    to_torch(residual)  # the weights still export: the connections hold none
    # A Zoneout cell's weights would load into a module that computes without it.
    zoneout = stackrnn.GRU(3, 4, 2, zoneout=0.1, key=getkey())
    for export in (to_torch_module, to_torch):
        with pytest.raises(ValueError, match="no `Zoneout`"):
            export(zoneout)
    to_torch_module(stackrnn.GRU(3, 4, 2, weight_drop=0.5, key=getkey()))


# ------------------------------------------------------------ per-layer wrappers


def _per_layer_stack(key, checkpoint):
    """Three GRU layers: recurrent dropout on the middle one only, zoneout on the
    top one only."""
    k0, k1, k2 = jr.split(key, 3)
    return stackrnn.StackedRNN(
        [
            stackrnn.GRUCell(3, 5, key=k0),
            stackrnn.RecurrentDropout(stackrnn.GRUCell(5, 5, key=k1), 0.5),
            stackrnn.Zoneout(stackrnn.GRUCell(5, 5, key=k2), 0.4),
        ],
        scan=stackrnn.Scan(checkpoint=stackrnn.Chunks.from_flag(checkpoint)),
    )


def _per_layer_by_hand(stack, xs, key, checkpoint):
    """`_per_layer_stack` by the reference, its masks drawn as documented: layer
    `l`'s wrappers take `split(k_l, 3)` of its key `k_l` (recurrent dropout the
    second entry, zoneout the third, one keep mask per array of the state), `k_l`
    being entry `(num_layers - 1) + l` of `split(key, 2 * num_layers - 1)`; in
    checkpointed chunks, zoneout's key is folded with each chunk's first step."""
    cell_keys = jr.split(key, 5)[2:]
    bottom, middle, top = (_base(c) for c in stack.cells)
    k_mask = jr.split(cell_keys[1], 3)[1]
    mask = jnp.where(jr.bernoulli(k_mask, 0.5, (5,)), 1 / 0.5, 0.0)
    k_zone = jr.split(cell_keys[2], 3)[2]
    if checkpoint:
        chunks = [(jr.fold_in(k_zone, s), checkpoint) for s in range(0, len(xs), 2)]
    else:
        chunks = [(k_zone, len(xs))]
    keeps = jnp.concatenate(
        [jr.bernoulli(jr.split(k, 1)[0], 0.4, (n, 5)) for k, n in chunks]
    )
    by_hand = stackrnn.StackedRNN(
        [bottom, _GalDropout(middle, mask), _ZoneoutKeeps(top, keeps)]
    )
    return stack_by_hand(by_hand, xs, inference=False)[0]


@pytest.mark.parametrize("checkpoint", structures([2, False], quick=1))
def test_per_layer_wrappers_equal_the_loops_under_vmap_and_jit(checkpoint, getkey):
    stack = _per_layer_stack(getkey(), checkpoint)
    xs = jr.normal(getkey(), (4, 6, 3))
    keys = jr.split(getkey(), 4)
    ys, _ = jax.vmap(lambda x, k: call(stack, x, key=k))(xs, keys)
    for b in range(4):
        want = _per_layer_by_hand(stack, xs[b], keys[b], checkpoint)
        assert tree_allclose(ys[b], want, **TOL)
    # Only the wrapped layers draw masks: at inference, the middle layer is its cell
    # and the top one zoneout's expectation.
    bottom, middle, top = (_base(c) for c in stack.cells)
    by_hand = stackrnn.StackedRNN([bottom, middle, _ZoneoutMean(top, (0.4,))])
    want, _ = stack_by_hand(by_hand, xs[0])
    assert tree_allclose(call(stack, xs[0], inference=True)[0], want, **TOL)


class _InputNoise(stackrnn.AbstractWrappedCell):
    """A user's wrapper: Gaussian noise on the layer's inputs in training, one draw
    per step, through the same hook as the built-in wrappers."""

    cell: stackrnn.AbstractCell
    scale: float = eqx.field(static=True)

    def project_input(self, x):
        return self.cell.project_input(x)

    def recur(self, gates_x, state):
        return self.cell.recur(gates_x, state)

    def for_sequence(self, xs, *, key, inference, start=None, streaming=False):
        cell, xs = self.cell.for_sequence(
            xs, key=key, inference=inference, start=start, streaming=streaming
        )
        if inference:
            return cell, xs
        if start is not None:
            key = jr.fold_in(key, start)
        return cell, xs + self.scale * jr.normal(key, xs.shape, xs.dtype)


@pytest.mark.parametrize("checkpoint", [False, 2])
def test_a_user_wrapper_runs_through_the_hook(checkpoint, getkey):
    """A wrapper written outside the library, around a built-in one, on layer 2
    only: the stack runs it as it runs its own, in and out of checkpointed chunks
    (where per-step draws fold in the chunk's start), and it composes with the
    inner wrapper's masks."""
    k0, k1 = getkey(), getkey()
    inner = stackrnn.RecurrentDropout(stackrnn.GRUCell(4, 4, key=k1), 0.3)
    wrapped = _InputNoise(inner, 0.5)
    bottom = stackrnn.GRUCell(3, 4, key=k0)
    scan = stackrnn.Scan(checkpoint=stackrnn.Chunks.from_flag(checkpoint))
    stack = stackrnn.StackedRNN([bottom, wrapped], scan=scan)
    xs, key = jr.normal(getkey(), (6, 3)), getkey()
    ys, _ = call(stack, xs, key=key)

    # By hand: the user's noise (from the layer's key, folded with each chunk's
    # start when checkpointed), then recurrent dropout's mask from the same key.
    layer_key = jr.split(key, 3)[2]
    hs, _ = stack_by_hand(_layer(bottom), xs)
    if checkpoint:
        noise = jnp.concatenate(
            [jr.normal(jr.fold_in(layer_key, s), (2, 4)) for s in range(0, 6, 2)]
        )
    else:
        noise = jr.normal(layer_key, (6, 4))
    mask = jnp.where(jr.bernoulli(jr.split(layer_key, 3)[1], 0.7, (4,)), 1 / 0.7, 0.0)
    want, _ = stack_by_hand(_layer(_GalDropout(inner.cell, mask)), hs + 0.5 * noise)
    assert tree_allclose(ys, want, **TOL)
    # At inference the user's wrapper and the inner one are off.
    want, _ = stack_by_hand(stackrnn.StackedRNN([bottom, inner.cell]), xs)
    assert tree_allclose(call(stack, xs, inference=True)[0], want, **TOL)
