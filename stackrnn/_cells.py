"""Recurrent cells: one time step of one layer, for one example.

Parameters, shapes, gate order and initialisation follow PyTorch's `nn.RNN`, `nn.GRU`
and `nn.LSTM` exactly, so weights move between the two without reshuffling.

Each cell splits its step in two: `project_input` (the part that reads only the input,
`weight_ih @ x + bias_ih`) and `recur` (the rest). `__call__` is their composition; a
layer can instead project every time step at once and scan only `recur`.
"""

import abc
import math
from typing import ClassVar, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ._checks import check_key, check_like, check_size, check_vector, is_number
from ._init import Initializer, PyTorchInit


State = (
    Float[Array, " hidden"] | tuple[Float[Array, " output"], Float[Array, " hidden"]]
)


def _default_float():
    # float64 when the user enabled x64, else float32 (as Equinox's layers do).
    return jax.dtypes.canonicalize_dtype(jnp.float64)


class AbstractCell(eqx.Module):
    """The contract every recurrent cell keeps.

    A cell computes one time step for one example: `new_state = cell(x, state)`, and
    `cell.output(state)` is what the next layer (or the readout) reads. A cell is split
    into `project_input(x)`, which reads only the input, and `recur(gates_x, state)`, so
    a layer can hoist the input projection of every time step out of the time loop.
    """

    input_size: eqx.AbstractVar[int]
    hidden_size: eqx.AbstractVar[int]

    @property
    @abc.abstractmethod
    def output_size(self) -> int:
        """Size of `output(state)`: what the next layer reads."""

    @abc.abstractmethod
    def init_state(self) -> State:
        """The all-zero state, PyTorch's default initial state."""

    @abc.abstractmethod
    def project_input(self, x: Float[Array, " input"]) -> Float[Array, " gates"]:
        """`weight_ih @ x + bias_ih`: the part of a step that reads only the input."""

    @abc.abstractmethod
    def recur(self, gates_x: Float[Array, " gates"], state: State) -> State:
        """The rest of a step, given `project_input(x)`."""

    @abc.abstractmethod
    def output(self, state: State) -> Float[Array, " output"]:
        """The layer's output at a step, read from its state."""

    def __call__(self, x: Float[Array, " input"], state: State) -> State:
        """One time step.

        **Arguments:**

        - `x`: the input, a JAX array of shape `(input_size,)`.
        - `state`: the previous state, structured as `init_state()`.

        **Returns:**

        The new state, structured as `init_state()`.
        """
        fresh = self.init_state()
        check_vector("x", x, self.input_size, jax.tree.leaves(fresh)[0].dtype)
        check_like("state", state, fresh)
        return self.recur(self.project_input(x), state)


class AbstractAffineCell(AbstractCell):
    """A cell whose step reads the input and the previous output only through two
    affine maps, `gates_x = weight_ih @ x + bias_ih` and
    `gates_h = weight_hh @ output(state) + bias_hh`, combined by an elementwise
    `pointwise(gates_x, gates_h, state)`.

    Elman, GRU and LSTM cells are of this kind. A layer of such a cell, with no
    parameters beyond those four, runs on the fast path: both projections and their
    weight gradients become single matrix products over all time steps. The
    layer-normalised cells are of this kind too (without biases, their normalisations
    inside `pointwise`), but their gains and shifts keep them on the reference path.
    """

    weight_ih: eqx.AbstractVar[Array]
    weight_hh: eqx.AbstractVar[Array]
    bias_ih: eqx.AbstractVar[Array | None]
    bias_hh: eqx.AbstractVar[Array | None]

    @abc.abstractmethod
    def pointwise(
        self, gates_x: Float[Array, " gates"], gates_h: Float[Array, " gates"], state
    ) -> State:
        """The new state from the two projections and the previous state."""

    # Whether the affine maps are written `x @ weight.T` rather than `weight @ x`:
    # the same products, which XLA:CPU compiles differently under `jax.vmap`.
    _input_first: ClassVar[bool] = False

    def project_input(self, x):
        return _affine(self.weight_ih, x, self.bias_ih, self._input_first)

    def recur(self, gates_x, state):
        h = self.output(state)
        gates_h = _affine(self.weight_hh, h, self.bias_hh, self._input_first)
        return self.pointwise(gates_x, gates_h, state)


