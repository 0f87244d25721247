"""A stack's configuration: which cells form each layer, and the checks
`StackedRNN.__init__` runs on its arguments.

Each check names the argument, what was expected and what arrived; options that would
have no effect (dropout, variational dropout or residual connections on a single layer)
only warn.
"""

import warnings
from collections.abc import Sequence
from typing import Any

from ._cells import AbstractCell
from ._checks import check_probability, check_size
from ._chunked import check_checkpoint
from ._regularise import check_affine, check_zoneout


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


def check_config(
    cells,
    backward_cells,
    *,
    dropout,
    variational,
    recurrent_dropout,
    zoneout,
    weight_drop,
    residual,
    unroll,
    reverse,
    fast,
    checkpoint,
) -> dict[str, Any]:
    """Checks the arguments of `StackedRNN.__init__` but `inference`, and returns
    them by name as the stack's fields: the cells as tuples, the rates as floats.
    Its warnings point at `StackedRNN.__init__`'s caller."""
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
        if reverse:
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
    rate = check_probability("dropout", dropout)
    # `stacklevel=3`: past this function and `StackedRNN.__init__`.
    if rate > 0 and len(cells) == 1:
        warnings.warn(
            f"`dropout` (={dropout}) has no effect with one layer: dropout acts "
            "between layers, never on the top layer's output",
            stacklevel=3,
        )
    for name, flag in (("variational", variational), ("residual", residual)):
        if not isinstance(flag, bool):
            raise TypeError(f"`{name}` must be a bool, got {flag!r}")
    if variational and rate == 0:
        warnings.warn(
            "`variational=True` has no effect with `dropout=0`: it makes the "
            "dropout between layers draw one mask per sequence",
            stacklevel=3,
        )
    named = [(f"cells[{i}]", c) for i, c in enumerate(cells)]
    backward = backward_cells or ()
    named += [(f"backward_cells[{i}]", c) for i, c in enumerate(backward)]
    recurrent_dropout = check_probability("recurrent_dropout", recurrent_dropout)
    check_affine("recurrent_dropout", recurrent_dropout, named)
    weight_drop = check_probability("weight_drop", weight_drop)
    check_affine("weight_drop", weight_drop, named)
    zoneout = check_zoneout(zoneout, named)
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
                stacklevel=3,
            )
    unroll = check_size("unroll", unroll)
    if not isinstance(reverse, bool):
        raise TypeError(f"`reverse` must be a bool, got {reverse!r}")
    if fast is not None and not isinstance(fast, bool):
        raise TypeError(f"`fast` must be True, False or None, got {fast!r}")
    return dict(
        cells=cells,
        backward_cells=backward_cells,
        dropout=rate,
        variational=variational,
        recurrent_dropout=recurrent_dropout,
        zoneout=zoneout,
        weight_drop=weight_drop,
        residual=residual,
        unroll=unroll,
        reverse=reverse,
        fast=fast,
        checkpoint=check_checkpoint(checkpoint),
    )
