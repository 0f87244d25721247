"""Peak training memory of stacked RNNs against sequence length, with and without
`checkpoint` (gradient checkpointing over chunks of time).

For every cell, sequence length T, loss and setting, compiles one training step, the
jitted `jax.value_and_grad` of a loss over `jax.vmap(stack)` on a batch, and reads
XLA's memory analysis of the compiled program: the sizes of its arguments, outputs
and temporary buffers (nothing is run for this). Three losses:

- `outputs`: the mean square of every output, as a per-step loss (a language model's)
  needs: the outputs and their gradient are kept, `O(T)` whatever the stack does;
- `final`: the square of the final state only: no output sequence is kept, so what
  remains is what the stack's backward pass itself needs;
- `lm`: a language model's training step, `stackrnn.lm.sequence_loss` of an `RNNLM`
  reading token indices (a vocabulary of `--input` tokens, one-hot) with next-token
  targets: with checkpointing, `StackedRNN.transduce` runs the one-hot encoding,
  the readout and the cross-entropy inside each chunk, so only the tokens grow with
  T.

Three settings: `off` (no checkpointing), `on` (`checkpoint=True`, chunks of
`ceil(sqrt(T))` steps) and `nested` (`checkpoint=(round(T ** (2/3)),
round(T ** (1/3)))`, chunks of chunks).

`--init` instead measures building a stack: the peak resident memory of a fresh
subprocess while it builds `--layers` layers of `--input` x `--hidden` with each of
`--inits`, against the size of the parameters it ends with.

`--rss` also runs a few of the points, each in a fresh subprocess, and samples the
process's resident memory while the step runs, to check that XLA's numbers are what
the CPU backend really allocates. `--time-at T` times one step of every loss in
every setting at that T (median of `--repeats` runs, alternating, one process).

    python benchmarks/bench_memory.py                       # the docs' table
    python benchmarks/bench_memory.py --cells gru --times 1024 4096 --rss
    python benchmarks/bench_memory.py --init --cells rnn gru lstm --input 8000 \
        --hidden 8000 --layers 1
"""

import argparse
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import threading
import time

import equinox as eqx
import jax
import jax.numpy as jnp

import stackrnn


MAKE = {"rnn": stackrnn.RNN, "gru": stackrnn.GRU, "lstm": stackrnn.LSTM}
MiB = 2**20
LOSSES = ("outputs", "final", "lm")
INITS = {
    "pytorch": stackrnn.PyTorchInit(),
    "normal": stackrnn.NormalInit(),
    "orthogonal": stackrnn.OrthogonalInit(),
}


SETTINGS = {
    "off": lambda t: False,
    "on": lambda t: True,
    "nested": lambda t: (round(t ** (2 / 3)), round(t ** (1 / 3))),
}


def step_fn(cell, args, setting, loss, time_steps):
    """The jitted training step (value and parameter gradients) and its arguments."""
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    stack = MAKE[cell](
        args.input,
        args.hidden,
        args.layers,
        checkpoint=SETTINGS[setting](time_steps),
        key=k1,
    )
    shape = (args.batch, time_steps)
    if loss == "lm":
        model = stackrnn.lm.RNNLM(stack, args.input, key=k2)
        params, static = eqx.partition(model, eqx.is_array)
        tokens = jax.random.randint(k3, (args.batch, time_steps + 1), 0, args.input)

        def objective(params, tokens):
            lm = eqx.combine(params, static)
            losses = jax.vmap(stackrnn.lm.sequence_loss, (None, 0, 0))(
                lm, tokens[:, :-1], tokens[:, 1:]
            )
            return jnp.mean(losses)

        return jax.jit(jax.value_and_grad(objective)), (params, tokens)

    params, static = eqx.partition(stack, eqx.is_array)
    xs = jax.random.normal(k3, (*shape, args.input))

    def objective(params, xs):
        ys, state = jax.vmap(eqx.combine(params, static))(xs)
        if loss == "outputs":
            return jnp.mean(ys**2)
        return sum(jnp.mean(s**2) for s in jax.tree.leaves(state))

    return jax.jit(jax.value_and_grad(objective)), (params, xs)


def memory(cell, args, setting, loss, time_steps):
    f, inputs = step_fn(cell, args, setting, loss, time_steps)
    start = time.perf_counter()
    compiled = f.lower(*inputs).compile()
    seconds = time.perf_counter() - start
    m = compiled.memory_analysis()
    return {
        "cell": cell,
        "T": time_steps,
        "loss": loss,
        "checkpoint": setting,
        "temp": m.temp_size_in_bytes,
        "arguments": m.argument_size_in_bytes,
        "outputs": m.output_size_in_bytes,
        "aliased": m.alias_size_in_bytes,
        "total": m.temp_size_in_bytes
        + m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes,
        "compile_s": seconds,
    }


