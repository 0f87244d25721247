"""Speed of stacked RNNs: stackrnn's two paths against PyTorch and plain Equinox.

Runs every implementation in ONE process, alternating them round by round, and reports
the median of `--repeats` timed runs after warm-up, for the forward pass and for the
forward and backward pass (gradient of the sum of squared outputs with respect to
every parameter). The ratios in the table are medians over rounds of the two times
measured in the same round. Also measures this machine's float32 GEMM rate before
each config and cell, and reports each implementation's share of it.

    python benchmarks/bench_speed.py                      # everything
    python benchmarks/bench_speed.py --configs d2l --cells gru --repeats 7

Needs torch (`pip install -e ".[torch]"`) for the PyTorch column. Where JAX's default
backend is a GPU, PyTorch runs on CUDA (cuDNN) too, and both keep their default
float32 matrix-product precision.
"""

import argparse
import json
import platform
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import stackrnn
from stackrnn._fast import scan_fast


# (input I, hidden H, layers L, batch B, time T)
CONFIGS = {
    "d2l": (28, 32, 2, 1024, 32),
    "mid": (256, 256, 4, 64, 128),
    "large": (1024, 1024, 2, 32, 64),
    "deep": (128, 128, 8, 32, 256),
}
GATES = {"rnn": 1, "gru": 3, "lstm": 4}


def flops(cell, config, backward):
    """Matrix-product FLOPs of the stack; the backward pass does two more products
    per forward product (input and weight gradients)."""
    i, h, layers, b, t = config
    g = GATES[cell] * h
    forward = sum(2 * t * b * g * ((i if n == 0 else h) + h) for n in range(layers))
    return 3 * forward if backward else forward


def gemm_rate(repeats):
    """This machine's float32 GEMM rate: the median over `repeats` products of two
    2048 x 2048 matrices, in FLOP/s."""
    n = 2048
    a = jax.random.normal(jax.random.key(0), (n, n))
    dot = jax.jit(jnp.dot)
    times = timed(lambda: dot(a, a), repeats)
    return 2 * n**3 / statistics.median(times)


def timed(fn, repeats, warmup=2):
    """Seconds of each of `repeats` calls of `fn`, after `warmup` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - start)
    return out


# --- implementations: each returns (forward, forward_backward) thunks ---------------


def _thunks(outputs, model, xs):
    """The forward and the fwd+bwd thunks of `outputs(model, xs)`: jitted, the
    gradient of the sum of squared outputs with respect to `model`."""
    forward = eqx.filter_jit(outputs)
    grad = eqx.filter_jit(eqx.filter_grad(lambda m, xs: jnp.sum(outputs(m, xs) ** 2)))
    return (lambda: forward(model, xs)), (lambda: grad(model, xs))


def _stack(cell, config):
    """stackrnn's stack of `cell` for `config`, the same parameters in every
    implementation that uses stackrnn's cells."""
    i, h, layers, _, _ = config
    make = {"rnn": stackrnn.RNN, "gru": stackrnn.GRU, "lstm": stackrnn.LSTM}[cell]
    return make(i, h, layers, key=jax.random.key(0))


def ours(cell, config, path):
    i, h, layers, b, t = config
    scan = stackrnn.Scan(path=path)
    stack = stackrnn.StackedRNN(_stack(cell, config).cells, scan=scan)
    xs = jax.random.normal(jax.random.key(1), (b, t, i))

    def outputs(model, xs):
        return jax.vmap(lambda x: model(x)[0])(xs)

    return _thunks(outputs, stack, xs)


def reference_batched(cell, config):
    """The reference path's algorithm on an explicit, time-major batch, written by
    hand with `lax.scan` and stackrnn's cells (per-step matrix products, autodiff
    backward): what the reference path under `jax.vmap` is compared to. Same input
    and output as the vmapped stack, batch-major; the transposes to and from
    time-major order are part of its time, as they are of the vmapped stack's."""
    i, h, layers, b, t = config
    stack = _stack(cell, config)
    xs = jax.random.normal(jax.random.key(1), (b, t, i))

    def outputs(model, xs):
        xs = jnp.swapaxes(xs, 0, 1)  # time-major, as the loop reads it
        for c in model.cells:
            state = jax.tree.map(
                lambda s: jnp.broadcast_to(s, (b, *s.shape)), c.init_state()
            )

            def step(s, x, c=c):
                gx = x @ c.weight_ih.T + c.bias_ih
                gh = c.output(s) @ c.weight_hh.T + c.bias_hh
                s = jax.vmap(c.pointwise)(gx, gh, s)
                return s, c.output(s)

            _, xs = jax.lax.scan(step, state, xs)
        return jnp.swapaxes(xs, 0, 1)

    return _thunks(outputs, stack, xs)


