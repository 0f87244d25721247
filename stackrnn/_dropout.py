"""Inverted dropout, the one mask function every regulariser draws from."""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray


def dropout(
    x: Float[Array, "..."],
    p: float,
    key: PRNGKeyArray,
    *,
    shape: tuple[int, ...] | None = None,
) -> Float[Array, "..."]:
    """Inverted dropout: zeroes each element with probability `p` and scales the
    survivors by `1 / (1 - p)`, so the expectation is unchanged (PyTorch's and
    Equinox's convention). `p` must be in [0, 1). `shape` is the mask's shape,
    broadcast against `x` (default `x`'s): `(1, size)` drops the same units at every
    time step of a `(time, size)` sequence."""
    keep = jax.random.bernoulli(key, 1.0 - p, jnp.shape(x) if shape is None else shape)
    return jnp.where(keep, x / (1.0 - p), jnp.zeros((), x.dtype))
