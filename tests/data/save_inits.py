"""Writes `inits.npz`, the parameters of small cells drawn by every initialiser in
every dtype, which `tests/test_init.py` rebuilds and compares bit for bit: the
draws of a key must not change when the way they are drawn does.

Run once, on the code whose draws must be kept, from the repository root:

    python tests/data/save_inits.py
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

import stackrnn


HERE = pathlib.Path(__file__).parent
INITS = {
    "pytorch": stackrnn.PyTorchInit(),
    "normal": stackrnn.NormalInit(0.3),
    "orthogonal": stackrnn.OrthogonalInit(gain=0.5),
}
DTYPES = ["float32", "bfloat16", "float16", "float64"]


def cells(dtype):
    """The cells in `dtype`, by name (float64 needs JAX's x64 mode): a GRU for
    square gate blocks, an LSTM with `proj_size` for narrow ones and `weight_hr`."""
    built = {}
    for name, init in INITS.items():
        k1, k2 = jax.random.split(jax.random.key(7))
        options = dict(init=init, dtype=jnp.dtype(dtype))
        built[f"gru-{name}"] = stackrnn.GRUCell(6, 8, key=k1, **options)
        built[f"lstm_proj-{name}"] = stackrnn.LSTMCell(
            6, 8, proj_size=4, key=k2, **options
        )
    return built


def cell_bytes(cell) -> np.ndarray:
    """The bytes of the cell's parameters, in leaf order."""
    return np.concatenate(
        [np.asarray(leaf).ravel().view(np.uint8) for leaf in jax.tree.leaves(cell)]
    )


if __name__ == "__main__":
    jax.config.update("jax_enable_x64", True)
    np.savez(
        HERE / "inits.npz",
        **{
            f"{dtype}/{name}": cell_bytes(cell)
            for dtype in DTYPES
            for name, cell in cells(dtype).items()
        },
    )