class _BatchedCell(eqx.Module):
    """One of stackrnn's cells acting on a batch: its elementwise update and output
    vmapped over the leading axis, its weights shared, so that the fast path's own
    code (`stackrnn._fast.scan_fast`) runs on an explicit, time-major batch."""

    cell: stackrnn.AbstractAffineCell

    weight_ih = property(lambda self: self.cell.weight_ih)
    weight_hh = property(lambda self: self.cell.weight_hh)
    bias_ih = property(lambda self: self.cell.bias_ih)
    bias_hh = property(lambda self: self.cell.bias_hh)
    hidden_size = property(lambda self: self.cell.hidden_size)

    def pointwise(self, gx, gh, state):
        return jax.vmap(self.cell.pointwise)(gx, gh, state)

    def output(self, state):
        return jax.vmap(self.cell.output)(state)


def fast_batched(cell, config):
    """The fast path (`scan_fast`, with its hand-written backward pass) on an
    explicit, time-major batch: what the fast path under `jax.vmap` is compared
    to. Batch-major input and output, as `reference_batched`."""
    i, h, layers, b, t = config
    cells = [_BatchedCell(c) for c in _stack(cell, config).cells]
    xs = jax.random.normal(jax.random.key(1), (b, t, i))

    def outputs(cells, xs):
        xs = jnp.swapaxes(xs, 0, 1)
        for c in cells:
            state = jax.tree.map(
                lambda s: jnp.broadcast_to(s, (b, *s.shape)), c.cell.init_state()
            )
            xs, _ = scan_fast(c, xs, state)
        return jnp.swapaxes(xs, 0, 1)

    return _thunks(outputs, cells, xs)


class _EqxElman(eqx.Module):
    cell: eqx.nn.Linear
    hidden: eqx.nn.Linear

    def __call__(self, x, h):
        return jnp.tanh(self.cell(x) + self.hidden(h))


def plain_equinox(cell, config):
    """Equinox's own cells (`eqx.nn.GRUCell`, `eqx.nn.LSTMCell`; Elman from two
    `eqx.nn.Linear`), one `lax.scan` per layer, vmapped over the batch."""
    i, h, layers, b, t = config
    keys = jax.random.split(jax.random.key(0), layers)
    cells = []
    for n in range(layers):
        size = i if n == 0 else h
        if cell == "gru":
            cells.append(eqx.nn.GRUCell(size, h, key=keys[n]))
        elif cell == "lstm":
            cells.append(eqx.nn.LSTMCell(size, h, key=keys[n]))
        else:
            k1, k2 = jax.random.split(keys[n])
            cells.append(
                _EqxElman(eqx.nn.Linear(size, h, key=k1), eqx.nn.Linear(h, h, key=k2))
            )
    xs = jax.random.normal(jax.random.key(1), (b, t, i))

    def run(cells, x):
        for c in cells:
            init = (jnp.zeros(h), jnp.zeros(h)) if cell == "lstm" else jnp.zeros(h)

            def step(s, x_t, c=c):
                s = c(x_t, s)
                return s, s[0] if cell == "lstm" else s

            _, x = jax.lax.scan(step, init, x)
        return x

    def outputs(cells, xs):
        return jax.vmap(lambda x: run(cells, x))(xs)

    return _thunks(outputs, cells, xs)


def pytorch(cell, config):
    import torch

    i, h, layers, b, t = config
    make = {"rnn": torch.nn.RNN, "gru": torch.nn.GRU, "lstm": torch.nn.LSTM}[cell]
    device = _torch_device()
    module = make(i, h, layers).to(device)
    xs = torch.randn(t, b, i, device=device)
    # A GPU runs asynchronously: wait for it, as `jax.block_until_ready` does.
    done = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def forward():
        with torch.no_grad():
            out = module(xs)[0]
        done()
        return out

    def forward_backward():
        module.zero_grad()
        out, _ = module(xs)
        (out**2).sum().backward()
        done()

    return forward, forward_backward


def _torch_device():
    """PyTorch runs on the kind of device JAX runs on: its GPU (cuDNN's fused
    loops) when JAX's default backend is a GPU, else the CPU."""
    return "cuda" if jax.default_backend() == "gpu" else "cpu"


IMPLEMENTATIONS = {
    "torch": pytorch,
    "equinox": plain_equinox,
    "reference": lambda c, cfg: ours(c, cfg, stackrnn.Reference()),
    "fast": lambda c, cfg: ours(c, cfg, stackrnn.Fast()),
    "reference, batch": reference_batched,
    "fast, batch": fast_batched,
}
if stackrnn.Fused().choose(stackrnn.GRUCell(1, 1, key=jax.random.key(0))) == "fused":
    # The optional CPU accelerator (`pip install ./kernels`) is installed.
    IMPLEMENTATIONS["fused"] = lambda c, cfg: ours(c, cfg, stackrnn.Fused())


