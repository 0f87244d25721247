"""`StackedRNN`: a tuple of cells folded over layers, each layer scanned over time."""

import functools
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree

from ._cells import AbstractCell, State
from ._checks import (
    check_flag,
    check_length,
    check_like,
    check_resets,
    check_sequence,
    check_transduce,
    check_vector,
)
from ._chunked import run_chunked, run_direction
from ._config import (
    check_between,
    check_layers,
    join_states,
    layer_cells,
    layer_output_size,
    split_state,
)
from ._fold import fold_layers, layer_dropout, split_keys
from ._time import Scan


StackState = PyTree[Float[Array, "layers ..."]]


class StackedRNN(eqx.Module):
    """A deep recurrent network: layer `l` at time `t` reads layer `l-1` at time `t`
    and itself at time `t-1`,

    `H_t^(l) = cell_l(H_t^(l-1), H_{t-1}^(l))`, with `H_t^(0) = x_t`.

    The stack is a Python fold over its layers (or a scan over runs of alike layers,
    with `Scan(scan_layers=...)`); each layer is a `jax.lax.scan` over time. It
    holds what lies between layers, dropout and residual connections, and how time
    runs (a [`stackrnn.Scan`][]); everything that acts on one cell
    (recurrent dropout, `Zoneout`, weight drop, layer normalisation, a regulariser of
    your own) lives in the cells, as wrapper cells (see
    [`stackrnn.AbstractWrappedCell`][]) or cell variants, so it can differ from layer
    to layer. Dropout is applied to the input of every layer but the first (so
    between layers, never to the top layer's output), only when `inference=False`.

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
    - `variational`: if `True`, `dropout` draws one mask per sequence and layer,
      the same at every time step (Gal & Ghahramani's variational dropout), instead
      of one per element. (Keyword only argument.)
    - `residual`: if `True`, layers 2..L add their input (before dropout) to their
      output, `y_l = layer_l(dropout(y_{l-1})) + y_{l-1}`; their input and output
      widths must then be equal. (Keyword only argument.)
    - `scan`: how every layer runs over time, a [`stackrnn.Scan`][]: the direction
      (`reverse`, for unidirectional stacks only), `unroll`, the path policy and
      gradient checkpointing. Default `Scan()`: forwards, the path by width, no
      checkpointing. (Keyword only argument.)
    - `inference`: the default of `__call__`'s `inference`; switch a whole model with
      `eqx.nn.inference_mode`. (Keyword only argument.)

    !!! example

        ```python
        import jax, jax.numpy as jnp, stackrnn

        k1, k2 = jax.random.split(jax.random.key(0))
        cells = [stackrnn.GRUCell(28, 32, key=k1), stackrnn.GRUCell(32, 32, key=k2)]
        rnn = stackrnn.StackedRNN(
            cells, dropout=0.2, scan=stackrnn.Scan(checkpoint=stackrnn.Chunks(8))
        )
        ys, state = rnn(jnp.ones((35, 28)), key=k1)  # ys: (35, 32), state: (2, 32)
        ```
    """

    cells: tuple[AbstractCell, ...]
    backward_cells: tuple[AbstractCell, ...] | None
    dropout: float = eqx.field(static=True)
    variational: bool = eqx.field(static=True)
    residual: bool = eqx.field(static=True)
    scan: Scan = eqx.field(static=True)
    inference: bool

    def __init__(
        self,
        cells: Sequence[AbstractCell],
        *,
        backward_cells: Sequence[AbstractCell] | None = None,
        dropout: float = 0.0,
        variational: bool = False,
        residual: bool = False,
        scan: Scan = Scan(),
        inference: bool = False,
    ):
        self.cells, self.backward_cells = check_layers(cells, backward_cells, scan)
        self.dropout = check_between(
            self.cells, self.backward_cells, dropout, variational, residual
        )
        self.variational = variational
        self.residual = residual
        self.scan = scan
        self.inference = check_flag("inference", inference)

    @property
    def num_layers(self) -> int:
        return len(self.cells)

    @property
    def bidirectional(self) -> bool:
        return self.backward_cells is not None

    @property
    def reverse(self) -> bool:
        """Whether a unidirectional stack reads time backwards (`scan.reverse`)."""
        return self.scan.reverse

    @property
    def input_size(self) -> int:
        return self.cells[0].input_size

    @property
    def output_size(self) -> int:
        return layer_output_size(self.cells, self.backward_cells, self.num_layers - 1)

    @property
    def _dtype(self):
        # The bottom layer's state dtype, which its inputs must share.
        return jax.tree.leaves(jax.eval_shape(self.cells[0].init_state))[0].dtype

    def _layers(self) -> list[tuple[AbstractCell, ...]]:
        return [
            layer_cells(self.cells, self.backward_cells, i)
            for i in range(self.num_layers)
        ]

    def _all_cells(self) -> list[AbstractCell]:
        # PyTorch's order of states: layer * num_directions + direction.
        return [cell for cells in self._layers() for cell in cells]

    def _join(self, states: list[State]) -> StackState:
        return join_states(self._all_cells(), states)

    def _split(self, state: StackState) -> list[State]:
        return split_state(self._all_cells(), state)

    def _fold(self, hs, states, run, key, inference, **kwargs):
        """`fold_layers` over this stack's layers, with its keys and dropout."""
        drop_keys, cell_keys = split_keys(
            key, self.num_layers, 2 if self.bidirectional else 1
        )
        drop = None
        if not inference and self.num_layers > 1 and self.dropout > 0:
            if key is None:
                raise RuntimeError(
                    f"`StackedRNN` with `dropout` (={self.dropout}) requires a "
                    "`key` when running in non-deterministic mode; pass `key=...` "
                    "or `inference=True`"
                )
            drop = layer_dropout(self.dropout, self.variational, drop_keys)
        return fold_layers(
            self._layers(),
            hs,
            states,
            run,
            cell_keys=cell_keys,
            inference=inference,
            drop=drop,
            residual=self.residual,
            scan_from=self.scan.scan_layers,
            **kwargs,
        )

    def _chunked(
        self,
        inputs,
        state,
        chunks,
        length,
        resets,
        key,
        inference,
        *,
        encode,
        decode,
        all_layers,
    ):
        """A unidirectional stack over `inputs`, checkpointed: the chunks of time
        outside, all layers inside each chunk. Within a chunk,
        `encode(inputs_chunk)` gives the bottom layer's inputs and
        `decode(outputs, inputs_chunk)`, `outputs` being every layer's outputs
        (`all_layers`) or the top layer's, what the chunk returns."""

        def layers(piece, layer_states, start, chunk_length, chunk_resets):
            run = functools.partial(
                run_direction,
                scan=self.scan,
                chunks=None,
                length=chunk_length,
                resets=chunk_resets,
            )
            outputs, finals = self._fold(
                encode(piece),
                layer_states,
                run,
                key,
                inference,
                start=start,
                all_layers=all_layers,
            )
            return decode(outputs, piece), finals

        decoded, finals = run_chunked(
            layers,
            inputs,
            self._split(state),
            [cell.init_state() for cell in self.cells],
            chunks=chunks,
            reverse=self.reverse,
            length=length,
            resets=resets,
        )
        return decoded, self._join(finals)

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

        - `xs`: the inputs, a JAX array of shape `(time, input_size)` and the
          parameters' dtype (inputs are never cast: a `TypeError` otherwise).
        - `state`: the initial state, structured as `init_state()` (same dtype);
          zeros if omitted.
        - `length`: this sequence's length, a scalar integer in `[1, time]`, for a
          sequence padded to `time` steps; `None` (default) for `time`. Steps
          `t >= length` leave every state unchanged and output zeros, so the final
          state is the state after step `length - 1`, and the backward direction
          starts at step `length - 1`, not at the padding. Checked when concrete;
          under `jit` or `vmap` (one length per example) it cannot be, and values
          <= 0 then read no step, values > `time` every step. The padding is never
          read (its inputs are replaced by zeros before the cell), so whatever it
          holds, NaN included, values and gradients are the truncated sequence's.
          (Keyword only argument.)
        - `resets`: a boolean array of shape `(time,)`: `resets[t]` returns every
          layer's state to `init_state()` before step `t`, so the sequence is read
          as independent segments (RL episodes, packed documents). The backward
          direction of a bidirectional stack, and a `reverse` stack, respect the
          same segments. (Keyword only argument.)
        - `key`: a `jax.random.PRNGKey` for the masks; needed only when
          `inference=False` and a mask is drawn (`dropout > 0` with
          `num_layers > 1`, or a wrapper cell that draws masks). Each layer's
          cells get their own key from it (`AbstractCell.for_sequence`). The same
          key draws the same masks. (Keyword only argument.)
        - `inference`: if `True`, no masks: no dropout of any kind, and each
          wrapper cell's inference step (`Zoneout`'s expectation); defaults to the
          module's `inference`. (Keyword only argument.)
        - `all_layers`: if `True`, return every layer's outputs instead of the top
          layer's only. (Keyword only argument.)

        **Returns:**

        `(ys, final_state)`: the top layer's outputs, of shape `(time, output_size)`,
        and every layer's state after the last step read, structured as
        `init_state()`. With `all_layers=True`, `ys` is instead a tuple with one
        output sequence per layer, bottom first, each of shape `(time, size)` where
        `size` is that layer's output size (both directions concatenated when
        bidirectional); these are the outputs before dropout (after the residual
        connections), and the last entry is what `all_layers=False` returns.
        """
        check_sequence("xs", xs, self.input_size, self._dtype)
        time = jnp.shape(xs)[0]
        if length is not None:
            check_length("length", length, time)
        if resets is not None:
            check_resets("resets", resets, time)
        if state is None:
            state = self.init_state()
        else:
            check_like("state", state, self.init_state())
        inference = check_flag("inference", inference, optional=True)
        inference = self.inference if inference is None else inference
        checkpoint = self.scan.checkpoint
        chunks = None if checkpoint is None else checkpoint.for_time(time)
        if chunks is not None and not self.bidirectional:
            return self._chunked(
                xs,
                state,
                chunks,
                length,
                resets,
                key,
                inference,
                encode=lambda piece: piece,
                decode=lambda outputs, _: tuple(outputs) if all_layers else outputs[-1],
                all_layers=all_layers,
            )

        run = functools.partial(
            run_direction, scan=self.scan, chunks=chunks, length=length, resets=resets
        )
        outputs, finals = self._fold(
            xs, self._split(state), run, key, inference, all_layers=all_layers
        )
        return (tuple(outputs) if all_layers else outputs[-1]), self._join(finals)

    def transduce(
        self,
        encode: Callable[[PyTree], Float[Array, "time input"]],
        decode: Callable[[Float[Array, "time output"], PyTree], PyTree],
        inputs: PyTree,
        state: StackState | None = None,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> tuple[PyTree, StackState]:
        """Maps a sequence to a sequence through the stack:
        `decode(stack(encode(inputs))[0], inputs)`, but with `scan.checkpoint` on a
        unidirectional stack, `encode` and `decode` run inside each checkpointed
        chunk of time, so neither the encoded inputs nor the top layer's outputs of
        the whole sequence are ever stored; only what `decode` returns is. A model
        whose inputs expand (token indices to one-hot vectors or embeddings) and whose
        per-step loss reduces the outputs then trains in memory that grows with the
        chunks, not with `time` (see "Long sequences" on the sequences page).

        **Arguments:**

        - `encode`: maps a chunk of `inputs` to the bottom layer's inputs, an array
          of shape `(steps, input_size)`; `steps` is the chunk's length.
        - `decode`: maps the top layer's outputs on a chunk, shape
          `(steps, output_size)`, and the same chunk of `inputs` to a PyTree of
          arrays whose leading axis has length `steps`.
        - `inputs`: a PyTree of arrays whose leading axis is time, e.g. token
          indices of shape `(time,)`, or `(tokens, targets)`.
        - `state`: the initial state, structured as `init_state()`; zeros if omitted.
        - `key`, `inference`: as in `__call__`. (Keyword only arguments.)

        Both functions must work step by step: what they give for a step may depend
        on that step alone, which is what makes running them chunk by chunk equal to
        running them once. A bidirectional stack cannot stream (its backward
        direction reads the whole sequence first), so it encodes and decodes the
        whole sequence around the call.

        **Returns:**

        `(decoded, final_state)`: `decode`'s results joined along time, and every
        layer's state after the last step, as `__call__` returns it. Same numbers as
        `decode(self(encode(inputs), state)[0], inputs)` up to float rounding, with
        `__call__`'s masks.
        """
        time = check_transduce(
            encode, decode, inputs, self.input_size, self.output_size, self._dtype
        )
        checkpoint = self.scan.checkpoint
        if checkpoint is None or self.bidirectional:
            ys, state = self(encode(inputs), state, key=key, inference=inference)
            return decode(ys, inputs), state
        if state is None:
            state = self.init_state()
        else:
            check_like("state", state, self.init_state())
        inference = check_flag("inference", inference, optional=True)
        inference = self.inference if inference is None else inference
        return self._chunked(
            inputs,
            state,
            checkpoint.for_time(time),
            None,
            None,
            key,
            inference,
            encode=encode,
            decode=lambda outputs, piece: decode(outputs[-1], piece),
            all_layers=False,
        )

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

        With `inference=True` the two agree exactly, whatever the options. In
        training, `step` draws fresh masks per step and layer from its `key`, for
        dropout (each input of layers 2..L zeroed independently with probability
        `dropout`) and per-step wrappers ([`stackrnn.Zoneout`][]), as `__call__`
        does but not the masks `__call__` draws from the same key: pass a different
        key at every step. What draws one mask per sequence (`variational`
        dropout, [`stackrnn.RecurrentDropout`][], [`stackrnn.WeightDrop`][])
        cannot keep it across calls, so `step` refuses it in training with a
        `ValueError`.

        Not available for bidirectional stacks, whose backward direction needs the
        whole sequence. To reset at an episode boundary, pass `init_state()`.

        **Arguments:**

        - `x`: the input at this step, a JAX array of shape `(input_size,)`.
        - `state`: the state after the previous step, structured as `init_state()`.
        - `key`: a `jax.random.PRNGKey` for the masks, as in `__call__`.
          (Keyword only argument.)
        - `inference`: as in `__call__`; defaults to the module's `inference`.
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
        check_vector("x", x, self.input_size, self._dtype)
        check_like("state", state, self.init_state())
        inference = check_flag("inference", inference, optional=True)
        inference = self.inference if inference is None else inference
        if not inference and self.variational and self.dropout > 0:
            raise ValueError(
                "`variational` dropout draws one mask per sequence, which `step` "
                "cannot keep across separate calls; in training, run the sequence "
                "with `__call__`, or pass `inference=True`"
            )

        def run(cell, inputs, layer_state, direction):
            new = cell(inputs[0], layer_state)
            return cell.output(new)[None], new

        outputs, finals = self._fold(
            x[None],
            self._split(state),
            run,
            key,
            inference,
            streaming=True,
            all_layers=False,
        )
        return outputs[-1][0], self._join(finals)
