"""What the cells' hand-written derivatives save, side by side with JAX's own.

The cells give their nonlinearities derivatives that keep only what the backward pass
reads (`_gru_update`, `_sigmoid`, `_tanh` in `stackrnn/_cells.py`). This script
compiles every workload twice in one process, once with those functions and once with
the plain formulas swapped in (JAX then differentiates them itself and keeps more
arrays per step), and times both alternately: the median of `--repeats` rounds of
each, and the median of the per-round ratios.

Workloads: the forward and backward pass of a stack at the Time Machine sizes
(2 layers of 32, batch 1024 by `jax.vmap`, 32 steps, the gradient of the sum of
squared outputs with respect to the parameters) and one whole Time Machine epoch
(`stackrnn train`'s compiled epoch), for the tanh RNN, the GRU and the LSTM.

    python benchmarks/derivatives.py [--cells rnn gru lstm] [--repeats 15]
"""

import argparse
import contextlib
import pathlib
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp

import stackrnn
import stackrnn._cells as cells
from stackrnn.lm._train import _epoch


TEXT = pathlib.Path(__file__).parents[2] / "shared" / "data" / "timemachine.txt"
MAKE = {"rnn": stackrnn.RNN, "gru": stackrnn.GRU, "lstm": stackrnn.LSTM}


@contextlib.contextmanager
def autodiff_formulas():
    """The plain formulas in place of the hand-differentiated functions (read when a
    program is traced)."""
    saved = cells._gru_update, cells._sigmoid, cells._tanh
    cells._gru_update = lambda gx, gh, h: cells._gru_gates(gx, gh, h)[0]
    cells._sigmoid, cells._tanh = jax.nn.sigmoid, jnp.tanh
    try:
        yield
    finally:
        cells._gru_update, cells._sigmoid, cells._tanh = saved


def workloads(cell, data, key):
    """`name -> (function, arguments)`; each function is a fresh `jit`, so the two
    variants never share a compiled program."""
    k1, k2, k3 = jax.random.split(key, 3)
    model = stackrnn.lm.RNNLM(MAKE[cell](28, 32, 2, key=k1), 28, key=k2)
    xs = jax.nn.one_hot(jax.random.randint(k3, (1024, 32), 0, 28), 28)

    def stack(rnn, xs):
        loss = lambda r: jnp.sum(jax.vmap(lambda x: r(x)[0])(xs) ** 2)  # noqa: E731
        return eqx.filter_grad(loss)(rnn)

    optimizer = stackrnn.lm.default_optimizer()
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))

    def epoch(model, opt_state, data):
        return _epoch.__wrapped__(model, opt_state, data, k3, optimizer, 1024)

    return {
        "stack fwd+bwd": (eqx.filter_jit(stack), (model.rnn, xs)),
        "epoch": (eqx.filter_jit(epoch), (model, opt_state, data)),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", nargs="+", default=list(MAKE), choices=MAKE)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    text = stackrnn.lm.load_text(TEXT)
    windows = stackrnn.lm.CharData.from_text(text)
    data = tuple(
        jnp.asarray(a)
        for a in (windows.train_x, windows.train_y, windows.val_x, windows.val_y)
    )
    print(f"# jax {jax.__version__}; medians of {args.repeats} alternating rounds")
    print("| cell | workload | JAX's derivatives (ms) | hand-written (ms) | ratio |")
    print("| --- | --- | ---: | ---: | ---: |")
    for cell in args.cells:
        key = jax.random.key(0)
        variants = {}
        for name, context in (
            ("autodiff", autodiff_formulas()),
            ("hand", contextlib.nullcontext()),
        ):
            with context:
                for workload, (f, inputs) in workloads(cell, data, key).items():
                    jax.block_until_ready(f(*inputs))  # compile and warm up
                    jax.block_until_ready(f(*inputs))
                    variants[name, workload] = (f, inputs, [])
        for _ in range(args.repeats):
            for f, inputs, times in variants.values():
                start = time.perf_counter()
                jax.block_until_ready(f(*inputs))
                times.append(time.perf_counter() - start)
        for workload in ("stack fwd+bwd", "epoch"):
            old = variants["autodiff", workload][2]
            new = variants["hand", workload][2]
            ratio = statistics.median(n / o for n, o in zip(new, old))
            print(
                f"| {cell} | {workload} | {1e3 * statistics.median(old):.1f} | "
                f"{1e3 * statistics.median(new):.1f} | {ratio:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
