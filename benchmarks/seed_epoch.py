"""The seed's epoch against ours, on this machine.

The seed of the reference workload is d2l's own JAX code for the Time Machine: a
2-layer GRU of width 32, batch 1024, windows of 32, learning rate 2 (d2l 1.0.3,
"Deep Recurrent Neural Networks"). This script times one of its epochs and one of
`stackrnn train` with the same settings, each in its own process, the two
alternating round by round.

d2l 1.0.3's JAX code runs on the JAX and Flax of its time, so the seed needs an
environment of its own:

    python3 -m venv seedenv
    seedenv/bin/pip install numpy==1.23.5 jax==0.4.13 jaxlib==0.4.13 flax==0.6.11 \\
        optax==0.1.5 chex==0.1.7 tensorflow-cpu==2.12.0 tensorflow-datasets==4.9.2 \\
        "tensorflow-metadata<1.15" pandas==2.0.3 matplotlib==3.7.2 \\
        matplotlib-inline==0.1.6 "ipython<8.15" requests "ml_dtypes<0.3" \\
        "orbax-checkpoint<0.3" "scipy<1.12"
    seedenv/bin/pip install --no-deps d2l==1.0.3

    python benchmarks/seed_epoch.py --seed-python seedenv/bin/python \\
        [--data ../shared/data/timemachine.txt] [--rounds 3] [--epochs 6] \\
        [--cpu-devices N [N ...]]

Each process trains for `--epochs` epochs and reports the median of its epochs after
the first (which compiles): for the seed, the wall time of d2l's `Trainer.fit_epoch`
(training, validation and its progress plot); for ours, the `s/epoch` that
`stackrnn train` prints. `--cpu-devices 1 2` runs ours twice a round, with
`JAX_NUM_CPU_DEVICES=1` and `=2`: the CPU as one JAX device, or split into two that
train data-parallel (docs/parallel.md). The script prints every round, then the
medians over rounds and their ratios.
"""

import argparse
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile


SEED = """
import statistics, time
from d2l import jax as d2l

data = d2l.TimeMachine(batch_size=1024, num_steps=32)
gru = d2l.GRU(num_hiddens=32, num_layers=2)
model = d2l.RNNLM(gru, vocab_size=len(data.vocab), lr=2)
trainer = d2l.Trainer(max_epochs={epochs}, gradient_clip_val=1)

seconds = []
fit_epoch = trainer.fit_epoch

def timed_epoch():
    start = time.perf_counter()
    fit_epoch()
    seconds.append(time.perf_counter() - start)

trainer.fit_epoch = timed_epoch
trainer.fit(model, data)
print("seconds per epoch:", statistics.median(seconds[1:]))
"""


def seed_epoch(python, data, epochs, workdir):
    # d2l reads `../data/timemachine.txt` (and checks its SHA-1) before downloading.
    run = workdir / "run"
    run.mkdir(exist_ok=True)
    (workdir / "data").mkdir(exist_ok=True)
    shutil.copy(data, workdir / "data" / "timemachine.txt")
    (run / "seed.py").write_text(SEED.format(epochs=epochs))
    out = subprocess.run(
        [python, "seed.py"], cwd=run, capture_output=True, text=True, check=True
    ).stdout
    return float(re.search(r"seconds per epoch: ([\d.]+)", out).group(1))


def our_epoch(data, epochs, workdir, cpu_devices):
    out = subprocess.run(
        [sys.executable, "-m", "stackrnn", "train", "--data", str(data)]
        + ["--out", str(workdir / "ours"), "--epochs", str(epochs), "--quiet"],
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ, JAX_NUM_CPU_DEVICES=str(cpu_devices)),
    ).stdout
    shutil.rmtree(workdir / "ours")
    return float(re.search(r"([\d.]+) s/epoch", out).group(1))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed-python", required=True)
    default_data = pathlib.Path(__file__).parents[2] / "shared/data/timemachine.txt"
    parser.add_argument("--data", type=pathlib.Path, default=default_data)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument(
        "--cpu-devices",
        type=int,
        nargs="+",
        default=[1],
        help="run ours with the CPU split into this many JAX devices (default 1)",
    )
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be >= 2: the first epoch compiles")
    seed, ours = [], {n: [] for n in args.cpu_devices}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = pathlib.Path(tmp)
        for round_ in range(args.rounds):
            seed.append(seed_epoch(args.seed_python, args.data, args.epochs, workdir))
            line = f"round {round_ + 1}: seed {seed[-1]:.3f} s/epoch"
            for n, times in ours.items():
                times.append(our_epoch(args.data, args.epochs, workdir, n))
                line += f", stackrnn ({n} CPU devices) {times[-1]:.3f} s/epoch"
            print(line, flush=True)
    s = statistics.median(seed)
    print(f"median of {args.rounds} rounds: seed {s:.3f} s/epoch")
    for n, times in ours.items():
        o = statistics.median(times)
        per_round = statistics.median(a / b for a, b in zip(seed, times))
        print(
            f"stackrnn, {n} CPU devices: {o:.3f} s/epoch; seed / stackrnn: "
            f"{s / o:.2f}x (median of the rounds' ratios: {per_round:.2f}x)"
        )


if __name__ == "__main__":
    main()
