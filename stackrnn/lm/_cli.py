"""The `stackrnn` command: `stackrnn train` and `stackrnn generate`."""

import argparse
import importlib.metadata
import math
import pathlib
import statistics
import sys
import tempfile
import warnings

import equinox as eqx
import jax

from .._cells import ElmanCell, GRUCell, LSTMCell
from .._constructors import GRU, LSTM, RNN
from .._init import NormalInit, OrthogonalInit, PyTorchInit
from .._kinds import cell_class, CELL_KINDS, LAYER_NORM_KINDS
from ._data import CharData, preprocess, UNK
from ._generate import generate
from ._lm import RNNLM
from ._saved_run import SavedRun
from ._train import default_optimizer, fit, plot_history


# The seed's run (d2l, chapter "Deep Recurrent Neural Networks"). `init` is None:
# d2l's normal(0.01) for Elman cells (`--cell rnn_tanh` is StackedRNNScratch),
# PyTorch's otherwise; `lr` is None: the seed's 2 for SGD, Adam's usual 0.001 for Adam.
# Options added after the first checkpoint format, with the values that reproduce
# what runs saved before them did.
_ADDED = dict(
    optimizer="sgd",
    variational=False,
    recurrent_dropout=0.0,
    zoneout=0.0,
    weight_drop=0.0,
    residual=False,
    layer_norm=False,
    forget_bias=None,
)
DEFAULTS = dict(
    cell="gru",
    layers=2,
    hidden=32,
    init=None,
    embedding=0,
    dropout=0.0,
    lr=None,
    clip=1.0,
    epochs=100,
    batch_size=1024,
    num_steps=32,
    num_train=10000,
    num_val=5000,
    seed=0,
    **_ADDED,
)
# May change when a run is resumed; everything else must match the checkpoint.
_RESUMABLE = {"epochs", "data"}
_LEARNING_RATES = dict(sgd=2.0, adam=0.001)
_INITS = dict(
    pytorch=PyTorchInit(), normal=NormalInit(0.01), orthogonal=OrthogonalInit()
)
# The one-liner that builds a stack of each kind's cell class.
_ONE_LINERS = {ElmanCell: RNN, GRUCell: GRU, LSTMCell: LSTM}
_CURVES = "curves.png"
# How `generate` prints `<unk>`: preprocessed text has no "?" of its own.
_UNKNOWN = "?"


def _count(minimum):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
        if value < minimum:
            raise argparse.ArgumentTypeError(
                f"expected an integer >= {minimum}, got {value}"
            )
        return value

    return parse


def _number(minimum=None, *, inclusive=True, below=None):
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
        low = minimum is None or (value >= minimum if inclusive else value > minimum)
        if not low or (below is not None and value >= below):
            bound = f"{'>=' if inclusive else '>'} {minimum}"
            if below is not None:
                bound += f" and < {below}"
            raise argparse.ArgumentTypeError(f"expected a number {bound}, got {text}")
        return value

    return parse


def _cell(text):
    """`--cell`'s value: `rnn`, the Elman tanh cell's name before the kinds were
    PyTorch's, is `rnn_tanh`, so that old command lines and saved runs still work."""
    return "rnn_tanh" if text == "rnn" else text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stackrnn",
        description="Train deep recurrent character language models and sample them.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {importlib.metadata.version('stackrnn')}",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    # Flags not given stay absent (SUPPRESS), so a resumed run can tell them apart
    # from defaults.
    _add_train_flags(
        commands.add_parser(
            "train",
            help="train a language model (default: d2l's 2-layer GRU on The Time "
            "Machine)",
            argument_default=argparse.SUPPRESS,
        )
    )

    gen = commands.add_parser("generate", help="generate text from a trained model")
    add = gen.add_argument
    # `--checkpoint` is the flag's first spelling, kept so that old scripts run.
    add(
        "--run",
        "--checkpoint",
        dest="run",
        metavar="DIR",
        required=True,
        help="a saved run: a `train --out` directory",
    )
    add("--prefix", default="time traveller", help="text to continue (time traveller)")
    add(
        "--num-chars",
        type=_count(0),
        default=200,
        help="characters to generate (200)",
    )
    add(
        "--temperature",
        type=_number(0),
        default=0.0,
        help="0 for greedy (d2l's predict), else sample from softmax(logits / T) (0)",
    )
    add("--seed", type=_count(0), default=0, help="random seed for sampling (0)")
    return parser


