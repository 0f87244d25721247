"""Initialisation choices: orthogonal recurrent weights and the LSTM's forget-gate
bias, each deterministic for a key and leaving every other parameter as drawn."""

import pathlib

import jax
import jax.extend.random as jex_random
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from hypothesis import given, strategies as st

import stackrnn
from stackrnn._kinds import cell_class

from .data.save_inits import cell_bytes, cells, DTYPES
from .helpers import KINDS as DRAWN_KINDS, seeds, tree_equal, x64


KEY = jr.key(0)
DATA = pathlib.Path(__file__).parent / "data"


# The cell kinds the strategies draw, and a layer-normalised LSTM with `proj_size`.
KINDS = (*DRAWN_KINDS, "lstm_ln_proj")


def _cell(kind, input_size, hidden_size, *, init, key, **kwargs):
    """A cell of `kind` (one of `KINDS`); `_proj` kinds have `proj_size`."""
    base = kind.removesuffix("_proj").removesuffix("_ln")
    make, keywords = cell_class(base, layer_norm="_ln" in kind)
    if kind.endswith("_proj"):
        keywords["proj_size"] = max(1, hidden_size // 2)
    return make(input_size, hidden_size, init=init, key=key, **keywords, **kwargs)


def _zeros(key, shape, dtype, *, role, hidden_size):
    """An initialiser that draws nothing (each new shape would compile a program),
    for the tests that read `weight_hh` alone."""
    return jax.device_put(np.zeros(shape, dtype))


def _blocks(cell):
    """`weight_hh` cut into its gate blocks of `hidden_size` rows, in float64."""
    w = np.asarray(cell.weight_hh, np.float64)
    return np.split(w, w.shape[0] // cell.hidden_size)


@given(gain=st.sampled_from([1.0, 0.5, 3.0]), seed=seeds)
def test_orthogonal_blocks(gain, seed):
    """Every gate block `Q` of `weight_hh` has orthonormal columns times `gain`
    (`Q^T Q = gain^2 I`), and when square orthonormal rows too, in a cell of every
    kind (one width: the examples after the first reuse the compiled draws)."""
    init = stackrnn.OrthogonalInit(_zeros, gain=gain)
    for kind, key in zip(KINDS, jr.split(jr.key(seed), len(KINDS))):
        cell = _cell(kind, 3, 4, init=init, key=key)
        blocks = _blocks(cell)
        assert len(blocks) == {"rnn": 1, "gru": 3}.get(kind[:3], 4)
        for q in blocks:
            cols = q.shape[1]
            np.testing.assert_allclose(q.T @ q, gain**2 * np.eye(cols), atol=1e-5)
            if cols == q.shape[0]:
                np.testing.assert_allclose(q @ q.T, gain**2 * np.eye(cols), atol=1e-5)
        # Each block is drawn on its own, not copied.
        assert not np.allclose(blocks[0], blocks[-1]) or len(blocks) == 1


@pytest.mark.parametrize("kind", KINDS)
def test_orthogonal_changes_only_the_recurrent_weights(kind):
    """Every parameter but `weight_hh` is `base`'s draw for the same key, and the
    cell is the same for the same key (bit for bit), another for another key."""
    base = stackrnn.NormalInit(0.3)
    init = stackrnn.OrthogonalInit(base=base)
    cell = _cell(kind, 3, 4, init=init, key=KEY)
    plain = _cell(kind, 3, 4, init=base, key=KEY)
    for name in ("weight_ih", "bias_ih", "bias_hh", "weight_hr"):
        assert tree_equal(getattr(cell, name, None), getattr(plain, name, None)), name
    assert not np.allclose(cell.weight_hh, plain.weight_hh)
    assert tree_equal(cell, _cell(kind, 3, 4, init=init, key=KEY))
    other = _cell(kind, 3, 4, init=init, key=jr.key(1))
    assert not np.allclose(cell.weight_hh, other.weight_hh)


def test_orthogonal_in_deep_and_bidirectional_stacks():
    """Every layer and direction gets its own orthogonal blocks, other weights as
    PyTorch's uniform draw."""
    init = stackrnn.OrthogonalInit()
    stack = stackrnn.GRU(3, 4, num_layers=4, init=init, bidirectional=True, key=KEY)
    plain = stackrnn.GRU(3, 4, num_layers=4, bidirectional=True, key=KEY)
    cells = stack.cells + stack.backward_cells
    for cell, same in zip(cells, plain.cells + plain.backward_cells):
        for q in _blocks(cell):
            np.testing.assert_allclose(q.T @ q, np.eye(4), atol=1e-5)
        assert tree_equal(
            (cell.weight_ih, cell.bias_ih, cell.bias_hh),
            (same.weight_ih, same.bias_ih, same.bias_hh),
        )
    hh = [np.asarray(c.weight_hh) for c in cells]
    assert all(not np.allclose(a, b) for i, a in enumerate(hh) for b in hh[i + 1 :])


def test_orthogonal_in_low_and_double_precision():
    init = stackrnn.OrthogonalInit(_zeros)
    cell = stackrnn.LSTMCell(3, 4, init=init, dtype=jnp.bfloat16, key=KEY)
    assert cell.weight_hh.dtype == jnp.bfloat16
    for q in _blocks(cell):
        np.testing.assert_allclose(q.T @ q, np.eye(4), atol=2e-2)
    with x64(True):
        cell = stackrnn.LSTMCell(3, 4, init=init, key=KEY)
        assert cell.weight_hh.dtype == jnp.float64
        for q in _blocks(cell):
            np.testing.assert_allclose(q.T @ q, np.eye(4), atol=1e-14)


@pytest.mark.parametrize(
    "init", [stackrnn.PyTorchInit(), stackrnn.NormalInit(0.1)], ids=["torch", "d2l"]
)
@pytest.mark.parametrize("proj_size", [0, 2])
def test_forget_bias_sets_the_forget_block_only(init, proj_size):
    """`bias_ih + bias_hh` is `forget_bias` on the forget block (i, f, g, o: rows
    `H:2H`), all of it on `bias_ih`; every other entry and parameter is the draw
    without `forget_bias`."""
    h = 4
    cell = stackrnn.LSTMCell(
        3, h, proj_size=proj_size, forget_bias=1.0, init=init, key=KEY
    )
    plain = stackrnn.LSTMCell(3, h, proj_size=proj_size, init=init, key=KEY)
    forget = slice(h, 2 * h)
    np.testing.assert_array_equal(cell.bias_ih[forget], np.ones(h))
    np.testing.assert_array_equal(cell.bias_hh[forget], np.zeros(h))
    keep = np.r_[0:h, 2 * h : 4 * h]
    for name in ("bias_ih", "bias_hh"):
        np.testing.assert_array_equal(
            getattr(cell, name)[keep], getattr(plain, name)[keep]
        )
    assert tree_equal(
        (cell.weight_ih, cell.weight_hh, cell.weight_hr),
        (plain.weight_ih, plain.weight_hh, plain.weight_hr),
    )


def test_forget_bias_in_every_cell_of_a_stack():
    stack = stackrnn.LSTM(
        3,
        [4, 5],
        num_layers=2,
        forget_bias=2,
        init=stackrnn.OrthogonalInit(),
        key=KEY,
    )
    for cell in stack.cells:
        h = cell.hidden_size
        total = cell.bias_ih + cell.bias_hh
        np.testing.assert_array_equal(total[h : 2 * h], np.full(h, 2.0))
        for q in _blocks(cell):
            np.testing.assert_allclose(q.T @ q, np.eye(h), atol=1e-5)


@pytest.mark.bit_exact
@pytest.mark.parametrize(
    "dtype, piece",
    [(dtype, 16) for dtype in DTYPES] + [("float32", None), ("bfloat16", None)],
)
def test_draws_are_the_saved_ones(dtype, piece, monkeypatch):
    """Every initialiser draws, for a key, the bits that the code drawing each
    parameter in one `jax.random` call saved in `tests/data/inits.npz`: drawn
    whole, and in pieces of 16 elements, as large parameters are drawn."""
    if piece is not None:
        monkeypatch.setattr(stackrnn._sample, "PIECE", piece)
    saved = np.load(DATA / "inits.npz")
    with x64(dtype == "float64"):
        for name, cell in cells(dtype).items():
            np.testing.assert_array_equal(
                cell_bytes(cell), saved[f"{dtype}/{name}"], err_msg=name
            )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_small_draws_are_jax_randoms(dtype):
    """A small array, cut from a draw at its size class, has `jax.random`'s numbers
    for its shape: the empty, a scalar, one under, at and over a size class, and
    a committed key, whose draw stays on the key's device."""
    shapes = [(0, 3), (), (7, 9), (8, 8), (5, 13), (1, 65)]
    keys = [KEY] * len(shapes) + [jax.device_put(KEY, jax.devices()[-1])]
    for shape, key in zip([*shapes, (2, 3)], keys):
        for sample, params in [
            (jr.uniform, dict(minval=-0.3, maxval=0.3)),
            (jr.normal, {}),
        ]:
            got = stackrnn._sample.draw(sample, key, shape, dtype, **params)
            want = sample(key, shape, dtype, **params)
            assert got.shape == want.shape and got.dtype == want.dtype
            assert got.committed == want.committed
            assert got.devices() == want.devices()
            np.testing.assert_array_equal(
                np.asarray(got).reshape(-1).view(np.uint16),
                np.asarray(want).reshape(-1).view(np.uint16),
            )


def test_pieces_count_past_two_to_the_32():
    """A piece hashes each element's 64-bit index, split into a high and a low
    word as JAX's partitionable threefry splits it, also where the low word
    wraps around within the piece or from one piece to the next."""
    data = jr.key_data(KEY)
    base, size = 2**32 - 40, 100
    bits = jax.jit(
        lambda d: stackrnn._sample._fill(jr.bits, d, size, jnp.uint32, (), 32, base)
    )(data)
    index = np.arange(base, base + size, dtype=np.uint64)
    words = [(index >> 32).astype(np.uint32), (index % 2**32).astype(np.uint32)]
    expected = jex_random.threefry2x32_p.bind(
        data[0], data[1], *map(jnp.asarray, words)
    )
    np.testing.assert_array_equal(bits, expected[0] ^ expected[1])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
def test_pieces_need_little_more_than_the_result(dtype):
    """A large draw in pieces holds the result and about a piece besides (one
    `jax.random.uniform` call holds three more arrays of the result's size)."""
    params = (("maxval", 1.0), ("minval", -1.0))
    lowered = stackrnn._sample._in_pieces.lower(
        jr.uniform, jr.key_data(KEY), (3000, 1000), dtype, params, 2**14
    )
    memory = lowered.compile().memory_analysis()
    assert memory.temp_size_in_bytes < 0.05 * memory.output_size_in_bytes
