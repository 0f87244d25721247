"""Speed of the fused path (the `stackrnn-kernels` accelerator) against PyTorch and
against the path stackrnn takes without it, side by side in one process.

For each config and cell: `torch` (`torch.nn.GRU`/`LSTM`/`RNN`, its default
threads), `without kernels` (the default `ByWidth()`'s choice when the accelerator is
not installed: the fast path from `min_hidden` on, else the reference path) and
`fused` (`stackrnn.Fused()`, at every width: the measurement that sets `ByWidth`'s
`max_fused`), all under `jax.vmap` as in
bench_speed.py, alternating round by round; the forward pass and the forward and
backward pass (gradient of the sum of squared outputs with respect to every
parameter). Reports the medians, the medians over rounds of the time ratios measured
in the same round, and the fused path's share of the float32 GEMM rate measured
before each config and cell.

    pip install ./kernels
    python benchmarks/bench_fused.py [--configs d2l deep] [--cells gru] [--repeats 7]
"""

import argparse
import os
import statistics
import time

import jax
from bench_speed import CONFIGS, flops, GATES, gemm_rate, ours, pytorch

import stackrnn
from stackrnn._fused import available


IMPLEMENTATIONS = ("torch", "without kernels", "fused")


def thunks(cell, config):
    # The default policy's choice without the accelerator: its width rule alone.
    width = stackrnn.ByWidth().min_hidden
    without = stackrnn.Fast() if config[1] >= width else stackrnn.Reference()
    return {
        "torch": pytorch(cell, config),
        "without kernels": ours(cell, config, without),
        "fused": ours(cell, config, stackrnn.Fused()),
    }


def measure(cell, name, repeats):
    rate = gemm_rate(repeats)
    config = CONFIGS[name]
    made = thunks(cell, config)
    times = {(i, m): [] for i in made for m in ("fwd", "fwd+bwd")}
    for fwd, fb in made.values():  # warm up (compiles)
        for fn in (fwd, fb):
            for _ in range(2):
                jax.block_until_ready(fn())
    for _ in range(repeats):
        for impl, (fwd, fb) in made.items():
            for mode, fn in (("fwd", fwd), ("fwd+bwd", fb)):
                start = time.perf_counter()
                jax.block_until_ready(fn())
                times[impl, mode].append(time.perf_counter() - start)
    rows = []
    for mode in ("fwd", "fwd+bwd"):

        def ratio(a, b):
            pairs = zip(times[a, mode], times[b, mode])
            return statistics.median(x / y for x, y in pairs)

        fused = statistics.median(times["fused", mode])
        rows.append(
            dict(
                config=name,
                cell=cell,
                mode=mode,
                ms={i: 1e3 * statistics.median(times[i, mode]) for i in made},
                torch_over_fused=ratio("torch", "fused"),
                without_over_fused=ratio("without kernels", "fused"),
                gemm_share=flops(cell, config, mode == "fwd+bwd") / fused / rate,
            )
        )
    return rows


HEADER = (
    "| config (I, H, L, B, T) | cell | pass | "
    + " | ".join(f"{i} ms" for i in IMPLEMENTATIONS)
    + " | torch / fused | without / fused | fused: % of GEMM rate |\n"
    + "| --- | --- | --- |"
    + " ---: |" * (len(IMPLEMENTATIONS) + 3)
)


def line(r):
    """A row of the Markdown table under `HEADER`."""
    config = ", ".join(map(str, CONFIGS[r["config"]]))
    ms = " | ".join(f"{r['ms'][i]:.1f}" for i in IMPLEMENTATIONS)
    return (
        f"| {r['config']} ({config}) | {r['cell']} | {r['mode']} | {ms} | "
        f"{r['torch_over_fused']:.2f} | {r['without_over_fused']:.2f} | "
        f"{100 * r['gemm_share']:.0f} |"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS)
    )
    parser.add_argument(
        "--cells", nargs="+", default=["gru", "lstm"], choices=list(GATES)
    )
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if not available():
        parser.error("the accelerator is not installed: pip install ./kernels")

    import torch

    print(
        f"# jax {jax.__version__}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {args.repeats} rounds, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(HEADER, flush=True)
    for name in args.configs:
        for cell in args.cells:
            for row in measure(cell, name, args.repeats):
                print(line(row), flush=True)
    print(f"# load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