def _add_train_flags(train: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Adds `stackrnn train`'s flags to `train`; returns them by destination, which
    also checks the hyper-parameters a checkpoint records."""
    flags = {}

    def add(*names, **options):
        action = train.add_argument(*names, **options)
        flags[action.dest] = action

    add("--data", metavar="FILE", help="a UTF-8 text file (default: The Time Machine)")
    add("--out", metavar="DIR", default="stackrnn-run", help="output (stackrnn-run)")
    add("--resume", action="store_true", default=False, help="continue --out's run")
    add(
        "--cell",
        type=_cell,
        choices=CELL_KINDS,
        help="recurrent cell; rnn means rnn_tanh (gru)",
    )
    add("--layers", type=_count(1), help="number of stacked layers (2)")
    add("--hidden", type=_count(1), help="hidden units per layer (32)")
    add(
        "--init",
        choices=tuple(_INITS),
        help="parameter init: PyTorch's uniform, d2l's normal(0.01), or PyTorch's "
        "with orthogonal recurrent weights (default: normal for rnn_*, pytorch "
        "otherwise)",
    )
    add("--embedding", type=_count(0), help="embedding size; 0 for one-hot (0)")
    add("--dropout", type=_number(0, below=1), help="dropout between layers (0)")
    add(
        "--variational",
        action="store_true",
        help="--dropout draws one mask per sequence, not per step",
    )
    add(
        "--recurrent-dropout",
        type=_number(0, below=1),
        help="dropout of h where it enters the recurrent product (0)",
    )
    add("--zoneout", type=_number(0, below=1), help="zoneout rate of the states (0)")
    add(
        "--weight-drop",
        type=_number(0, below=1),
        help="DropConnect on the recurrent weights (0)",
    )
    add("--residual", action="store_true", help="residual connections, layers 2..L")
    add("--layer-norm", action="store_true", help="layer-normalised gru/lstm cells")
    add(
        "--forget-bias",
        type=_number(),
        help="lstm: the forget gate's starting bias (the init's draw)",
    )
    add("--optimizer", choices=("sgd", "adam"), help="after gradient clipping (sgd)")
    add(
        "--lr",
        type=_number(0, inclusive=False),
        help="learning rate (2 for sgd, 0.001 for adam)",
    )
    add("--clip", type=_number(0, inclusive=False), help="gradient norm clip (1)")
    add("--epochs", type=_count(1), help="total epochs of the run (100)")
    add("--batch-size", type=_count(1), help="windows per step (1024)")
    add("--num-steps", type=_count(1), help="characters per window (32)")
    add("--num-train", type=_count(1), help="training windows (10000)")
    add("--num-val", type=_count(1), help="validation windows (5000)")
    add("--seed", type=_count(0), help="random seed (0)")
    add(
        "--devices",
        type=_count(1),
        default=None,
        help="train data-parallel on this many devices (default: all)",
    )
    add("--quiet", action="store_true", default=False, help="no progress bar")
    return flags


def _build_model(hp: dict, vocab_size: int, key) -> RNNLM:
    init = _INITS[hp["init"]]
    cell, options = cell_class(hp["cell"])
    if hp["cell"] in LAYER_NORM_KINDS:
        options["layer_norm"] = hp["layer_norm"]
    if hp["cell"] == "lstm":
        options["forget_bias"] = hp["forget_bias"]
    rnn_key, lm_key = jax.random.split(key)
    rnn = _ONE_LINERS[cell](
        hp["embedding"] or vocab_size,
        hp["hidden"],
        hp["layers"],
        dropout=hp["dropout"],
        variational=hp["variational"],
        recurrent_dropout=hp["recurrent_dropout"],
        zoneout=hp["zoneout"],
        weight_drop=hp["weight_drop"],
        residual=hp["residual"],
        init=init,
        key=rnn_key,
        **options,
    )
    return RNNLM(rnn, vocab_size, embedding=hp["embedding"] > 0, init=init, key=lm_key)


def _saved_hyperparameters(saved: SavedRun) -> dict:
    """The hyper-parameters `saved` records (with the values of options added since
    its format), each checked as its flag would be: a damaged or foreign record
    fails here, naming the file, not in the model's constructors."""
    hp = {**_ADDED, **saved.hyperparameters}
    record = str(saved.record)
    missing = sorted((DEFAULTS.keys() | {"data", "sha1"}) - hp.keys())
    if missing:
        raise ValueError(
            f"{record!r} lacks the hyper-parameters {missing}: it was not written by "
            "`stackrnn train`"
        )
    hp["cell"] = _cell(hp["cell"])
    flags = _add_train_flags(argparse.ArgumentParser())
    for name in DEFAULTS:
        value, flag = hp[name], flags[name]
        if flag.nargs == 0:  # a switch
            problem = None if isinstance(value, bool) else "expected true or false"
        elif value is None:
            problem = None if name == "forget_bias" else "expected a value"
        elif flag.choices is not None:
            problem = None if value in flag.choices else f"expected {flag.choices}"
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            problem = "expected a number"
        else:
            try:
                flag.type(str(value))
                problem = None
            except argparse.ArgumentTypeError as e:
                problem = str(e)
        if problem is not None:
            raise ValueError(
                f"{record!r} is damaged or not a checkpoint: hyper-parameter "
                f"`{name}` (={value!r}): {problem}"
            )
    if not isinstance(hp["sha1"], str) or not isinstance(hp["data"], (str, type(None))):
        raise ValueError(
            f"{record!r} is damaged or not a checkpoint: `sha1` must be a string and "
            "`data` a string or null"
        )
    return hp


def _new_state(hp: dict, vocab_size: int, key):
    """A freshly initialised `(model, optimizer, opt_state)` for hyper-parameters
    `hp`; also the skeleton a checkpoint is loaded into."""
    model = _build_model(hp, vocab_size, key)
    optimizer = default_optimizer(hp["lr"], hp["clip"], method=hp["optimizer"])
    return model, optimizer, optimizer.init(eqx.filter(model, eqx.is_inexact_array))


def _check_out(out: str) -> None:
    """`--out` must be a directory this process can write in, or one it can create:
    checked before the data and the compilation, which may take minutes."""
    path = pathlib.Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"`--out` {out!r} is a file; give a directory")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(
            f"`--out` {out!r} cannot be created: {str(existing)!r} is a file"
        )
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        raise ValueError(
            f"`--out` {out!r} is not writable: cannot write in {str(existing)!r} "
            f"({e.strerror})"
        ) from None


