"""Where an epoch of the Time Machine run spends its time.

Times, on the seed's settings (2 layers, 32 hidden, batch 1024, 32 steps): one whole
epoch as `stackrnn train` runs it, the same epoch with a single validation window, and
the stack alone (forward and backward over 10 batches of one-hot inputs).

    python benchmarks/time_machine_epoch.py [--cell gru|rnn|lstm] [--repeats N]
"""

import argparse
import pathlib
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp

import stackrnn
from stackrnn.lm._train import _epoch


TEXT = pathlib.Path(__file__).parents[2] / "shared" / "data" / "timemachine.txt"


def median_seconds(f, repeats):
    jax.block_until_ready(f())  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(f())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cell", choices=("rnn", "gru", "lstm"), default="gru")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    make = {"rnn": stackrnn.RNN, "gru": stackrnn.GRU, "lstm": stackrnn.LSTM}[args.cell]
    text = stackrnn.lm.load_text(TEXT)
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    model = stackrnn.lm.RNNLM(make(28, 32, 2, key=k1), 28, key=k2)
    optimizer = stackrnn.lm.default_optimizer()
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))

    for label, num_val in (("epoch", 5000), ("epoch, 1 validation window", 1)):
        data = stackrnn.lm.CharData.from_text(text, num_val=num_val)
        arrays = tuple(
            jnp.asarray(a) for a in (data.train_x, data.train_y, data.val_x, data.val_y)
        )
        seconds = median_seconds(
            lambda: _epoch(model, opt_state, arrays, k3, optimizer, 1024), args.repeats
        )
        print(f"{args.cell} {label}: {seconds:.4f} s")

    xs = jax.nn.one_hot(jax.random.randint(k3, (10, 1024, 32), 0, 28), 28)

    @eqx.filter_jit
    def stack_grads(rnn, xs):
        def batch(_, x):
            loss = lambda r: jax.vmap(lambda s: r(s)[0])(x).sum()  # noqa: E731
            return None, eqx.filter_grad(loss)(rnn)

        return jax.lax.scan(batch, None, xs)[1]

    seconds = median_seconds(lambda: stack_grads(model.rnn, xs), args.repeats)
    print(f"{args.cell} stack forward+backward, 10 batches: {seconds:.4f} s")


if __name__ == "__main__":
    main()
