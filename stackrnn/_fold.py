"""The fold over a stack's layers: layer `l` reads the outputs of layer `l - 1`
through what lies between layers (dropout, and the residual connection around the
layer), and runs each of its directions on them, with the cell that the layer's cell
gives for the sequence (`AbstractCell.for_sequence`, where wrapper cells draw their
masks).

How a direction runs over time is the caller's: a scan over the whole sequence, over
one chunk of a checkpointed sequence, or a single step (`StackedRNN.step`). The
fold, and the masks it draws, are the same for all three.

The fold is a Python loop over layers, the reference. A run of alike layers (the
same cells but for their parameters' values) may instead fold with one
`jax.lax.scan` over their parameters, stacked inside the traced function, which
compiles one layer where the loop compiles every layer; each layer draws its masks
from the same keys either way.
"""

from collections.abc import Callable, Iterable, Iterator, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._cells import AbstractCell, State
from ._dropout import dropout


Keys = tuple[PRNGKeyArray | None, PRNGKeyArray | None]


def split_keys(key: PRNGKeyArray | None, num_layers: int, num_directions: int) -> Keys:
    """A call's keys: an array with one for the input of each layer above the first,
    and an array of shape `(num_layers, num_directions)` with one per layer and
    direction for that cell; `(None, None)` without `key`."""
    if key is None:
        return None, None
    keys = jax.random.split(key, num_layers - 1 + num_layers * num_directions)
    cell_keys = keys[num_layers - 1 :].reshape(num_layers, num_directions)
    return keys[: num_layers - 1], cell_keys


def layer_dropout(
    p: float, variational: bool, keys: PRNGKeyArray
) -> Callable[[int, Float[Array, "time size"], Int[Array, ""] | None], Array]:
    """The dropout of the input of layer `i >= 1` (an integer, or a traced one),
    `drop(i, hs, start)`: a mask per element drawn from `keys[i - 1]`, folded with
    `start` for the chunk of a checkpointed sequence from step `start`; or,
    `variational`, one mask per sequence, the same at every step."""

    def drop(i, hs, start):
        key = keys[i - 1]
        if variational:
            return dropout(hs, p, key, shape=(1, hs.shape[-1]))
        if start is not None:
            key = jax.random.fold_in(key, start)
        return dropout(hs, p, key)

    return drop


def _alike(a: tuple[AbstractCell, ...], b: tuple[AbstractCell, ...]) -> bool:
    """Whether two layers' cells differ only in their arrays' values."""
    (params_a, static_a), (params_b, static_b) = (
        eqx.partition(cells, eqx.is_array) for cells in (a, b)
    )
    return (
        jax.tree.structure(params_a) == jax.tree.structure(params_b)
        and all(
            (x.shape, x.dtype) == (y.shape, y.dtype)
            for x, y in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b))
        )
        and eqx.tree_equal(static_a, static_b) is True
    )


def _runs(
    layers: Sequence[tuple[AbstractCell, ...]], scan_from: int | None
) -> Iterator[tuple[int, int, bool]]:
    """`(begin, end, scanned)` for consecutive spans of layers: runs of at least
    `scan_from` alike layers above the first are scanned, every other layer is a
    span of its own."""
    # The first layer, which reads the inputs as they are, is never alike.
    yield 0, 1, False
    if scan_from is None:
        yield from ((i, i + 1, False) for i in range(1, len(layers)))
        return
    begin = 1
    while begin < len(layers):
        end = begin + 1
        while end < len(layers) and _alike(layers[begin], layers[end]):
            end += 1
        if scan_from is not None and end - begin >= scan_from:
            yield begin, end, True
        else:
            yield from ((i, i + 1, False) for i in range(begin, end))
        begin = end


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def fold_layers(
    layers: Sequence[tuple[AbstractCell, ...]],
    hs: Float[Array, "time input"],
    states: Iterable[State],
    run: Callable[
        [AbstractCell, Float[Array, "time _"], State, int],
        tuple[Float[Array, "time _"], State],
    ],
    *,
    cell_keys: PRNGKeyArray | None,
    inference: bool,
    drop: Callable | None,
    residual: bool,
    start: Int[Array, ""] | None = None,
    streaming: bool = False,
    scan_from: int | None = None,
    all_layers: bool = True,
) -> tuple[list[Float[Array, "time _"]], list[State]]:
    """Runs every layer on the bottom layer's inputs `hs`.

    `layers` holds each layer's cells (forward, then backward if bidirectional);
    `states` the initial state of every layer and direction in that order;
    `cell_keys[i, d]` the key of layer `i`'s direction `d` (`None` for none).
    `run(cell, xs, state, direction) -> (ys, final_state)` runs one direction of a
    layer; `direction` is 0 (forward) or 1 (backward). `drop(i, hs, start)`: the
    dropout of layer `i`'s input, `None` for none. `residual`: layers 2..L add their
    input (before dropout) to their output. `start` and `streaming` go to
    `for_sequence`. `scan_from`: runs of at least this many alike layers above the
    first fold with `jax.lax.scan`; `None` for the Python loop throughout.

    Returns `(outputs, finals)`: every layer's outputs, bottom first (after the
    residual connection, before dropout), or only the top layer's unless
    `all_layers`; and every layer's and direction's final state in the order of
    `states`.
    """
    states = list(states)
    directions = len(layers[0])

    def layer(i, cells, hs, layer_states):
        # `i` is an integer, or a traced one >= 1 inside the scan over layers.
        below = hs
        between = not isinstance(i, int) or i > 0
        if between and drop is not None:
            hs = drop(i, hs, start)
        ys, finals = [], []
        for direction, (cell, state) in enumerate(zip(cells, layer_states)):
            cell, inputs = cell.for_sequence(
                hs,
                key=None if cell_keys is None else cell_keys[i, direction],
                inference=inference,
                start=start,
                streaming=streaming,
            )
            y, final = run(cell, inputs, state, direction)
            ys.append(y)
            finals.append(final)
        hs = ys[0] if len(ys) == 1 else jnp.concatenate(ys, axis=-1)
        if residual and between:
            hs = hs + below
        return hs, tuple(finals)

    outputs, finals = [], []
    for begin, end, scanned in _runs(layers, scan_from):
        span_states = [
            tuple(states[i * directions : (i + 1) * directions])
            for i in range(begin, end)
        ]
        if not scanned:
            hs, layer_finals = layer(begin, layers[begin], hs, span_states[0])
            outputs.append(hs)
            finals.extend(layer_finals)
            continue
        parts = [eqx.partition(cells, eqx.is_array) for cells in layers[begin:end]]
        static = parts[0][1]

        def body(hs, inputs):
            i, params, layer_states = inputs
            hs, layer_finals = layer(i, eqx.combine(params, static), hs, layer_states)
            return hs, (layer_finals, hs if all_layers else None)

        hs, (span_finals, span_outputs) = jax.lax.scan(
            body,
            hs,
            (
                jnp.arange(begin, end),
                _stack([params for params, _ in parts]),
                _stack(span_states),
            ),
        )
        for j in range(end - begin):
            finals.extend(jax.tree.map(lambda x: x[j], span_finals))
            if all_layers:
                outputs.append(span_outputs[j])
        if not all_layers:
            outputs.append(hs)
    return (outputs if all_layers else outputs[-1:]), finals
