"""Models saved by an earlier version load into today's: the one-liners build the
same PyTree leaves in the same order, and compute the same numbers, at inference and
in training from the same key (the regularisers' masks included).

The files in tests/data were written by `tests/data/save_models.py`.
"""

import pathlib

import equinox as eqx
import jax
import numpy as np
import pytest

from stackrnn.lm import SavedRun

from .data.save_models import load_run, models, outputs, RUNS
from .helpers import TOL32, tree_equal


DATA = pathlib.Path(__file__).parent / "data"
ONE_LINERS = ["gru", "lstm_lm", "rnn_bidirectional"]


def _assert_outputs(name, got):
    want = np.load(DATA / f"{name}.npz")
    assert sorted(got) == sorted(want.files)
    for out in want.files:
        # To float32 rounding, which changes with XLA's options (the inputs' normal
        # draw among them); the saved bits of the parameters are compared exactly.
        np.testing.assert_allclose(got[out], want[out], **TOL32)


def _load(name):
    built = models()[name]
    # A skeleton with other values: only the file can give it the saved ones.
    skeleton = jax.tree.map(lambda a: a + 1 if eqx.is_inexact_array(a) else a, built)
    return built, eqx.tree_deserialise_leaves(DATA / f"{name}.eqx", skeleton)


@pytest.mark.bit_exact
@pytest.mark.parametrize("name", ONE_LINERS)
def test_saved_one_liner_models_load(name):
    """The one-liners draw, for the key, the bits saved, in the same leaves."""
    built, loaded = _load(name)
    assert tree_equal(loaded, built)


@pytest.mark.parametrize("name", ONE_LINERS)
def test_saved_one_liner_models_compute_the_saved_outputs(name):
    _assert_outputs(name, outputs(name, _load(name)[1]))


@pytest.mark.parametrize("name", RUNS)
def test_saved_runs_load(name):
    _assert_outputs(name, outputs("lm", load_run(DATA / name)))


def test_saved_rnn_run_keeps_the_old_cell_name():
    # What makes `rnn-run` the test of the old spelling.
    assert SavedRun.read(DATA / "rnn-run").hyperparameters["cell"] == "rnn"
