import functools
import json
import math
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax
import pytest

import stackrnn
import stackrnn.lm
from stackrnn.lm._cli import _new_state, _parser, DEFAULTS, main

from .data.save_models import HERE as DATA


# A small run: tiny model, few windows, two epochs.
SMALL = [
    "--hidden", "8", "--num-steps", "8", "--num-train", "200", "--num-val", "50",
    "--batch-size", "64", "--epochs", "2", "--quiet",
]  # fmt: skip
# A run `stackrnn train` wrote (one epoch of a small Elman network), stored so that
# the tests that only read a run need no training.
STORED = DATA / "rnn-run"
STATE = "state-000001.eqx"


@pytest.fixture(scope="module", autouse=True)
def _one_optimizer_per_setting():
    """The command builds a new optimiser for every run, and the compiled epoch
    depends on the optimiser object: runs here with the same settings share one,
    so that they share the compiled epoch of a model."""
    with pytest.MonkeyPatch.context() as patch:
        cached = functools.cache(stackrnn.lm.default_optimizer)
        patch.setattr("stackrnn.lm._cli.default_optimizer", cached)
        yield


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


@pytest.mark.slow
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

    assert run("generate", "--run", out, "--num-chars", "20") == 0
    text = capsys.readouterr().out
    assert text.startswith("time traveller") and len(text) >= len("time traveller")
    # The flag's first spelling still works.
    assert run("generate", "--checkpoint", out, "--num-chars", "20") == 0
    assert capsys.readouterr().out == text

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
    other = tmp_path / "other.txt"
    other.write_text(stackrnn.lm.load_text())
    assert run("train", "--out", out, "--resume", "--data", other) == 2
    assert "is not the text the checkpoint was trained on" in capsys.readouterr().err