def _params(init, key, dtype, hidden_size, shapes, bias):
    """Draws PyTorch's parameters in PyTorch's order, as `(name, value)` pairs;
    `None` for absent biases."""
    roles = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    for role, k in zip(roles, jax.random.split(key, len(roles))):
        if role.startswith("bias") and not bias:
            yield role, None
        else:
            yield role, init(k, shapes[role], dtype, role=role, hidden_size=hidden_size)


def _affine(weight, x, bias, input_first=False):
    y = x @ weight.T if input_first else weight @ x
    return y if bias is None else y + bias


def _weight_hr(init, key, dtype, hidden_size, proj_size):
    """An LSTM's projection `weight_hr`, or `None` when `proj_size` is 0. Drawn from
    its own key, split off before the other parameters'."""
    if not proj_size:
        return None
    shape = (proj_size, hidden_size)
    return init(key, shape, dtype, role="weight_hr", hidden_size=hidden_size)


def _gru_gates(gates_x, gates_h, h):
    """The GRU's new state, and the gates `r`, `z`, `n` and the projection `h_n`
    that its derivative reads."""
    x_r, x_z, x_n = jnp.split(gates_x, 3)
    h_r, h_z, h_n = jnp.split(gates_h, 3)
    r = jax.nn.sigmoid(x_r + h_r)
    z = jax.nn.sigmoid(x_z + h_z)
    n = jnp.tanh(x_n + r * h_n)
    return (1 - z) * n + z * h, (r, z, n, h_n)


@jax.custom_jvp
def _gru_update(gates_x, gates_h, h):
    """PyTorch's GRU update from the two projections, each split r, z, n.

    The derivative is written out so that reverse mode keeps four arrays per step
    (`r`, `z`, `n`, `h_n`; `h` is kept for `weight_hh`'s gradient anyway) where
    differentiating the formula kept eight (`1 - z`, `z * (1 - z)`, ...). A layer's
    scan stacks every kept array over time; at small widths writing those stacks
    cost more than the arithmetic (the Time Machine experiment's epoch, 2 x 32 GRU:
    about 10 % faster)."""
    return _gru_gates(gates_x, gates_h, h)[0]


@_gru_update.defjvp
def _gru_update_jvp(primals, tangents):
    gates_x, gates_h, h = primals
    d_gates_x, d_gates_h, d_h = tangents
    new, (r, z, n, h_n) = _gru_gates(gates_x, gates_h, h)
    dx_r, dx_z, dx_n = jnp.split(d_gates_x, 3)
    dh_r, dh_z, dh_n = jnp.split(d_gates_h, 3)
    # s' = s (1 - s) and tanh' = 1 - n^2, written as products of the tangent with the
    # kept arrays alone: `1 - s` or `h - n` would each be kept as one more array.
    a = (dx_r + dh_r) * r
    d_r = a - a * r
    b = (dx_z + dh_z) * z
    d_z = b - b * z
    c = dx_n + d_r * h_n + r * dh_n
    d_n = c - c * n * n
    return new, d_n - z * d_n + z * d_h + h * d_z - n * d_z


@jax.custom_jvp
def _sigmoid(x):
    """`jax.nn.sigmoid`, whose derivative keeps only its output for the backward pass.

    JAX's own derivative, `s * (1 - s)`, keeps `1 - s` as well. A layer's scan stacks
    every kept array over time, and at small widths writing those stacks costs more
    than the arithmetic (see `_gru_update`). With `_tanh`, an LSTM step keeps 6 arrays
    instead of 11 (2 x 32 LSTM forward and backward: about 15 % faster) and a tanh
    Elman step 1 instead of 2 (about 10 %)."""
    return jax.nn.sigmoid(x)


@_sigmoid.defjvp
def _sigmoid_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    s = jax.nn.sigmoid(x)
    # s' = s (1 - s), as products of the tangent with `s` alone.
    a = dx * s
    return s, a - a * s


@jax.custom_jvp
def _tanh(x):
    """`jnp.tanh`, whose derivative keeps only its output for the backward pass (JAX's
    keeps `1 - tanh(x)` as well; see `_sigmoid`)."""
    return jnp.tanh(x)


@_tanh.defjvp
def _tanh_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    t = jnp.tanh(x)
    return t, dx - dx * t * t


def _lstm_memory(gates, c):
    """The LSTM's new memory `c'` and output gate, from the summed gate
    pre-activations in the order i, f, g, o."""
    i, f, g, o = jnp.split(gates, 4)
    c = _sigmoid(f) * c + _sigmoid(i) * _tanh(g)
    return c, _sigmoid(o)


def _check_config(input_size, hidden_size, key):
    check_key("key", key)
    return check_size("input_size", input_size), check_size("hidden_size", hidden_size)


