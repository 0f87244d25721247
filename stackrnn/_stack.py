"""`StackedRNN`: a tuple of cells folded over layers, each layer scanned over time."""

import warnings
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree

from ._cells import AbstractCell, State
from ._checks import (
    check_length,
    check_like,
    check_probability,
    check_resets,
    check_sequence,
    check_size,
    check_vector,
)
from ._dropout import dropout as _dropout
from ._layer import run_layer


StackState = PyTree[Float[Array, "layers ..."]]


def _check_cells(name: str, cells) -> tuple[AbstractCell, ...]:
    cells = tuple(cells)
    if not cells:
        raise ValueError(f"`{name}` must hold at least one cell, got none")
    for i, cell in enumerate(cells):
        if not isinstance(cell, AbstractCell):
            raise TypeError(
                f"`{name}[{i}]` must be a stackrnn cell (an AbstractCell), "
                f"got {type(cell).__name__}"
            )
    return cells


class StackedRNN(eqx.Module):
    """A deep recurrent network: layer `l` at time `t` reads layer `l-1` at time `t`
    and itself at time `t-1`,

    `H_t^(l) = cell_l(H_t^(l-1), H_{t-1}^(l))`, with `H_t^(0) = x_t`.

    The stack is a Python fold over its layers; each layer is a `jax.lax.scan` over
    time. Dropout is applied to the input of every layer but the first (so between
    layers, never to the top layer's output), only when `inference=False`.

    A bidirectional stack (`backward_cells` given) runs every layer forwards with
    `cells[l]` and backwards with `backward_cells[l]` over the same input, and the
    next layer reads the two outputs concatenated, forward first (PyTorch's layout).

    The module takes one sequence; batch with `jax.vmap`.

    **Arguments:**

    - `cells`: a non-empty sequence of cells (each an [`stackrnn.AbstractCell`][]),
      bottom first; each cell's `input_size` must equal the `output_size` of the cell
      below (in a bidirectional stack, the sum of both directions' `output_size`).
      Widths may differ between layers.
    - `backward_cells`: `None` (default) for a unidirectional stack, else one cell per
      layer for the backward direction, with the same `input_size` as `cells[l]`.
      (Keyword only argument.)
    - `dropout`: probability in [0, 1) of zeroing each input of layers 2..L during
      training. (Keyword only argument.)
    - `unroll`: passed to `jax.lax.scan` over time. (Keyword only argument.)
    - `reverse`: if `True`, a unidirectional stack reads time backwards: every layer
      starts at the last step, and outputs stay aligned with their inputs. Not
      allowed with `backward_cells`. (Keyword only argument.)
    - `fast`: which path each layer takes. `True`: layers of Elman, GRU and LSTM
      cells (without `proj_size`) take the fast path, a hand-written backward pass
      whose weight gradients are single matrix products over all steps and
      examples; calls with `length` or `resets` take the reference path. `False`:
      the reference path, a plain `jax.lax.scan` of each cell differentiated by
      JAX. `None` (default): the fast path for layers of `hidden_size >= 512`,
      where it measured faster on CPU (see the benchmarks page). Both paths give the
      same numbers up to float rounding. (Keyword only argument.)
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
    backward_cells: tuple[AbstractCell, ...] | None
    dropout: float = eqx.field(static=True)
    unroll: int = eqx.field(static=True)
    reverse: bool = eqx.field(static=True)
    fast: bool | None = eqx.field(static=True)
    inference: bool

    def __init__(
        self,
        cells: Sequence[AbstractCell],
        *,
        backward_cells: Sequence[AbstractCell] | None = None,
        dropout: float = 0.0,
        unroll: int = 1,
        reverse: bool = False,
        fast: bool | None = None,
        inference: bool = False,
    ):
        cells = _check_cells("cells", cells)
        if backward_cells is not None:
            backward_cells = _check_cells("backward_cells", backward_cells)
            if len(backward_cells) != len(cells):
                raise ValueError(
                    f"`backward_cells` must hold one cell per layer (={len(cells)}), "
                    f"got {len(backward_cells)}"
                )
            for i, (f, b) in enumerate(zip(cells, backward_cells)):
                if b.input_size != f.input_size:
                    raise ValueError(
                        f"`backward_cells[{i}].input_size` (={b.input_size}) must "
                        f"equal `cells[{i}].input_size` (={f.input_size}), since "
                        "both directions read the same input"
                    )
            if reverse:
                raise ValueError(
                    "`reverse=True` applies to unidirectional stacks only; a "
                    "bidirectional stack (`backward_cells` given) already reads both "
                    "ways"
                )
        self.cells = cells
        self.backward_cells = backward_cells
        for i in range(1, len(cells)):
            below = f"`cells[{i - 1}].output_size`"
            if backward_cells is not None:
                below += f" + `backward_cells[{i - 1}].output_size`"
            size = self._layer_output_size(i - 1)
            if cells[i].input_size != size:
                raise ValueError(
                    f"`cells[{i}].input_size` (={cells[i].input_size}) must equal "
                    f"{below} (={size}), since layer l reads the output of layer l-1"
                )
        self.dropout = check_probability("dropout", dropout)
        if self.dropout > 0 and len(cells) == 1:
            warnings.warn(
                f"`dropout` (={dropout}) has no effect with one layer: dropout acts "
                "between layers, never on the top layer's output",
                stacklevel=2,
            )
        self.unroll = check_size("unroll", unroll)
        if not isinstance(reverse, bool):
            raise TypeError(f"`reverse` must be a bool, got {reverse!r}")
        self.reverse = reverse
        if fast is not None and not isinstance(fast, bool):
            raise TypeError(f"`fast` must be True, False or None, got {fast!r}")
        self.fast = fast
        self.inference = inference

    @property
    def num_layers(self) -> int:
        return len(self.cells)

    @property
    def bidirectional(self) -> bool:
        return self.backward_cells is not None

    @property
    def input_size(self) -> int:
        return self.cells[0].input_size

    @property
    def output_size(self) -> int:
        return self._layer_output_size(self.num_layers - 1)

    def _layer_output_size(self, layer: int) -> int:
        return sum(cell.output_size for cell in self._layer(layer))

    def _layer(self, layer: int) -> tuple[AbstractCell, ...]:
        """The cells of one layer: forward, then backward if bidirectional."""
        if self.backward_cells is None:
            return (self.cells[layer],)
        return self.cells[layer], self.backward_cells[layer]

    def _all_cells(self) -> list[AbstractCell]:
        # PyTorch's order of states: layer * num_directions + direction.
        return [cell for i in range(self.num_layers) for cell in self._layer(i)]

    @property
    def _stackable(self) -> bool:
        # Layers whose states share shapes are stacked on a leading axis (L, H);
        # otherwise the state is a tuple with one entry per layer.
        shapes = [
            jax.tree.map(jnp.shape, jax.eval_shape(c.init_state))
            for c in self._all_cells()
        ]
        return all(s == shapes[0] for s in shapes)

    def _join(self, states: list[State]) -> StackState:
        if self._stackable:
            return jax.tree.map(lambda *xs: jnp.stack(xs), *states)
        return tuple(states)

    def _split(self, state: StackState) -> list[State]:
        if self._stackable:
            n = len(self._all_cells())
            return [jax.tree.map(lambda s: s[i], state) for i in range(n)]
        return list(state)

    def _dropout_keys(self, key, inference) -> PRNGKeyArray | None:
        """One dropout key per layer above the first, or `None` without dropout."""
        if inference is None:
            inference = self.inference
        if not (self.dropout > 0 and not inference and self.num_layers > 1):
            return None
        if key is None:
            raise RuntimeError(
                f"`StackedRNN` with `dropout` (={self.dropout}) requires a `key` when "
                "running in non-deterministic mode; pass `key=...` or "
                "`inference=True`"
            )
        return jax.random.split(key, self.num_layers - 1)

    def init_state(self) -> StackState:
        """Every layer's zero state: an array of shape `(num_layers, hidden_size)`
        (LSTM: a tuple `(h, c)` of such arrays) when all layers have the same state
        shapes, else a tuple with one state per layer. A bidirectional stack holds
        `2 * num_layers` states in PyTorch's order, `layer * 2 + direction` (forward
        0, backward 1)."""
        return self._join([cell.init_state() for cell in self._all_cells()])

    def __call__(
        self,
        xs: Float[Array, "time input"],
        state: StackState | None = None,
        *,
        length: Int[Array, ""] | int | None = None,
        resets: Bool[Array, " time"] | None = None,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
        all_layers: bool = False,
    ) -> tuple[
        Float[Array, "time output"] | tuple[Float[Array, "time _"], ...], StackState
    ]:
        """Runs the stack over one sequence.

        **Arguments:**

        - `xs`: the inputs, a JAX array of shape `(time, input_size)`.
        - `state`: the initial state, structured as `init_state()`; zeros if omitted.
        - `length`: this sequence's length, a scalar integer in `[1, time]`, for a
          sequence padded to `time` steps; `None` (default) for `time`. Steps
          `t >= length` leave every state unchanged and output zeros, so the final
          state is the state after step `length - 1`, and the backward direction
          starts at step `length - 1`, not at the padding. Checked when concrete;
          under `jit` or `vmap` (one length per example) it cannot be, and values
          <= 0 then read no step, values > `time` every step. (Keyword only
          argument.)
        - `resets`: a boolean array of shape `(time,)`: `resets[t]` returns every
          layer's state to `init_state()` before step `t`, so the sequence is read
          as independent segments (RL episodes, packed documents). The backward
          direction of a bidirectional stack, and a `reverse` stack, respect the
          same segments. (Keyword only argument.)
        - `key`: a `jax.random.PRNGKey` for dropout; needed only when `dropout > 0`,
          `num_layers > 1` and `inference=False`. (Keyword only argument.)
        - `inference`: if `True`, no dropout; defaults to the module's `inference`.
          (Keyword only argument.)
        - `all_layers`: if `True`, return every layer's outputs instead of the top
          layer's only. (Keyword only argument.)

        **Returns:**

        `(ys, final_state)`: the top layer's outputs, of shape `(time, output_size)`,
        and every layer's state after the last step read, structured as
        `init_state()`. With `all_layers=True`, `ys` is instead a tuple with one
        output sequence per layer, bottom first, each of shape `(time, size)` where
        `size` is that layer's output size (both directions concatenated when
        bidirectional); these are the outputs before dropout, and the last entry is
        what `all_layers=False` returns.
        """
        check_sequence("xs", xs, self.input_size)
        time = jnp.shape(xs)[0]
        if length is not None:
            check_length("length", length, time)
        if resets is not None:
            check_resets("resets", resets, time)
        if state is None:
            state = self.init_state()
        else:
            check_like("state", state, self.init_state())
        keys = self._dropout_keys(key, inference)
        states = iter(self._split(state))
        hs = xs
        outputs, finals = [], []
        for i in range(self.num_layers):
            if i > 0 and keys is not None:
                hs = _dropout(hs, self.dropout, keys[i - 1])
            ys = []
            for direction, cell in enumerate(self._layer(i)):
                y, final = run_layer(
                    cell,
                    hs,
                    next(states),
                    reverse=self.reverse or direction == 1,
                    unroll=self.unroll,
                    length=length,
                    resets=resets,
                    fast=self.fast,
                )
                ys.append(y)
                finals.append(final)
            hs = ys[0] if len(ys) == 1 else jnp.concatenate(ys, axis=-1)
            outputs.append(hs)
        return (tuple(outputs) if all_layers else hs), self._join(finals)

    def step(
        self,
        x: Float[Array, " input"],
        state: StackState,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> tuple[Float[Array, " output"], StackState]:
        """One time step of the whole stack, for streaming: feeding a sequence to
        `step` one element at a time gives the outputs and states of `__call__`
        (for a `reverse` stack, feed the elements last first).

        With dropout off (`inference=True` or `dropout=0`) the two agree exactly.
        With dropout on, `step` draws a fresh mask per step and layer from its `key`:
        each input of layers 2..L is zeroed independently with probability
        `dropout`, as in `__call__`, but the masks are not those `__call__` draws
        from the same key. Pass a different key at every step.

        Not available for bidirectional stacks, whose backward direction needs the
        whole sequence. To reset at an episode boundary, pass `init_state()`.

        **Arguments:**

        - `x`: the input at this step, a JAX array of shape `(input_size,)`.
        - `state`: the state after the previous step, structured as `init_state()`.
        - `key`: a `jax.random.PRNGKey` for dropout, as in `__call__`.
          (Keyword only argument.)
        - `inference`: if `True`, no dropout; defaults to the module's `inference`.
          (Keyword only argument.)

        **Returns:**

        `(y, state)`: the top layer's output, of shape `(output_size,)`, and the new
        state, structured as `init_state()`.
        """
        if self.bidirectional:
            raise ValueError(
                "`step` needs a unidirectional stack: the backward direction of a "
                "bidirectional stack reads the whole sequence; call the stack on it"
            )
        check_vector("x", x, self.input_size)
        check_like("state", state, self.init_state())
        keys = self._dropout_keys(key, inference)
        h = x
        finals = []
        for i, (cell, layer_state) in enumerate(zip(self.cells, self._split(state))):
            if i > 0 and keys is not None:
                h = _dropout(h, self.dropout, keys[i - 1])
            layer_state = cell(h, layer_state)
            finals.append(layer_state)
            h = cell.output(layer_state)
        return h, self._join(finals)
