"""Recurrent cells: one time step of one layer, for one example.

Parameters, shapes, gate order and initialisation follow PyTorch's `nn.RNN`, `nn.GRU`
and `nn.LSTM` exactly, so weights move between the two without reshuffling.

Each cell splits its step in two: `project_input` (the part that reads only the input,
`weight_ih @ x + bias_ih`) and `recur` (the rest). `__call__` is their composition; a
layer can instead project every time step at once and scan only `recur`.
"""

import abc
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._checks import check_like, check_vector
from ._gates import (
    affine,
    check_forget_bias,
    check_proj_size,
    check_sizes,
    default_float,
    draw_params,
    draw_weight_hr,
    gru_update,
    lstm_update,
    tanh,
    with_forget_bias,
)
from ._init import Initializer, PyTorchInit


State = (
    Float[Array, " hidden"] | tuple[Float[Array, " output"], Float[Array, " hidden"]]
)


class AbstractCell(eqx.Module):
    """The contract every recurrent cell keeps.

    A cell computes one time step for one example: `new_state = cell(x, state)`, and
    `cell.output(state)` is what the next layer (or the readout) reads. A cell is split
    into `project_input(x)`, which reads only the input, and `recur(gates_x, state)`, so
    a layer can hoist the input projection of every time step out of the time loop.

    Before a layer reads a sequence it asks its cell for the cell to run on it,
    `for_sequence`: a plain cell runs itself; a wrapper cell (see
    [`stackrnn.AbstractWrappedCell`][]) draws its masks for the sequence there.
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

    def for_sequence(
        self,
        xs: Float[Array, "time input"],
        *,
        key: PRNGKeyArray | None,
        inference: bool,
        start: Int[Array, ""] | None = None,
        streaming: bool = False,
    ) -> tuple["AbstractCell", Float[Array, "time _"]]:
        """The cell a layer runs over the sequence `xs`, and the inputs it reads.

        A plain cell returns `(self, xs)`. A wrapper cell draws its masks here, once
        per sequence, from `key`, and returns a cell that applies them; masks that
        change from step to step may travel with the inputs (appended to `xs`, read
        back by the returned cell).

        **Arguments:**

        - `xs`: the sequence the layer reads, shape `(time, input_size)`.
        - `key`: this cell's key for the sequence, `None` when the caller has none;
          a cell that needs one in training raises a `RuntimeError`.
          (Keyword only argument.)
        - `inference`: if `True`, no masks: the cell to run at inference.
          (Keyword only argument.)
        - `start`: when `xs` is one chunk of a longer (checkpointed) sequence, the
          chunk's first step; per-step masks are then drawn from the key folded
          with it, per-sequence masks from the key itself. (Keyword only argument.)
        - `streaming`: `True` when `xs` is a single step fed to
          [`stackrnn.StackedRNN.step`][], whose key changes at every step: a
          wrapper that holds one mask per sequence raises a `ValueError` in
          training. (Keyword only argument.)

        **Returns:**

        `(cell, xs)`: the cell to run, and the inputs it reads.
        """
        del key, inference, start, streaming
        return self, xs

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

    def project_input(self, x):
        return affine(self.weight_ih, x, self.bias_ih)

    def recur(self, gates_x, state):
        h = self.output(state)
        gates_h = affine(self.weight_hh, h, self.bias_hh)
        return self.pointwise(gates_x, gates_h, state)


class AbstractVectorStateCell(AbstractAffineCell):
    """An affine cell whose state is one vector of `hidden_size`, which is also its
    output (Elman and GRU cells)."""

    @property
    def output_size(self) -> int:
        return self.hidden_size

    def init_state(self) -> Float[Array, " hidden"]:
        return jnp.zeros((self.hidden_size,), self.weight_hh.dtype)

    def output(self, state):
        return state


class AbstractLSTMStateCell(AbstractAffineCell):
    """An affine cell whose state is an LSTM's `(h, c)`: `h` of `proj_size` entries
    when `proj_size > 0`, else `hidden_size`, and the memory `c` of `hidden_size`;
    its output is `h`."""

    proj_size: eqx.AbstractVar[int]

    @property
    def output_size(self) -> int:
        return self.proj_size or self.hidden_size

    def init_state(self) -> tuple[Float[Array, " output"], Float[Array, " hidden"]]:
        dtype = self.weight_hh.dtype
        return (
            jnp.zeros((self.output_size,), dtype),
            jnp.zeros((self.hidden_size,), dtype),
        )

    def output(self, state):
        return state[0]


class ElmanCell(AbstractVectorStateCell):
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
        input_size, hidden_size = check_sizes(input_size, hidden_size, key)
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(
                f'`nonlinearity` must be "tanh" or "relu", got {nonlinearity!r}'
            )
        dtype = default_float() if dtype is None else dtype
        self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh = draw_params(
            init, key, dtype, hidden_size, 1, input_size, hidden_size, bias
        )
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.nonlinearity = nonlinearity

    def pointwise(self, gates_x, gates_h, state):
        pre = gates_x + gates_h
        return tanh(pre) if self.nonlinearity == "tanh" else jax.nn.relu(pre)


class GRUCell(AbstractVectorStateCell):
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
        input_size, hidden_size = check_sizes(input_size, hidden_size, key)
        dtype = default_float() if dtype is None else dtype
        self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh = draw_params(
            init, key, dtype, hidden_size, 3, input_size, hidden_size, bias
        )
        self.input_size = input_size
        self.hidden_size = hidden_size

    def pointwise(self, gates_x, gates_h, state):
        return gru_update(gates_x, gates_h, state)


class LSTMCell(AbstractLSTMStateCell):
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
        input_size, hidden_size = check_sizes(input_size, hidden_size, key)
        proj_size = check_proj_size(proj_size, hidden_size)
        check_forget_bias(forget_bias, bias)
        dtype = default_float() if dtype is None else dtype
        key, proj_key = jax.random.split(key)
        weight_ih, weight_hh, bias_ih, bias_hh = draw_params(
            init, key, dtype, hidden_size, 4, input_size, proj_size or hidden_size, bias
        )
        if bias:
            bias_ih, bias_hh = with_forget_bias(
                bias_ih, bias_hh, hidden_size, forget_bias
            )
        self.weight_ih, self.weight_hh = weight_ih, weight_hh
        self.bias_ih, self.bias_hh = bias_ih, bias_hh
        self.weight_hr = draw_weight_hr(init, proj_key, dtype, hidden_size, proj_size)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.proj_size = proj_size

    def pointwise(self, gates_x, gates_h, state):
        return lstm_update(gates_x + gates_h, state, self.weight_hr)
