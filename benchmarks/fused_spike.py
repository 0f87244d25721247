"""The gate of issue 21: a fused forward loop against today's forward, one process.

Builds kernels/spike/gru_forward.cc (a GRU layer's forward loop as an XLA FFI
handler for the CPU) with g++, then times, alternating round by round:

- `today`: `stackrnn.GRU(28, 32, num_layers=2)` under `jax.vmap`, jitted (its
  default path at this width);
- `fused, 1 thread` and `fused, pool`: the same stack with each layer's input
  projection an XLA product and its loop the handler, in one jitted program, the
  loop's rows on the calling thread alone or split over XLA's FFI thread pool;
- `projections only` and `loops only`: the two parts of `fused, 1 thread` as
  programs of their own, for the breakdown.

It prints the median and minimum of each and the median over rounds of
`today / fused` measured in the same round.

    python benchmarks/fused_spike.py [--rounds 60] [--batch 1024] [--time 32]

Needs g++ and the XLA FFI headers that jaxlib installs (`jax.ffi.include_dir()`).
"""

import argparse
import ctypes
import os
import pathlib
import statistics
import subprocess
import tempfile
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import stackrnn


SOURCE = pathlib.Path(__file__).parent.parent / "kernels" / "spike" / "gru_forward.cc"


def build():
    out = pathlib.Path(tempfile.mkdtemp()) / "gru_forward.so"
    flags = ["-O3", "-march=native", "-ffast-math", "-fopenmp-simd", "-std=c++17"]
    subprocess.run(
        ["g++", *flags, "-fPIC", "-shared", f"-I{jax.ffi.include_dir()}"]
        + [str(SOURCE), "-o", str(out)],
        check=True,
    )
    library = ctypes.cdll.LoadLibrary(str(out))
    jax.ffi.register_ffi_target(
        "gru_forward_spike", jax.ffi.pycapsule(library.GruForward), platform="cpu"
    )


def loop(cell, gates_x, threads):
    """One layer's loop through the handler, for one example (`jax.vmap` hands the
    handler the batch as a leading axis). `gates_x` without `bias_ih`: the loop
    adds it."""
    time_, _ = gates_x.shape
    shape = jax.ShapeDtypeStruct((time_, cell.hidden_size), gates_x.dtype)
    call = jax.ffi.ffi_call("gru_forward_spike", shape, vmap_method="expand_dims")
    h0 = jnp.zeros((cell.hidden_size,), gates_x.dtype)
    return call(
        gates_x,
        cell.bias_ih,
        cell.weight_hh,
        cell.bias_hh,
        h0,
        max_threads=np.int64(threads),
    )


def fused(model, xs, threads):
    for cell in model.cells:
        xs = loop(cell, xs @ cell.weight_ih.T, threads)
    return xs


def projections(model, xs):
    out = []
    for cell in model.cells:
        out.append(xs @ cell.weight_ih.T)
        xs = out[-1][:, : cell.hidden_size]
    return out


def loops(model, gates):
    return [loop(cell, g, 1) for cell, g in zip(model.cells, gates)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--time", type=int, default=32)
    args = parser.parse_args()
    build()
    model = stackrnn.GRU(28, 32, num_layers=2, key=jax.random.key(0))
    xs = jax.random.normal(jax.random.key(1), (args.batch, args.time, 28))

    def batched(f, *axes):
        return eqx.filter_jit(jax.vmap(f, in_axes=(None, *axes)))

    today = batched(lambda m, x: m(x)[0], 0)
    one = batched(lambda m, x: fused(m, x, 1), 0)
    pool = batched(lambda m, x: fused(m, x, 2), 0)
    project = batched(projections, 0)
    gates = project(model, xs)
    only_loops = batched(loops, 0)
    thunks = {
        "today": lambda: today(model, xs),
        "fused, 1 thread": lambda: one(model, xs),
        "fused, pool": lambda: pool(model, xs),
        "projections only": lambda: project(model, xs),
        "loops only": lambda: only_loops(model, gates),
    }
    reference = today(model, xs)
    for name in ("fused, 1 thread", "fused, pool"):
        diff = float(jnp.max(jnp.abs(thunks[name]() - reference)))
        print(f"{name}: max |difference| from today's forward {diff:.1e}")
    times = {name: [] for name in thunks}
    for thunk in thunks.values():
        jax.block_until_ready(thunk())
    for _ in range(args.rounds):
        for name, thunk in thunks.items():
            start = time.perf_counter()
            jax.block_until_ready(thunk())
            times[name].append(time.perf_counter() - start)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'':18s} {'median ms':>10s} {'min ms':>8s} {'today / this':>13s}")
    for name, ts in times.items():
        rounds = [a / b for a, b in zip(times["today"], ts)]
        print(
            f"{name:18s} {1e3 * statistics.median(ts):10.2f} {1e3 * min(ts):8.2f}"
            f" {statistics.median(rounds):13.2f}"
        )


if __name__ == "__main__":
    main()
