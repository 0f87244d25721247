"""Large random arrays drawn piece by piece, with the numbers of one draw.

`jax.random.uniform(key, shape)` on the CPU holds about three more arrays of the
result's size while it runs (threefry's two words per element, carried by its loop,
and their mix), so a large weight matrix needed about four times its size to be
drawn. With JAX's partitionable threefry (its default), element `i` of a draw
depends only on the key and on `i`, and `jax.random`'s samplers turn each element's
bits into its value on their own. So a draw can run over pieces of `PIECE`
elements, each written into the result in place: the same numbers, in memory for
the result and a piece. An orthogonal draw also takes its QR one gate block at a
time.

A small array is drawn flat at its size class, the power of two at or above its
size, and cut to its shape on the host: the same numbers again, by one compiled
program per size class and dtype, where `jax.random` compiles one per shape (so
building a model eagerly compiles a few draws, not one per parameter shape).

Elsewhere (another PRNG, `jax_threefry_partitionable` off, a key under a
transform), the array is drawn in one call, as `jax.random` draws it.
"""

import functools
import math

import jax
import jax.extend.random as jex_random
import jax.numpy as jnp
import numpy as np


PIECE = 2**18
SMALLEST_CLASS = 2**6


def _unsupported(*args):
    raise NotImplementedError("a piece's key only draws bits")


def _piece_bits(key_data, bit_width, shape):
    # `key_data` is a threefry key and the index of the piece's first element as
    # two words (high, low); threefry then hashes each element's 64-bit index, split
    # the same way, as JAX's partitionable threefry does for the whole array.
    k1, k2, high, low = key_data
    count_low = low + jax.lax.iota(np.uint32, math.prod(shape)).reshape(shape)
    count_high = high + (count_low < low).astype(np.uint32)
    bits1, bits2 = jex_random.threefry2x32_p.bind(k1, k2, count_high, count_low)
    dtype = np.dtype(f"uint{bit_width}")
    if bit_width == 64:
        high_bits = jax.lax.convert_element_type(bits1, dtype)
        low_bits = jax.lax.convert_element_type(bits2, dtype)
        return jax.lax.shift_left(high_bits, jnp.asarray(32, dtype)) | low_bits
    return jax.lax.convert_element_type(bits1 ^ bits2, dtype)


_PIECE_IMPL = jex_random.define_prng_impl(
    key_shape=(4,),
    seed=_unsupported,
    split=_unsupported,
    random_bits=_piece_bits,
    fold_in=_unsupported,
    name="stackrnn_threefry_piece",
    tag="piece",
)


def _partitionable(key) -> bool:
    """Whether element `i` of a draw from `key` depends on the key and `i` alone,
    and the key is a concrete array."""
    return (
        not isinstance(key, jax.core.Tracer)
        and jax.config.jax_threefry_partitionable
        and str(jax.random.key_impl(key)) == "threefry2x32"
    )


def _size_class(size: int) -> int:
    return max(SMALLEST_CLASS, 1 << (size - 1).bit_length())


def _cut(flat, shape):
    """The first `prod(shape)` elements of `flat`, in `shape`, placed as `flat` is
    (a draw from one key is replicated, so its placement fits any shape): cut on the
    host, as a cut on the device compiles a program per shape."""
    host = np.asarray(flat)[: math.prod(shape)].reshape(shape)
    # `jax.device_put`, as `jnp.asarray` compiles a copy per shape.
    return jax.device_put(host, flat.sharding if flat.committed else None)


def _stored(dtype):
    # XLA:CPU widens a bfloat16 array to float32 and back for every piece written
    # into it, so bfloat16 pieces are stored as bits, at the price of one copy at
    # the end; other dtypes are written in place.
    return np.dtype(np.uint16) if np.dtype(dtype) == jnp.bfloat16 else np.dtype(dtype)


