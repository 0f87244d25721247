"""The Time Machine with a wide stack, with and without each regulariser.

Trains a 2 x 256 GRU language model (one-hot inputs, Adam at 0.003 after clipping at
global norm 1, batch 1024, windows of 32, the first 10,000 windows) once per
configuration with `stackrnn train`, then prints a Markdown table of the train and
validation perplexities and draws every run's validation curve. (Epoch times of
runs that share a machine mislead; `--time` measures them side by side.)

    python benchmarks/regularisers.py [--epochs 30] [--out runs/regularisers]
        [--only NAME ...] [--plot docs/experiments/regularisers.png]

Runs already in `--out` are resumed (a finished one is only read), so the script can
be stopped and started again.

    python benchmarks/regularisers.py --time [--repeats 3] [--only NAME ...]

times one training epoch of each configuration instead, in one process, the
configurations alternating, and prints the median of `--repeats` rounds (after one
compiling round); then the gradient of one batch with weight drop 0.5 drawn once per
sequence (the stack under `jax.vmap` with a key per sequence) against once per batch
(`stackrnn.drop_weights`, as `fit` does), timed the same way.
"""

import argparse
import json
import pathlib
import statistics
import time

import matplotlib


matplotlib.use("Agg")
import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

import stackrnn as _stackrnn  # noqa: E402
from stackrnn.lm._cli import (  # noqa: E402
    _new_state,
    _parser,
    DEFAULTS,
    main as stackrnn,  # noqa: E402
)
from stackrnn.lm._train import _epoch  # noqa: E402


TEXT = pathlib.Path(__file__).parents[2] / "shared" / "data" / "timemachine.txt"
BASE = ["--hidden", "256", "--optimizer", "adam", "--lr", "0.003", "--quiet"]
RUNS = {
    "none": [],
    "dropout 0.3": ["--dropout", "0.3"],
    "variational dropout 0.3": ["--dropout", "0.3", "--variational"],
    "recurrent dropout 0.25": ["--recurrent-dropout", "0.25"],
    "zoneout 0.1": ["--zoneout", "0.1"],
    "weight-drop 0.3": ["--weight-drop", "0.3"],
    "residual": ["--residual"],
    "LayerNorm GRU": ["--layer-norm"],
    "orthogonal init": ["--init", "orthogonal"],
    "weight-drop 0.5": ["--weight-drop", "0.5"],
    "variational 0.5 + weight-drop 0.5": [
        "--dropout", "0.5", "--variational", "--weight-drop", "0.5",
    ],
    "LayerNorm + weight-drop 0.5": ["--layer-norm", "--weight-drop", "0.5"],
}  # fmt: skip


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", default="runs/regularisers")
    parser.add_argument("--only", nargs="*", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--plot", default="docs/experiments/regularisers.png")
    parser.add_argument("--time", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.time:
        time_epochs(args.only, args.repeats)
        return time_weight_drop(args.repeats)
    rows, curves = [], {}
    for name in args.only:
        out = pathlib.Path(args.out) / name.replace(" ", "-")
        argv = ["train", "--out", str(out), "--epochs", str(args.epochs)]
        if (out / "checkpoint.json").exists():
            argv += ["--resume", "--quiet"]
        else:
            argv += ["--data", str(TEXT), *BASE, *RUNS[name]]
        stackrnn(argv)
        history = json.loads((out / "checkpoint.json").read_text())["history"]
        val = history["val_ppl"]
        best = min(range(len(val)), key=val.__getitem__)
        rows.append(
            f"| {name} | `{' '.join(RUNS[name])}` | {history['train_ppl'][-1]:.2f} "
            f"| {val[-1]:.2f} | {val[best]:.2f} (epoch {best + 1}) |"
        )
        curves[name] = val
    print(
        "| regulariser | flags | train ppl (last epoch) | val ppl (last epoch) "
        "| best val ppl |\n| --- | --- | --- | --- | --- |"
    )
    print("\n".join(rows))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for i, (name, val) in enumerate(curves.items()):
        # Ten colours in matplotlib's cycle: the next ten runs are dashed.
        style = "-" if i < 10 else "--"
        ax.plot(range(1, len(val) + 1), val, style, label=name)
    ax.set(xlabel="epoch", ylabel="validation perplexity", yscale="log")
    ax.set_title("2 x 256 GRU on The Time Machine, Adam 0.003")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)


def time_epochs(names, repeats):
    data = _stackrnn.CharData.from_text(_stackrnn.load_text(TEXT))
    arrays = tuple(
        jnp.asarray(a) for a in (data.train_x, data.train_y, data.val_x, data.val_y)
    )
    key = jax.random.key(0)
    epochs = {}
    for name in names:
        flags = vars(_parser().parse_args(["train", *BASE, *RUNS[name]]))
        hp = {**DEFAULTS, **{k: v for k, v in flags.items() if k in DEFAULTS}}
        hp["init"] = hp["init"] or "pytorch"
        model, optimizer, opt_state = _new_state(hp, len(data.vocab), key)
        epochs[name] = (model, opt_state, optimizer)
    seconds = {name: [] for name in names}
    for round in range(repeats + 1):
        for name, (model, opt_state, optimizer) in epochs.items():
            start = time.perf_counter()
            jax.block_until_ready(
                _epoch(model, opt_state, arrays, key, optimizer, 1024)
            )
            if round:
                seconds[name].append(time.perf_counter() - start)
    base = statistics.median(seconds[names[0]])
    print(f"| regulariser | s/epoch (median of {repeats}) | / {names[0]} |")
    print("| --- | --- | --- |")
    for name, times in seconds.items():
        median = statistics.median(times)
        print(f"| {name} | {median:.2f} | {median / base:.2f} |")


def time_weight_drop(repeats):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    rnn = _stackrnn.GRU(28, 256, 2, weight_drop=0.5, key=k1)
    model = _stackrnn.RNNLM(rnn, 28, key=k2)
    x = jax.random.randint(k3, (1024, 32), 0, 28)
    y = jnp.roll(x, -1, axis=1)
    keys = jax.random.split(k4, 1024)

    def loss(model, per_batch):
        if per_batch:
            model = _stackrnn.drop_weights(model, k4)
        loss = lambda a, b, k: _stackrnn.sequence_loss(model, a, b, key=k)  # noqa: E731
        return jax.vmap(loss)(x, y, keys).mean()

    grads = {
        label: eqx.filter_jit(eqx.filter_grad(lambda m, p=per_batch: loss(m, p)))
        for label, per_batch in (("per sequence", False), ("per batch", True))
    }
    seconds = {label: [] for label in grads}
    for round in range(repeats + 1):
        for label, grad in grads.items():
            start = time.perf_counter()
            jax.block_until_ready(grad(model))
            if round:
                seconds[label].append(time.perf_counter() - start)
    medians = {label: statistics.median(t) for label, t in seconds.items()}
    print(
        "weight drop 0.5, gradient of one batch: "
        + ", ".join(f"one mask {label} {s:.3f} s" for label, s in medians.items())
        + f"; ratio {medians['per sequence'] / medians['per batch']:.1f}"
    )


if __name__ == "__main__":
    main()
