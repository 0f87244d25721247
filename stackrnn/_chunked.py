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

Within a chunk every layer runs as without checkpointing, through `run_layer`, on the
path it would take (the fast path's stored projections are per chunk here).
When `chunk` does not divide `time`, the last `time % chunk` steps form one shorter
chunk, run outside the outer scan; nothing is padded.
"""

import math

import jax
import jax.numpy as jnp


def check_checkpoint(value) -> bool | int:
    """`value` must be `True`, `False` or a chunk length, an integer >= 1."""
    if isinstance(value, bool):
        return value
    if not isinstance(value, int):
        raise TypeError(
            "`checkpoint` must be True, False or a chunk length (an integer >= 1), "
            f"got {value!r}"
        )
    if value < 1:
        raise ValueError(
            f"`checkpoint` must be a chunk length >= 1 (or True or False), got {value}"
        )
    return value


def chunk_length(checkpoint: bool | int, time: int) -> int | None:
    """The chunk length for a sequence of `time` steps: `None` without checkpointing,
    `ceil(sqrt(time))` for `True`, else `checkpoint` itself."""
    if checkpoint is False:
        return None
    if checkpoint is True:
        return math.isqrt(time - 1) + 1
    return checkpoint


def scan_chunks(run, carry, xs, *, time, chunk, reverse):
    """Runs `run(carry, xs_chunk, start, index) -> (carry, ys_chunk)` over the chunks
    of `time` steps, `jax.checkpoint`-ed; `xs` and `ys` are PyTrees of arrays whose
    leading axis is time, `start` the chunk's first step and `index` its number, both
    scalar integers. With `reverse`, the chunks are visited last first (`run` must
    then read each chunk backwards itself).

    Returns `(carry, ys)`, `ys` with the chunks joined back along time.
    """
    full, rest = divmod(time, chunk)

    def remainder(carry):
        piece = jax.tree.map(lambda a: a[full * chunk :], xs)
        index = jnp.asarray(full)
        return jax.checkpoint(run)(carry, piece, index * chunk, index)

    def chunks(carry):
        pieces = jax.tree.map(
            lambda a: a[: full * chunk].reshape(full, chunk, *a.shape[1:]), xs
        )
        index = jnp.arange(full)

        def body(carry, inputs):
            piece, i = inputs
            return run(carry, piece, i * chunk, i)

        # `prevent_cse` guards against XLA merging the recomputation with the
        # forward pass; a loop body cannot be merged that way, so it is not needed.
        carry, ys = jax.lax.scan(
            jax.checkpoint(body, prevent_cse=False),
            carry,
            (pieces, index),
            reverse=reverse,
        )
        return carry, jax.tree.map(lambda y: y.reshape(-1, *y.shape[2:]), ys)

    ys_full = ys_rest = None
    if reverse and rest:
        carry, ys_rest = remainder(carry)
    if full:
        carry, ys_full = chunks(carry)
    if not reverse and rest:
        carry, ys_rest = remainder(carry)
    pieces = [ys for ys in (ys_full, ys_rest) if ys is not None]
    if len(pieces) == 1:
        return carry, pieces[0]
    return carry, jax.tree.map(lambda a, b: jnp.concatenate([a, b]), *pieces)


def run_chunked(layers, xs, states, fresh, *, chunk, reverse, length, resets):
    """Runs a unidirectional stack over `xs` in checkpointed chunks of `chunk` steps.

    `layers(hs, states, index, length, resets) -> (outputs, finals)` runs every layer
    on one chunk `hs` from `states` (a list, one per layer), reading the chunk
    forwards or backwards as the stack does, for the chunk numbered `index`, with
    `length` and `resets` relative to the chunk (`length` may be outside
    `[1, chunk]`; `None` when not given); it returns a list of output chunks and
    the layers' final states. `fresh` holds each layer's `init_state()`.

    Returns `(outputs, finals)`: the output lists of the chunks joined along time,
    and the final states.
    """
    time = xs.shape[0]
    steps = jnp.arange(time)
    if length is not None:
        # Any integer dtype of `length` compares as the steps' (as in the layer).
        length = jnp.asarray(length).astype(steps.dtype)
    inputs = {"xs": xs}
    if resets is not None:
        if length is not None:
            resets = resets & (steps < length)
        inputs["resets"] = resets
        if reverse:
            # Reading backwards, a segment starting at step `s` ends the read of
            # `s`, so the state is reset before `s - 1`. The layer does this within
            # a chunk; across chunks, the flag of the chunk's first step is needed
            # when the chunk before it starts: `after[t] = resets[t + 1]`.
            inputs["after"] = jnp.append(resets[1:], False)

    def run(carry, piece, start, index):
        if "after" in piece:
            reset = piece["after"][-1]
            carry = [
                jax.tree.map(lambda f, s: jnp.where(reset, f, s), f, s)
                for f, s in zip(fresh, carry)
            ]
        outputs, finals = layers(
            piece["xs"],
            carry,
            index,
            None if length is None else length - start,
            piece.get("resets"),
        )
        return finals, outputs

    finals, outputs = scan_chunks(
        run, list(states), inputs, time=time, chunk=chunk, reverse=reverse
    )
    return outputs, finals