@pytest.mark.slow
def test_divergence_keeps_the_last_finite_epoch(
    text_file, tmp_path, capsys, monkeypatch
):
    # Updates turn NaN from the 9th step on: 4 steps an epoch (200 windows in
    # batches of 64), so epoch 3 diverges. The resumed run has the same optimiser
    # state, without the poison.
    poison = [True]

    def poisoned(*args, **kwargs):
        scale = jnp.nan if poison[0] else 1.0
        schedule = optax.scale_by_schedule(lambda n: jnp.where(n >= 8, scale, 1.0))
        return optax.chain(stackrnn.lm.default_optimizer(*args, **kwargs), schedule)

    monkeypatch.setattr("stackrnn.lm._cli.default_optimizer", poisoned)
    out = tmp_path / "run"
    argv = ["train", "--data", text_file, "--out", out, *SMALL, "--epochs", "4"]
    assert run(*argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "diverged in epoch 3" in err
    assert f"{str(out)!r} keeps epoch 2, the last finite one" in err
    assert {p.name for p in out.iterdir()} == {"checkpoint.json", "state-000002.eqx"}
    before = json.loads((out / "checkpoint.json").read_text())["history"]
    assert len(before["train_ppl"]) == 2
    # Resumed without the poison, the run continues from epoch 2.
    poison[0] = False
    assert run("train", "--out", out, "--resume", "--epochs", "3", "--quiet") == 0
    after = json.loads((out / "checkpoint.json").read_text())["history"]
    assert after["train_ppl"][:2] == before["train_ppl"]
    assert all(math.isfinite(p) for p in after["train_ppl"] + after["val_ppl"])
    assert len(after["train_ppl"]) == 3


@pytest.fixture(scope="module")
def trained(text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    assert run("train", "--data", text_file, "--out", out, *SMALL) == 0
    return out


def edit_record(edit):
    def damage(run):
        path = run / "checkpoint.json"
        meta = json.loads(path.read_text())
        edit(meta)
        path.write_text(json.dumps(meta))

    return damage


def edit_state(edit):
    def damage(run):
        path = run / STATE
        path.write_bytes(edit(path.read_bytes()))

    return damage


def drop_letter(meta):
    meta["vocab"].remove("t")


@pytest.mark.parametrize(
    ("damage", "file", "message"),
    [
        # Cut in the first array's header, then in an array's data.
        (edit_state(lambda b: b[:60]), STATE, "EOF: reading array header"),
        (edit_state(lambda b: b[: len(b) // 2]), STATE, "could only read"),
        (edit_state(lambda b: b[:0]), STATE, "No data left in file"),
        (edit_state(lambda b: b + b), STATE, "holds more arrays"),
        (
            lambda run: (run / STATE).unlink(),
            STATE,
            "is missing, although",
        ),
        (
            edit_record(lambda m: m.pop("vocab")),
            "checkpoint.json",
            "`vocab` must be a JSON list, found missing",
        ),
        (
            edit_record(lambda m: m.pop("history")),
            "checkpoint.json",
            "`history` must be a JSON object, found missing",
        ),
        (
            edit_record(lambda m: m["history"]["val_ppl"].pop()),
            "checkpoint.json",
            "`history` must hold lists of numbers",
        ),
        (
            edit_record(lambda m: m.update(state_file="../elsewhere.eqx")),
            "checkpoint.json",
            "`state_file` must be named as state-NNNNNN.eqx",
        ),
        (
            edit_record(lambda m: m["vocab"].remove("<unk>")),
            "checkpoint.json",
            "`vocab`: `tokens` must contain '<unk>'",
        ),
        (
            edit_record(lambda m: m["vocab"].append(7)),
            "checkpoint.json",
            "`vocab` must be a list of strings",
        ),
        (
            edit_record(lambda m: m["hyperparameters"].pop("sha1")),
            "checkpoint.json",
            "lacks the hyper-parameters ['sha1']",
        ),
        (
            edit_record(lambda m: m["hyperparameters"].update(hidden=-8)),
            "checkpoint.json",
            "`hidden` (=-8): expected an integer >= 1, got -8",
        ),
        (
            edit_record(lambda m: m["hyperparameters"].update(hidden="8")),
            "checkpoint.json",
            "`hidden` (='8'): expected a number",
        ),
        (
            edit_record(lambda m: m["hyperparameters"].update(init="xavier")),
            "checkpoint.json",
            "`init` (='xavier'): expected ('pytorch', 'normal', 'orthogonal')",
        ),
        (
            edit_record(lambda m: m["hyperparameters"].update(cell="tcn")),
            "checkpoint.json",
            "`cell` (='tcn'): expected ('rnn_tanh', 'rnn_relu', 'gru', 'lstm')",
        ),
        (
            edit_record(lambda m: m["hyperparameters"].update(residual="yes")),
            "checkpoint.json",
            "`residual` (='yes'): expected true or false",
        ),
        # A vocabulary that no longer matches the saved shapes.
        (edit_record(drop_letter), STATE, "has changed shape"),
        (
            lambda run: (run / "checkpoint.json").write_text('{"format": 1, "st'),
            "checkpoint.json",
            "not JSON (Unterminated string",
        ),
        (
            lambda run: (run / "checkpoint.json").write_text("[1, 2]"),
            "checkpoint.json",
            "a JSON list, not an object",
        ),
    ],
)
def test_damaged_run_directory(tmp_path, capsys, damage, file, message):
    out = tmp_path / "run"
    shutil.copytree(STORED, out)
    damage(out)
    for argv in (
        ["train", "--out", out, "--resume", "--epochs", "3", "--quiet"],
        ["generate", "--run", out, "--num-chars", "3"],
    ):
        assert run(*argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert f"{str(out / file)!r}" in err and message in err, err


@pytest.mark.parametrize("case", ["file", "under a file", "read-only"])
def test_out_is_checked_before_training(text_file, tmp_path, capsys, monkeypatch, case):
    def fail(*args, **kwargs):
        raise AssertionError("trained before checking --out")

    monkeypatch.setattr("stackrnn.lm._cli.fit", fail)
    file = tmp_path / "file"
    file.write_text("not a directory")
    out, message = {
        "file": (file, "is a file; give a directory"),
        "under a file": (file / "run", f"cannot be created: {str(file)!r} is a file"),
        "read-only": (tmp_path / "ro" / "run", "is not writable: cannot write in"),
    }[case]
    if case == "read-only":
        (tmp_path / "ro").mkdir(0o555)
        if os.access(tmp_path / "ro", os.W_OK):
            pytest.skip("this user can write in read-only directories")
    assert run("train", "--data", text_file, "--out", out, *SMALL) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"`--out` {str(out)!r}" in err and message in err


def test_stale_temporary_files_are_removed(tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(STORED, out)
    # What saves killed midway leave, then files of other names that stay.
    stale = [".checkpoint.json.k3_x9a0q", ".state-000003.eqx.abcdefgh"]
    kept = [".checkpoint.json.bak", ".state-3.eqx.abcdefgh", "notes.txt"]
    for name in stale + kept:
        (out / name).write_text("")
    assert run("train", "--out", out, "--resume", "--quiet") == 0
    assert "already has 1 epochs" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(
        kept + ["checkpoint.json", STATE]
    )


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing", "empty", "a first save stopped"])
def test_resume_without_a_run_starts_one(text_file, tmp_path, capsys, case):
    out = tmp_path / "run"
    if case != "missing":
        out.mkdir()
    if case == "a first save stopped":
        (out / "state-000001.eqx").write_bytes(b"half a state")
        (out / ".checkpoint.json.0a1b2c3d").write_text("{")
    args = ["train", "--data", text_file, "--out", out, "--resume", *SMALL]
    assert run(*args) == 0
    out_text, err = capsys.readouterr()
    message = f"no run in {str(out)!r} to resume yet; starting a new one"
    assert err == f"stackrnn train: {message}\n"
    assert "epoch 2: train ppl" in out_text
    assert {p.name for p in out.iterdir()} == {
        "checkpoint.json",
        "state-000002.eqx",
        "curves.png",
    }


def test_resume_in_a_directory_of_other_files(text_file, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("")
    args = ["train", "--data", text_file, "--out", tmp_path, "--resume", *SMALL]
    assert run(*args) == 2
    assert (
        "holds no run to resume (no checkpoint.json) but other files (notes.txt)"
        in (capsys.readouterr().err)
    )


def test_version(capsys):
    assert run("--version") == 0
    assert capsys.readouterr().out == f"stackrnn {stackrnn.__version__}\n"


@pytest.mark.parametrize("command", ["train", "generate"])
def test_help_shows_the_defaults(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    blocks, flag = {}, None
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  --"):
            flag = line.split()[0]
            blocks[flag] = line
        elif flag is not None and line.startswith("    "):
            blocks[flag] += " " + line.strip()
    if command == "train":
        defaults = DEFAULTS
    else:
        defaults = vars(_parser().parse_args(["generate", "--run", "x"]))
    shown = 0
    for name, value in defaults.items():
        if value is None or isinstance(value, bool) or name in ("command", "run"):
            continue  # None: depends on another flag; a switch: off
        text = f"{value:g}" if isinstance(value, float) else str(value)
        assert f"({text})" in blocks["--" + name.replace("_", "-")], name
        shown += 1
    assert shown >= 4


@pytest.mark.parametrize(
    ("cell", "kind"),
    [
        ("rnn_tanh", "rnn_tanh"),
        ("rnn_relu", "rnn_relu"),
        ("gru", "gru"),
        ("lstm", "lstm"),
        ("rnn", "rnn_tanh"),  # the first spelling, kept so that old scripts run
    ],
)
def test_cell_kinds(cell, kind):
    assert _parser().parse_args(["train", "--cell", cell]).cell == kind


def test_bad_cell_lists_the_kinds(capsys):
    assert run("train", "--cell", "tcn") == 2
    accepted = capsys.readouterr().err.split("invalid choice: 'tcn' (choose from")[1]
    for kind in ("rnn_tanh", "rnn_relu", "gru", "lstm"):
        assert kind in accepted


@pytest.fixture
def untrained(monkeypatch):
    """`stackrnn train` with `fit` replaced by one epoch that trains nothing: the
    run's files as the command writes them, holding the model it starts from,
    without compiling an epoch."""

    def one_epoch(model, data, *, opt_state, on_epoch, **kwargs):
        history = stackrnn.lm.History([1.0], [1.0], [0.0])
        on_epoch(model, opt_state, history)
        return model, opt_state, history

    monkeypatch.setattr("stackrnn.lm._cli.fit", one_epoch)


@pytest.mark.parametrize("cell", ["rnn", "rnn_relu"])
def test_elman_cells_use_d2ls_init(cell, text_file, tmp_path, untrained):
    out = tmp_path / "rnn"
    assert run("train", "--data", text_file, "--out", out, "--cell", cell, *SMALL) == 0
    saved = stackrnn.lm.SavedRun.read(out)
    hp = saved.hyperparameters
    assert hp["init"] == "normal"
    like, _, opt_state = _new_state(hp, len(saved.vocab), jax.random.key(1))
    model, _ = saved.load((like, opt_state))
    for c in model.rnn.cells:
        assert isinstance(c, stackrnn.ElmanCell)
        assert c.nonlinearity == {"rnn": "tanh", "rnn_relu": "relu"}[cell]
        # d2l's normal(0.01), not PyTorch's uniform(+-1/sqrt(8)) (std 0.2).
        assert 0.005 < float(jnp.std(c.weight_hh)) < 0.015


def test_run_saved_as_rnn_generates_and_keeps_its_cell(tmp_path, capsys):
    """`tests/data/rnn-run` was saved when its checkpoint could only say `rnn`."""
    saved = DATA / "rnn-run"
    assert run("generate", "--run", saved, "--num-chars", "5") == 0
    assert capsys.readouterr().out.startswith("time traveller")
    out = tmp_path / "run"
    shutil.copytree(saved, out)
    assert run("train", "--out", out, "--resume", "--cell", "rnn_relu") == 2
    assert "`--cell` (=rnn_relu) differs from the checkpoint's (=rnn_tanh)" in (
        capsys.readouterr().err
    )


@pytest.mark.slow
def test_run_saved_as_rnn_resumes(tmp_path):
    """The old command line resumes `tests/data/rnn-run`."""
    out = tmp_path / "run"
    shutil.copytree(DATA / "rnn-run", out)
    argv = ["--resume", "--cell", "rnn", "--epochs", "2", "--quiet"]
    assert run("train", "--out", out, *argv) == 0
    resumed = stackrnn.lm.SavedRun.read(out)
    assert resumed.hyperparameters["cell"] == "rnn_tanh"
    assert len(resumed.history) == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--lr", "-1"], "--lr: expected a number > 0, got -1"),
        (["train", "--layers", "0"], "--layers: expected an integer >= 1, got 0"),
        (["train", "--hidden", "3.5"], "--hidden: expected an integer, got '3.5'"),
        (["train", "--dropout", "1"], "--dropout: expected a number >= 0 and < 1"),
        (["train", "--lr", "inf"], "--lr: expected a finite number, got inf"),
        (["train", "--lr", "nan"], "--lr: expected a finite number, got nan"),
        (["train", "--clip", "inf"], "--clip: expected a finite number, got inf"),
        (
            ["train", "--forget-bias=-inf"],
            "--forget-bias: expected a finite number, got -inf",
        ),
        (
            ["generate", "--run", "x", "--temperature", "inf"],
            "--temperature: expected a finite number, got inf",
        ),
        (["train", "--cell", "tcn"], "--cell: invalid choice: 'tcn'"),
        (["train", "--nope"], "unrecognized arguments: --nope"),
        (["generate"], "the following arguments are required: --run"),
        (
            ["generate", "--run", "x", "--temperature", "-0.5"],
            "--temperature: expected a number >= 0, got -0.5",
        ),
        (["generate", "--run", "nowhere"], "no checkpoint in 'nowhere'"),
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


def test_data_directory(tmp_path, capsys):
    assert run("train", "--data", tmp_path, "--out", tmp_path / "run") == 2
    assert f"{str(tmp_path)!r} is a directory" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_with_unknown_prefix_characters(trained, capsys):
    # The training text has no q, u or z.
    assert run("generate", "--run", trained, "--prefix", "The quiz") == 0
    out, err = capsys.readouterr()
    assert out.startswith("the ??i?") and "<unk>" not in out
    assert err.count("\n") == 1
    assert "warning: `prefix` has characters outside the vocabulary" in err
    assert "'q', 'u', 'z' (printed as '?')" in err


@pytest.mark.slow
def test_time_machine_from_the_command_line(tmp_path):
    # The README's command, as a user runs it (one epoch of a narrow model here), on
    # the packaged text.
    out = tmp_path / "tm"
    command = [sys.executable, "-m", "stackrnn", "train"]
    command += ["--out", out, "--epochs", "1", "--hidden", "8", "--quiet"]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    assert "epoch 1: train ppl" in result.stdout
    meta = json.loads((out / "checkpoint.json").read_text())
    assert len(meta["vocab"]) == 28


def test_generate_needs_a_train_checkpoint(tmp_path, capsys):
    vocab = stackrnn.lm.Vocab.from_tokens("ab")
    history = stackrnn.lm.History()
    stackrnn.lm.SavedRun.save(
        tmp_path, {}, hyperparameters={"note": 1}, vocab=vocab, history=history
    )
    assert run("generate", "--run", tmp_path) == 2
    assert "it was not written by `stackrnn train`" in capsys.readouterr().err


@pytest.mark.slow
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


@pytest.mark.slow
def test_optimizer_flag(trained, text_file, tmp_path, capsys):
    sgd, adam = trained, tmp_path / "adam"
    # optax.adam's bias correction raises a float to an int32 power, which the
    # strict promotion these tests run under forbids; users run JAX's standard mode.
    with jax.numpy_dtype_promotion("standard"):
        argv = ["--out", adam, *SMALL, "--optimizer", "adam"]
        assert run("train", "--data", text_file, *argv) == 0
    hp = {
        name: json.loads((path / "checkpoint.json").read_text())
        for name, path in (("sgd", sgd), ("adam", adam))
    }
    assert hp["sgd"]["hyperparameters"]["optimizer"] == "sgd"
    assert hp["sgd"]["hyperparameters"]["lr"] == 2.0
    assert hp["adam"]["hyperparameters"]["optimizer"] == "adam"
    assert hp["adam"]["hyperparameters"]["lr"] == 0.001
    assert hp["sgd"]["history"]["train_ppl"] != hp["adam"]["history"]["train_ppl"]
    assert run("train", "--optimizer", "rmsprop") == 2
    assert "--optimizer: invalid choice: 'rmsprop'" in capsys.readouterr().err


@pytest.mark.slow
def test_checkpoint_from_before_the_optimizer_flag_resumes(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    path = out / "checkpoint.json"
    meta = json.loads(path.read_text())
    del meta["hyperparameters"]["optimizer"]
    path.write_text(json.dumps(meta))
    assert run("train", "--out", out, "--resume", "--epochs", "3", "--quiet") == 0
    assert len(json.loads(path.read_text())["history"]["train_ppl"]) == 3
    assert run("generate", "--run", out, "--num-chars", "5") == 0


@pytest.mark.slow
def test_regulariser_and_cell_flags(text_file, tmp_path, capsys):
    out = tmp_path / "run"
    flags = [
        "--cell", "lstm", "--layers", "2", "--dropout", "0.2", "--variational",
        "--recurrent-dropout", "0.1", "--zoneout", "0.05", "--weight-drop", "0.2",
        "--residual", "--layer-norm", "--forget-bias", "1", "--init", "orthogonal",
    ]  # fmt: skip
    assert run("train", "--data", text_file, "--out", out, *SMALL, *flags) == 0
    saved = stackrnn.lm.SavedRun.read(out)
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
    assert run("generate", "--run", out, "--num-chars", "5") == 0
    capsys.readouterr()
    for argv, message in [
        (["--cell", "rnn", "--layer-norm"], "`--layer-norm` needs `--cell gru`"),
        (["--forget-bias", "1"], "`--forget-bias` needs `--cell lstm`"),
        (["--zoneout", "1"], "--zoneout: expected a number >= 0 and < 1, got 1"),
    ]:
        assert run("train", "--data", text_file, "--out", tmp_path / "x", *argv) == 2
        assert message in capsys.readouterr().err
