"""Parameter initialisers for the recurrent cells.

An initialiser is a callable `init(key, shape, dtype, *, role, hidden_size)` that
returns one parameter array. `role` names the parameter in PyTorch's words
(`"weight_ih"`, `"weight_hh"`, `"bias_ih"`, `"bias_hh"`, `"weight_hr"`), so an
initialiser can treat recurrent weights or biases differently without knowing the
cell type.
"""

import dataclasses
import math
from typing import Literal, Protocol

import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray


Role = Literal["weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"]


class Initializer(Protocol):
    def __call__(
        self,
        key: PRNGKeyArray,
        shape: tuple[int, ...],
        dtype: jnp.dtype,
        *,
        role: Role,
        hidden_size: int,
    ) -> Array: ...


@dataclasses.dataclass(frozen=True)
class PyTorchInit:
    """PyTorch's initialisation of `nn.RNN`, `nn.GRU` and `nn.LSTM`: every parameter,
    weights and biases alike, drawn from U(-1/sqrt(hidden_size), 1/sqrt(hidden_size)).

    This is the default of every cell.
    """

    def __call__(self, key, shape, dtype, *, role, hidden_size):
        del role
        bound = 1.0 / math.sqrt(hidden_size)
        return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)


@dataclasses.dataclass(frozen=True)
class NormalInit:
    """d2l's from-scratch initialisation (`StackedRNNScratch`, `GRUScratch`): weights
    from N(0, sigma^2), biases zero.

    **Arguments:**

    - `sigma`: standard deviation of the weights. d2l uses 0.01.
    """

    sigma: float = 0.01

    def __post_init__(self):
        if not (isinstance(self.sigma, (int, float)) and self.sigma >= 0):
            raise ValueError(f"`sigma` must be a number >= 0, got {self.sigma!r}")

    def __call__(self, key, shape, dtype, *, role, hidden_size):
        del hidden_size
        if role.startswith("bias"):
            return jnp.zeros(shape, dtype)
        return self.sigma * jax.random.normal(key, shape, dtype)
