import json
import subprocess
import sys

import jax
import pytest

import stackrnn
from stackrnn._cli import _new_state, main

from .test_data import TIME_MACHINE


# A small run: tiny model, few windows, two epochs.
SMALL = [
    "--hidden", "8", "--num-steps", "8", "--num-train", "200", "--num-val", "50",
    "--batch-size", "64", "--epochs", "2", "--quiet",
]  # fmt: skip


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("The Time Traveller (for so it will be convenient...)\n" * 10)
    return path


def run(*argv):
    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        return e.code
    return 0


def test_train_generate_resume(text_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert run("train", "--data", text_file, "--out", out, *SMALL) == 0
    assert "epoch 2: train ppl" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {
        "checkpoint.json",
        "state-000002.eqx",
        "curves.png",
    }
    meta = json.loads((out / "checkpoint.json").read_text())
    assert meta["hyperparameters"]["cell"] == "gru"
    assert meta["hyperparameters"]["init"] == "pytorch"
    assert meta["vocab"][:2] == [" ", "<unk>"]

    assert run("generate", "--checkpoint", out, "--num-chars", "20") == 0
    text = capsys.readouterr().out
    assert text.startswith("time traveller") and len(text) >= len("time traveller")

    # Resuming to 3 epochs gives the history of an uninterrupted 3-epoch run.
    assert run("train", "--out", out, "--resume", "--epochs", "3", "--quiet") == 0
    fresh = tmp_path / "fresh"
    args = [*SMALL[:-3], "--epochs", "3", "--quiet"]
    assert run("train", "--data", text_file, "--out", fresh, *args) == 0
    resumed = json.loads((out / "checkpoint.json").read_text())["history"]
    uninterrupted = json.loads((fresh / "checkpoint.json").read_text())["history"]
    assert resumed["train_ppl"] == uninterrupted["train_ppl"]
    assert resumed["val_ppl"] == uninterrupted["val_ppl"]
    capsys.readouterr()

    # A resumed run keeps its hyper-parameters, and a run is never overwritten.
    assert run("train", "--out", out, "--resume", "--hidden", "9") == 2
    assert (
        "`--hidden` (=9) differs from the checkpoint's (=8)" in capsys.readouterr().err
    )
    assert run("train", "--data", text_file, "--out", out, *SMALL) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    assert run("train", "--out", out, "--resume", "--data", TIME_MACHINE) == 2
    assert "is not the text the checkpoint was trained on" in capsys.readouterr().err


def test_rnn_uses_d2ls_init(text_file, tmp_path):
    out = tmp_path / "rnn"
    assert run("train", "--data", text_file, "--out", out, "--cell", "rnn", *SMALL) == 0
    meta = json.loads((out / "checkpoint.json").read_text())
    assert meta["hyperparameters"]["init"] == "normal"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--lr", "-1"], "--lr: expected a number > 0, got -1"),
        (["train", "--layers", "0"], "--layers: expected an integer >= 1, got 0"),
        (["train", "--hidden", "3.5"], "--hidden: expected an integer, got '3.5'"),
        (["train", "--dropout", "1"], "--dropout: expected a number >= 0 and < 1"),
        (["train", "--cell", "tcn"], "--cell: invalid choice: 'tcn'"),
        (["train", "--nope"], "unrecognized arguments: --nope"),
        (["generate"], "the following arguments are required: --checkpoint"),
        (
            ["generate", "--checkpoint", "x", "--temperature", "-0.5"],
            "--temperature: expected a number >= 0, got -0.5",
        ),
        (["generate", "--checkpoint", "nowhere"], "no checkpoint in 'nowhere'"),
        ([], "the following arguments are required: command"),
    ],
)
def test_bad_flags(argv, message, capsys):
    assert run(*argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "is empty"), (b"\x00\x01\x02 binary", "not UTF-8"), (b"hi", "windows")],
)
def test_bad_data(content, message, tmp_path, capsys):
    path = tmp_path / "data.txt"
    path.write_bytes(content)
    assert run("train", "--data", path, "--out", tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert err.startswith("stackrnn train: error:") and message in err


def test_time_machine_from_the_command_line(tmp_path):
    # The README's command, as a user runs it (one epoch of a narrow model here).
    out = tmp_path / "tm"
    command = [sys.executable, "-m", "stackrnn", "train", "--data", TIME_MACHINE]
    command += ["--out", out, "--epochs", "1", "--hidden", "8", "--quiet"]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    assert "epoch 1: train ppl" in result.stdout
    meta = json.loads((out / "checkpoint.json").read_text())
    assert len(meta["vocab"]) == 28


def test_generate_needs_a_train_checkpoint(tmp_path, capsys):
    vocab = stackrnn.Vocab.from_tokens("ab")
    history = stackrnn.History()
    stackrnn.Checkpoint.save(
        tmp_path, {}, hyperparameters={"note": 1}, vocab=vocab, history=history
    )
    assert run("generate", "--checkpoint", tmp_path) == 2
    assert "it was not written by `stackrnn train`" in capsys.readouterr().err


def test_train_devices(text_file, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--data", text_file, *SMALL]
    assert run(*args, "--out", out, "--devices", "1") == 0
    assert "epoch 2: train ppl" in capsys.readouterr().out
    # Not a hyper-parameter: a run may resume on another number of devices.
    meta = json.loads((out / "checkpoint.json").read_text())
    assert "devices" not in meta["hyperparameters"]
    assert run(*args, "--out", tmp_path / "b", "--devices", "99") == 2
    assert "`devices` (=99) must be at most" in capsys.readouterr().err


def test_optimizer_flag(text_file, tmp_path, capsys):
    sgd, adam = tmp_path / "sgd", tmp_path / "adam"
    assert run("train", "--data", text_file, "--out", sgd, *SMALL) == 0
    # optax.adam's bias correction raises a float to an int32 power, which the
    # strict promotion these tests run under forbids; users run JAX's standard mode.
    with jax.numpy_dtype_promotion("standard"):
        argv = ["--out", adam, *SMALL, "--optimizer", "adam"]
        assert run("train", "--data", text_file, *argv) == 0
    hp = {p.name: json.loads((p / "checkpoint.json").read_text()) for p in (sgd, adam)}
    assert hp["sgd"]["hyperparameters"]["optimizer"] == "sgd"
    assert hp["sgd"]["hyperparameters"]["lr"] == 2.0
    assert hp["adam"]["hyperparameters"]["optimizer"] == "adam"
    assert hp["adam"]["hyperparameters"]["lr"] == 0.001
    assert hp["sgd"]["history"]["train_ppl"] != hp["adam"]["history"]["train_ppl"]
    assert run("train", "--optimizer", "rmsprop") == 2
    assert "--optimizer: invalid choice: 'rmsprop'" in capsys.readouterr().err


def test_checkpoint_from_before_the_optimizer_flag_resumes(text_file, tmp_path):
    out = tmp_path / "run"
    assert run("train", "--data", text_file, "--out", out, *SMALL) == 0
    path = out / "checkpoint.json"
    meta = json.loads(path.read_text())
    del meta["hyperparameters"]["optimizer"]
    path.write_text(json.dumps(meta))
    assert run("train", "--out", out, "--resume", "--epochs", "3", "--quiet") == 0
    assert len(json.loads(path.read_text())["history"]["train_ppl"]) == 3
    assert run("generate", "--checkpoint", out, "--num-chars", "5") == 0


def test_regulariser_and_cell_flags(text_file, tmp_path, capsys):
    out = tmp_path / "run"
    flags = [
        "--cell", "lstm", "--layers", "3", "--dropout", "0.2", "--variational",
        "--recurrent-dropout", "0.1", "--zoneout", "0.05", "--weight-drop", "0.2",
        "--residual", "--layer-norm", "--forget-bias", "1", "--init", "orthogonal",
    ]  # fmt: skip
    assert run("train", "--data", text_file, "--out", out, *SMALL, *flags) == 0
    saved = stackrnn.Checkpoint.read(out)
    hp = saved.hyperparameters
    model, _, _ = _new_state(hp, len(saved.vocab), jax.random.key(0))
    rnn = model.rnn
    assert (rnn.dropout, rnn.variational, rnn.residual) == (0.2, True, True)
    for zoneout in rnn.cells:
        assert isinstance(zoneout, stackrnn.Zoneout) and set(zoneout.rates) == {0.05}
        recurrent, weight = zoneout.cell, zoneout.cell.cell
        assert isinstance(recurrent, stackrnn.RecurrentDropout) and recurrent.p == 0.1
        assert isinstance(weight, stackrnn.WeightDrop) and weight.p == 0.2
        assert isinstance(weight.cell, stackrnn.LayerNormLSTMCell)
    assert hp["init"] == "orthogonal" and hp["forget_bias"] == 1.0
    assert run("generate", "--checkpoint", out, "--num-chars", "5") == 0
    capsys.readouterr()
    for argv, message in [
        (["--cell", "rnn", "--layer-norm"], "`--layer-norm` needs `--cell gru`"),
        (["--forget-bias", "1"], "`--forget-bias` needs `--cell lstm`"),
        (["--zoneout", "1"], "--zoneout: expected a number >= 0 and < 1, got 1"),
    ]:
        assert run("train", "--data", text_file, "--out", tmp_path / "x", *argv) == 2
        assert message in capsys.readouterr().err
