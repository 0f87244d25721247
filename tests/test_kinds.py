import pytest

import stackrnn
from stackrnn._kinds import (
    cell_class,
    CELL_KINDS,
    check_kind,
    kind_of,
    LAYER_NORM_KINDS,
    num_gates,
)


@pytest.mark.parametrize("kind", CELL_KINDS)
def test_a_kinds_cell_has_that_kind(kind, getkey):
    cls, keywords = cell_class(kind)
    cell = cls(3, 5, key=getkey(), **keywords)
    assert check_kind("kind", kind) == kind
    assert kind_of(cell) == kind
    assert kind_of(stackrnn.WeightDrop(cell, 0.5)) is None
    assert cell.weight_ih.shape == (num_gates(kind) * 5, 3)


@pytest.mark.parametrize("kind", LAYER_NORM_KINDS)
def test_layer_norm_modifies_a_kind(kind, getkey):
    cls, keywords = cell_class(kind, layer_norm=True)
    cell = cls(3, 5, key=getkey(), **keywords)
    assert type(cell).__name__.startswith("LayerNorm")
    assert cell.weight_ih.shape == (num_gates(kind) * 5, 3)
    # PyTorch has no layer-normalised cells, so no kind names them alone.
    assert kind_of(cell) is None


def test_the_kinds_are_pytorchs_modes():
    torch = pytest.importorskip("torch")
    modules = [
        torch.nn.RNN(2, 3),
        torch.nn.RNN(2, 3, nonlinearity="relu"),
        torch.nn.GRU(2, 3),
        torch.nn.LSTM(2, 3),
    ]
    assert tuple(m.mode.lower() for m in modules) == CELL_KINDS


@pytest.mark.parametrize("kind", ["rnn", "RNN_TANH", "tcn", None, 3])
def test_bad_kind(kind):
    with pytest.raises(
        ValueError,
        match=r"`cell` must name a cell kind, 'rnn_tanh', 'rnn_relu', 'gru' or "
        rf"'lstm', got {kind!r}",
    ):
        check_kind("cell", kind)


def test_layer_norm_needs_a_kind_with_it():
    with pytest.raises(ValueError, match="needs a cell kind .*'gru' or 'lstm', got"):
        cell_class("rnn_relu", layer_norm=True)
