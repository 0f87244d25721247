"""The fast path of a layer: the input projection out of the loop, and a hand-written
backward pass.

For a cell whose step is `pointwise(W_ih x_t + b_ih, W_hh h_{t-1} + b_hh, s_{t-1})`
(an [`stackrnn.AbstractAffineCell`][] with no other parameters):

- forward: the input projection `GX = X W_ih^T + b_ih` of all time steps is one
  matrix product before the loop; the loop then computes only the recurrent
  projection `gh_t` and the elementwise update, keeping `gh_t` and the previous
  state for the backward pass. (At large widths a product with all `time * batch`
  rows runs near the machine's GEMM rate, a step's product with `batch` rows well
  below it. At small widths it is slower: under `jax.vmap` the projected gates are
  transposed to time-major order for the loop, and that copy costs more than the
  products save; the default path policy, `ByWidth()`, keeps such layers off this
  path. The measurement log, `benchmarks/README.md`, has the numbers.) The loop
  reads the projected gates as one array per gate (`_by_gate`), which XLA:CPU's
  elementwise kernels read faster than slices of one array.
- backward: a reverse scan computes the gradients of the gate pre-activations,
  `dGX_t` and `dGH_t`, and the state gradient, nothing else; the weight and bias
  gradients are then single matrix products over all time steps and examples,
  `dW_ih = dGX^T X`, `dW_hh = dGH^T H_prev`, and so is `dX = dGX W_ih`.

Batching. The weight gradients are not written inside a `custom_vjp` backward: a
backward pass cannot know whether it runs under `jax.vmap` for per-example gradients
(`vmap(grad(f))`, where each example must get its own) or inside a batched loss
(`grad(vmap(f))`, where JAX sums them): a `custom_vmap` rule that sums them is wrong
for the first, and one that does not materialises a weight gradient per example for
the second. Instead the reverse scan returns `dGX` and `dGH`; the input projection
is an ordinary product that JAX differentiates, and the recurrent one carries a
`custom_jvp` whose tangent is linear in the weights (`H_prev dW_hh^T + db_hh`): JAX
transposes and batches both itself, so under `grad(vmap(f))` each weight gradient is
one matrix product contracting batch and time, and under `vmap(grad(f))` it stays
per example.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp

from ._cells import AbstractAffineCell


def _affine_fields(cell):
    return (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)


def supports(cell) -> bool:
    """Whether `cell` runs on the fast path: an affine cell whose only parameters are
    `weight_ih`, `weight_hh`, `bias_ih` and `bias_hh` (an LSTM with `proj_size` has
    `weight_hr` too, and takes the reference path)."""
    if not isinstance(cell, AbstractAffineCell):
        return False
    rest = eqx.tree_at(
        _affine_fields, cell, replace=(None,) * 4, is_leaf=lambda x: x is None
    )
    return not jax.tree.leaves(eqx.filter(rest, eqx.is_array))


def _affine(weight, xs, bias):
    # `xs @ weight.T`: a single product over all rows when `xs` is a matrix.
    ys = xs @ weight.T
    return ys if bias is None else ys + bias


def _run(cell, gates_x, state, unroll):
    """The forward recurrence from the projected inputs, for values only (its inputs
    carry no gradient). Returns the state after and before every step, the output
    each step read (`h_prev`) and the recurrent projection, which the reverse scan and
    the weight gradients read."""

    # `h_prev @ weight_hh.T` reads the weight across its rows at every step; one
    # transposed copy before the loop makes every step's product read it row by row,
    # which measured faster at large widths.
    weight_hh_t = cell.weight_hh.T

    def step(s, gx):
        gx = jnp.concatenate(gx, -1)
        h_prev = cell.output(s)
        gh = h_prev @ weight_hh_t
        gh = gh if cell.bias_hh is None else gh + cell.bias_hh
        new = cell.pointwise(gx, gh, s)
        return new, (new, s, h_prev, gh)

    _, out = jax.lax.scan(step, state, _by_gate(gates_x, cell), unroll=unroll)
    return out


def _by_gate(gates, cell):
    """`gates` split along its last axis into blocks of `hidden_size` (one per gate),
    for the loop to read; `jnp.concatenate` in the step restores them.

    XLA:CPU fuses the loop's read of a step into the elementwise kernel of the gates,
    and that kernel runs several times slower when it slices each gate out of the
    step's whole row of gates than on whole arrays (the measurement log,
    `benchmarks/README.md`)."""
    width = gates.shape[-1]
    if width % cell.hidden_size:
        return (gates,)
    return tuple(jnp.split(gates, width // cell.hidden_size, axis=-1))


@jax.custom_jvp
def recurrent_projection(value, h_prev, weight, bias):
    """Returns `value`, already computed by `_run` as `h_prev @ weight.T + bias`; its
    derivative is that of the affine map in `weight` and `bias` alone: `h_prev` enters
    without gradient, the reverse scan accounts for it."""
    del h_prev, weight, bias
    return value


def _recurrent_projection_jvp(primals, tangents):
    value, h_prev, weight, bias = primals
    _, _, d_weight, d_bias = tangents
    # Linear in the tangents, so JAX transposes it into single matrix products over
    # all steps (and, under `vmap`, all examples). Symbolic zeros skip their product.
    del weight
    terms = []
    if not _is_zero(d_weight):
        terms.append(h_prev @ d_weight.T)
    if bias is not None and not _is_zero(d_bias):
        terms.append(jnp.broadcast_to(d_bias, value.shape))
    return value, sum(terms[1:], terms[0]) if terms else jnp.zeros_like(value)


def _is_zero(tangent):
    return isinstance(tangent, jax.custom_derivatives.SymbolicZero)


recurrent_projection.defjvp(_recurrent_projection_jvp, symbolic_zeros=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _recurrence(cell, gates_x, gates_h, states, prev, state0, unroll):
    """Returns `states` (computed by `_run`). Its backward pass is the reverse scan:
    cotangents of the states in, cotangents of `gates_x`, `gates_h` and `state0`
    out. `cell`, `states` and `prev` (the state before each step) enter without
    gradient."""
    del cell, gates_x, gates_h, prev, state0, unroll
    return states


def _recurrence_fwd(cell, gates_x, gates_h, states, prev, state0, unroll):
    del unroll
    return states, (cell, gates_x, gates_h, states, prev, state0)


def _recurrence_bwd(unroll, residuals, d_states):
    cell, gates_x, gates_h, states, prev, state0 = residuals
    # s_{t-1} also fed gates_h through h_{t-1} = output(s_{t-1}); `output` selects
    # part of the state, a linear map, so its backward function is the same at
    # every step.
    _, output_vjp = jax.vjp(cell.output, state0)

    def step(carry, inputs):
        d_state, gx, gh, s_prev = inputs
        d_state = jax.tree.map(jnp.add, d_state, carry)
        _, pointwise_vjp = jax.vjp(cell.pointwise, gx, gh, s_prev)
        d_gx, d_gh, d_prev = pointwise_vjp(d_state)
        (d_prev_from_h,) = output_vjp(d_gh @ cell.weight_hh)
        carry = jax.tree.map(jnp.add, d_prev, d_prev_from_h)
        return carry, (d_gx, d_gh)

    zeros = jax.tree.map(jnp.zeros_like, state0)
    d_state0, (d_gates_x, d_gates_h) = jax.lax.scan(
        step, zeros, (d_states, gates_x, gates_h, prev), reverse=True, unroll=unroll
    )
    no_gradient = jax.tree.map(jnp.zeros_like, (cell, states, prev))
    d_cell, d_states_in, d_prev_in = no_gradient
    return d_cell, d_gates_x, d_gates_h, d_states_in, d_prev_in, d_state0


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def scan_fast(cell, xs, state, *, reverse=False, unroll=1):
    """Same contract as `scan_reference` (without `length` and `resets`), for a cell
    that `supports`."""
    if reverse:
        ys, final = scan_fast(cell, xs[::-1], state, unroll=unroll)
        return ys[::-1], final
    stop = jax.lax.stop_gradient
    fixed = stop(cell)
    gates_x = _affine(cell.weight_ih, xs, cell.bias_ih)  # all steps in one product
    states, prev, h_prev, gates_h = _run(fixed, stop(gates_x), stop(state), unroll)
    gates_h = recurrent_projection(gates_h, h_prev, cell.weight_hh, cell.bias_hh)
    states = _recurrence(fixed, gates_x, gates_h, states, prev, state, unroll)
    ys = jax.vmap(cell.output)(states)
    return ys, jax.tree.map(lambda s: s[-1], states)