def _train(args: dict) -> None:
    out, resume, quiet = args.pop("out"), args.pop("resume"), args.pop("quiet")
    _check_out(out)
    SavedRun.remove_stale(out)
    # Not a hyper-parameter: a run may resume on other devices.
    devices = args.pop("devices")
    if resume and not SavedRun.exists(out):
        # A run stopped before its first save: a restart script may always resume.
        foreign = SavedRun.foreign_files(out)
        if foreign:
            raise ValueError(
                f"`--out` {out!r} holds no run to resume (no checkpoint.json) "
                f"but other files ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}); choose its run's directory "
                "or a new one"
            )
        print(
            f"stackrnn train: no run in {out!r} to resume yet; starting a new one",
            file=sys.stderr,
        )
        resume = False
    if resume:
        saved = SavedRun.read(out)
        saved_hp = _saved_hyperparameters(saved)
        for name, value in args.items():
            before = saved_hp.get(name)
            if name not in _RESUMABLE and before != value:
                raise ValueError(
                    f"`--{name.replace('_', '-')}` (={value}) differs from the "
                    f"checkpoint's (={before}); drop it to resume"
                )
        hp = {**saved_hp, **args}
        vocab, history = saved.vocab, saved.history
    else:
        if SavedRun.exists(out):
            raise ValueError(
                f"`--out` {out!r} already holds a run; pass --resume to continue it "
                "or choose another directory"
            )
        hp = {**DEFAULTS, "data": None, **args}
        if hp["init"] is None:
            elman = cell_class(hp["cell"])[0] is ElmanCell
            hp["init"] = "normal" if elman else "pytorch"
        if hp["lr"] is None:
            hp["lr"] = _LEARNING_RATES[hp["optimizer"]]
        if hp["layer_norm"] and hp["cell"] not in LAYER_NORM_KINDS:
            kinds = " or ".join(f"`--cell {kind}`" for kind in LAYER_NORM_KINDS)
            raise ValueError(f"`--layer-norm` needs {kinds}")
        if hp["forget_bias"] is not None and hp["cell"] != "lstm":
            raise ValueError("`--forget-bias` needs `--cell lstm`")
        vocab, history = None, None
    data = CharData.from_file(
        hp["data"],
        num_steps=hp["num_steps"],
        num_train=hp["num_train"],
        num_val=hp["num_val"],
        vocab=vocab,
    )
    if resume and data.sha1 != hp["sha1"]:
        raise ValueError(
            f"the data (SHA-1 {data.sha1}) is not the text the checkpoint was trained "
            f"on (SHA-1 {hp['sha1']})"
        )
    hp["sha1"] = data.sha1
    model_key, train_key = jax.random.split(jax.random.key(hp["seed"]))
    model, optimizer, opt_state = _new_state(hp, len(data.vocab), model_key)
    if resume:
        model, opt_state = saved.load((model, opt_state))

    start = saved_epochs = 0 if history is None else len(history)

    def save(model, opt_state, history):
        nonlocal saved_epochs
        SavedRun.save(
            out,
            (model, opt_state),
            hyperparameters=hp,
            vocab=data.vocab,
            history=history,
        )
        saved_epochs = len(history)

    try:
        model, opt_state, history = fit(
            model,
            data,
            epochs=hp["epochs"],
            key=train_key,
            optimizer=optimizer,
            batch_size=hp["batch_size"],
            opt_state=opt_state,
            history=history,
            on_epoch=save,
            progress=not quiet,
            devices=devices,
        )
    except FloatingPointError as e:
        if saved_epochs:
            kept = (
                f"{out!r} keeps epoch {saved_epochs}, the last finite one, which "
                "`--resume` continues"
            )
        else:
            kept = f"nothing was saved in {out!r}"
        raise FloatingPointError(f"{e}; {kept}") from None
    if len(history) == start:
        print(f"the run in {out!r} already has {start} epochs; raise --epochs")
        return
    plot_history(history, f"{out}/{_CURVES}")
    # The first epoch of this process includes compilation.
    timed = history.seconds[start + 1 :] or history.seconds[start:]
    print(
        f"epoch {len(history)}: train ppl {history.train_ppl[-1]:.2f}, "
        f"val ppl {history.val_ppl[-1]:.2f}; "
        f"{statistics.median(timed):.3f} s/epoch (median of epochs "
        f"{len(history) - len(timed) + 1}-{len(history)}); saved in {out}"
    )


