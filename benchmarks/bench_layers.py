"""Compile time and run time of deep stacks against their depth: the Python fold
over layers (`Scan(scan_layers=None)`, the reference) against the scan over alike
layers (`Scan(scan_layers=2)`: layers 2..L in one `jax.lax.scan`).

For every depth, builds one stack, then for each fold traces and compiles (timed
together: `jit(...).lower(...).compile()`) the forward pass and the training step
(`jax.value_and_grad` of the mean square of the outputs) over a `jax.vmap`-ed batch,
and times each compiled program (median of `--repeats` runs, the two folds
alternating, one process).

    python benchmarks/bench_layers.py                    # the log's table
    python benchmarks/bench_layers.py --layers 2 16 --cell lstm
"""

import argparse
import os
import platform
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp

import stackrnn


MAKE = {"rnn": stackrnn.RNN, "gru": stackrnn.GRU, "lstm": stackrnn.LSTM}
FOLDS = {"loop": None, "scan": 2}


def programs(args, layers):
    """For each fold, the compile seconds and the compiled programs (forward and
    training step) with their arguments."""
    k1, k2 = jax.random.split(jax.random.key(0))
    plain = MAKE[args.cell](args.input, args.hidden, layers, key=k1)
    xs = jax.random.normal(k2, (args.batch, args.time, args.input))
    out = {}
    for fold, scan_layers in FOLDS.items():
        stack = stackrnn.StackedRNN(
            plain.cells, scan=stackrnn.Scan(scan_layers=scan_layers)
        )
        params, static = eqx.partition(stack, eqx.is_array)

        def forward(params, xs):
            return jax.vmap(eqx.combine(params, static))(xs)[0]

        def loss(params, xs):
            return jnp.mean(forward(params, xs) ** 2)

        for name, f in (("forward", forward), ("gradient", jax.value_and_grad(loss))):
            start = time.perf_counter()
            compiled = jax.jit(f).lower(params, xs).compile()
            seconds = time.perf_counter() - start
            jax.block_until_ready(compiled(params, xs))  # warm-up
            out[fold, name] = (seconds, compiled, (params, xs))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--layers", nargs="+", type=int, default=[2, 4, 8, 16, 64, 256, 1000]
    )
    parser.add_argument("--cell", default="gru", choices=MAKE)
    parser.add_argument("--input", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--time", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    print(
        f"# jax {jax.__version__}, {platform.machine()}, {os.cpu_count()} CPUs; "
        f"{args.cell} I={args.input} H={args.hidden} T={args.time} "
        f"B={args.batch}, float32"
    )
    print(
        "| L | pass | compile loop (s) | compile scan (s) | scan / loop | "
        "run loop (ms) | run scan (ms) | scan / loop |"
    )
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for layers in args.layers:
        compiled = programs(args, layers)
        for name in ("forward", "gradient"):
            times = {fold: [] for fold in FOLDS}
            for _ in range(args.repeats):
                for fold in FOLDS:
                    _, program, inputs = compiled[fold, name]
                    start = time.perf_counter()
                    jax.block_until_ready(program(*inputs))
                    times[fold].append(time.perf_counter() - start)
            loop, scan = (compiled[fold, name][0] for fold in FOLDS)
            run_loop, run_scan = (1e3 * statistics.median(times[f]) for f in FOLDS)
            print(
                f"| {layers} | {name} | {loop:.2f} | {scan:.2f} | {scan / loop:.2f} "
                f"| {run_loop:.2f} | {run_scan:.2f} | {run_scan / run_loop:.2f} |",
                flush=True,
            )
        jax.clear_caches()


if __name__ == "__main__":
    main()