def measure(cell, name, repeats):
    """Times every implementation, alternating them round by round; the GEMM rate
    the shares refer to is measured just before, on its own (timed between the
    implementations it ran slower and changed their times)."""
    rate = gemm_rate(repeats)
    config = CONFIGS[name]
    thunks = {impl: make(cell, config) for impl, make in IMPLEMENTATIONS.items()}
    results = {impl: {"fwd": [], "fwd+bwd": []} for impl in thunks}
    for impl, (fwd, fb) in thunks.items():  # warm up (compiles)
        for fn in (fwd, fb):
            for _ in range(2):
                jax.block_until_ready(fn())
    for _ in range(repeats):  # alternate implementations round by round
        for impl, (fwd, fb) in thunks.items():
            for mode, fn in (("fwd", fwd), ("fwd+bwd", fb)):
                start = time.perf_counter()
                jax.block_until_ready(fn())
                results[impl][mode].append(time.perf_counter() - start)
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        medians = {i: statistics.median(r[mode]) for i, r in results.items()}
        work = flops(cell, config, mode == "fwd+bwd")
        rows.append(
            dict(
                config=name,
                cell=cell,
                mode=mode,
                ms={i: 1e3 * m for i, m in medians.items()},
                seconds={i: r[mode] for i, r in results.items()},
                gemm_rate=rate,
                gemm_fraction={i: work / m / rate for i, m in medians.items()},
            )
        )
    return rows


def default_path(cell, name):
    """The path the default policy, `stackrnn.ByWidth()`, takes at the config's
    width."""
    return stackrnn.ByWidth().choose(_stack(cell, CONFIGS[name]).cells[-1])


def ratio(row, a, b):
    """Median over rounds of `a`'s time / `b`'s time in the same round: the two ran
    one after the other, so a slow spell of the machine mostly scales both."""
    pairs = zip(row["seconds"][a], row["seconds"][b])
    return statistics.median(x / y for x, y in pairs)


def table(rows):
    """The Markdown table of docs/benchmarks.md."""
    names = {"torch": "torch", "equinox": "Equinox cells"}
    impls = list(IMPLEMENTATIONS)
    head = (
        "| config (I, H, L, B, T) | cell | pass | "
        + " | ".join(names.get(i, i) for i in impls)
        + " | default path | torch / default | default / batch"
        + " | fast: % of GEMM rate |"
    )
    lines = [
        head,
        "| --- | --- | --- |" + " ---: |" * len(impls) + " --- |" + " ---: |" * 3,
    ]
    for r in rows:
        config = ", ".join(map(str, CONFIGS[r["config"]]))
        ms = " | ".join(f"{r['ms'][i]:.1f}" for i in impls)
        path = default_path(r["cell"], r["config"])
        torch_ratio = ratio(r, "torch", path)
        batch = f"{path}, batch"  # the fused path has no hand-batched twin
        vmap_ratio = f"{ratio(r, path, batch):.2f}" if batch in impls else "-"
        lines.append(
            f"| {r['config']} ({config}) | {r['cell']} | {r['mode']} | {ms} | {path} | "
            f"{torch_ratio:.2f} | {vmap_ratio} | "
            f"{100 * r['gemm_fraction']['fast']:.0f} |"
        )
    lines.append("")
    rates = sorted({r["gemm_rate"] / 1e9 for r in rows})
    lines.append(
        f"Measured float32 GEMM rate (2048x2048), before each config and cell: "
        f"{statistics.median(rates):.1f} GFLOP/s (from {rates[0]:.1f} to "
        f"{rates[-1]:.1f})"
    )
    return "\n".join(lines)


def chart(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['config']}\n{r['cell']}\n{r['mode']}" for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(rows)), 4))
    for shift, impl in ((-0.2, "fast"), (0.2, "reference")):
        ratios = [ratio(r, "torch", impl) for r in rows]
        ax.bar(x + shift, ratios, 0.4, label=f"{impl} path")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel("torch time / stackrnn time (higher is faster)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS)
    )
    parser.add_argument(
        "--cells", nargs="+", default=["rnn", "gru", "lstm"], choices=list(GATES)
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", help="write the rows to this JSON file")
    parser.add_argument("--chart", help="write a PNG chart to this path")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    import torch

    device = jax.devices()[0].device_kind
    if _torch_device() == "cuda":
        device += f", cuDNN {torch.backends.cudnn.version()}"
    print(
        f"# {platform.processor() or platform.machine()} ({device}), "
        f"jax {jax.__version__}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"{args.repeats} timed runs per cell of the table"
    )
    rows = []
    for name in args.configs:
        for cell in args.cells:
            rows.extend(measure(cell, name, args.repeats))
            print(f"measured {name} {cell}", flush=True)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows), f, indent=1)
    if args.chart:
        chart(rows, args.chart)


if __name__ == "__main__":
    main()
