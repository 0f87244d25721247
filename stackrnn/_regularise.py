"""The stack's regularisers: dropout between layers (per element, or one mask per
sequence), recurrent dropout, zoneout and weight drop.

Every mask is drawn here, from the keys that `mask_keys` splits for a call of the
stack (which also decides which regularisers draw masks at all). The regularisers
that act inside the time loop wrap a layer's cell (`RecurrentDropout`, `Zoneout`), so
a layer runs them as it runs any cell, on the reference path; weight drop edits the
cell's `weight_hh` before the layer runs, so it keeps the fast path.
"""

import itertools
from typing import TYPE_CHECKING

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._cells import AbstractAffineCell, AbstractCell, State
from ._checks import check_probability


if TYPE_CHECKING:
    from ._stack import StackedRNN


def dropout(
    x: Float[Array, "..."],
    p: float,
    key: PRNGKeyArray,
    *,
    shape: tuple[int, ...] | None = None,
) -> Float[Array, "..."]:
    """Inverted dropout: zeroes each element with probability `p` and scales the
    survivors by `1 / (1 - p)`, so the expectation is unchanged (PyTorch's and
    Equinox's convention). `p` must be in [0, 1). `shape` is the mask's shape,
    broadcast against `x` (default `x`'s): `(1, size)` drops the same units at every
    time step of a `(time, size)` sequence."""
    keep = jax.random.bernoulli(key, 1.0 - p, jnp.shape(x) if shape is None else shape)
    return jnp.where(keep, x / (1.0 - p), jnp.zeros((), x.dtype))


def split_keys(
    key: PRNGKeyArray, num_layers: int, num_directions: int
) -> tuple[PRNGKeyArray, list[list[PRNGKeyArray]]]:
    """The stack's keys: one for the input of each layer above the first, and one
    per layer and direction for that cell's regularisers."""
    keys = jax.random.split(key, num_layers - 1 + num_layers * num_directions)
    cell_keys = keys[num_layers - 1 :]
    return keys[: num_layers - 1], [
        [cell_keys[i * num_directions + d] for d in range(num_directions)]
        for i in range(num_layers)
    ]


def zoneout_on(zoneout: float | tuple[float, ...]) -> bool:
    """Whether any zoneout rate is positive."""
    rates = zoneout if isinstance(zoneout, tuple) else (zoneout,)
    return max(rates) > 0


def active_regularisers(stack: "StackedRNN", inference: bool) -> list[str]:
    """The names of the regularisers of `stack` that draw masks in a call."""
    if inference:
        return []
    on = {
        "dropout": stack.num_layers > 1 and stack.dropout > 0,
        "recurrent_dropout": stack.recurrent_dropout > 0,
        "zoneout": zoneout_on(stack.zoneout),
        "weight_drop": stack.weight_drop > 0,
    }
    return [name for name, drawn in on.items() if drawn]


def mask_keys(
    stack: "StackedRNN", key: PRNGKeyArray | None, inference: bool
) -> tuple[PRNGKeyArray, list[list[PRNGKeyArray]]] | None:
    """The keys of every mask `stack` draws in a call (`split_keys`), or `None`
    when it draws none; a `RuntimeError` naming the regularisers that need `key`
    when it is `None`."""
    names = active_regularisers(stack, inference)
    if not names:
        return None
    if key is None:
        named = ", ".join(f"`{n}` (={getattr(stack, n)})" for n in names)
        raise RuntimeError(
            f"`StackedRNN` with {named} requires a `key` when "
            "running in non-deterministic mode; pass `key=...` or "
            "`inference=True`"
        )
    return split_keys(key, stack.num_layers, 2 if stack.bidirectional else 1)


def check_step(stack: "StackedRNN", inference: bool) -> None:
    """`StackedRNN.step` draws its masks afresh at every call, so in training it
    refuses the regularisers that draw one mask per sequence."""
    names = active_regularisers(stack, inference)
    per_sequence = [
        name
        for name, on in (
            ("variational", stack.variational and "dropout" in names),
            ("recurrent_dropout", "recurrent_dropout" in names),
            ("weight_drop", "weight_drop" in names),
        )
        if on
    ]
    if per_sequence:
        listed = " and ".join(f"`{n}`" for n in per_sequence)
        raise ValueError(
            f"{listed} draw one mask per sequence, which `step` cannot keep "
            "across separate calls; in training, run the sequence with "
            "`__call__`, or pass `inference=True`"
        )


def check_zoneout(zoneout, cells: list[tuple[str, AbstractCell]]):
    """`zoneout` must be a probability, or a tuple with one probability per array of
    every cell's state (an LSTM's `(p_h, p_c)`)."""
    if not isinstance(zoneout, tuple):
        return check_probability("zoneout", zoneout)
    rates = tuple(check_probability(f"zoneout[{i}]", p) for i, p in enumerate(zoneout))
    for name, cell in cells:
        arrays = len(jax.tree.leaves(jax.eval_shape(cell.init_state)))
        if arrays != len(rates):
            raise ValueError(
                f"`zoneout` (={zoneout}) gives {len(rates)} rates, one per array of "
                f"the state, but the state of `{name}` holds {arrays} array(s); give "
                "one rate (a number) or one per array"
            )
    return rates


