"""One layer: a cell run over a sequence with `jax.lax.scan`.

`run_layer` is the single entry point the stack uses. The reference path scans the
cell's own `__call__` and lets autodiff differentiate the loop; every faster path is
tested against it.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ._cells import AbstractCell, State
from ._fast import scan_fast
from ._fused import scan_fused
from ._time import AbstractPath, ByWidth


def scan_reference(
    cell: AbstractCell,
    xs: Float[Array, "time input"],
    state: State,
    *,
    reverse: bool = False,
    unroll: int = 1,
    length: Int[Array, ""] | int | None = None,
    resets: Bool[Array, " time"] | None = None,
) -> tuple[Float[Array, "time output"], State]:
    """Runs `cell` over `xs` one step at a time: the reference path.

    **Arguments:**

    - `cell`: the recurrent cell.
    - `xs`: the inputs, a JAX array of shape `(time, input_size)`.
    - `state`: the initial state, structured as `cell.init_state()`.
    - `reverse`: read time backwards (outputs stay aligned with their inputs).
      (Keyword only argument.)
    - `unroll`: passed to `jax.lax.scan`. (Keyword only argument.)
    - `length`: a scalar integer, or `None` for `time`. Only the steps `t < length`
      are read; the others leave the state unchanged and output zeros, so reading
      backwards starts at step `length - 1`. The cell never sees a padded step's
      input, so no value there reaches the gradients. (Keyword only argument.)
    - `resets`: a boolean array of shape `(time,)`, or `None`. `resets[t]` starts a
      new segment at step `t`: the state returns to `cell.init_state()` before step
      `t` is read (forwards) or after it is read (backwards, i.e. before step `t - 1`),
      so every segment is read as a sequence of its own. Flags at steps
      `t >= length` are ignored. (Keyword only argument.)

    **Returns:**

    `(ys, final_state)`: the outputs `cell.output(state_t)` of shape
    `(time, output_size)` and the state after the last step read.
    """
    valid = None
    if length is not None:
        steps = jnp.arange(xs.shape[0])
        # Any integer dtype of `length` (int16, uint8, ...) compares as the steps'.
        valid = steps < jnp.asarray(length).astype(steps.dtype)
    if resets is not None:
        if valid is not None:
            resets = resets & valid
        if reverse:
            # Backwards, a segment starting at t ends the read of t: reset before t-1.
            resets = jnp.append(resets[1:], False)
    fresh = cell.init_state()

    def step(carry, inputs):
        x, reset, read = inputs
        if read is not None:
            # A padded step's input never reaches the cell: masking only the
            # cell's results would keep NaN or inf padding out of the values but
            # not out of the gradients (0 * NaN in the backward pass).
            x = jnp.where(read, x, jnp.zeros_like(x))
        if reset is not None:
            carry = jax.tree.map(lambda f, c: jnp.where(reset, f, c), fresh, carry)
        new = cell(x, carry)
        y = cell.output(new)
        if read is not None:
            new = jax.tree.map(lambda n, c: jnp.where(read, n, c), new, carry)
            y = jnp.where(read, y, jnp.zeros_like(y))
        return new, y

    final, ys = jax.lax.scan(
        step, state, (xs, resets, valid), reverse=reverse, unroll=unroll
    )
    return ys, final


def run_layer(
    cell,
    xs,
    state,
    *,
    reverse=False,
    unroll=1,
    length=None,
    resets=None,
    path: AbstractPath = ByWidth(),
):
    """Runs one layer; the stack's only way to do so. Same contract as
    `scan_reference`. `path` chooses the path for `cell` (see
    [`stackrnn.AbstractPath`][]); with `length` or `resets`, which exist on the
    reference path only, that path is taken."""
    chosen = (
        "reference" if length is not None or resets is not None else path.choose(cell)
    )
    if chosen == "fused":
        return scan_fused(cell, xs, state, reverse=reverse)
    if chosen == "fast":
        return scan_fast(cell, xs, state, reverse=reverse, unroll=unroll)
    return scan_reference(
        cell, xs, state, reverse=reverse, unroll=unroll, length=length, resets=resets
    )
