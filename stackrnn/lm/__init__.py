"""The d2l application: character language models on stacked RNNs.

Data (The Time Machine ships with the package), `RNNLM`, the sequence loss, `fit` on
optax, generation, saved runs and the `stackrnn` command. Needs the `lm` extra:
`pip install "stackrnn[lm]"` (from a clone: `pip install -e ".[lm]"`).
"""

try:
    import matplotlib  # noqa: F401
    import optax  # noqa: F401
    import tqdm  # noqa: F401
except ModuleNotFoundError as e:
    raise ModuleNotFoundError(
        f"`stackrnn.lm` needs the `lm` extra, and {e.name!r} is missing: "
        'pip install "stackrnn[lm]" (from a clone: pip install -e ".[lm]")',
        name=e.name,
    ) from None

from ._data import (
    CharData as CharData,
    load_text as load_text,
    preprocess as preprocess,
    read_text as read_text,
    Vocab as Vocab,
)
from ._generate import generate as generate, predict as predict
from ._lm import RNNLM as RNNLM, sequence_loss as sequence_loss
from ._saved_run import SavedRun as SavedRun
from ._train import (
    default_optimizer as default_optimizer,
    fit as fit,
    History as History,
    plot_history as plot_history,
)
