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

from ._checks import is_number
from ._sample import draw, orthogonal


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
        return draw(jax.random.uniform, key, shape, dtype, minval=-bound, maxval=bound)


@dataclasses.dataclass(frozen=True)
class NormalInit:
    """d2l's from-scratch initialisation (`StackedRNNScratch`, `GRUScratch`): weights
    from N(0, sigma^2), biases zero.

    **Arguments:**

    - `sigma`: standard deviation of the weights. d2l uses 0.01.
    """

    sigma: float = 0.01

    def __post_init__(self):
        if not (is_number(self.sigma) and self.sigma >= 0):
            raise ValueError(f"`sigma` must be a number >= 0, got {self.sigma!r}")
        # A NumPy scalar would fix the weights' dtype under strict promotion.
        object.__setattr__(self, "sigma", float(self.sigma))

    def __call__(self, key, shape, dtype, *, role, hidden_size):
        del hidden_size
        if role.startswith("bias"):
            return jnp.zeros(shape, dtype)
        return draw(_scaled_normal, key, shape, dtype, sigma=self.sigma)


def _scaled_normal(key, shape, dtype, *, sigma):
    # The barrier keeps XLA from folding `sigma` into the normal's own factor
    # sqrt(2) when this runs inside `jax.jit`, which moves the last bit of some draws.
    return sigma * jax.lax.optimization_barrier(jax.random.normal(key, shape, dtype))


@dataclasses.dataclass(frozen=True)
class OrthogonalInit:
    """Orthogonal recurrent weights (Saxe et al., 2014): each gate's block of
    `weight_hh` (`hidden_size` rows: one block for Elman, r, z, n for GRU, i, f, g, o
    for LSTM) is drawn uniformly from the orthogonal matrices and times `gain`; every
    other parameter comes from `base`.

    Each block is orthogonal on its own, not the stacked matrix, since each gate
    reads the previous output through its own block. A block with fewer columns
    than rows (an LSTM with `proj_size`) gets orthonormal columns: `Q^T Q = I`.

    **Arguments:**

    - `base`: the initialiser of every parameter other than `weight_hh`, default
      [`stackrnn.PyTorchInit`][]. Its draws are the same as without
      `OrthogonalInit`, so only `weight_hh` changes.
    - `gain`: a number > 0 multiplying the orthogonal blocks.
    """

    base: Initializer = PyTorchInit()
    gain: float = 1.0

    def __post_init__(self):
        if not callable(self.base):
            raise TypeError(
                "`base` must be an initialiser, a callable "
                f"`init(key, shape, dtype, *, role, hidden_size)`, got {self.base!r}"
            )
        if not is_number(self.gain) or not 0 < self.gain < math.inf:
            raise ValueError(f"`gain` must be a finite number > 0, got {self.gain!r}")
        object.__setattr__(self, "gain", float(self.gain))

    def __call__(self, key, shape, dtype, *, role, hidden_size):
        if role != "weight_hh":
            return self.base(key, shape, dtype, role=role, hidden_size=hidden_size)
        rows, cols = shape
        if rows % hidden_size:
            raise ValueError(
                f"`weight_hh` of shape {shape} does not split into blocks of "
                f"`hidden_size` (={hidden_size}) rows"
            )
        # QR needs at least single precision; half-precision weights are cast after.
        work = dtype if jnp.dtype(dtype).itemsize >= 4 else jnp.float32
        blocks = orthogonal(
            key, hidden_size, rows // hidden_size, work, cols, self.gain, dtype
        )
        return blocks.reshape(shape)
