"""The fused path of a layer: the fast path's loop as one XLA FFI call on the CPU.

When the optional `stackrnn-kernels` distribution is installed (`pip install
./kernels` from the repository), its handlers run a layer's whole loop, forward and
backward, as one custom call each, where `jax.lax.scan` runs about thirty XLA:CPU
kernels per step. Everything else is `stackrnn._fast`'s split: the input projection
`xs @ weight_ih.T` of all steps is one XLA product before the loop, and the weight
gradients come from `recurrent_projection`'s linear tangent and the input
projection's own derivative, so `grad(vmap(f))` contracts batch and time in single
products and `vmap(grad(f))` stays per example. The handlers add `bias_ih` inside
the loop (an XLA addition would be a pass of its own over every step's gates), and
receive the batch of `jax.vmap` as a leading array axis (`vmap_method="expand_dims"`:
unbatched weights are not copied).

Without the kernels, `available()` is `False` and layers take the other paths; the
numbers differ only by float rounding.
"""

import functools

import jax
import jax.numpy as jnp

from ._cells import ElmanCell, GRUCell, LSTMCell
from ._fast import recurrent_projection


try:
    import stackrnn_kernels as kernels
except ImportError:  # the optional accelerator is not installed
    kernels = None


def available() -> bool:
    """Whether the fused loops are installed (the `stackrnn-kernels` distribution)."""
    return kernels is not None


def _kind(cell):
    """The handlers' name for `cell`'s kind of step, or `None` for one they lack."""
    if type(cell) is GRUCell:
        return "gru"
    if type(cell) is LSTMCell:
        return "lstm" if cell.weight_hr is None else None
    if type(cell) is ElmanCell:
        return cell.nonlinearity
    return None


def supports(cell) -> bool:
    """Whether `cell` can run on the fused path here: the kernels are installed, JAX
    runs on the CPU, and `cell` is an Elman, GRU or LSTM cell (without `proj_size`)
    of float32 or float64."""
    return (
        available()
        and jax.default_backend() == "cpu"
        and _kind(cell) is not None
        and cell.weight_hh.dtype in (jnp.float32, jnp.float64)
    )


def _bias(cell, name):
    bias = getattr(cell, name)
    return (
        jnp.zeros(cell.weight_hh.shape[:1], cell.weight_hh.dtype)
        if bias is None
        else bias
    )


def _split(cell, state):
    """`(h0, c0)`; `c0` is empty for a cell whose state is `h` alone."""
    if _kind(cell) == "lstm":
        return state
    return state, jnp.zeros((0,), state.dtype)


def _forward(cell, gates_x, bias_ih, state, reverse):
    """`(hs, cs)`: every step's state. No argument carries a gradient."""
    h0, c0 = _split(cell, state)
    time, _ = gates_x.shape
    dtype = gates_x.dtype
    lstm = _kind(cell) == "lstm"
    shapes = (
        jax.ShapeDtypeStruct((time, cell.hidden_size), dtype),
        jax.ShapeDtypeStruct((time, cell.hidden_size) if lstm else (0,), dtype),
    )
    call = jax.ffi.ffi_call(kernels.FORWARD, shapes, vmap_method="expand_dims")
    return call(
        gates_x,
        bias_ih,
        cell.weight_hh,
        _bias(cell, "bias_hh"),
        h0,
        c0,
        cell=kernels.CELLS[_kind(cell)],
        reverse=reverse,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _recurrence(reverse, cell, gates_x, bias_ih, gates_h, state, hs, cs):
    """Returns `(hs, cs)` (computed by `_forward`). Its backward pass is the reverse
    loop: cotangents of the states in, cotangents of `gates_x`, `bias_ih`, `gates_h`
    and `state` out. `cell` (whose `weight_hh` and `bias_hh` the loop reads), `hs`
    and `cs` enter without gradient; `gates_h` is read for its cotangent alone (the
    loop recomputes the projections)."""
    del reverse, cell, gates_x, bias_ih, gates_h, state
    return hs, cs


def _recurrence_fwd(reverse, cell, gates_x, bias_ih, gates_h, state, hs, cs):
    return (hs, cs), (cell, gates_x, bias_ih, state, hs, cs)


def _recurrence_bwd(reverse, residuals, cotangents):
    cell, gates_x, bias_ih, state, hs, cs = residuals
    d_hs, d_cs = cotangents
    h0, c0 = _split(cell, state)
    kind = _kind(cell)
    # Only the GRU's two gate cotangents differ (its candidate's recurrent part is
    # scaled by `r`); the other cells' are one array, written once and read by both
    # weight gradients' products.
    gru = kind == "gru"
    shapes = (
        jax.ShapeDtypeStruct(gates_x.shape, gates_x.dtype),
        jax.ShapeDtypeStruct(gates_x.shape if gru else (0,), gates_x.dtype),
        jax.ShapeDtypeStruct(h0.shape, h0.dtype),
        jax.ShapeDtypeStruct(c0.shape, c0.dtype),
    )
    call = jax.ffi.ffi_call(kernels.BACKWARD, shapes, vmap_method="expand_dims")
    d_gates_x, d_gates_h, d_h0, d_c0 = call(
        gates_x,
        bias_ih,
        cell.weight_hh,
        _bias(cell, "bias_hh"),
        h0,
        c0,
        hs,
        cs,
        d_hs,
        d_cs,
        cell=kernels.CELLS[kind],
        reverse=reverse,
    )
    if not gru:
        d_gates_h = d_gates_x
    d_state = (d_h0, d_c0) if kind == "lstm" else d_h0
    d_cell, d_hs, d_cs = jax.tree.map(jnp.zeros_like, (cell, hs, cs))
    return d_cell, d_gates_x, jnp.sum(d_gates_x, 0), d_gates_h, d_state, d_hs, d_cs


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def scan_fused(cell, xs, state, *, reverse=False, unroll=1):
    """Same contract as `scan_fast`, for a cell that `supports`; `unroll` has no
    effect (the loop is one call)."""
    del unroll
    stop = jax.lax.stop_gradient
    fixed = stop(cell)
    gates_x = xs @ cell.weight_ih.T  # all steps in one product
    bias_ih = _bias(cell, "bias_ih")
    hs, cs = _forward(fixed, stop(gates_x), stop(bias_ih), stop(state), reverse)
    h0, _ = _split(cell, stop(state))
    before = (hs[1:], h0[None]) if reverse else (h0[None], hs[:-1])
    # The recurrent projections carry the weight gradients as in `scan_fast`; their
    # values are never read (the backward loop recomputes them), so an array of
    # their shape and batch stands in and nothing computes or stores them.
    gates_h = recurrent_projection(
        stop(gates_x), jnp.concatenate(before), cell.weight_hh, cell.bias_hh
    )
    hs, cs = _recurrence(reverse, fixed, gates_x, bias_ih, gates_h, state, hs, cs)
    last = 0 if reverse else -1
    return hs, ((hs[last], cs[last]) if _kind(cell) == "lstm" else hs[last])
