"""Writes the saved models that `tests/test_saved.py` loads: one-liner stacks and a
language model serialised with `eqx.tree_serialise_leaves`, their outputs (at
inference, and in training from a fixed key, so the regularisers' masks are pinned),
and tiny `stackrnn train` runs on The Time Machine with their models' outputs.

Run once, on the code whose files must keep loading, from the repository root:

    python tests/data/save_models.py
"""

import pathlib
import shutil

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import stackrnn
import stackrnn.lm
from stackrnn.lm import SavedRun
from stackrnn.lm._cli import _new_state, _saved_hyperparameters, main


HERE = pathlib.Path(__file__).parent
KEY = jax.random.key(0)
_TINY = ["--hidden", "8", "--num-steps", "8", "--num-train", "64", "--num-val", "32"]
_TINY += ["--batch-size", "32", "--epochs", "1", "--quiet"]
# The `stackrnn train` runs, by directory: their flags.
RUNS = {
    "time-machine-run": ["--cell", "lstm", "--dropout", "0.1", "--zoneout", "0.1"]
    + ["--weight-drop", "0.2", "--recurrent-dropout", "0.1", *_TINY],
    # Saved when `rnn` was the only spelling of the Elman tanh cell: its
    # checkpoint.json says `"cell": "rnn"`, which runs saved then keep.
    "rnn-run": ["--cell", "rnn", *_TINY],
}


def models():
    """The saved models, by name: built here and rebuilt the same way by the test."""
    k = jax.random.split(KEY, 4)
    lstm = stackrnn.LSTM(
        28,
        16,
        num_layers=2,
        dropout=0.2,
        recurrent_dropout=0.1,
        zoneout=(0.1, 0.05),
        weight_drop=0.2,
        residual=True,
        forget_bias=1.0,
        key=k[1],
    )
    return {
        "gru": stackrnn.GRU(28, 32, num_layers=2, key=k[0]),
        "lstm_lm": stackrnn.lm.RNNLM(lstm, 28, embedding=True, key=k[2]),
        "rnn_bidirectional": stackrnn.RNN(
            5,
            [6, 7],
            num_layers=2,
            dropout=0.3,
            variational=True,
            zoneout=0.2,
            bidirectional=True,
            checkpoint=2,
            key=k[3],
        ),
    }


@eqx.filter_jit
def _both_outputs(model, inputs, key):
    """The outputs at inference and in training from `key`, as one compiled program
    per model (eagerly, every operation compiled a program of its own)."""

    def call(**kw):
        out = model(inputs, **kw)
        return out[0] if isinstance(model, stackrnn.lm.RNNLM) else out

    return call(inference=True), call(key=key, inference=False)


def outputs(name, model):
    """The model's outputs at inference and in training from a fixed key."""
    if isinstance(model, stackrnn.lm.RNNLM):
        inputs = jnp.arange(12) % 28
    else:
        inputs = jax.random.normal(jax.random.key(1), (9, model.input_size))
    leaves = jax.tree.leaves(_both_outputs(model, inputs, jax.random.key(2)))
    return {f"out{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)}


def load_run(run):
    """The language model of the `stackrnn train` run saved in `run`."""
    saved = SavedRun.read(run)
    hp = _saved_hyperparameters(saved)
    model, _, opt_state = _new_state(hp, len(saved.vocab), jax.random.key(0))
    return saved.load((model, opt_state))[0]


def save_run(name):
    """Trains run `name` of `RUNS` into its directory, and saves its outputs."""
    run = HERE / name
    shutil.rmtree(run, ignore_errors=True)
    main(["train", "--out", str(run), *RUNS[name]])
    (run / "curves.png").unlink()
    np.savez(HERE / f"{name}.npz", **outputs("lm", load_run(run)))


if __name__ == "__main__":
    for name, model in models().items():
        eqx.tree_serialise_leaves(HERE / f"{name}.eqx", model)
        np.savez(HERE / f"{name}.npz", **outputs(name, model))
    for name in RUNS:
        save_run(name)
