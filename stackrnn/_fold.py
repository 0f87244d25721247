"""The fold over a stack's layers: layer `l` reads the outputs of layer `l - 1`
through the regularisers between layers (dropout, and the residual connection around
the layer), and runs each of its directions, with its cell's own regularisers, on them.

How a direction runs over time is the caller's: a scan over the whole sequence
(`StackedRNN.__call__`), over one chunk of a checkpointed sequence (`call_chunked`),
or a single step (`StackedRNN.step`). The fold, and the masks it draws, are the same
for all three.
"""

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._cells import AbstractCell, State
from ._regularise import dropout, regularise_cell


if TYPE_CHECKING:
    from ._stack import StackedRNN


def fold_layers(
    stack: "StackedRNN",
    hs: Float[Array, "time input"],
    states: Iterable[State],
    keys: tuple[PRNGKeyArray, list[list[PRNGKeyArray]]] | None,
    inference: bool,
    run: Callable[
        [AbstractCell, Float[Array, "time _"], State, int],
        tuple[Float[Array, "time _"], State],
    ],
    *,
    start: Int[Array, ""] | None = None,
) -> tuple[list[Float[Array, "time _"]], list[State]]:
    """Runs every layer of `stack` on the bottom layer's inputs `hs`.

    `states` holds the initial state of every layer and direction in PyTorch's
    order (`StackedRNN._split`); `keys` the masks' keys (`mask_keys`), `None` when
    no mask is drawn. `run(cell, xs, state, direction) -> (ys, final_state)` runs
    one direction of a layer, its cell already regularised; `direction` is 0
    (forward) or 1 (backward). `start`: the first step of the chunk of time `hs` is,
    in a checkpointed unidirectional stack, which draws its per-step masks from
    their keys folded with it.

    Returns `(outputs, finals)`: every layer's outputs, bottom first (after the
    residual connection, before dropout), and every layer's and direction's final
    state in the order of `states`.
    """
    states = iter(states)
    outputs, finals = [], []
    for i in range(stack.num_layers):
        below = hs
        if i > 0 and keys is not None and stack.dropout > 0:
            shape, key = None, keys[0][i - 1]
            if stack.variational:
                shape = (1, hs.shape[-1])
            elif start is not None:
                key = jax.random.fold_in(key, start)
            hs = dropout(hs, stack.dropout, key, shape=shape)
        ys = []
        for direction, cell in enumerate(stack._layer(i)):
            cell, inputs = regularise_cell(
                cell,
                hs,
                weight_drop=stack.weight_drop,
                recurrent_dropout=stack.recurrent_dropout,
                zoneout=stack.zoneout,
                key=None if keys is None else keys[1][i][direction],
                inference=inference,
                start=start,
            )
            y, final = run(cell, inputs, next(states), direction)
            ys.append(y)
            finals.append(final)
        hs = ys[0] if len(ys) == 1 else jnp.concatenate(ys, axis=-1)
        if stack.residual and i > 0:
            hs = hs + below
        outputs.append(hs)
    return outputs, finals
