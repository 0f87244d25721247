"""Layer-normalised GRU and LSTM cells (Ba, Kiros and Hinton, 2016).

Each projection is normalised as one vector over all its gates, as in the paper's
layer-normalised LSTM (its eqs. 20-22): `LN(W_hh h) + LN(W_ih x)`, then the cell's
gate arithmetic, and for the LSTM `tanh(LN(c'))` in place of `tanh(c')`. Here

    LN(a) = gain * (a - mean(a)) / sqrt(var(a) + eps) + shift

with the mean and variance over the entries of `a`, and a learnable `gain` (starting
at 1) and `shift` (starting at 0) per entry. The shifts play the biases' part, in the
biases' places: the shift of `LN(W_hh h)` is PyTorch's `bias_hh`, inside the GRU's
reset product `r * (...)`, the shift of `LN(W_ih x)` is `bias_ih`; the paper's extra
bias `b` would only add to them, so the cells have no `bias_ih` or `bias_hh`.

The cells keep the affine split of [`stackrnn.AbstractAffineCell`][]
(`gates_x = weight_ih @ x`, `gates_h = weight_hh @ output(state)`, the
normalisations inside `pointwise`), so code that works on that split works on them;
their gains and shifts keep them off the fast path, which handles only the four
affine parameters, so their layers always run on the reference path.
"""

import math

import equinox as eqx
import jax
from jaxtyping import Array, Float, PRNGKeyArray

from ._cells import AbstractLSTMStateCell, AbstractVectorStateCell
from ._checks import is_number
from ._gates import (
    check_forget_bias,
    check_proj_size,
    check_sizes,
    default_float,
    draw_params,
    draw_weight_hr,
    gru_update,
    lstm_update,
    with_forget_bias,
)
from ._init import Initializer, PyTorchInit


def _check_eps(eps) -> float:
    if not is_number(eps) or not 0 < eps < math.inf:
        raise ValueError(f"`eps` must be a finite number > 0, got {eps!r}")
    return float(eps)


def _norm(size, eps, bias, dtype) -> eqx.nn.LayerNorm:
    return eqx.nn.LayerNorm(size, eps=eps, use_bias=bias, dtype=dtype)


class LayerNormGRUCell(AbstractVectorStateCell):
    """Layer-normalised GRU: PyTorch's [`stackrnn.GRUCell`][] with each projection
    normalised over its three gates (Ba et al., 2016). Gates in the order r, z, n:

    ```
    x_r, x_z, x_n = split(LN_ih(W_ih x))
    h_r, h_z, h_n = split(LN_hh(W_hh h))
    r  = sigmoid(x_r + h_r)
    z  = sigmoid(x_z + h_z)
    n  = tanh(x_n + r * h_n)
    h' = (1 - z) * n + z * h
    ```

    `LN(a) = gain * (a - mean(a)) / sqrt(var(a) + eps) + shift`, with mean and
    variance over all `3 * hidden_size` entries. `norm_ih` and `norm_hh` are
    `equinox.nn.LayerNorm`s holding the gains (`weight`, starting at 1) and shifts
    (`bias`, starting at 0); the shifts sit where `GRUCell`'s `bias_ih` and
    `bias_hh` do, so the cell has no other biases (`bias_ih` and `bias_hh` are
    `None`).

    Runs on the reference path only (see [`stackrnn.AbstractPath`][]).

    **Arguments:**

    - `input_size`: size of the input vector.
    - `hidden_size`: size of the hidden state.
    - `bias`: whether the normalisations have learnable shifts; without them the
      cell has no additive terms at all. (Keyword only argument.)
    - `eps`: added to the variance, a number > 0. (Keyword only argument.)
    - `init`: the initialiser of `weight_ih` and `weight_hh`, default
      [`stackrnn.PyTorchInit`][]; a cell built with the same `key` and `init` as a
      `GRUCell` has the same weights. (Keyword only argument.)
    - `dtype`: parameter dtype; float32 unless JAX's x64 mode is on. Below single
      precision the normalisation itself is computed in float32.
      (Keyword only argument.)
    - `key`: a `jax.random.PRNGKey` for the weights. (Keyword only argument.)
    """

    weight_ih: Float[Array, "3*hidden input"]
    weight_hh: Float[Array, "3*hidden hidden"]
    bias_ih: None
    bias_hh: None
    norm_ih: eqx.nn.LayerNorm
    norm_hh: eqx.nn.LayerNorm
    input_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        bias: bool = True,
        eps: float = 1e-5,
        init: Initializer = PyTorchInit(),
        dtype=None,
        key: PRNGKeyArray,
    ):
        input_size, hidden_size = check_sizes(input_size, hidden_size, key)
        eps = _check_eps(eps)
        dtype = default_float() if dtype is None else dtype
        h = hidden_size
        self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh = draw_params(
            init, key, dtype, h, 3, input_size, h, bias=False
        )
        self.norm_ih = _norm(3 * h, eps, bias, dtype)
        self.norm_hh = _norm(3 * h, eps, bias, dtype)
        self.input_size = input_size
        self.hidden_size = hidden_size

    def pointwise(self, gates_x, gates_h, state):
        return gru_update(self.norm_ih(gates_x), self.norm_hh(gates_h), state)