def _check_proj_size(proj_size, hidden_size):
    proj_size = check_size("proj_size", proj_size, minimum=0)
    if proj_size >= hidden_size:
        raise ValueError(
            f"`proj_size` (={proj_size}) must be smaller than `hidden_size` "
            f"(={hidden_size})"
        )
    return proj_size


def _check_forget_bias(forget_bias, bias):
    if forget_bias is None:
        return
    if not is_number(forget_bias) or not math.isfinite(forget_bias):
        raise ValueError(
            f"`forget_bias` must be a finite number or None, got {forget_bias!r}"
        )
    if not bias:
        raise ValueError(
            f"`forget_bias` (={forget_bias!r}) needs biases, but `bias` is False"
        )


def _with_forget_bias(bias_ih, bias_hh, hidden_size, forget_bias):
    """Sets the forget gate's block (rows `hidden_size:2*hidden_size` in the order
    i, f, g, o) so that `bias_ih + bias_hh` there equals `forget_bias`: all of it on
    `bias_ih`, zero on `bias_hh`. Unchanged if `forget_bias` is None."""
    if forget_bias is None:
        return bias_ih, bias_hh
    forget = slice(hidden_size, 2 * hidden_size)
    return bias_ih.at[forget].set(forget_bias), bias_hh.at[forget].set(0)


class ElmanCell(AbstractAffineCell):
    """Elman cell, PyTorch's `nn.RNNCell`:
    `h' = phi(W_ih x + b_ih + W_hh h + b_hh)` with `phi` tanh or relu.

    **Arguments:**

    - `input_size`: size of the input vector.
    - `hidden_size`: size of the hidden state.
    - `nonlinearity`: `"tanh"` (default) or `"relu"`. (Keyword only argument.)
    - `bias`: whether to use `bias_ih` and `bias_hh`. (Keyword only argument.)
    - `init`: the initialiser, default [`stackrnn.PyTorchInit`][].
      (Keyword only argument.)
    - `dtype`: parameter dtype; float32 unless JAX's x64 mode is on.
      (Keyword only argument.)
    - `key`: a `jax.random.PRNGKey` for the parameters. (Keyword only argument.)
    """

    weight_ih: Float[Array, "hidden input"]
    weight_hh: Float[Array, "hidden hidden"]
    bias_ih: Float[Array, " hidden"] | None
    bias_hh: Float[Array, " hidden"] | None
    input_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)
    nonlinearity: Literal["tanh", "relu"] = eqx.field(static=True)

    # Under `jax.vmap`, the mid-sized Elman stack of docs/benchmarks.md ran its
    # forward and backward pass 1.13x faster with `x @ W^T` than with `W @ x` (the
    # other sizes and the forward pass alone: within noise); the GRU and the LSTM
    # were not faster with it.
    _input_first: ClassVar[bool] = True

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        nonlinearity: Literal["tanh", "relu"] = "tanh",
        bias: bool = True,
        init: Initializer = PyTorchInit(),
        dtype=None,
        key: PRNGKeyArray,
    ):
        input_size, hidden_size = _check_config(input_size, hidden_size, key)
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(
                f'`nonlinearity` must be "tanh" or "relu", got {nonlinearity!r}'
            )
        dtype = _default_float() if dtype is None else dtype
        h, i = hidden_size, input_size
        shapes = dict(weight_ih=(h, i), weight_hh=(h, h), bias_ih=(h,), bias_hh=(h,))
        for name, value in _params(init, key, dtype, hidden_size, shapes, bias):
            setattr(self, name, value)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.nonlinearity = nonlinearity

    @property
    def output_size(self) -> int:
        return self.hidden_size

    def init_state(self) -> Float[Array, " hidden"]:
        return jnp.zeros((self.hidden_size,), self.weight_hh.dtype)

    def pointwise(self, gates_x, gates_h, state):
        pre = gates_x + gates_h
        return _tanh(pre) if self.nonlinearity == "tanh" else jax.nn.relu(pre)

    def output(self, state):
        return state


