"""The arithmetic the cells share: PyTorch's parameters drawn in PyTorch's order, the
affine maps, the GRU update and the LSTM memory with their hand-written derivatives,
and the checks of the cells' arguments.

The plain and the layer-normalised cells of one kind differ only in where they
normalise; everything else they compute comes from here.
"""

import math

import jax
import jax.numpy as jnp

from ._checks import check_key, check_size, is_number


def default_float():
    """float64 when the user enabled x64, else float32 (as Equinox's layers do)."""
    return jax.dtypes.canonicalize_dtype(jnp.float64)


def check_sizes(input_size, hidden_size, key) -> tuple[int, int]:
    """A cell's sizes, as Python ints, and its `key`."""
    check_key("key", key)
    return check_size("input_size", input_size), check_size("hidden_size", hidden_size)


def check_proj_size(proj_size, hidden_size) -> int:
    proj_size = check_size("proj_size", proj_size, minimum=0)
    if proj_size >= hidden_size:
        raise ValueError(
            f"`proj_size` (={proj_size}) must be smaller than `hidden_size` "
            f"(={hidden_size})"
        )
    return proj_size


def check_forget_bias(forget_bias, bias) -> None:
    if forget_bias is None:
        return
    if not is_number(forget_bias) or not math.isfinite(forget_bias):
        raise ValueError(
            f"`forget_bias` must be a finite number or None, got {forget_bias!r}"
        )
    if not bias:
        raise ValueError(
            f"`forget_bias` (={forget_bias!r}) needs biases, but `bias` is False"
        )


def check_init(init) -> None:
    """`init` must be an initialiser object, not the name of one."""
    if isinstance(init, str) or not callable(init):
        raise TypeError(
            "`init` must be an initialiser such as `stackrnn.PyTorchInit()`, "
            "`stackrnn.NormalInit(0.01)` or `stackrnn.OrthogonalInit()` (a callable "
            f"`init(key, shape, dtype, *, role, hidden_size)`), got {init!r}"
        )


def draw_params(init, key, dtype, hidden_size, gates, input_size, recurrent, bias):
    """PyTorch's `(weight_ih, weight_hh, bias_ih, bias_hh)` for `gates` blocks of
    `hidden_size` rows reading `input_size` inputs and `recurrent` outputs, drawn in
    PyTorch's order; `None` for the biases when `bias` is False."""
    check_init(init)
    rows = gates * hidden_size
    shapes = dict(
        weight_ih=(rows, input_size),
        weight_hh=(rows, recurrent),
        bias_ih=(rows,),
        bias_hh=(rows,),
    )
    keys = jax.random.split(key, len(shapes))
    return tuple(
        None
        if role.startswith("bias") and not bias
        else init(k, shape, dtype, role=role, hidden_size=hidden_size)
        for (role, shape), k in zip(shapes.items(), keys)
    )


def draw_weight_hr(init, key, dtype, hidden_size, proj_size):
    """An LSTM's projection `weight_hr`, or `None` when `proj_size` is 0. Drawn from
    its own key, split off before the other parameters'."""
    if not proj_size:
        return None
    shape = (proj_size, hidden_size)
    return init(key, shape, dtype, role="weight_hr", hidden_size=hidden_size)


def with_forget_bias(bias_ih, bias_hh, hidden_size, forget_bias):
    """Sets the forget gate's block (rows `hidden_size:2*hidden_size` in the order
    i, f, g, o) so that `bias_ih + bias_hh` there equals `forget_bias`: all of it on
    `bias_ih`, zero on `bias_hh`. Unchanged if `forget_bias` is None."""
    if forget_bias is None:
        return bias_ih, bias_hh
    forget = slice(hidden_size, 2 * hidden_size)
    return bias_ih.at[forget].set(forget_bias), bias_hh.at[forget].set(0)


def affine(weight, x, bias):
    """`weight @ x + bias`, written `x @ weight.T`: the same product, which XLA:CPU
    compiled faster under `jax.vmap` for the Elman stacks of the benchmarks."""
    y = x @ weight.T
    return y if bias is None else y + bias