class LayerNormLSTMCell(AbstractLSTMStateCell):
    """Layer-normalised LSTM, eqs. 20-22 of Ba et al. (2016) in PyTorch's layout:
    gates in the order i, f, g, o,

    ```
    i, f, g, o = split(LN_ih(W_ih x) + LN_hh(W_hh h))
    c' = sigmoid(f) * c + sigmoid(i) * tanh(g)
    h' = sigmoid(o) * tanh(LN_c(c'))       # then h' = W_hr h' when proj_size > 0
    ```

    `LN(a) = gain * (a - mean(a)) / sqrt(var(a) + eps) + shift`, with mean and
    variance over all entries: `4 * hidden_size` for `LN_ih` and `LN_hh`,
    `hidden_size` for `LN_c`. `norm_ih`, `norm_hh` and `norm_c` are
    `equinox.nn.LayerNorm`s holding the gains (`weight`, starting at 1) and shifts
    (`bias`, starting at 0). The two projections' shifts play `LSTMCell`'s
    `bias_ih` and `bias_hh`, so the cell has no other biases (`bias_ih` and
    `bias_hh` are `None`). The memory `c` itself stays unnormalised in the state.

    Runs on the reference path only (see [`stackrnn.AbstractPath`][]).

    **Arguments:** as [`stackrnn.LayerNormGRUCell`][], plus

    - `proj_size`: size of the projected hidden state `h`; 0 (default) for none.
      (Keyword only argument.)
    - `forget_bias`: if a number, the forget block of `norm_ih`'s shift
      (`norm_ih.bias[hidden_size:2*hidden_size]`) starts at this value instead of 0,
      so the forget gate starts mostly open. Needs `bias=True`.
      (Keyword only argument.)
    """

    weight_ih: Float[Array, "4*hidden input"]
    weight_hh: Float[Array, "4*hidden output"]
    bias_ih: None
    bias_hh: None
    norm_ih: eqx.nn.LayerNorm
    norm_hh: eqx.nn.LayerNorm
    norm_c: eqx.nn.LayerNorm
    weight_hr: Float[Array, "output hidden"] | None
    input_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)
    proj_size: int = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        proj_size: int = 0,
        bias: bool = True,
        forget_bias: float | None = None,
        eps: float = 1e-5,
        init: Initializer = PyTorchInit(),
        dtype=None,
        key: PRNGKeyArray,
    ):
        input_size, hidden_size = check_sizes(input_size, hidden_size, key)
        proj_size = check_proj_size(proj_size, hidden_size)
        check_forget_bias(forget_bias, bias)
        eps = _check_eps(eps)
        dtype = default_float() if dtype is None else dtype
        h = hidden_size
        key, proj_key = jax.random.split(key)
        self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh = draw_params(
            init, key, dtype, h, 4, input_size, proj_size or h, bias=False
        )
        self.weight_hr = draw_weight_hr(init, proj_key, dtype, h, proj_size)
        norm_ih, norm_hh = (
            _norm(4 * h, eps, bias, dtype),
            _norm(4 * h, eps, bias, dtype),
        )
        if bias:
            shifts = with_forget_bias(norm_ih.bias, norm_hh.bias, h, forget_bias)
            norm_ih, norm_hh = eqx.tree_at(
                lambda norms: (norms[0].bias, norms[1].bias), (norm_ih, norm_hh), shifts
            )
        self.norm_ih, self.norm_hh = norm_ih, norm_hh
        self.norm_c = _norm(h, eps, bias, dtype)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.proj_size = proj_size

    def pointwise(self, gates_x, gates_h, state):
        gates = self.norm_ih(gates_x) + self.norm_hh(gates_h)
        return lstm_update(gates, state, self.weight_hr, squash=self.norm_c)
