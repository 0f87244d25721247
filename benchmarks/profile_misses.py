"""The measurements behind the targets that docs/benchmarks.md and the log report as
missed.

1. PyTorch's operator profile (`torch.profiler`, 3 runs of forward and backward after
   2 warm-up runs) of its LSTM and GRU on the d2l and large configs: which kernels
   each runs, and how often.
2. The float32 GEMM rate of each matrix product the large config's forward runs,
   against the square 2048 x 2048 product that sets the benchmark's "GEMM rate":
   the input projection of all steps at once (`time * batch` = 2048 rows), and the
   recurrent product of every step (32 rows), timed as the fast path runs it: a
   `jax.lax.scan` of 64 steps, each multiplying the state by the transposed weight.
   Medians of `--repeats` runs, every product compiled with `jax.jit` and timed
   alternately in one process.
3. The per-step recurrent product of every config and cell (`h @ weight_hh.T`, the
   whole batch, one step) on XLA, in PyTorch and in SciPy's BLAS: each round runs
   each library for a block of `--calls` calls in turn (alternating call by call,
   the three libraries' idle threads spin against each other's calls); the median
   over `--rounds` rounds of each block's median, threads as they come.

    python benchmarks/profile_misses.py [--parts profiles rates products] [--repeats N]
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from bench_speed import CONFIGS as ALL_CONFIGS, GATES, timed


CONFIGS = {name: ALL_CONFIGS[name] for name in ("d2l", "large")}


def torch_profiles():
    import torch
    from torch.profiler import profile, ProfilerActivity

    for name, module in (("lstm", torch.nn.LSTM), ("gru", torch.nn.GRU)):
        for config, (i, h, layers, batch, time_) in CONFIGS.items():
            torch.manual_seed(0)
            rnn = module(i, h, layers)
            x = torch.randn(time_, batch, i)

            def forward_backward():
                y, _ = rnn(x)
                (y**2).sum().backward()

            for _ in range(2):
                forward_backward()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    forward_backward()
            averages = sorted(
                prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True
            )
            total = sum(e.self_cpu_time_total for e in averages)
            print(f"\ntorch {name} {config} fwd+bwd, 3 runs: operators by self time")
            for e in averages[:5]:
                share = 100 * e.self_cpu_time_total / total
                print(f"  {e.key:40s} {e.count:6d} calls  {share:5.1f} %")


def _recurrent(h, weight_t):
    # 64 steps of the fast path's recurrent product; the state keeps its width.
    width = h.shape[1]
    return jax.lax.scan(lambda h, _: ((h @ weight_t)[:, :width], None), h, length=64)[0]


def gemm_rates(repeats):
    k1, k2 = jax.random.split(jax.random.key(0))
    products = {}  # (cell, kind): (jitted product, a, b, FLOPs)

    def add(key, f, m, k, n, steps=1):
        a = jax.random.normal(k1, (m, k))
        b = jax.random.normal(k2, (k, n)) / k**0.5
        products[key] = (jax.jit(f), a, b, 2 * m * k * n * steps)

    add(("square", "2048 x 2048 x 2048"), jnp.dot, 2048, 2048, 2048)
    for cell, gates in (("gru", 3), ("lstm", 4)):
        n = gates * 1024
        add((cell, f"input projection, 2048 x 1024 x {n}"), jnp.dot, 2048, 1024, n)
        add(
            (cell, f"recurrent, 64 steps of 32 x 1024 x {n}"),
            _recurrent,
            32,
            1024,
            n,
            64,
        )
    times = {key: [] for key in products}
    for f, a, b, _ in products.values():
        jax.block_until_ready(f(a, b))
    for _ in range(repeats):
        for key, (f, a, b, _) in products.items():
            start = time.perf_counter()
            jax.block_until_ready(f(a, b))
            times[key].append(time.perf_counter() - start)
    rates = {key: products[key][3] / statistics.median(t) for key, t in times.items()}
    square = rates["square", "2048 x 2048 x 2048"]
    print("\nfloat32 GEMM rates (jax.jit), median of", repeats)
    for (cell, kind), rate in rates.items():
        share = 100 * rate / square
        print(f"  {cell:6s} {kind:40s} {rate / 1e9:7.1f} GFLOP/s  {share:4.0f} %")
    # Half the large forward's FLOPs are input projections, half recurrent steps
    # (input size = hidden size): at these rates it reaches at most this share.
    for cell in ("gru", "lstm"):
        projection, recurrent = (r for (c, _), r in rates.items() if c == cell)
        bound = 1 / (0.5 * square / projection + 0.5 * square / recurrent)
        print(f"  {cell} large forward at these rates: {100 * bound:.0f} % of square")


def _products(b, h, g):
    import torch
    from scipy.linalg import blas

    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, h), dtype=np.float32)
    w = rng.standard_normal((h, g), dtype=np.float32)
    xj, wj = jnp.asarray(x), jnp.asarray(w)
    dot = jax.jit(jnp.dot)
    xt, wt = torch.from_numpy(x), torch.from_numpy(w)
    xf, wf = np.asfortranarray(x), np.asfortranarray(w)
    return {
        "XLA": lambda: dot(xj, wj).block_until_ready(),
        "torch": lambda: torch.mm(xt, wt),
        "SciPy BLAS": lambda: blas.sgemm(1.0, xf, wf),
    }


def step_products(calls, rounds):
    names = ("XLA", "torch", "SciPy BLAS")
    print(
        "\n| config | cell | B, H, G | "
        + " | ".join(f"{n} µs | {n} GFLOP/s" for n in names)
        + " |\n| --- | --- | --- |"
        + " ---: |" * (2 * len(names))
    )
    for config, (_, h, _, b, _) in ALL_CONFIGS.items():
        for cell in ("gru", "lstm"):
            g = GATES[cell] * h
            fns = _products(b, h, g)
            medians = {n: [] for n in fns}
            for _ in range(rounds):
                for n, fn in fns.items():  # warm-up: compiles, threads
                    medians[n].append(statistics.median(timed(fn, calls, warmup=10)))
            row = []
            for n in names:
                t = statistics.median(medians[n])
                row.append(f"{1e6 * t:.0f} | {2 * b * h * g / t / 1e9:.0f}")
            print(f"| {config} | {cell} | {b}, {h}, {g} | " + " | ".join(row) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parts = ("profiles", "rates", "products")
    parser.add_argument("--parts", nargs="+", default=list(parts), choices=parts)
    parser.add_argument("--repeats", type=int, default=51)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if "profiles" in args.parts:
        torch_profiles()
    if "rates" in args.parts:
        gemm_rates(args.repeats)
    if "products" in args.parts:
        step_products(args.calls, args.rounds)


if __name__ == "__main__":
    main()
