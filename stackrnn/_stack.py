"""`StackedRNN`: a tuple of cells folded over layers, each layer scanned over time."""

import dataclasses
import functools
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree

from ._cells import AbstractCell, State
from ._checks import (
    check_length,
    check_like,
    check_resets,
    check_sequence,
    check_transduce,
    check_vector,
)
from ._chunked import call_chunked, chunk_lengths, run_direction
from ._config import check_config, layer_cells, layer_output_size
from ._fold import fold_layers
from ._regularise import check_step, drop_weight, mask_keys


StackState = PyTree[Float[Array, "layers ..."]]


class StackedRNN(eqx.Module):
    """A deep recurrent network: layer `l` at time `t` reads layer `l-1` at time `t`
    and itself at time `t-1`,

    `H_t^(l) = cell_l(H_t^(l-1), H_{t-1}^(l))`, with `H_t^(0) = x_t`.

    The stack is a Python fold over its layers; each layer is a `jax.lax.scan` over
    time. Dropout is applied to the input of every layer but the first (so between
    layers, never to the top layer's output), only when `inference=False`. The other
    regularisers (variational and recurrent dropout, zoneout, weight drop, residual
    connections) are off by default; the regularisation page of the docs describes
    them.

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
    - `recurrent_dropout`: probability in [0, 1) of zeroing each unit of the
      previous output where it enters the recurrent product `weight_hh @ h`, with
      one mask per sequence, layer and direction (Gal & Ghahramani); the carried
      state is not masked. Needs [`stackrnn.AbstractAffineCell`][]s; takes the
      reference path. (Keyword only argument.)
    - `zoneout`: probability in [0, 1) that each state unit keeps its previous
      value at a step, a fresh mask per step (Krueger et al.); at inference every
      unit is `p * previous + (1 - p) * new`. A tuple gives one rate per array of
      the state: `(p_h, p_c)` for LSTM cells. Takes the reference path.
      (Keyword only argument.)
    - `weight_drop`: probability in [0, 1) of zeroing each entry of every
      `weight_hh` (DropConnect, Merity et al.'s weight drop), one mask per
      sequence, layer and direction. Needs [`stackrnn.AbstractAffineCell`][]s;
      keeps the fast path. (Keyword only argument.)
    - `residual`: if `True`, layers 2..L add their input (before dropout) to their
      output, `y_l = layer_l(dropout(y_{l-1})) + y_{l-1}`; their input and output
      widths must then be equal. (Keyword only argument.)
    - `unroll`: passed to `jax.lax.scan` over time. (Keyword only argument.)
    - `reverse`: if `True`, a unidirectional stack reads time backwards: every layer
      starts at the last step, and outputs stay aligned with their inputs. Not
      allowed with `backward_cells`. (Keyword only argument.)
    - `fast`: which path each layer takes. `True`: layers of Elman, GRU and LSTM
      cells (without `proj_size`) take the fast path, a hand-written backward pass
      whose weight gradients are single matrix products over all steps and
      examples; calls with `length` or `resets`, layers with `recurrent_dropout`
      or `zoneout`, and cells with other parameters (LayerNorm cells, LSTMs with
      `proj_size`) take the reference path. `False`:
      the reference path, a plain `jax.lax.scan` of each cell differentiated by
      JAX. `None` (default): the fast path for layers of `hidden_size >= 512`,
      where it measured faster on CPU (see the benchmarks page). Both paths give the
      same numbers up to float rounding. (Keyword only argument.)
    - `checkpoint`: gradient checkpointing over time, for long sequences. `False`
      (default): none; the backward pass keeps every step's intermediate values.
      `True`: chunks of `ceil(sqrt(time))` steps; an integer: chunks of that many
      steps. The backward pass then keeps only the state at the start of each chunk
      and recomputes the chunk's forward pass (about one more forward pass in all),
      so a unidirectional stack needs memory for about `sqrt(time)` steps of every
      layer, besides the inputs and outputs: the chunks are the outer loop and run
      all layers inside. A tuple of lengths, outermost first, nests the chunks:
      `(c1, c2)` cuts each chunk of `c1` steps into checkpointed chunks of `c2`,
      one more forward pass per level for memory of about `time / c1 + c1 / c2 +
      c2` steps (`(round(time ** (2 / 3)), round(time ** (1 / 3)))` for about
      `3 * time ** (1 / 3)`). [`stackrnn.StackedRNN.transduce`][] also keeps the
      inputs' encoding and the outputs' decoding inside the chunks. A
      bidirectional stack cannot interleave its layers that way (the backward
      direction of layer `l` needs all of layer `l-1`), so each of its layers is
      checkpointed on its own: every layer's outputs are kept, the per-step values
      inside the layers are not. Same numbers as without
      checkpointing up to float rounding, except for the masks a unidirectional
      stack draws per step (`dropout` unless `variational`, and `zoneout`): the
      (innermost) chunk from step `s` draws them from their key folded with `s`
      (`jax.random.fold_in`). See
      "Long sequences" on the sequences page. (Keyword only argument.)
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
    variational: bool = eqx.field(static=True)
    recurrent_dropout: float = eqx.field(static=True)
    zoneout: float | tuple[float, ...] = eqx.field(static=True)
    weight_drop: float = eqx.field(static=True)
    residual: bool = eqx.field(static=True)
    unroll: int = eqx.field(static=True)
    reverse: bool = eqx.field(static=True)
    fast: bool | None = eqx.field(static=True)
    checkpoint: bool | int | tuple[int, ...] = eqx.field(static=True)
    inference: bool

    def __init__(
        self,
        cells: Sequence[AbstractCell],
        *,
        backward_cells: Sequence[AbstractCell] | None = None,
        dropout: float = 0.0,
        variational: bool = False,
        recurrent_dropout: float = 0.0,
        zoneout: float | tuple[float, ...] = 0.0,
        weight_drop: float = 0.0,
        residual: bool = False,
        unroll: int = 1,
        reverse: bool = False,
        fast: bool | None = None,
        checkpoint: bool | int | tuple[int, ...] = False,
        inference: bool = False,
    ):
        fields = check_config(
            cells,
            backward_cells,
            dropout=dropout,
            variational=variational,
            recurrent_dropout=recurrent_dropout,
            zoneout=zoneout,
            weight_drop=weight_drop,
            residual=residual,
            unroll=unroll,
            reverse=reverse,
            fast=fast,
            checkpoint=checkpoint,
        )
        for name, value in fields.items():
            setattr(self, name, value)
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
        return layer_output_size(self.cells, self.backward_cells, self.num_layers - 1)

    @property
    def _dtype(self):
        # The bottom layer's state dtype, which its inputs must share.
        return jax.tree.leaves(jax.eval_shape(self.cells[0].init_state))[0].dtype

    def _layer(self, layer: int) -> tuple[AbstractCell, ...]:
        return layer_cells(self.cells, self.backward_cells, layer)

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

    def drop_weights(self, key: PRNGKeyArray) -> "StackedRNN":
        """Draws the `weight_drop` masks once, for every sequence the result reads.

        `__call__` draws one DropConnect mask per sequence. Under `jax.vmap` with a
        key per example that makes one `weight_hh` per example: memory of
        `batch x gates x hidden` per layer, and batched matrix-vector products in
        place of one matrix product (on CPU, a training batch of 1024 sequences
        of a 2 x 256 GRU language model: 12.9x slower, see the regularisation
        page). AWD-LSTM instead draws one mask per
        batch: call `drop_weights` outside `jax.vmap` and the returned stack, whose
        `weight_drop` is 0, inside it. [`stackrnn.lm.fit`][] does so.

        **Arguments:**

        - `key`: a `jax.random.PRNGKey`; one mask per layer and direction is drawn
          from it.

        **Returns:**

        A copy of the stack with every cell's `weight_hh` masked (survivors scaled
        by `1 / (1 - weight_drop)`) and `weight_drop=0`; the stack itself when
        `weight_drop` is 0.
        """
        if self.weight_drop == 0:
            return self
        cells = [
            drop_weight(cell, self.weight_drop, k)
            for cell, k in zip(
                self._all_cells(), jax.random.split(key, len(self._all_cells()))
            )
        ]
        step = 2 if self.bidirectional else 1
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields.update(cells=cells[::step], weight_drop=0.0)
        if self.bidirectional:
            fields.update(backward_cells=cells[1::2])
        return StackedRNN(**fields)

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
        - `key`: a `jax.random.PRNGKey` for the regularisers' masks; needed only
          when `inference=False` and one of them draws masks (`dropout > 0` with
          `num_layers > 1`, `recurrent_dropout`, `zoneout` or `weight_drop > 0`).
          The same key draws the same masks. (Keyword only argument.)
        - `inference`: if `True`, no dropout of any kind, and zoneout's expectation;
          defaults to the module's `inference`. (Keyword only argument.)
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
        inference = self.inference if inference is None else inference
        keys = mask_keys(self, key, inference)

        chunks = chunk_lengths(self.checkpoint, time)
        if chunks is not None and not self.bidirectional:
            return call_chunked(
                self,
                xs,
                state,
                chunks,
                length,
                resets,
                keys,
                inference,
                encode=lambda piece: piece,
                decode=lambda outputs, _: tuple(outputs) if all_layers else outputs[-1],
            )

        run = functools.partial(
            run_direction, self, chunks=chunks, length=length, resets=resets
        )
        outputs, finals = fold_layers(
            self, xs, self._split(state), keys, inference, run
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
        `decode(stack(encode(inputs))[0], inputs)`, but with `checkpoint` on a
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
        chunks = chunk_lengths(self.checkpoint, time)
        if chunks is None or self.bidirectional:
            ys, state = self(encode(inputs), state, key=key, inference=inference)
            return decode(ys, inputs), state
        if state is None:
            state = self.init_state()
        else:
            check_like("state", state, self.init_state())
        inference = self.inference if inference is None else inference
        return call_chunked(
            self,
            inputs,
            state,
            chunks,
            None,
            None,
            mask_keys(self, key, inference),
            inference,
            encode=encode,
            decode=lambda outputs, piece: decode(outputs[-1], piece),
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
        `dropout`) and zoneout, as `__call__` does but not the masks `__call__`
        draws from the same key: pass a different key at every step. The options
        that draw one mask per sequence (`variational`, `recurrent_dropout`,
        `weight_drop`) cannot keep it across calls, so `step` refuses them in
        training with a `ValueError`.

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
        inference = self.inference if inference is None else inference
        check_step(self, inference)
        keys = mask_keys(self, key, inference)

        def run(cell, inputs, layer_state, direction):
            new = cell(inputs[0], layer_state)
            return cell.output(new)[None], new

        states = self._split(state)
        outputs, finals = fold_layers(self, x[None], states, keys, inference, run)
        return outputs[-1][0], self._join(finals)
