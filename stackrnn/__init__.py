"""Deep (stacked) recurrent networks for JAX, as Equinox modules."""

import importlib.metadata

from ._cells import (
    AbstractCell as AbstractCell,
    ElmanCell as ElmanCell,
    GRUCell as GRUCell,
    LSTMCell as LSTMCell,
)
from ._constructors import GRU as GRU, LSTM as LSTM, RNN as RNN
from ._init import NormalInit as NormalInit, PyTorchInit as PyTorchInit
from ._stack import StackedRNN as StackedRNN


__version__ = importlib.metadata.version("stackrnn")
