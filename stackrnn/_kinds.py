"""Cell kinds: the one vocabulary for naming a kind of cell by a string, as PyTorch
interop, the `stackrnn` command and `stackrnn.testing` do.

The names are PyTorch's RNN modes in lower case (`torch.nn.RNNBase.mode`). Layer
normalisation is a modifier of a kind, as the one-liners' `layer_norm=` is, not a kind
of its own.
"""

from typing import get_args, Literal, NamedTuple

from ._cells import AbstractCell, ElmanCell, GRUCell, LSTMCell
from ._norm_cells import LayerNormGRUCell, LayerNormLSTMCell


CellKind = Literal["rnn_tanh", "rnn_relu", "gru", "lstm"]
CELL_KINDS: tuple[CellKind, ...] = get_args(CellKind)


class _Kind(NamedTuple):
    cell: type[AbstractCell]
    layer_norm_cell: type[AbstractCell] | None
    # What gives `cell` this kind.
    keywords: dict[str, str]
    # Blocks of `hidden_size` rows in `weight_ih`.
    gates: int


_KINDS: dict[CellKind, _Kind] = {
    "rnn_tanh": _Kind(ElmanCell, None, {"nonlinearity": "tanh"}, 1),
    "rnn_relu": _Kind(ElmanCell, None, {"nonlinearity": "relu"}, 1),
    "gru": _Kind(GRUCell, LayerNormGRUCell, {}, 3),
    "lstm": _Kind(LSTMCell, LayerNormLSTMCell, {}, 4),
}
LAYER_NORM_KINDS = tuple(k for k, entry in _KINDS.items() if entry.layer_norm_cell)


def _names(kinds) -> str:
    return ", ".join(map(repr, kinds[:-1])) + f" or {kinds[-1]!r}"


def check_kind(name: str, kind) -> CellKind:
    """`kind` must be one of `CELL_KINDS`; returned as given."""
    if not isinstance(kind, str) or kind not in CELL_KINDS:
        raise ValueError(
            f"`{name}` must name a cell kind, {_names(CELL_KINDS)}, got {kind!r}"
        )
    return kind


def cell_class(
    kind: CellKind, *, layer_norm: bool = False
) -> tuple[type[AbstractCell], dict[str, str]]:
    """The cell class of `kind` (its layer-normalised variant if `layer_norm`), and
    the keywords that give the class this kind: an Elman cell's `nonlinearity`."""
    entry = _KINDS[check_kind("kind", kind)]
    if layer_norm and entry.layer_norm_cell is None:
        raise ValueError(
            f"`layer_norm=True` needs a cell kind with a layer-normalised variant, "
            f"{_names(LAYER_NORM_KINDS)}, got {kind!r}"
        )
    cell = entry.layer_norm_cell if layer_norm else entry.cell
    return cell, dict(entry.keywords)


def kind_of(cell: AbstractCell) -> CellKind | None:
    """The kind of `cell`, or `None` for any other cell: a wrapper cell, a
    layer-normalised one (which PyTorch lacks), a user's own."""
    for kind, entry in _KINDS.items():
        if isinstance(cell, entry.cell) and all(
            getattr(cell, k) == v for k, v in entry.keywords.items()
        ):
            return kind
    return None


def num_gates(kind: CellKind) -> int:
    """How many blocks of `hidden_size` rows a cell of `kind` has in `weight_ih`."""
    return _KINDS[check_kind("kind", kind)].gates
