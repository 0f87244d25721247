"""One layer: a cell run over a sequence with `jax.lax.scan`.

`run_layer` is the single entry point the stack uses. The reference path scans the
cell's own `__call__` and lets autodiff differentiate the loop; every faster path is
tested against it.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ._cells import AbstractCell, State
from ._fast import scan_fast, supports
from ._fused import scan_fused, supports as fused_supports


# Below this width the reference path's backward pass (per-step weight-gradient
# products, fewer stored arrays) measured faster on CPU than the fast path's
# (docs/benchmarks.md); from it on, single products over all steps win.
FAST_MIN_HIDDEN = 512
# Up to this width the fused path (the optional accelerator) measured faster than the
# other paths on CPU; at 256 its backward loop's products measured slower than XLA's
# (benchmarks/README.md).
FUSED_MAX_HIDDEN = 128


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
      backwards starts at step `length - 1`. (Keyword only argument.)
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


def layer_path(cell: AbstractCell, *, fast=None, length=None, resets=None) -> str:
    """Which path a layer of `cell` takes, as a stack runs it.

    `"reference"`: `jax.lax.scan` over the cell's step. `"fast"`: the input
    projection out of the loop and a hand-written backward pass. `"fused"`: the fast
    path with its loop and the loop's reverse each one CPU kernel, taken with
    `fast=None` when the optional accelerator is installed (`pip install ./kernels`
    from the repository) for Elman, GRU and LSTM cells (without `proj_size`) of
    float32 or float64 and `hidden_size <= FUSED_MAX_HIDDEN` (128).

    **Arguments:**

    - `cell`: the layer's cell.
    - `fast`: as [`stackrnn.StackedRNN`][]'s. (Keyword only argument.)
    - `length`, `resets`: whether the call gives them (only the reference path has
      them). (Keyword only arguments.)

    **Returns:**

    `"reference"`, `"fast"` or `"fused"`.
    """
    if length is not None or resets is not None or fast is False:
        return "reference"
    if fast is None and fused_supports(cell) and cell.hidden_size <= FUSED_MAX_HIDDEN:
        return "fused"
    if fast is None:
        fast = cell.hidden_size >= FAST_MIN_HIDDEN
    return "fast" if fast and supports(cell) else "reference"


def run_layer(
    cell,
    xs,
    state,
    *,
    reverse=False,
    unroll=1,
    length=None,
    resets=None,
    fast=None,
):
    """Runs one layer; the stack's only way to do so. Same contract as
    `scan_reference`. With `fast=True` a cell that the fast path supports (see
    `stackrnn._fast`) takes it, unless `length` or `resets` is given: those options
    exist on the reference path only, which is then taken. `fast=None` decides by
    width: the fused path (see `stackrnn._fused`) for `hidden_size <=
    FUSED_MAX_HIDDEN` where the accelerator is installed, the fast path for
    `hidden_size >= FAST_MIN_HIDDEN`. `layer_path` says which."""
    path = layer_path(cell, fast=fast, length=length, resets=resets)
    if path == "fused":
        return scan_fused(cell, xs, state, reverse=reverse)
    if path == "fast":
        return scan_fast(cell, xs, state, reverse=reverse, unroll=unroll)
    return scan_reference(
        cell, xs, state, reverse=reverse, unroll=unroll, length=length, resets=resets
    )