def _gru_gates(gates_x, gates_h, h):
    """The GRU's new state, and the gates `r`, `z`, `n` and the projection `h_n`
    that its derivative reads."""
    x_r, x_z, x_n = jnp.split(gates_x, 3)
    h_r, h_z, h_n = jnp.split(gates_h, 3)
    r = jax.nn.sigmoid(x_r + h_r)
    z = jax.nn.sigmoid(x_z + h_z)
    n = jnp.tanh(x_n + r * h_n)
    return (1 - z) * n + z * h, (r, z, n, h_n)


@jax.custom_jvp
def gru_update(gates_x, gates_h, h):
    """PyTorch's GRU update from the two projections, each split r, z, n.

    The derivative is written out so that reverse mode keeps four arrays per step
    (`r`, `z`, `n`, `h_n`; `h` is kept for `weight_hh`'s gradient anyway) where
    differentiating the formula kept eight (`1 - z`, `z * (1 - z)`, ...). A layer's
    scan stacks every kept array over time; at small widths writing those stacks
    cost more than the arithmetic."""
    return _gru_gates(gates_x, gates_h, h)[0]


@gru_update.defjvp
def _gru_update_jvp(primals, tangents):
    gates_x, gates_h, h = primals
    d_gates_x, d_gates_h, d_h = tangents
    new, (r, z, n, h_n) = _gru_gates(gates_x, gates_h, h)
    dx_r, dx_z, dx_n = jnp.split(d_gates_x, 3)
    dh_r, dh_z, dh_n = jnp.split(d_gates_h, 3)
    # s' = s (1 - s) and tanh' = 1 - n^2, written as products of the tangent with the
    # kept arrays alone: `1 - s` or `h - n` would each be kept as one more array.
    a = (dx_r + dh_r) * r
    d_r = a - a * r
    b = (dx_z + dh_z) * z
    d_z = b - b * z
    c = dx_n + d_r * h_n + r * dh_n
    d_n = c - c * n * n
    return new, d_n - z * d_n + z * d_h + h * d_z - n * d_z


@jax.custom_jvp
def sigmoid(x):
    """`jax.nn.sigmoid`, whose derivative keeps only its output for the backward pass.

    JAX's own derivative, `s * (1 - s)`, keeps `1 - s` as well. A layer's scan stacks
    every kept array over time, and at small widths writing those stacks costs more
    than the arithmetic (see `gru_update`): with `tanh`, an LSTM step keeps 6 arrays
    instead of 11 and a tanh Elman step 1 instead of 2."""
    return jax.nn.sigmoid(x)


@sigmoid.defjvp
def _sigmoid_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    s = jax.nn.sigmoid(x)
    # s' = s (1 - s), as products of the tangent with `s` alone.
    a = dx * s
    return s, a - a * s


@jax.custom_jvp
def tanh(x):
    """`jnp.tanh`, whose derivative keeps only its output for the backward pass (JAX's
    keeps `1 - tanh(x)` as well; see `sigmoid`)."""
    return jnp.tanh(x)


@tanh.defjvp
def _tanh_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    t = jnp.tanh(x)
    return t, dx - dx * t * t


def lstm_update(gates, state, weight_hr, squash=lambda c: c):
    """The LSTM's new state `(h', c')` from the summed gate pre-activations in the
    order i, f, g, o: `c' = sigmoid(f) * c + sigmoid(i) * tanh(g)`,
    `h' = sigmoid(o) * tanh(squash(c'))`, then `h' = weight_hr @ h'` unless
    `weight_hr` is `None`. `squash` is where a layer-normalised cell normalises."""
    _, c = state
    i, f, g, o = jnp.split(gates, 4)
    c = sigmoid(f) * c + sigmoid(i) * tanh(g)
    h = sigmoid(o) * tanh(squash(c))
    if weight_hr is not None:
        h = weight_hr @ h
    return h, c