def _generate(args: argparse.Namespace) -> None:
    saved = SavedRun.read(args.run)
    model, _, opt_state = _new_state(
        _saved_hyperparameters(saved), len(saved.vocab), jax.random.key(0)
    )
    model, _ = saved.load((model, opt_state))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chars = generate(
            model,
            saved.vocab,
            args.prefix,
            temperature=args.temperature,
            key=jax.random.key(args.seed),
        )
    for warning in caught:
        print(
            f"stackrnn generate: warning: {warning.message} (printed as {_UNKNOWN!r})",
            file=sys.stderr,
        )

    def show(token):
        return _UNKNOWN if token == UNK else token

    # The prefix as the model reads it: preprocessed, unknown characters as such.
    read = [saved.vocab.tokens[i] for i in saved.vocab.encode(preprocess(args.prefix))]
    print("".join(map(show, read)), end="", flush=True)
    for _, char in zip(range(args.num_chars), chars):
        print(show(char), end="", flush=True)
    print()


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `stackrnn` console script and of `python -m stackrnn`."""
    parser = _parser()
    args = parser.parse_args(argv)
    options = vars(args)
    command = options.pop("command")
    try:
        if command == "train":
            _train(options)
        else:
            _generate(args)
    except (ValueError, OSError) as e:
        parser.exit(2, f"stackrnn {command}: error: {e}\n")
    except FloatingPointError as e:  # the run diverged: not the user's input
        parser.exit(1, f"stackrnn {command}: error: {e}\n")