def largest_arrays(cell, args, setting, loss, time_steps, count=8):
    """The largest arrays the compiled step's top level creates (not nested loop
    bodies): a profile of where the memory goes. Returns (MiB, opcode, shape, the
    JAX operation it came from)."""
    f, inputs = step_fn(cell, args, setting, loss, time_steps)
    text = f.lower(*inputs).compile().as_text()
    entry = text[text.index("\nENTRY ") :]
    entry = entry[: entry.index("\n}")]
    found = []
    pattern = (
        r"= (f32|s32|pred)\[([\d,]*)\]\{[^}]*\} ([\w-]+)\(.*?(?:op_name=\"([^\"]*))?"
    )
    for line in entry.splitlines():
        m = re.search(pattern, line)
        if m is None or m.group(3) in ("get-tuple-element", "bitcast"):
            continue
        dims = [int(d) for d in m.group(2).split(",") if d]
        size = math.prod(dims) * (1 if m.group(1) == "pred" else 4)
        op = re.search(r'op_name="([^"]*)"', line)
        found.append(
            (size / MiB, m.group(3), f"{m.group(1)}{dims}", op.group(1) if op else "")
        )
    return sorted(found, reverse=True)[:count]


def floor(args, loss, time_steps):
    """Bytes that grow with T whatever the stack does: the inputs (for `lm`, the
    `T + 1` int32 tokens), and for the `outputs` loss the output sequence and its
    gradient (float32)."""
    if loss == "lm":
        return 4 * args.batch * (time_steps + 1)
    per_step = args.input + (2 * args.hidden if loss == "outputs" else 0)
    return 4 * args.batch * time_steps * per_step


def _resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_point(cell, args, setting, loss, time_steps):
    """Compiles one step, then runs it once; returns the peak rise of resident
    memory during the run, sampled every millisecond. (The first run: after it the
    allocator may keep freed buffers resident, which would hide a second run's.)"""
    f, inputs = step_fn(cell, args, setting, loss, time_steps)
    compiled = f.lower(*inputs).compile()
    jax.block_until_ready(inputs)
    before, peak, done = _resident(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _resident())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    jax.block_until_ready(compiled(*inputs))
    done.set()
    sampler.join()
    return max(0, peak[0] - before)


def init_point(cell, args, init, dtype):
    """Builds one stack in this (fresh) process; returns the bytes of its parameters,
    the rise of the peak resident memory while it was built, and the seconds."""
    jax.block_until_ready(jnp.zeros(()))  # the runtime, before the baseline
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    stack = MAKE[cell](
        args.input,
        args.hidden,
        args.layers,
        init=INITS[init],
        dtype=jnp.dtype(dtype),
        key=jax.random.key(0),
    )
    jax.block_until_ready(stack)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    weights = sum(
        leaf.nbytes for leaf in jax.tree.leaves(eqx.filter(stack, eqx.is_array))
    )
    return weights, peak - before, seconds


