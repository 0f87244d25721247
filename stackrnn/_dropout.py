"""Dropout between the layers of a stack."""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray


def dropout(x: Float[Array, "..."], p: float, key: PRNGKeyArray) -> Float[Array, "..."]:
    """Inverted dropout: zeroes each element with probability `p` and scales the
    survivors by `1 / (1 - p)`, so the expectation is unchanged (PyTorch's and
    Equinox's convention). `p` must be in [0, 1)."""
    keep = jax.random.bernoulli(key, 1.0 - p, jnp.shape(x))
    return jnp.where(keep, x / (1.0 - p), jnp.zeros((), x.dtype))
