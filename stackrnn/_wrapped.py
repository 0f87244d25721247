"""Wrapper cells: a cell changed by holding it (Equinox's "wrap, don't subclass").

The regularisers that act on one cell are wrappers: [`stackrnn.WeightDrop`][],
[`stackrnn.RecurrentDropout`][] and [`stackrnn.Zoneout`][]. Each draws its masks for
a sequence in `for_sequence`, the one hook a layer calls on its cell before reading
a sequence, and returns the cell that applies them; the stack passes every cell its
key and knows nothing of what the cell does with it. Wrappers nest, and may wrap
any layer's cell alone.

Wrappers of one cell share its key: each takes its own entry of
`jax.random.split(key, 3)` (weight drop the first, recurrent dropout the second,
zoneout the third), so a cell's masks do not depend on how its wrappers are nested.
"""

import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from ._cells import AbstractAffineCell, AbstractCell, State
from ._checks import check_probability
from ._dropout import dropout


class AbstractWrappedCell(AbstractCell):
    """A cell that runs `cell` changed: its sizes, state and output are `cell`'s.

    A final subclass declares `cell` and implements `project_input` and `recur` (what
    calling the wrapper as a cell does; the built-in wrappers compute their
    inference-time step there) and `for_sequence`, which must first ask `cell` for
    the cell it runs (`self.cell.for_sequence(...)`, passing every argument on), so
    that the wrappers inside draw their masks too.

    !!! example

        A wrapper that adds Gaussian noise to a layer's inputs in training, one draw
        per step:

        ```python
        import equinox as eqx, jax, jax.numpy as jnp, stackrnn

        class InputNoise(stackrnn.AbstractWrappedCell):
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
                    key = jax.random.fold_in(key, start)
                noise = jax.random.normal(key, xs.shape, xs.dtype)
                return cell, xs + self.scale * noise

        k1, k2 = jax.random.split(jax.random.key(0))
        cells = [
            stackrnn.GRUCell(3, 8, key=k1),
            InputNoise(stackrnn.GRUCell(8, 8, key=k2), 0.1),
        ]
        rnn = stackrnn.StackedRNN(cells)
        ys, state = rnn(jnp.ones((5, 3)), key=jax.random.key(1))
        ```
    """

    cell: eqx.AbstractVar[AbstractCell]

    @property
    def input_size(self) -> int:
        return self.cell.input_size

    @property
    def hidden_size(self) -> int:
        return self.cell.hidden_size

    @property
    def output_size(self) -> int:
        return self.cell.output_size

    def init_state(self) -> State:
        return self.cell.init_state()

    def output(self, state):
        return self.cell.output(state)


def _check_cell(cell) -> AbstractCell:
    if not isinstance(cell, AbstractCell):
        raise TypeError(
            f"`cell` must be a stackrnn cell (an AbstractCell), got "
            f"{type(cell).__name__}"
        )
    return cell


def _check_runs_affine(wrapper: str, cell: AbstractCell) -> None:
    """`wrapper` acts on the product `weight_hh @ h`: the cell that `cell` runs must
    be an `AbstractAffineCell`."""
    xs = jnp.zeros((1, cell.input_size))
    runs = jax.eval_shape(lambda: cell.for_sequence(xs, key=None, inference=True)[0])
    if not isinstance(runs, AbstractAffineCell):
        raise TypeError(
            f"`{wrapper}` acts on the product `weight_hh @ h` of an "
            f"`AbstractAffineCell`, but `cell` is a {type(cell).__name__}"
        )


def _inner(wrapper, xs, key, inference, start, streaming):
    return wrapper.cell.for_sequence(
        xs, key=key, inference=inference, start=start, streaming=streaming
    )


def _own_key(wrapper: str, key, slot: int, streaming: bool, per_sequence: bool):
    """The key of a wrapper (`wrapper` describes it), entry `slot` of
    `split(key, 3)`; the errors a wrapper that draws masks raises without a key, or
    when streamed with per-sequence masks."""
    if key is None:
        raise RuntimeError(
            f"`{wrapper}` requires a `key` when running in non-deterministic mode; "
            "pass `key=...` or `inference=True`"
        )
    if streaming and per_sequence:
        raise ValueError(
            f"`{wrapper}` draws one mask per sequence, which `step` cannot keep "
            "across separate calls; in training, run the sequence with "
            "`__call__`, or pass `inference=True`"
        )
    return jax.random.split(key, 3)[slot]


