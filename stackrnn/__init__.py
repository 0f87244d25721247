"""Deep (stacked) recurrent networks for JAX, as Equinox modules.

The layer library; the language-model application is `stackrnn.lm`."""

import importlib.metadata

from ._cells import (
    AbstractAffineCell as AbstractAffineCell,
    AbstractCell as AbstractCell,
    ElmanCell as ElmanCell,
    GRUCell as GRUCell,
    LSTMCell as LSTMCell,
)
from ._constructors import GRU as GRU, LSTM as LSTM, RNN as RNN
from ._init import (
    NormalInit as NormalInit,
    OrthogonalInit as OrthogonalInit,
    PyTorchInit as PyTorchInit,
)
from ._norm_cells import (
    LayerNormGRUCell as LayerNormGRUCell,
    LayerNormLSTMCell as LayerNormLSTMCell,
)
from ._stack import StackedRNN as StackedRNN
from ._time import (
    AbstractPath as AbstractPath,
    ByWidth as ByWidth,
    Chunks as Chunks,
    Fast as Fast,
    Fused as Fused,
    Reference as Reference,
    Scan as Scan,
)
from ._wrapped import (
    AbstractWrappedCell as AbstractWrappedCell,
    drop_weights as drop_weights,
    RecurrentDropout as RecurrentDropout,
    WeightDrop as WeightDrop,
    Zoneout as Zoneout,
)


__version__ = importlib.metadata.version("stackrnn")