def _fill(sample, key_data, size, dtype, params, length, base=0):
    """Elements `base` to `base + size` of the flat draw `sample(key, ...)` of
    `key_data`'s key, drawn `length` (a power of two) at a time."""
    full, rest = divmod(size, length)
    shift = length.bit_length() - 1
    base_high, base_low = (np.uint32(w) for w in divmod(base, 2**32))

    def piece(i, n):
        i = jnp.asarray(i, np.uint32)
        # The piece's first index, `base + i * length`, as two 32-bit words.
        low = base_low + (i << shift)
        high = base_high + (i >> (32 - shift)) + (low < base_low).astype(np.uint32)
        words = jnp.concatenate([key_data, jnp.stack([high, low])])
        key = jax.random.wrap_key_data(words, impl=_PIECE_IMPL)
        # Computed as in one draw, then stored: nothing fuses across a piece's end.
        values = jax.lax.optimization_barrier(sample(key, (n,), dtype, **dict(params)))
        return jax.lax.bitcast_convert_type(values, store)

    def body(i, out):
        return jax.lax.dynamic_update_slice(out, piece(i, length), (i * length,))

    store = _stored(dtype)
    out = jnp.empty((size,), store)
    # The shorter last piece first: written after the loop, it made XLA copy the
    # whole array.
    if rest:
        out = jax.lax.dynamic_update_slice(out, piece(full, rest), (full * length,))
    if full:
        out = jax.lax.fori_loop(0, full, body, out)
    return jax.lax.bitcast_convert_type(out, dtype)


@functools.partial(jax.jit, static_argnums=(0, 2, 3, 4, 5))
def _in_pieces(sample, key_data, shape, dtype, params, length):
    return _fill(sample, key_data, math.prod(shape), dtype, params, length).reshape(
        shape
    )


def draw(sample, key, shape: tuple[int, ...], dtype, **params):
    """`sample(key, shape, dtype, **params)`: cut from a draw at its size class where
    it is small, in pieces where it is large.

    `sample` is a `jax.random` sampler, or a function of one, whose every element
    is computed from that element's bits alone (`uniform`, `normal`, times a
    number); `params` are Python numbers (static, so that they convert to `dtype`
    as they would outside `jax.jit`)."""
    size = math.prod(shape)
    if not _partitionable(key):
        return sample(key, shape, dtype, **params)
    if size <= PIECE:
        return _cut(sample(key, (_size_class(size),), dtype, **params), shape)
    data = jax.random.key_data(key)
    params = tuple(sorted(params.items()))
    return _in_pieces(sample, data, tuple(shape), dtype, params, PIECE)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6, 7))
def _orthogonal_in_pieces(key_data, n, m, blocks, work, gain, dtype, length):
    rows, cols = max(n, m), min(n, m)
    out = jnp.empty((blocks, n, m), _stored(dtype))
    for b in range(blocks):
        z = _fill(
            jax.random.normal, key_data, rows * cols, work, (), length, b * rows * cols
        )
        # `jax.random.orthogonal`'s steps, one block at a time.
        q, r = jnp.linalg.qr(z.reshape(rows, cols))
        x = q * jnp.expand_dims(jnp.sign(jnp.diagonal(r)), -2)
        x = x.T if n < m else x
        block = jax.lax.bitcast_convert_type((gain * x).astype(dtype), out.dtype)
        out = jax.lax.dynamic_update_slice(out, block[None], (b, 0, 0))
    return jax.lax.bitcast_convert_type(out, dtype)


def orthogonal(key, n: int, blocks: int, work, m: int, gain: float, dtype):
    """`(gain * jax.random.orthogonal(key, n, (blocks,), work, m)).astype(dtype)`,
    its normal draw in pieces and its QR one block at a time where it is large."""
    if blocks * n * m <= PIECE or not _partitionable(key):
        return (gain * jax.random.orthogonal(key, n, (blocks,), work, m)).astype(dtype)
    data = jax.random.key_data(key)
    return _orthogonal_in_pieces(data, n, m, blocks, work, gain, dtype, PIECE)