def check_affine(option: str, value: float, cells: list[tuple[str, AbstractCell]]):
    """The options that act on `weight_hh @ h` need affine cells."""
    for name, cell in cells:
        if value > 0 and not isinstance(cell, AbstractAffineCell):
            raise TypeError(
                f"`{option}` (={value}) acts on the product `weight_hh @ h` of an "
                f"`AbstractAffineCell`, but `{name}` is a {type(cell).__name__}"
            )


def _rates(zoneout, state) -> tuple[float, ...]:
    if isinstance(zoneout, tuple):
        return zoneout
    return (zoneout,) * len(jax.tree.leaves(state))


class _Wrapper(AbstractCell):
    """A cell that runs `cell` with a regulariser: sizes, state and output are
    `cell`'s."""

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


class RecurrentDropout(_Wrapper):
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


class Zoneout(_Wrapper):
    """`cell` whose state units keep their previous values with probability `rates`
    (one per array of the state). With `sampled=True` (training) the keep masks
    arrive with the input, after the cell's own input, one row per step (see
    `zoneout_masks`); with `sampled=False` (inference) each unit is the expectation
    `p * previous + (1 - p) * new`."""

    cell: AbstractCell
    rates: tuple[float, ...] = eqx.field(static=True)
    sampled: bool = eqx.field(static=True)

    @property
    def _units(self) -> int:
        return sum(s.size for s in jax.tree.leaves(self.init_state()))

    @property
    def input_size(self) -> int:
        return self.cell.input_size + (self._units if self.sampled else 0)

    def project_input(self, x):
        if not self.sampled:
            return self.cell.project_input(x)
        n = self.cell.input_size
        return jnp.concatenate([self.cell.project_input(x[:n]), x[n:]])

    def recur(self, gates_x, state):
        leaves, treedef = jax.tree.flatten(state)
        if self.sampled:
            gates_x, keep = gates_x[: -self._units], gates_x[-self._units :]
            bounds = list(itertools.accumulate(s.size for s in leaves))[:-1]
            keeps = jnp.split(keep, bounds)
        new = jax.tree.leaves(self.cell.recur(gates_x, state))
        mixed = []
        for i, (p, prev, now) in enumerate(zip(self.rates, leaves, new)):
            if p == 0:
                mixed.append(now)
            elif self.sampled:
                mixed.append(jnp.where(keeps[i] != 0, prev, now))
            else:
                mixed.append(p * prev + (1 - p) * now)
        return jax.tree.unflatten(treedef, mixed)


def zoneout_masks(
    key: PRNGKeyArray, rates: tuple[float, ...], state: State, time: int, dtype
) -> Float[Array, "time units"]:
    """One keep mask per step, every array of the state in turn: 1 where a unit
    keeps its previous value (probability `rates[i]` for the i-th array), else 0."""
    leaves = jax.tree.leaves(state)
    keys = jax.random.split(key, len(leaves))
    return jnp.concatenate(
        [
            jax.random.bernoulli(k, p, (time, s.size)).astype(dtype)
            for k, p, s in zip(keys, rates, leaves)
        ],
        axis=-1,
    )


def drop_weight(cell: AbstractCell, p: float, key: PRNGKeyArray) -> AbstractCell:
    """DropConnect: `cell` with one inverted-dropout mask on its `weight_hh`."""
    return eqx.tree_at(lambda c: c.weight_hh, cell, dropout(cell.weight_hh, p, key))


def regularise_cell(
    cell: AbstractCell,
    xs: Float[Array, "time input"],
    *,
    weight_drop: float,
    recurrent_dropout: float,
    zoneout: float | tuple[float, ...],
    key: PRNGKeyArray | None,
    inference: bool,
    start: Int[Array, ""] | None = None,
) -> tuple[AbstractCell, Float[Array, "time _"]]:
    """The cell a layer runs, and the inputs it reads, for one sequence `xs`.

    In training (`inference=False`, `key` given when any rate is positive):
    `weight_hh` with one DropConnect mask, the previous output with one recurrent
    dropout mask, and a fresh zoneout mask per step (appended to the inputs). At
    inference: zoneout's expectation only. A rate of 0 leaves the cell as it is.
    `start`: when `xs` is one chunk of a checkpointed sequence, the chunk's first
    step; the zoneout masks are then drawn from their key folded with it."""
    rates = _rates(zoneout, jax.eval_shape(cell.init_state))
    if not any(rates):
        rates = ()
    if inference:
        return (Zoneout(cell, rates, sampled=False) if rates else cell), xs
    if not (weight_drop > 0 or recurrent_dropout > 0 or rates):
        return cell, xs
    k_weight, k_recurrent, k_zoneout = jax.random.split(key, 3)
    if start is not None:
        # `xs` is the chunk from step `start` of a checkpointed sequence: the
        # per-sequence masks are the whole sequence's, the per-step masks this
        # chunk's own.
        k_zoneout = jax.random.fold_in(k_zoneout, start)
    if weight_drop > 0:
        cell = drop_weight(cell, weight_drop, k_weight)
    if recurrent_dropout > 0:
        ones = jnp.ones_like(cell.output(cell.init_state()))
        cell = RecurrentDropout(cell, dropout(ones, recurrent_dropout, k_recurrent))
    if rates:
        keep = zoneout_masks(k_zoneout, rates, cell.init_state(), len(xs), xs.dtype)
        cell = Zoneout(cell, rates, sampled=True)
        xs = jnp.concatenate([xs, keep], axis=-1)
    return cell, xs