class GRUCell(AbstractAffineCell):
    """Gated recurrent unit, PyTorch's `nn.GRUCell`. Gates in the order r, z, n:

    ```
    r  = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
    z  = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
    n  = tanh(W_in x + b_in + r * (W_hn h + b_hn))
    h' = (1 - z) * n + z * h
    ```

    `b_hn` sits inside the reset gate's product, as in PyTorch (and unlike the original
    paper), which is why `bias_hh` is kept apart from `bias_ih`.

    **Arguments:** as [`stackrnn.ElmanCell`][] without `nonlinearity`.
    """

    weight_ih: Float[Array, "3*hidden input"]
    weight_hh: Float[Array, "3*hidden hidden"]
    bias_ih: Float[Array, " 3*hidden"] | None
    bias_hh: Float[Array, " 3*hidden"] | None
    input_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        bias: bool = True,
        init: Initializer = PyTorchInit(),
        dtype=None,
        key: PRNGKeyArray,
    ):
        input_size, hidden_size = _check_config(input_size, hidden_size, key)
        dtype = _default_float() if dtype is None else dtype
        h, i = hidden_size, input_size
        shapes = dict(
            weight_ih=(3 * h, i),
            weight_hh=(3 * h, h),
            bias_ih=(3 * h,),
            bias_hh=(3 * h,),
        )
        for name, value in _params(init, key, dtype, hidden_size, shapes, bias):
            setattr(self, name, value)
        self.input_size = input_size
        self.hidden_size = hidden_size

    @property
    def output_size(self) -> int:
        return self.hidden_size

    def init_state(self) -> Float[Array, " hidden"]:
        return jnp.zeros((self.hidden_size,), self.weight_hh.dtype)

    def pointwise(self, gates_x, gates_h, state):
        return _gru_update(gates_x, gates_h, state)

    def output(self, state):
        return state


class LSTMCell(AbstractAffineCell):
    """Long short-term memory, PyTorch's `nn.LSTM` step. Gates in the order i, f, g, o:

    ```
    i, f, g, o = split(W_ih x + b_ih + W_hh h + b_hh)
    c' = sigmoid(f) * c + sigmoid(i) * tanh(g)
    h' = sigmoid(o) * tanh(c')            # then h' = W_hr h' when proj_size > 0
    ```

    The state is the tuple `(h, c)`; `h` has `proj_size` entries when `proj_size > 0`
    (PyTorch's LSTM with projections), else `hidden_size`.

    **Arguments:** as [`stackrnn.GRUCell`][], plus

    - `proj_size`: size of the projected hidden state `h`; 0 (default) for none.
      (Keyword only argument.)
    - `forget_bias`: if a number, the forget gate's bias `b_if + b_hf` starts at this
      value instead of the initialiser's draw: `bias_ih[hidden_size:2*hidden_size]`
      holds it and `bias_hh`'s forget block is zero (Jozefowicz et al., 2015,
      recommend 1). `None` (default) leaves the draw. Needs `bias=True`.
      (Keyword only argument.)
    """

    weight_ih: Float[Array, "4*hidden input"]
    weight_hh: Float[Array, "4*hidden output"]
    bias_ih: Float[Array, " 4*hidden"] | None
    bias_hh: Float[Array, " 4*hidden"] | None
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
        init: Initializer = PyTorchInit(),
        dtype=None,
        key: PRNGKeyArray,
    ):
        input_size, hidden_size = _check_config(input_size, hidden_size, key)
        proj_size = _check_proj_size(proj_size, hidden_size)
        _check_forget_bias(forget_bias, bias)
        dtype = _default_float() if dtype is None else dtype
        h, i = hidden_size, input_size
        out = proj_size or hidden_size
        shapes = dict(
            weight_ih=(4 * h, i),
            weight_hh=(4 * h, out),
            bias_ih=(4 * h,),
            bias_hh=(4 * h,),
        )
        key, proj_key = jax.random.split(key)
        for name, value in _params(init, key, dtype, hidden_size, shapes, bias):
            setattr(self, name, value)
        if bias:
            self.bias_ih, self.bias_hh = _with_forget_bias(
                self.bias_ih, self.bias_hh, hidden_size, forget_bias
            )
        self.weight_hr = _weight_hr(init, proj_key, dtype, hidden_size, proj_size)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.proj_size = proj_size

    @property
    def output_size(self) -> int:
        return self.proj_size or self.hidden_size

    def init_state(self) -> tuple[Float[Array, " output"], Float[Array, " hidden"]]:
        dtype = self.weight_hh.dtype
        return (
            jnp.zeros((self.output_size,), dtype),
            jnp.zeros((self.hidden_size,), dtype),
        )

    def pointwise(self, gates_x, gates_h, state):
        _, c = state
        c, o = _lstm_memory(gates_x + gates_h, c)
        h = o * _tanh(c)
        if self.weight_hr is not None:
            h = self.weight_hr @ h
        return h, c

    def output(self, state):
        return state[0]
