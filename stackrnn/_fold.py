"""The fold over a stack's layers: layer `l` reads the outputs of layer `l - 1`
through what lies between layers (dropout, and the residual connection around the
layer), and runs each of its directions on them, with the cell that the layer's cell
gives for the sequence (`AbstractCell.for_sequence`, where wrapper cells draw their
masks).

How a direction runs over time is the caller's: a scan over the whole sequence, over
one chunk of a checkpointed sequence, or a single step (`StackedRNN.step`). The
fold, and the masks it draws, are the same for all three.
"""

from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._cells import AbstractCell, State
from ._dropout import dropout


Keys = tuple[list[PRNGKeyArray], list[list[PRNGKeyArray | None]]]


def split_keys(key: PRNGKeyArray | None, num_layers: int, num_directions: int) -> Keys:
    """A call's keys: one for the input of each layer above the first, and one per
    layer and direction for that cell (all `None` without `key`)."""
    if key is None:
        return [], [[None] * num_directions for _ in range(num_layers)]
    keys = jax.random.split(key, num_layers - 1 + num_layers * num_directions)
    cell_keys = keys[num_layers - 1 :]
    return list(keys[: num_layers - 1]), [
        [cell_keys[i * num_directions + d] for d in range(num_directions)]
        for i in range(num_layers)
    ]


def layer_dropout(
    p: float, variational: bool, keys: list[PRNGKeyArray]
) -> Callable[[int, Float[Array, "time size"], Int[Array, ""] | None], Array]:
    """The dropout of the input of layer `i >= 1`, `drop(i, hs, start)`: a mask per
    element drawn from `keys[i - 1]`, folded with `start` for the chunk of a
    checkpointed sequence from step `start`; or, `variational`, one mask per
    sequence, the same at every step."""

    def drop(i, hs, start):
        key = keys[i - 1]
        if variational:
            return dropout(hs, p, key, shape=(1, hs.shape[-1]))
        if start is not None:
            key = jax.random.fold_in(key, start)
        return dropout(hs, p, key)

    return drop


def fold_layers(
    layers: Sequence[tuple[AbstractCell, ...]],
    hs: Float[Array, "time input"],
    states: Iterable[State],
    run: Callable[
        [AbstractCell, Float[Array, "time _"], State, int],
        tuple[Float[Array, "time _"], State],
    ],
    *,
    cell_keys: list[list[PRNGKeyArray | None]],
    inference: bool,
    drop: Callable | None,
    residual: bool,
    start: Int[Array, ""] | None = None,
    streaming: bool = False,
) -> tuple[list[Float[Array, "time _"]], list[State]]:
    """Runs every layer on the bottom layer's inputs `hs`.

    `layers` holds each layer's cells (forward, then backward if bidirectional);
    `states` the initial state of every layer and direction in that order;
    `cell_keys[i][d]` the key of layer `i`'s direction `d`. `run(cell, xs, state,
    direction) -> (ys, final_state)` runs one direction of a layer; `direction` is
    0 (forward) or 1 (backward). `drop(i, hs, start)`: the dropout of layer `i`'s
    input, `None` for none. `residual`: layers 2..L add their input (before
    dropout) to their output. `start` and `streaming` go to `for_sequence`.

    Returns `(outputs, finals)`: every layer's outputs, bottom first (after the
    residual connection, before dropout), and every layer's and direction's final
    state in the order of `states`.
    """
    states = iter(states)
    outputs, finals = [], []
    for i, cells in enumerate(layers):
        below = hs
        if i > 0 and drop is not None:
            hs = drop(i, hs, start)
        ys = []
        for direction, cell in enumerate(cells):
            cell, inputs = cell.for_sequence(
                hs,
                key=cell_keys[i][direction],
                inference=inference,
                start=start,
                streaming=streaming,
            )
            y, final = run(cell, inputs, next(states), direction)
            ys.append(y)
            finals.append(final)
        hs = ys[0] if len(ys) == 1 else jnp.concatenate(ys, axis=-1)
        if residual and i > 0:
            hs = hs + below
        outputs.append(hs)
    return outputs, finals
