"""Checkpointed runs of a stack: time cut into chunks, each chunk's forward pass
recomputed during the backward pass (gradient checkpointing, `jax.checkpoint`).

An outer `jax.lax.scan` runs over chunks of `chunk` steps, and its body, which runs
every layer of a unidirectional stack over one chunk (layer `l` reading the chunk
output of layer `l-1`), is `jax.checkpoint`-ed. The backward pass then keeps only each
chunk's first state (all layers) and recomputes the chunk's steps when it gets there,
so besides the inputs and outputs it holds `time / chunk` boundary states and one
chunk's per-step residuals: about `sqrt(time)` of each with `chunk ~ sqrt(time)`.
Time must be outside the layers for that: a fold over layers, each over all steps,
would keep every layer's whole output sequence for the backward pass of the layer
above, whatever happens inside each layer.

Nested chunks (`Chunks(c1, c2, ...)`) cut each chunk of `c1` steps into
checkpointed chunks of `c2` steps, and so on: the recomputation of an outer chunk
keeps only its inner chunks' first states. With `k` levels, memory for about
`k * time ** (1 / (k + 1))` steps, at one more forward pass per level.

Within a chunk every layer runs as without checkpointing, through `run_layer`, on the
path it would take (the fast path's stored projections are per chunk here).
When `chunk` does not divide `time`, the last `time % chunk` steps form one shorter
chunk, run outside the outer scan; nothing is padded.

`run_chunked` runs a unidirectional stack so, given a function that runs all its
layers on a chunk. A bidirectional stack cannot interleave its layers that way (the
backward direction of layer `l` reads all of layer `l-1`), so `run_direction`
checkpoints each direction of each of its layers on its own; without chunks,
`run_direction` is how any direction runs over a whole sequence.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ._cells import AbstractCell, State
from ._layer import run_layer
from ._time import Scan


def scan_chunks(run, carry, xs, *, chunks, reverse, offset=0):
    """Runs `run(carry, xs_chunk, start) -> (carry, ys_chunk)` over the chunks of
    `xs`, `jax.checkpoint`-ed; `xs` and `ys` are PyTrees of arrays whose leading axis
    is time, `start` the chunk's first step (counted from the start of the whole
    sequence, `offset` being that of `xs`), a scalar integer. `chunks` holds the
    chunk lengths, outermost first: each chunk is itself cut into chunks of the next
    length. With `reverse`, the chunks are visited last first (`run` must then read
    each chunk backwards itself).

    Returns `(carry, ys)`, `ys` with the chunks joined back along time.
    """
    time = jax.tree.leaves(xs)[0].shape[0]
    chunk, inner = chunks[0], chunks[1:]
    full, rest = divmod(time, chunk)

    def run_chunk(carry, piece, start):
        if inner:
            return scan_chunks(
                run, carry, piece, chunks=inner, reverse=reverse, offset=start
            )
        return run(carry, piece, start)

    def remainder(carry):
        piece = jax.tree.map(lambda a: a[full * chunk :], xs)
        return jax.checkpoint(run_chunk)(carry, piece, offset + full * chunk)

    def chunks_loop(carry):
        pieces = jax.tree.map(
            lambda a: a[: full * chunk].reshape(full, chunk, *a.shape[1:]), xs
        )
        starts = offset + chunk * jnp.arange(full)

        def body(carry, inputs):
            return run_chunk(carry, *inputs)

        # `prevent_cse` guards against XLA merging the recomputation with the
        # forward pass; a loop body cannot be merged that way, so it is not needed.
        carry, ys = jax.lax.scan(
            jax.checkpoint(body, prevent_cse=False),
            carry,
            (pieces, starts),
            reverse=reverse,
        )
        return carry, jax.tree.map(lambda y: y.reshape(-1, *y.shape[2:]), ys)

    ys_full = ys_rest = None
    if reverse and rest:
        carry, ys_rest = remainder(carry)
    if full:
        carry, ys_full = chunks_loop(carry)
    if not reverse and rest:
        carry, ys_rest = remainder(carry)
    pieces = [ys for ys in (ys_full, ys_rest) if ys is not None]
    if len(pieces) == 1:
        return carry, pieces[0]
    return carry, jax.tree.map(lambda a, b: jnp.concatenate([a, b]), *pieces)


def run_chunked(layers, inputs, states, fresh, *, chunks, reverse, length, resets):
    """Runs a unidirectional stack over `inputs` in checkpointed chunks.

    `layers(piece, states, start, length, resets) -> (outputs, finals)` runs every
    layer on one chunk of `inputs` (a PyTree of arrays whose leading axis is time)
    from `states` (a list, one per layer), reading the chunk forwards or backwards
    as the stack does, for the chunk whose first step is `start`, with `length` and
    `resets` relative to the chunk (`length` may be outside `[1, chunk]`; `None`
    when not given); it returns a PyTree of outputs with leading axis time (the
    chunk's) and the layers' final states. `fresh` holds each layer's
    `init_state()`; `chunks` the chunk lengths, outermost first.

    Returns `(outputs, finals)`: the outputs of the chunks joined along time, and
    the final states.
    """
    time = jax.tree.leaves(inputs)[0].shape[0]
    steps = jnp.arange(time)
    if length is not None:
        # Any integer dtype of `length` compares as the steps' (as in the layer).
        length = jnp.asarray(length).astype(steps.dtype)
    pieces = {"inputs": inputs}
    if resets is not None:
        if length is not None:
            resets = resets & (steps < length)
        pieces["resets"] = resets
        if reverse:
            # Reading backwards, a segment starting at step `s` ends the read of
            # `s`, so the state is reset before `s - 1`. The layer does this within
            # a chunk; across chunks, the flag of the chunk's first step is needed
            # when the chunk before it starts: `after[t] = resets[t + 1]`.
            pieces["after"] = jnp.append(resets[1:], False)

    def run(carry, piece, start):
        if "after" in piece:
            reset = piece["after"][-1]
            carry = [
                jax.tree.map(lambda f, s: jnp.where(reset, f, s), f, s)
                for f, s in zip(fresh, carry)
            ]
        outputs, finals = layers(
            piece["inputs"],
            carry,
            start,
            None if length is None else length - start,
            piece.get("resets"),
        )
        return finals, outputs

    finals, outputs = scan_chunks(
        run, list(states), pieces, chunks=chunks, reverse=reverse
    )
    return outputs, finals


def run_direction(
    cell: AbstractCell,
    xs: Float[Array, "time input"],
    state: State,
    direction: int,
    *,
    scan: Scan,
    chunks: tuple[int, ...] | None,
    length: Int[Array, ""] | int | None,
    resets: Bool[Array, " time"] | None,
) -> tuple[Float[Array, "time output"], State]:
    """One direction of one layer over the whole of `xs`, through `run_layer` with
    `scan`'s `unroll` and `path`: backwards for `direction=1` or a `scan.reverse`
    stack. With `chunks` (not `None`), checkpointed on its own, as the layers of a
    bidirectional stack are: `xs` then already carries every mask the direction
    reads. Returns `(ys, final_state)`."""
    reverse = scan.reverse or direction == 1

    def run(hs, layer_state, run_length, run_resets):
        return run_layer(
            cell,
            hs,
            layer_state,
            reverse=reverse,
            unroll=scan.unroll,
            length=run_length,
            resets=run_resets,
            path=scan.path,
        )

    if chunks is None:
        return run(xs, state, length, resets)

    def layers(hs, states, start, chunk_length, chunk_resets):
        del start
        ys, final = run(hs, states[0], chunk_length, chunk_resets)
        return ys, [final]

    ys, (final,) = run_chunked(
        layers,
        xs,
        [state],
        [cell.init_state()],
        chunks=chunks,
        reverse=reverse,
        length=length,
        resets=resets,
    )
    return ys, final
