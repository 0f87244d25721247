"""One training step's time in a process of its own: the forward and backward pass of
a stack on the fused path (or another), for comparisons that need a fresh process
each, such as the memory allocator or environment variables read at start-up.

    python benchmarks/bench_step.py [--cell lstm] [--config d2l] [--path fused]
        [--calls 40]
    perf stat -e page-faults python benchmarks/bench_step.py
"""

import argparse
import statistics

from bench_speed import CONFIGS, ours, timed

import stackrnn


PATHS = {
    "fused": stackrnn.Fused,
    "fast": stackrnn.Fast,
    "reference": stackrnn.Reference,
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cell", default="lstm", choices=("rnn", "gru", "lstm"))
    parser.add_argument("--config", default="d2l", choices=sorted(CONFIGS))
    parser.add_argument("--path", default="fused", choices=sorted(PATHS))
    parser.add_argument("--calls", type=int, default=40)
    args = parser.parse_args()
    _, step = ours(args.cell, CONFIGS[args.config], PATHS[args.path]())
    times = timed(step, args.calls, warmup=3)  # the first call compiles
    print(
        f"{args.cell} {args.config} {args.path}: fwd+bwd median "
        f"{1000 * statistics.median(times):.1f} ms over {args.calls} calls"
    )


if __name__ == "__main__":
    main()
