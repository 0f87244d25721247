import contextlib
import dataclasses

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import settings

import stackrnn


@contextlib.contextmanager
def x64(enabled: bool):
    """JAX's 64-bit mode on or off inside the block, restored after it."""
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", enabled)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", before)


def tree_allclose(x, y, *, rtol=1e-6, atol=1e-6) -> bool:
    """Same structure and all leaves close (exact when rtol = atol = 0)."""
    if jax.tree.structure(x) != jax.tree.structure(y):
        return False
    return all(
        jnp.shape(a) == jnp.shape(b)
        and np.allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)
        for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y))
    )


def tree_equal(x, y) -> bool:
    """Bit-for-bit equality of two PyTrees of arrays."""
    if jax.tree.structure(x) != jax.tree.structure(y):
        return False
    return all(
        jnp.shape(a) == jnp.shape(b) and np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y))
    )


# Hypothesis strategies over stack configurations: small shapes, since JAX compiles once
# per new shape.


KINDS = ("rnn_tanh", "rnn_relu", "gru", "lstm", "lstm_proj")


@dataclasses.dataclass(frozen=True)
class Config:
    kind: str
    input_size: int
    widths: tuple[int, ...]
    bias: bool
    time: int

    @property
    def num_layers(self):
        return len(self.widths)


def make_cell(kind, input_size, width, *, bias=True, key):
    if kind in ("rnn_tanh", "rnn_relu"):
        return stackrnn.ElmanCell(
            input_size, width, nonlinearity=kind[4:], bias=bias, key=key
        )
    if kind == "gru":
        return stackrnn.GRUCell(input_size, width, bias=bias, key=key)
    proj = max(1, width // 2) if kind == "lstm_proj" else 0
    if proj >= width:
        proj = 0
    return stackrnn.LSTMCell(input_size, width, proj_size=proj, bias=bias, key=key)


def make_cells(cfg: Config, key):
    cells = []
    size = cfg.input_size
    for width, k in zip(cfg.widths, jax.random.split(key, cfg.num_layers)):
        cell = make_cell(cfg.kind, size, width, bias=cfg.bias, key=k)
        cells.append(cell)
        size = cell.output_size
    return cells


@st.composite
def configs(draw, *, max_layers=3, max_width=6, max_time=6, same_width=False):
    kind = draw(st.sampled_from(KINDS))
    num_layers = draw(st.integers(1, max_layers))
    if same_width:
        widths = (draw(st.integers(2, max_width)),) * num_layers
    else:
        widths = tuple(draw(st.integers(2, max_width)) for _ in range(num_layers))
    return Config(
        kind=kind,
        input_size=draw(st.integers(1, 5)),
        widths=widths,
        bias=draw(st.booleans()),
        time=draw(st.integers(1, max_time)),
    )


def inputs(cfg: Config, key, *, scale=1.0, batch=None):
    shape = (cfg.time, cfg.input_size)
    if batch is not None:
        shape = (batch, *shape)
    return scale * jax.random.normal(key, shape)


def fewer():
    """Half the active profile's examples, for the property tests that compile most
    (each example compiles anew)."""
    return settings(max_examples=max(1, settings.default.max_examples // 2))
