"""The measurements behind two targets that docs/benchmarks.md reports as missed.

1. PyTorch's operator profile (`torch.profiler`, 3 runs of forward and backward after
   2 warm-up runs) of its LSTM and GRU on the d2l and large configs: which kernels
   each runs, and how often.
2. The float32 GEMM rate of each matrix product the large config's forward runs,
   against the square 2048 x 2048 product that sets the benchmark's "GEMM rate":
   the recurrent product of every step (batch 32 times `hidden x gates`) and the
   input projection of all steps at once (the bottom layer's, `time * batch` rows).
   Medians of `--repeats` runs, every product compiled with `jax.jit` and timed
   alternately in one process.

    python benchmarks/profile_misses.py [--repeats N]
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp


CONFIGS = {"d2l": (28, 32, 2, 1024, 32), "large": (1024, 1024, 2, 32, 64)}


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


def gemm_rates(repeats):
    k1, k2 = jax.random.split(jax.random.key(0))
    shapes = {"square 2048 x 2048 x 2048 (the benchmark's rate)": (2048, 2048, 2048)}
    for cell, gates in (("gru", 3), ("lstm", 4)):
        shapes[f"{cell} recurrent step, 32 x 1024 x {gates * 1024}"] = (
            32,
            1024,
            gates * 1024,
        )
        shapes[f"{cell} input projection, 2048 x 1024 x {gates * 1024}"] = (
            64 * 32,
            1024,
            gates * 1024,
        )
    products = {}
    for label, (m, k, n) in shapes.items():
        a = jax.random.normal(k1, (m, k))
        b = jax.random.normal(k2, (k, n))
        products[label] = (jax.jit(jnp.dot), a, b, 2 * m * k * n)
    times = {label: [] for label in products}
    for f, a, b, _ in products.values():
        jax.block_until_ready(f(a, b))
    for _ in range(repeats):
        for label, (f, a, b, _) in products.items():
            start = time.perf_counter()
            jax.block_until_ready(f(a, b))
            times[label].append(time.perf_counter() - start)
    rates = {
        label: products[label][3] / statistics.median(t) for label, t in times.items()
    }
    square = next(iter(rates.values()))
    print("\nfloat32 GEMM rates (jnp.dot under jax.jit), median of", repeats)
    for label, rate in rates.items():
        print(f"  {label:52s} {rate / 1e9:7.1f} GFLOP/s  {100 * rate / square:4.0f} %")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=51)
    args = parser.parse_args()
    torch_profiles()
    gemm_rates(args.repeats)


if __name__ == "__main__":
    main()
