"""Argument checks shared by cells and stacks.

Every check runs at trace time (shapes and dtypes are static under `jit`), so it costs
nothing at run time, and names the argument, what was expected and what arrived.
"""

import numbers
import os
import sys

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


def is_integer(value) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A Python or NumPy real number, not a bool (NumPy's bools are not numbers)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_size(name: str, value, *, minimum: int = 1) -> int:
    """`value` must be an integer >= `minimum` (bools are rejected); returned as a
    Python int, so that static fields hash and print as the user expects."""
    if not is_integer(value) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_probability(name: str, value) -> float:
    """`value` must be a number in [0, 1); returned as a Python float."""
    if not is_number(value):
        raise ValueError(f"`{name}` must be a number in [0, 1), got {value!r}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"`{name}` must be in [0, 1), got {value!r}")
    return float(value)


def user_stacklevel() -> int:
    """The `stacklevel` that points a warning at the first caller outside stackrnn
    and Equinox (whose module machinery runs our `__init__`s), however deep the
    call came in: a one-liner, `StackedRNN(...)`, or a user's own module."""
    ours = (
        os.path.dirname(os.path.abspath(__file__)) + os.sep,
        os.path.dirname(os.path.abspath(eqx.__file__)) + os.sep,
    )
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(ours):
        frame, level = frame.f_back, level + 1
    return level


def check_flag(name: str, value, *, optional: bool = False) -> bool | None:
    """`value` must be a bool (NumPy's included), or `None` when `optional`."""
    if optional and value is None:
        return value
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(
            f"`{name}` must be True or False{' or None' if optional else ''}, "
            f"got {value!r}"
        )
    return bool(value)


def check_key(name: str, key) -> None:
    """`key` must be a JAX PRNG key: a typed key (`jax.random.key`) or a legacy
    `uint32` array of shape `(2,)` (`jax.random.PRNGKey`)."""
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if jnp.ndim(key) == 0:
            return
    elif dtype == jnp.uint32 and jnp.shape(key) == (2,):
        return
    raise TypeError(
        f"`{name}` must be a single JAX PRNG key such as `jax.random.key(0)`, "
        f"got {_describe(key)}"
    )


def check_floating(name: str, x) -> None:
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"`{name}` must be a floating-point array, got dtype {dtype}; "
            f"convert it first, e.g. `{name}.astype(jnp.float32)`"
        )


def check_dtype(name: str, x, dtype) -> None:
    """`x` must have the parameters' floating dtype `dtype`: inputs and states are
    never cast, so a mixed-precision model casts where it means to."""
    got = jnp.result_type(x)
    if got != dtype:
        raise TypeError(
            f"`{name}` must have the parameters' dtype {jnp.dtype(dtype)}, got "
            f"{got}; cast it first (`.astype(jnp.{jnp.dtype(dtype)})`)"
        )


def check_sequence(name: str, xs, input_size: int, dtype=None) -> None:
    """`xs` must be a float array of shape `(time, input_size)` with time >= 1, of
    `dtype` when given."""
    check_floating(name, xs)
    if dtype is not None:
        check_dtype(name, xs, dtype)
    try:
        chex.assert_shape(xs, (None, input_size))
    except AssertionError:
        hint = ""
        if jnp.ndim(xs) == 3:
            hint = (
                ". Modules take one example: to run a batch, use `jax.vmap(model)(xs)`"
            )
        raise ValueError(
            f"`{name}` must have shape (time, input_size={input_size}), "
            f"got {jnp.shape(xs)}{hint}"
        ) from None
    if jnp.shape(xs)[0] < 1:
        raise ValueError(
            f"`{name}` must have at least one time step, got shape {jnp.shape(xs)}"
        )


def check_vector(name: str, x, size: int, dtype=None) -> None:
    """`x` must be a float array of shape `(size,)`, of `dtype` when given."""
    check_floating(name, x)
    if dtype is not None:
        check_dtype(name, x, dtype)
    try:
        chex.assert_shape(x, (size,))
    except AssertionError:
        hint = ""
        if jnp.ndim(x) == 2:
            hint = ". Cells take one example: to run a batch, use `jax.vmap(cell)`"
        raise ValueError(
            f"`{name}` must have shape ({size},), got {jnp.shape(x)}{hint}"
        ) from None


def check_like(name: str, value, expected) -> None:
    """`value` must have the tree structure, shapes and dtypes of `expected`."""
    want = jax.tree.structure(expected)
    got = jax.tree.structure(value)
    if want != got:
        raise ValueError(
            f"`{name}` must have the structure of {_describe(expected)}, "
            f"got {_describe(value)}"
        )
    for leaf, ref in zip(jax.tree.leaves(value), jax.tree.leaves(expected)):
        if jnp.shape(leaf) != jnp.shape(ref):
            raise ValueError(
                f"`{name}` must be {_describe(expected)}, got {_describe(value)}"
            )
        check_floating(name, leaf)
        check_dtype(name, leaf, jnp.result_type(ref))


def _describe(tree) -> str:
    if isinstance(tree, tuple):
        inner = ", ".join(_describe(t) for t in tree)
        return f"a tuple ({inner})"
    if hasattr(tree, "shape"):
        return f"an array of shape {tuple(tree.shape)}"
    return repr(tree)


def check_length(name: str, length, time: int) -> None:
    """`length` must be a scalar integer; when it is concrete (not traced), also
    1 <= length <= time. A traced value cannot be checked: the layer then reads the
    steps `t < length`, so values <= 0 read none and values > time read all."""
    dtype = jnp.result_type(length)
    if jnp.ndim(length) != 0 or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(
            f"`{name}` must be a scalar integer (one sequence's length; under "
            f"`jax.vmap`, one per example), got shape {jnp.shape(length)} and "
            f"dtype {dtype}"
        )
    if not isinstance(length, jax.core.Tracer) and not 1 <= int(length) <= time:
        raise ValueError(
            f"`{name}` must be in [1, {time}] (the number of time steps of `xs`), "
            f"got {int(length)}"
        )


def check_resets(name: str, resets, time: int) -> None:
    """`resets` must be a boolean array of shape `(time,)`."""
    dtype = jnp.result_type(resets)
    if jnp.shape(resets) != (time,) or dtype != jnp.bool_:
        raise ValueError(
            f"`{name}` must be a boolean array of shape ({time},) (one flag per time "
            f"step of `xs`), got shape {jnp.shape(resets)} and dtype {dtype}"
        )


def check_transduce(
    encode, decode, inputs, input_size: int, output_size: int, dtype
) -> int:
    """The arguments of `StackedRNN.transduce`, checked on their shapes alone
    (`jax.eval_shape`): `inputs` must be a PyTree of arrays sharing a leading (time)
    axis, `encode(inputs)` a float array of shape `(time, input_size)`, and
    `decode(outputs, inputs)`, for outputs of shape `(time, output_size)`, a PyTree of
    arrays whose leading axis is time. Returns `time`."""
    leaves = jax.tree.leaves(inputs)
    if not leaves or any(jnp.ndim(leaf) < 1 for leaf in leaves):
        raise ValueError(
            "`inputs` must be a PyTree of arrays whose leading axis is time, "
            f"got {inputs!r}"
        )
    time = jnp.shape(leaves[0])[0]
    if any(jnp.shape(leaf)[0] != time for leaf in leaves):
        raise ValueError(
            "`inputs`' arrays must share their leading (time) axis, got shapes "
            f"{[jnp.shape(leaf) for leaf in leaves]}"
        )
    encoded = jax.eval_shape(encode, inputs)
    check_sequence("encode(inputs)", encoded, input_size, dtype)
    if encoded.shape[0] != time:
        raise ValueError(
            f"`encode(inputs)` must have one row per step ({time}), got shape "
            f"{encoded.shape}"
        )
    outputs = jax.ShapeDtypeStruct((time, output_size), encoded.dtype)
    decoded = jax.eval_shape(decode, outputs, inputs)
    if any(jnp.shape(leaf)[:1] != (time,) for leaf in jax.tree.leaves(decoded)):
        raise ValueError(
            "`decode` must return arrays whose leading axis is time "
            f"({time}), got {decoded}"
        )
    return time