class WeightDrop(AbstractWrappedCell):
    """DropConnect on the recurrent weights (Merity et al.'s weight drop): each entry
    of `cell.weight_hh` is zeroed with probability `p`, one mask per sequence, the
    survivors scaled by `1 / (1 - p)`.

    The masked cell is an ordinary cell, so the layer keeps the fast path. To share
    one mask across a batch, as AWD-LSTM does, call [`stackrnn.drop_weights`][]
    outside `jax.vmap`.

    **Arguments:**

    - `cell`: an [`stackrnn.AbstractAffineCell`][].
    - `p`: the probability, in [0, 1).
    """

    cell: AbstractAffineCell
    p: float = eqx.field(static=True)

    def __init__(self, cell: AbstractAffineCell, p: float):
        if not isinstance(_check_cell(cell), AbstractAffineCell):
            raise TypeError(
                "`WeightDrop` acts on the `weight_hh` of an `AbstractAffineCell`, "
                f"but `cell` is a {type(cell).__name__}"
            )
        self.cell = cell
        self.p = check_probability("p", p)

    def dropped(self, key: PRNGKeyArray) -> AbstractAffineCell:
        """`cell` with one mask on its `weight_hh`, drawn from `key`."""
        weight = dropout(self.cell.weight_hh, self.p, key)
        return eqx.tree_at(lambda c: c.weight_hh, self.cell, weight)

    def project_input(self, x):
        return self.cell.project_input(x)

    def recur(self, gates_x, state):
        return self.cell.recur(gates_x, state)

    def for_sequence(self, xs, *, key, inference, start=None, streaming=False):
        if inference or self.p == 0:
            return _inner(self, xs, key, inference, start, streaming)
        own = _own_key(f"WeightDrop(p={self.p})", key, 0, streaming, per_sequence=True)
        cell = self.dropped(own)
        return cell.for_sequence(
            xs, key=key, inference=inference, start=start, streaming=streaming
        )


class _MaskedRecurrence(AbstractWrappedCell):
    """`cell` with its previous output masked where it enters the recurrent product:
    `pointwise(project_input(x), weight_hh @ (mask * output(state)) + bias_hh,
    state)`. The state itself is carried unmasked (a GRU's `z * h`, an LSTM's `c`)."""

    cell: AbstractAffineCell
    mask: Float[Array, " output"]

    def project_input(self, x):
        return self.cell.project_input(x)

    def recur(self, gates_x, state):
        cell = self.cell
        gates_h = cell.weight_hh @ (self.mask * cell.output(state))
        if cell.bias_hh is not None:
            gates_h = gates_h + cell.bias_hh
        return cell.pointwise(gates_x, gates_h, state)


class RecurrentDropout(AbstractWrappedCell):
    """Gal and Ghahramani's recurrent dropout: each unit of the previous output is
    zeroed with probability `p` where it enters the recurrent product
    `weight_hh @ h`, one mask per sequence; the carried state is not masked. The
    layer takes the reference path in training.

    **Arguments:**

    - `cell`: a cell that runs as an [`stackrnn.AbstractAffineCell`][] (one, or a
      [`stackrnn.WeightDrop`][] of one).
    - `p`: the probability, in [0, 1).
    """

    cell: AbstractCell
    p: float = eqx.field(static=True)

    def __init__(self, cell: AbstractCell, p: float):
        _check_runs_affine("RecurrentDropout", _check_cell(cell))
        self.cell = cell
        self.p = check_probability("p", p)

    def project_input(self, x):
        return self.cell.project_input(x)

    def recur(self, gates_x, state):
        return self.cell.recur(gates_x, state)

    def for_sequence(self, xs, *, key, inference, start=None, streaming=False):
        cell, xs = _inner(self, xs, key, inference, start, streaming)
        if inference or self.p == 0:
            return cell, xs
        own = _own_key(
            f"RecurrentDropout(p={self.p})", key, 1, streaming, per_sequence=True
        )
        ones = jnp.ones_like(cell.output(cell.init_state()))
        return _MaskedRecurrence(cell, dropout(ones, self.p, own)), xs


def _mix(rates, state, new, keeps=None):
    """Every array of the state with rate `p > 0` kept unit by unit from `state`:
    where `keeps` says so, or, without `keeps`, in expectation."""
    leaves, treedef = jax.tree.flatten(state)
    mixed = []
    for i, (p, prev, now) in enumerate(zip(rates, leaves, jax.tree.leaves(new))):
        if p == 0:
            mixed.append(now)
        elif keeps is not None:
            mixed.append(jnp.where(keeps[i] != 0, prev, now))
        else:
            mixed.append(p * prev + (1 - p) * now)
    return jax.tree.unflatten(treedef, mixed)


class _SampledZoneout(AbstractCell):
    """`cell` whose state units keep their previous values where a keep mask says
    so. The masks arrive with the input, after the cell's own input, one row per
    step (so its `input_size` is the cell's plus the state's units)."""

    cell: AbstractCell
    rates: tuple[float, ...] = eqx.field(static=True)

    @property
    def _units(self) -> int:
        return sum(s.size for s in jax.tree.leaves(self.init_state()))

    @property
    def input_size(self) -> int:
        return self.cell.input_size + self._units

    @property
    def hidden_size(self) -> int:
        return self.cell.hidden_size

    @property
    def output_size(self) -> int:
        return self.cell.output_size

    def init_state(self) -> State:
        return self.cell.init_state()

    def output(self, state):
        return self.cell.output(state)

    def project_input(self, x):
        n = self.cell.input_size
        return jnp.concatenate([self.cell.project_input(x[:n]), x[n:]])

    def recur(self, gates_x, state):
        units = self._units
        gates_x, keep = gates_x[:-units], gates_x[-units:]
        sizes = [s.size for s in jax.tree.leaves(state)]
        keeps = jnp.split(keep, list(itertools.accumulate(sizes))[:-1])
        return _mix(self.rates, state, self.cell.recur(gates_x, state), keeps)


