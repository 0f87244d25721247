"""Deep (stacked) recurrent networks for JAX, as Equinox modules."""

import importlib.metadata

from ._cells import (
    AbstractAffineCell as AbstractAffineCell,
    AbstractCell as AbstractCell,
    ElmanCell as ElmanCell,
    GRUCell as GRUCell,
    LSTMCell as LSTMCell,
)
from ._checkpoint import Checkpoint as Checkpoint
from ._constructors import GRU as GRU, LSTM as LSTM, RNN as RNN
from ._data import (
    CharData as CharData,
    load_text as load_text,
    preprocess as preprocess,
    read_text as read_text,
    Vocab as Vocab,
)
from ._generate import generate as generate, predict as predict
from ._init import (
    NormalInit as NormalInit,
    OrthogonalInit as OrthogonalInit,
    PyTorchInit as PyTorchInit,
)
from ._layer import layer_path as layer_path
from ._lm import RNNLM as RNNLM, sequence_loss as sequence_loss
from ._norm_cells import (
    LayerNormGRUCell as LayerNormGRUCell,
    LayerNormLSTMCell as LayerNormLSTMCell,
)
from ._stack import StackedRNN as StackedRNN
from ._train import (
    default_optimizer as default_optimizer,
    fit as fit,
    History as History,
    plot_history as plot_history,
)


__version__ = importlib.metadata.version("stackrnn")