def init_table(args):
    print(
        f"# jax {jax.__version__}, {platform.machine()}, {os.cpu_count()} CPUs; "
        f"I={args.input} H={args.hidden} L={args.layers}"
    )
    print("| cell | init | dtype | weights MiB | peak rise MiB | rise / weights | s |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for cell in args.cells:
        for init in args.inits:
            for dtype in args.dtypes:
                command = [sys.executable, __file__, "--init-point", cell, init, dtype]
                for name in ("input", "hidden", "layers"):
                    command += [f"--{name}", str(getattr(args, name))]
                out = subprocess.run(command, capture_output=True, check=True).stdout
                weights, rise, seconds = json.loads(out)
                print(
                    f"| {cell} | {init} | {dtype} | {weights / MiB:.0f} | "
                    f"{rise / MiB:.0f} | {rise / weights:.2f} | {seconds:.1f} |",
                    flush=True,
                )


def timing(cell, args, loss, time_steps):
    """Median seconds of one step in every setting, alternating."""
    runs = {}
    for setting in args.settings:
        f, inputs = step_fn(cell, args, setting, loss, time_steps)
        compiled = f.lower(*inputs).compile()
        jax.block_until_ready(compiled(*inputs))  # warm-up
        runs[setting] = (compiled, inputs, [])
    for _ in range(args.repeats):
        for compiled, inputs, times in runs.values():
            start = time.perf_counter()
            jax.block_until_ready(compiled(*inputs))
            times.append(time.perf_counter() - start)
    return {k: statistics.median(v[2]) for k, v in runs.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", nargs="+", default=["gru", "lstm"], choices=MAKE)
    parser.add_argument("--times", nargs="+", type=int, default=[1024, 4096, 16384])
    parser.add_argument(
        "--losses", nargs="+", default=["outputs", "final", "lm"], choices=LOSSES
    )
    parser.add_argument(
        "--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS
    )
    parser.add_argument("--input", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rss", action="store_true", help="check a few points' RSS")
    parser.add_argument("--time-at", type=int, default=None, help="time steps at T")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument(
        "--profile", type=int, default=None, help="largest arrays at this T"
    )
    parser.add_argument("--rss-point", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument(
        "--init", action="store_true", help="peak memory of building the stacks"
    )
    parser.add_argument("--inits", nargs="+", default=list(INITS), choices=INITS)
    parser.add_argument("--dtypes", nargs="+", default=["float32"])
    parser.add_argument("--init-point", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.init_point:  # a subprocess of --init
        cell, init, dtype = args.init_point
        print(json.dumps(init_point(cell, args, init, dtype)))
        return
    if args.init:
        init_table(args)
        return

    if args.rss_point:  # a subprocess of --rss
        cell, setting, loss, time_steps = args.rss_point
        print(rss_point(cell, args, setting, loss, int(time_steps)))
        return

    print(
        f"# jax {jax.__version__}, {platform.machine()}, {os.cpu_count()} CPUs; "
        f"I={args.input} H={args.hidden} L={args.layers} B={args.batch}, float32"
    )
    rows = []
    header = (
        "| cell | loss | T | checkpoint | total MiB | temp MiB | arguments MiB | "
        "floor MiB | total - floor MiB | total / total at T0 |"
    )
    print(header)
    print("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for cell in args.cells:
        for loss in args.losses:
            for setting in args.settings:
                first = None
                for t in args.times:
                    row = memory(cell, args, setting, loss, t)
                    row["floor"] = floor(args, loss, t)
                    first = first or row["total"]
                    rows.append(row)
                    print(
                        f"| {cell} | {loss} | {t} | {setting} | "
                        f"{row['total'] / MiB:.1f} | {row['temp'] / MiB:.1f} | "
                        f"{row['arguments'] / MiB:.1f} | {row['floor'] / MiB:.1f} | "
                        f"{(row['total'] - row['floor']) / MiB:.1f} | "
                        f"{row['total'] / first:.2f} |",
                        flush=True,
                    )

    checks = []
    if args.rss:
        # The shortest and longest points of the first cell and loss, in every
        # setting, one subprocess each.
        points = [
            (args.cells[0], setting, args.losses[0], t)
            for t in (args.times[0], args.times[-1])
            for setting in args.settings
        ]
        print(
            "\n| cell | loss | T | checkpoint | XLA temp + outputs MiB | RSS rise MiB |"
        )
        print("| --- | --- | ---: | --- | ---: | ---: |")
        for cell, setting, loss, t in points:
            command = [sys.executable, __file__, "--rss-point", cell]
            command += [setting, loss, str(t)]
            for name in ("input", "hidden", "layers", "batch"):
                command += [f"--{name}", str(getattr(args, name))]
            rise = int(subprocess.run(command, capture_output=True, check=True).stdout)
            (row,) = [
                r
                for r in rows
                if (r["cell"], r["checkpoint"], r["loss"], r["T"])
                == (cell, setting, loss, t)
            ]
            xla = row["temp"] + row["outputs"]
            checks.append({**row, "rss_rise": rise})
            print(
                f"| {cell} | {loss} | {t} | {setting} | "
                f"{xla / MiB:.1f} | {rise / MiB:.1f} |",
                flush=True,
            )

    profile = []
    if args.profile:
        cell = args.cells[0]
        print(
            f"\nLargest arrays, {cell}, outputs loss, T={args.profile}, checkpoint on:"
        )
        print("\n| MiB | XLA operation | shape | from |")
        print("| ---: | --- | --- | --- |")
        for size, opcode, shape, origin in largest_arrays(
            cell, args, "on", "outputs", args.profile
        ):
            profile.append([size, opcode, shape, origin])
            print(f"| {size:.1f} | {opcode} | {shape} | `{origin}` |")

    timings = {}
    if args.time_at:
        names = " | ".join(f"{s} (s) | {s} / off" for s in args.settings)
        print(f"\n| cell | loss | T | {names} |")
        print("| --- | --- | ---: |" + " ---: | ---: |" * len(args.settings))
        for cell in args.cells:
            for loss in args.losses:
                t = timing(cell, args, loss, args.time_at)
                timings[f"{cell} {loss}"] = t
                cells = " | ".join(f"{t[s]:.2f} | {t[s] / t['off']:.2f}" for s in t)
                print(f"| {cell} | {loss} | {args.time_at} | {cells} |", flush=True)

    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"memory": rows, "rss": checks, "profile": profile, "timing": timings},
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