class Zoneout(AbstractWrappedCell):
    """Zoneout (Krueger et al.): at every step each unit of the state keeps its
    previous value with probability `p`, a fresh mask per step; at inference each
    unit is the expectation `p * previous + (1 - p) * new`. The layer takes the
    reference path.

    **Arguments:**

    - `cell`: any cell.
    - `rates`: the probability `p`, in [0, 1), for every array of the state, or a
      tuple with one per array: `(p_h, p_c)` for an LSTM's state `(h, c)`.
    """

    cell: AbstractCell
    rates: tuple[float, ...] = eqx.field(static=True)

    def __init__(self, cell: AbstractCell, rates: float | tuple[float, ...]):
        arrays = len(jax.tree.leaves(jax.eval_shape(_check_cell(cell).init_state)))
        if isinstance(rates, tuple):
            rates = tuple(
                check_probability(f"rates[{i}]", p) for i, p in enumerate(rates)
            )
            if len(rates) != arrays:
                raise ValueError(
                    f"`rates` (={rates}) gives {len(rates)} rates, one per array of "
                    f"the state, but the state of a {type(cell).__name__} holds "
                    f"{arrays} array(s); give one rate (a number) or one per array"
                )
        else:
            rates = (check_probability("rates", rates),) * arrays
        self.cell = cell
        self.rates = rates

    def project_input(self, x):
        return self.cell.project_input(x)

    def recur(self, gates_x, state):
        return _mix(self.rates, state, self.cell.recur(gates_x, state))

    def for_sequence(self, xs, *, key, inference, start=None, streaming=False):
        cell, xs = _inner(self, xs, key, inference, start, streaming)
        if not any(self.rates):
            return cell, xs
        if inference:
            return eqx.tree_at(lambda z: z.cell, self, cell), xs
        own = _own_key(
            f"Zoneout(rates={self.rates})", key, 2, streaming, per_sequence=False
        )
        if start is not None:
            # `xs` is the chunk from step `start` of a checkpointed sequence: the
            # per-step masks are this chunk's own.
            own = jax.random.fold_in(own, start)
        leaves = jax.tree.leaves(cell.init_state())
        keep = jnp.concatenate(
            [
                jax.random.bernoulli(k, p, (len(xs), s.size)).astype(xs.dtype)
                for k, p, s in zip(
                    jax.random.split(own, len(leaves)), self.rates, leaves
                )
            ],
            axis=-1,
        )
        return _SampledZoneout(cell, self.rates), jnp.concatenate([xs, keep], -1)


def _is_weight_drop(x) -> bool:
    return isinstance(x, WeightDrop)


def holds(model: PyTree, cls: type) -> bool:
    """Whether `model` holds a module of type `cls`."""
    is_cls = lambda x: isinstance(x, cls)  # noqa: E731
    return any(map(is_cls, jax.tree.leaves(model, is_leaf=is_cls)))


def drop_weights(model: PyTree, key: PRNGKeyArray) -> PyTree:
    """Draws every [`stackrnn.WeightDrop`][]'s mask once, for every sequence the
    result reads.

    A `WeightDrop` cell draws one mask per sequence. Under `jax.vmap` with a key per
    example that makes one `weight_hh` per example: memory of
    `batch x gates x hidden` per layer, and batched matrix-vector products in place
    of one matrix product (see the regularisation page). AWD-LSTM instead draws one
    mask per batch: call `drop_weights` outside `jax.vmap` and the returned model
    inside it. [`stackrnn.lm.fit`][] does so.

    **Arguments:**

    - `model`: any PyTree holding cells, e.g. a [`stackrnn.StackedRNN`][] or a
      [`stackrnn.lm.RNNLM`][].
    - `key`: a `jax.random.PRNGKey`; one mask per `WeightDrop` is drawn from it.

    **Returns:**

    `model` with every `WeightDrop` replaced by its cell, whose `weight_hh` is
    masked (survivors scaled by `1 / (1 - p)`); `model` itself when it holds none.
    """
    if not holds(model, WeightDrop):
        return model
    count = sum(map(_is_weight_drop, jax.tree.leaves(model, is_leaf=_is_weight_drop)))
    keys = iter(jax.random.split(key, count))
    return jax.tree.map(
        lambda x: x.dropped(next(keys)) if _is_weight_drop(x) else x,
        model,
        is_leaf=_is_weight_drop,
    )
