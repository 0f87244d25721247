"""One layer: a cell run over a sequence with `jax.lax.scan`.

`run_layer` is the single entry point the stack uses. The reference path scans the
cell's own `__call__` and lets autodiff differentiate the loop; every faster path is
tested against it.
"""

import jax
from jaxtyping import Array, Float

from ._cells import AbstractCell, State


def scan_reference(
    cell: AbstractCell,
    xs: Float[Array, "time input"],
    state: State,
    *,
    reverse: bool = False,
    unroll: int = 1,
) -> tuple[Float[Array, "time output"], State]:
    """Runs `cell` over `xs` one step at a time: the reference path.

    **Arguments:**

    - `cell`: the recurrent cell.
    - `xs`: the inputs, a JAX array of shape `(time, input_size)`.
    - `state`: the initial state, structured as `cell.init_state()`.
    - `reverse`: read time backwards (outputs stay aligned with their inputs).
      (Keyword only argument.)
    - `unroll`: passed to `jax.lax.scan`. (Keyword only argument.)

    **Returns:**

    `(ys, final_state)`: the outputs `cell.output(state_t)` of shape
    `(time, output_size)` and the state after the last step read.
    """

    def step(carry, x):
        carry = cell(x, carry)
        return carry, cell.output(carry)

    final, ys = jax.lax.scan(step, state, xs, reverse=reverse, unroll=unroll)
    return ys, final


def run_layer(cell, xs, state, *, reverse=False, unroll=1):
    """Runs one layer; the stack's only way to do so. Same contract as
    `scan_reference`."""
    return scan_reference(cell, xs, state, reverse=reverse, unroll=unroll)
