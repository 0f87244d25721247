"""A stack's layout (which cells form each layer, how the states of all layers join
into one PyTree) and the checks `StackedRNN.__init__` runs on its arguments.

Each check names the argument, what was expected and what arrived; options that would
have no effect (dropout, variational dropout or residual connections on a single layer)
only warn.
"""

import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from ._cells import AbstractCell, State
from ._checks import check_probability, user_stacklevel
from ._time import Scan


def layer_cells(
    cells: Sequence[AbstractCell],
    backward_cells: Sequence[AbstractCell] | None,
    layer: int,
) -> tuple[AbstractCell, ...]:
    """The cells of one layer: forward, then backward if bidirectional."""
    if backward_cells is None:
        return (cells[layer],)
    return cells[layer], backward_cells[layer]


def layer_output_size(
    cells: Sequence[AbstractCell],
    backward_cells: Sequence[AbstractCell] | None,
    layer: int,
) -> int:
    """The width of one layer's output: its directions' outputs side by side."""
    return sum(cell.output_size for cell in layer_cells(cells, backward_cells, layer))


def _stackable(cells: Sequence[AbstractCell]) -> bool:
    # Layers whose states share shapes are stacked on a leading axis (L, H);
    # otherwise the state is a tuple with one entry per layer. One `eval_shape` for
    # all cells: one per cell took seconds for a thousand layers.
    states = jax.eval_shape(lambda: [c.init_state() for c in cells])
    shapes = [jax.tree.map(jnp.shape, s) for s in states]
    return all(s == shapes[0] for s in shapes)


def join_states(cells: Sequence[AbstractCell], states: Sequence[State]):
    """The states of `cells` (one each, in order) as one PyTree."""
    if _stackable(cells):
        return jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    return tuple(states)


def split_state(cells: Sequence[AbstractCell], state) -> list[State]:
    """The inverse of `join_states`."""
    if _stackable(cells):
        return [jax.tree.map(lambda s: s[i], state) for i in range(len(cells))]
    return list(state)


def check_cells(name: str, cells) -> tuple[AbstractCell, ...]:
    """`cells` must be a non-empty sequence of cells; returns it as a tuple."""
    cells = tuple(cells)
    if not cells:
        raise ValueError(f"`{name}` must hold at least one cell, got none")
    for i, cell in enumerate(cells):
        if not isinstance(cell, AbstractCell):
            raise TypeError(
                f"`{name}[{i}]` must be a stackrnn cell (an AbstractCell), "
                f"got {type(cell).__name__}"
            )
    return cells


def check_layers(cells, backward_cells, scan):
    """The cells and backward cells as tuples, each layer reading the one below;
    `scan` must be a `Scan`, not reversed when bidirectional."""
    if not isinstance(scan, Scan):
        raise TypeError(
            f"`scan` must be a `stackrnn.Scan`, e.g. `Scan(reverse=True)`, got {scan!r}"
        )
    cells = check_cells("cells", cells)
    if backward_cells is not None:
        backward_cells = check_cells("backward_cells", backward_cells)
        if len(backward_cells) != len(cells):
            raise ValueError(
                f"`backward_cells` must hold one cell per layer (={len(cells)}), "
                f"got {len(backward_cells)}"
            )
        for i, (f, b) in enumerate(zip(cells, backward_cells)):
            if b.input_size != f.input_size:
                raise ValueError(
                    f"`backward_cells[{i}].input_size` (={b.input_size}) must "
                    f"equal `cells[{i}].input_size` (={f.input_size}), since "
                    "both directions read the same input"
                )
        if scan.reverse:
            raise ValueError(
                "`reverse=True` applies to unidirectional stacks only; a "
                "bidirectional stack (`backward_cells` given) already reads both "
                "ways"
            )
    for i in range(1, len(cells)):
        below = f"`cells[{i - 1}].output_size`"
        if backward_cells is not None:
            below += f" + `backward_cells[{i - 1}].output_size`"
        size = layer_output_size(cells, backward_cells, i - 1)
        if cells[i].input_size != size:
            raise ValueError(
                f"`cells[{i}].input_size` (={cells[i].input_size}) must equal "
                f"{below} (={size}), since layer l reads the output of layer l-1"
            )
    return cells, backward_cells


def check_between(cells, backward_cells, dropout, variational, residual) -> float:
    """What lies between layers: `dropout` a probability (returned as a float),
    `variational` and `residual` bools, residual layers as wide as their input.
    Its warnings point at `StackedRNN.__init__`'s caller."""
    rate = check_probability("dropout", dropout)
    if rate > 0 and len(cells) == 1:
        warnings.warn(
            f"`dropout` (={dropout}) has no effect with one layer: dropout acts "
            "between layers, never on the top layer's output",
            stacklevel=user_stacklevel(),
        )
    for name, flag in (("variational", variational), ("residual", residual)):
        if not isinstance(flag, bool):
            raise TypeError(f"`{name}` must be a bool, got {flag!r}")
    if variational and rate == 0:
        warnings.warn(
            "`variational=True` has no effect with `dropout=0`: it makes the "
            "dropout between layers draw one mask per sequence",
            stacklevel=user_stacklevel(),
        )
    if residual:
        for i in range(1, len(cells)):
            size = layer_output_size(cells, backward_cells, i)
            if cells[i].input_size != size:
                raise ValueError(
                    f"`residual=True` adds the input of layers 2..L to their "
                    f"output, so their widths must match, but layer {i} "
                    f"(`cells[{i}]`) reads {cells[i].input_size} features and "
                    f"outputs {size}"
                )
        if len(cells) == 1:
            warnings.warn(
                "`residual=True` has no effect with one layer: residual "
                "connections skip layers 2..L",
                stacklevel=user_stacklevel(),
            )
    return rate
