"""`StackedRNN`: a tuple of cells folded over layers, each layer scanned over time."""

import warnings
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from ._cells import AbstractCell, State
from ._checks import check_like, check_probability, check_sequence, check_size
from ._dropout import dropout as _dropout
from ._layer import run_layer


StackState = PyTree[Float[Array, "layers ..."]]


class StackedRNN(eqx.Module):
    """A deep recurrent network: layer `l` at time `t` reads layer `l-1` at time `t`
    and itself at time `t-1`,

    `H_t^(l) = cell_l(H_t^(l-1), H_{t-1}^(l))`, with `H_t^(0) = x_t`.

    The stack is a Python fold over its layers; each layer is a `jax.lax.scan` over
    time. Dropout is applied to the input of every layer but the first (so between
    layers, never to the top layer's output), only when `inference=False`.

    The module takes one sequence; batch with `jax.vmap`.

    **Arguments:**

    - `cells`: a non-empty sequence of cells (each an [`stackrnn.AbstractCell`][]),
      bottom first; each cell's `input_size` must equal the `output_size` of the cell
      below. Widths may differ between layers.
    - `dropout`: probability in [0, 1) of zeroing each input of layers 2..L during
      training. (Keyword only argument.)
    - `unroll`: passed to `jax.lax.scan` over time. (Keyword only argument.)
    - `inference`: the default of `__call__`'s `inference`; switch a whole model with
      `eqx.nn.inference_mode`. (Keyword only argument.)

    !!! example

        ```python
        import jax, jax.numpy as jnp, stackrnn

        rnn = stackrnn.GRU(28, 32, num_layers=2, key=jax.random.key(0))
        ys, state = rnn(jnp.ones((35, 28)))  # ys: (35, 32), state: (2, 32)
        ```
    """

    cells: tuple[AbstractCell, ...]
    dropout: float = eqx.field(static=True)
    unroll: int = eqx.field(static=True)
    inference: bool

    def __init__(
        self,
        cells: Sequence[AbstractCell],
        *,
        dropout: float = 0.0,
        unroll: int = 1,
        inference: bool = False,
    ):
        cells = tuple(cells)
        if not cells:
            raise ValueError("`cells` must hold at least one cell, got none")
        for i, cell in enumerate(cells):
            if not isinstance(cell, AbstractCell):
                raise TypeError(
                    f"`cells[{i}]` must be a stackrnn cell (an AbstractCell), "
                    f"got {type(cell).__name__}"
                )
        for i in range(1, len(cells)):
            if cells[i].input_size != cells[i - 1].output_size:
                raise ValueError(
                    f"`cells[{i}].input_size` (={cells[i].input_size}) must equal "
                    f"`cells[{i - 1}].output_size` (={cells[i - 1].output_size}), "
                    "since layer l reads the output of layer l-1"
                )
        self.dropout = check_probability("dropout", dropout)
        if self.dropout > 0 and len(cells) == 1:
            warnings.warn(
                f"`dropout` (={dropout}) has no effect with one layer: dropout acts "
                "between layers, never on the top layer's output",
                stacklevel=2,
            )
        self.unroll = check_size("unroll", unroll)
        self.cells = cells
        self.inference = inference

    @property
    def num_layers(self) -> int:
        return len(self.cells)

    @property
    def input_size(self) -> int:
        return self.cells[0].input_size

    @property
    def output_size(self) -> int:
        return self.cells[-1].output_size

    @property
    def _stackable(self) -> bool:
        # Layers whose states share shapes are stacked on a leading axis (L, H);
        # otherwise the state is a tuple with one entry per layer.
        shapes = [
            jax.tree.map(jnp.shape, jax.eval_shape(c.init_state)) for c in self.cells
        ]
        return all(s == shapes[0] for s in shapes)

    def _join(self, states: list[State]) -> StackState:
        if self._stackable:
            return jax.tree.map(lambda *xs: jnp.stack(xs), *states)
        return tuple(states)

    def _split(self, state: StackState) -> list[State]:
        if self._stackable:
            return [jax.tree.map(lambda s: s[i], state) for i in range(self.num_layers)]
        return list(state)

    def init_state(self) -> StackState:
        """Every layer's zero state: an array of shape `(num_layers, hidden_size)`
        (LSTM: a tuple `(h, c)` of such arrays) when all layers have the same state
        shapes, else a tuple with one state per layer."""
        return self._join([cell.init_state() for cell in self.cells])

    def __call__(
        self,
        xs: Float[Array, "time input"],
        state: StackState | None = None,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> tuple[Float[Array, "time output"], StackState]:
        """Runs the stack over one sequence.

        **Arguments:**

        - `xs`: the inputs, a JAX array of shape `(time, input_size)`.
        - `state`: the initial state, structured as `init_state()`; zeros if omitted.
        - `key`: a `jax.random.PRNGKey` for dropout; needed only when `dropout > 0`,
          `num_layers > 1` and `inference=False`. (Keyword only argument.)
        - `inference`: if `True`, no dropout; defaults to the module's `inference`.
          (Keyword only argument.)

        **Returns:**

        `(ys, final_state)`: the top layer's outputs, of shape `(time, output_size)`,
        and every layer's state after the last step, structured as `init_state()`.
        """
        check_sequence("xs", xs, self.input_size)
        if state is None:
            state = self.init_state()
        else:
            check_like("state", state, self.init_state())
        if inference is None:
            inference = self.inference
        use_dropout = self.dropout > 0 and not inference and self.num_layers > 1
        if use_dropout and key is None:
            raise RuntimeError(
                f"`StackedRNN` with `dropout` (={self.dropout}) requires a `key` when "
                "running in non-deterministic mode; pass `key=...` or "
                "`inference=True`"
            )
        keys = jax.random.split(key, self.num_layers - 1) if use_dropout else None
        hs = xs
        finals = []
        for i, (cell, layer_state) in enumerate(zip(self.cells, self._split(state))):
            if i > 0 and keys is not None:
                hs = _dropout(hs, self.dropout, keys[i - 1])
            hs, final = run_layer(cell, hs, layer_state, unroll=self.unroll)
            finals.append(final)
        return hs, self._join(finals)
