"""Hypothesis strategies and invariant checks for models built on stackrnn.

Strategies draw valid stack configurations, stacks, input sequences, initial states
and lengths, with small shapes (JAX compiles once per new shape). Checks take your
model (or wrapper) and raise `AssertionError` with a message saying what differs when
an invariant fails, so they drop into any pytest test.

Needs Hypothesis: `pip install stackrnn[testing]`. `import stackrnn` does not import
this module.
"""

import dataclasses
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Bool, Float, PRNGKeyArray, PyTree


try:
    import hypothesis.strategies as st
except ImportError as e:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "`stackrnn.testing` needs Hypothesis; install the `testing` extra: "
        "pip install 'stackrnn[testing]'"
    ) from e

from ._cells import AbstractCell
from ._kinds import cell_class, CELL_KINDS, LAYER_NORM_KINDS
from ._sample import draw as draw_random
from ._stack import StackedRNN


__all__ = [
    "KINDS",
    "Config",
    "make_cell",
    "make_cells",
    "configs",
    "stacks",
    "sequences",
    "states",
    "lengths",
    "inputs",
    "random_state",
    "stack_by_hand",
    "check_depth_one_matches_cell",
    "check_layer_wiring",
    "check_step_matches_scan",
    "check_finite_clipped_grads",
    "check_vmap_consistent",
    "check_jit_consistent",
]

KINDS = (
    *CELL_KINDS,
    "lstm_proj",
    *(f"{kind}_ln" for kind in LAYER_NORM_KINDS),
)
"""The cell kinds the strategies draw: PyTorch's (`rnn_tanh`, `rnn_relu`, `gru`,
`lstm`), and variants named by a suffix: `_proj`, an LSTM with a projection
(`proj_size = hidden_size // 2`); `_ln`, layer-normalised (GRU and LSTM)."""


@dataclasses.dataclass(frozen=True)
class Config:
    """A stack configuration: cell `kind` (one of `KINDS`), `input_size`, one width
    per layer (bottom first), whether cells have biases, and a sequence length
    `time`."""

    kind: str
    input_size: int
    widths: tuple[int, ...]
    bias: bool
    time: int

    @property
    def num_layers(self) -> int:
        return len(self.widths)


def make_cell(
    kind: str, input_size: int, width: int, *, bias: bool = True, key: PRNGKeyArray
) -> AbstractCell:
    """One cell of `kind` (one of `KINDS`) reading `input_size` with `width` hidden
    units."""
    if kind not in KINDS:
        raise ValueError(f"`kind` must be one of {KINDS}, got {kind!r}")
    base = kind.removesuffix("_ln").removesuffix("_proj")
    cell, keywords = cell_class(base, layer_norm=kind.endswith("_ln"))
    proj = max(1, width // 2)
    if kind.endswith("_proj") and proj < width:
        keywords["proj_size"] = proj
    return cell(input_size, width, bias=bias, key=key, **keywords)


def make_cells(cfg: Config, key: PRNGKeyArray) -> list[AbstractCell]:
    """The cells of `cfg`, bottom first, each reading the output of the one below."""
    cells = []
    size = cfg.input_size
    for width, k in zip(cfg.widths, jax.random.split(key, cfg.num_layers)):
        cell = make_cell(cfg.kind, size, width, bias=cfg.bias, key=k)
        cells.append(cell)
        size = cell.output_size
    return cells


@st.composite
def configs(
    draw,
    *,
    kinds: Sequence[str] = KINDS,
    max_layers: int = 3,
    max_width: int = 6,
    max_input: int = 5,
    max_time: int = 6,
    same_width: bool = False,
) -> Config:
    """Strategy: a [`stackrnn.testing.Config`][] with 1..`max_layers` layers of widths
    2..`max_width` (all equal if `same_width`), input size 1..`max_input` and
    1..`max_time` time steps."""
    kind = draw(st.sampled_from(tuple(kinds)))
    num_layers = draw(st.integers(1, max_layers))
    if same_width:
        widths = (draw(st.integers(2, max_width)),) * num_layers
    else:
        widths = tuple(draw(st.integers(2, max_width)) for _ in range(num_layers))
    return Config(
        kind=kind,
        input_size=draw(st.integers(1, max_input)),
        widths=widths,
        bias=draw(st.booleans()),
        time=draw(st.integers(1, max_time)),
    )


@st.composite
def stacks(draw, key: PRNGKeyArray, **config_options) -> StackedRNN:
    """Strategy: a [`stackrnn.StackedRNN`][] of a drawn configuration, its parameters
    drawn from `fold_in(key, drawn seed)`. `config_options` go to `configs`."""
    cfg = draw(configs(**config_options))
    seed = draw(st.integers(0, 2**16))
    return StackedRNN(make_cells(cfg, jax.random.fold_in(key, seed)))


def _default_float():
    """`jax.random`'s default dtype: float64 where 64-bit types are on."""
    return jax.dtypes.canonicalize_dtype(np.float64)


def inputs(
    cfg: Config, key: PRNGKeyArray, *, scale: float = 1.0, batch: int | None = None
) -> Float[Array, "*batch time input"]:
    """Standard normal inputs of shape `(time, input_size)` for `cfg`, times `scale`;
    `(batch, time, input_size)` if `batch` is given."""
    shape = (cfg.time, cfg.input_size)
    if batch is not None:
        shape = (batch, *shape)
    return scale * draw_random(jax.random.normal, key, shape, _default_float())


@st.composite
def sequences(
    draw, input_size: int, *, max_time: int = 6, scale: float = 1.0
) -> Float[Array, "time input"]:
    """Strategy: a sequence of shape `(time, input_size)`, `time` in 1..`max_time`,
    standard normal values times `scale` (drawn from a Hypothesis-chosen seed, so a
    failing example replays)."""
    time = draw(st.integers(1, max_time))
    seed = draw(st.integers(0, 2**16))
    return scale * draw_random(
        jax.random.normal, jax.random.key(seed), (time, input_size), _default_float()
    )


def random_state(model, key: PRNGKeyArray) -> PyTree[Array]:
    """A standard normal state structured as `model.init_state()`."""
    leaves, treedef = jax.tree.flatten(model.init_state())
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef,
        [
            draw_random(jax.random.normal, k, x.shape, x.dtype)
            for k, x in zip(keys, leaves)
        ],
    )


@st.composite
def states(draw, model) -> PyTree[Array]:
    """Strategy: an initial state for `model` (anything with `init_state()`: a cell,
    a stack), standard normal values from a Hypothesis-chosen seed."""
    seed = draw(st.integers(0, 2**16))
    return random_state(model, jax.random.key(seed))


def lengths(time: int) -> "st.SearchStrategy[int]":
    """Strategy: a valid `length` for a sequence padded to `time` steps, 1..`time`."""
    return st.integers(1, time)


# The reference


def _stackable(states: list) -> bool:
    # The documented layout: states stacked on a leading axis when all share their
    # shapes, else a tuple with one state per cell.
    shapes = [jax.tree.map(jnp.shape, s) for s in states]
    return all(s == shapes[0] for s in shapes)


def _join(states: list) -> PyTree[Array]:
    if _stackable(states):
        return jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
    return tuple(states)


def _split(cells: list[AbstractCell], state) -> list:
    if _stackable([cell.init_state() for cell in cells]):
        return [jax.tree.map(lambda s: s[i], state) for i in range(len(cells))]
    return list(state)


def _innermost_chunks(time: int, lengths: Sequence[int], offset: int = 0) -> list:
    """`(first step, size)` of every innermost chunk, in time order, of `time` steps
    cut into chunks of `lengths[0]` steps, each of those into chunks of
    `lengths[1]`, and so on."""
    found = []
    for start in range(0, time, lengths[0]):
        size = min(lengths[0], time - start)
        if len(lengths) > 1:
            found += _innermost_chunks(size, lengths[1:], offset + start)
        else:
            found.append((offset + start, size))
    return found


def stack_by_hand(
    stack: StackedRNN,
    xs: Float[Array, "time input"],
    state: PyTree[Array] | None = None,
    *,
    length: int | None = None,
    resets: Bool[Array, " time"] | None = None,
    key: PRNGKeyArray | None = None,
    inference: bool | None = None,
    all_layers: bool = False,
) -> tuple[Array | tuple[Array, ...], PyTree[Array]]:
    """What `stack(xs, state, ...)` computes, by Python loops over layers,
    directions and steps, each step one `cell(x, state)` and `cell.output(state)`:
    a slow reference, written without the stack's own code, that every path of the
    stack can be held to. `check_depth_one_matches_cell` and `check_layer_wiring`
    compare against it.

    It reads the stack's fields (`cells`, `backward_cells`, `dropout`,
    `variational`, `residual`, `scan`, `inference`) and draws the masks as the
    stack documents: `key` split into `num_layers - 1` keys, one for the dropout of
    each layer's input above the first, then one per layer and direction (forward
    first) that the layer's cell gets in `for_sequence`, where wrapper cells draw
    theirs. With `scan.checkpoint` on a unidirectional stack, the loop over the
    innermost chunks is outside the loop over layers, and the masks drawn per step
    are drawn per chunk, from their key folded with the chunk's first step.

    **Arguments:**

    - `stack`: a [`stackrnn.StackedRNN`][], or a subclass of your own.
    - `xs`, `state`, `resets`, `key`, `inference`, `all_layers`: as in
      [`stackrnn.StackedRNN.__call__`][]. (Keyword only arguments, but `xs` and
      `state`.)
    - `length`: as in `__call__`, but a Python integer. (Keyword only argument.)

    **Returns:**

    `(ys, final_state)`, as [`stackrnn.StackedRNN.__call__`][] returns them.
    """
    time = len(xs)
    valid = time if length is None else int(length)
    inference = stack.inference if inference is None else inference
    layers = [[cell] for cell in stack.cells]
    if stack.backward_cells is not None:
        layers = [[f, b] for f, b in zip(stack.cells, stack.backward_cells)]
    directions = len(layers[0])
    all_cells = [cell for cells in layers for cell in cells]
    if state is None:
        states = [cell.init_state() for cell in all_cells]
    else:
        states = _split(all_cells, state)
    drop = not inference and stack.dropout > 0 and len(layers) > 1
    if key is None:
        if drop:
            raise RuntimeError(
                "`stack_by_hand` needs a `key` for the stack's `dropout` in "
                "training; pass `key=...` or `inference=True`"
            )
        drop_keys, cell_keys = [], [None] * len(all_cells)
    else:
        keys = jax.random.split(key, len(layers) - 1 + len(all_cells))
        drop_keys, cell_keys = keys[: len(layers) - 1], keys[len(layers) - 1 :]

    checkpoint = stack.scan.checkpoint
    if checkpoint is None or stack.backward_cells is not None:
        pieces, chunked = [(0, time)], False
    else:
        pieces, chunked = _innermost_chunks(time, checkpoint.for_time(time)), True
    backwards = [stack.scan.reverse or d == 1 for d in range(directions)]

    def read(cell, inputs, state, first, backwards):
        # Steps `first + j` of the sequence; past `length` none is read, and a
        # reset returns the state to zeros before the first step of a segment
        # (reading backwards: after its first step, before the step before it).
        ys = [jnp.zeros_like(cell.output(cell.init_state()))] * len(inputs)
        order = range(len(inputs))
        for j in reversed(order) if backwards else order:
            t = first + j
            if t >= valid:
                continue
            if resets is not None:
                if backwards:
                    reset = resets[t + 1] if t + 1 < valid else False
                else:
                    reset = resets[t]
                fresh = cell.init_state()
                state = jax.tree.map(lambda f, s: jnp.where(reset, f, s), fresh, state)
            state = cell(inputs[j], state)
            ys[j] = cell.output(state)
        return jnp.stack(ys), state

    outputs = {}
    for first, size in pieces[::-1] if stack.scan.reverse else pieces:
        start = first if chunked else None
        hs = xs[first : first + size]
        for i, cells in enumerate(layers):
            below = hs
            if i > 0 and drop:
                k = drop_keys[i - 1]
                if stack.variational:
                    shape = (1, hs.shape[-1])
                else:
                    k = k if start is None else jax.random.fold_in(k, start)
                    shape = hs.shape
                keep = jax.random.bernoulli(k, 1 - stack.dropout, shape)
                hs = jnp.where(keep, hs / (1 - stack.dropout), jnp.zeros((), hs.dtype))
            ys = []
            for d, cell in enumerate(cells):
                n = i * directions + d
                cell, inputs = cell.for_sequence(
                    hs, key=cell_keys[n], inference=inference, start=start
                )
                y, states[n] = read(cell, inputs, states[n], first, backwards[d])
                ys.append(y)
            hs = jnp.concatenate(ys, axis=-1)
            if stack.residual and i > 0:
                hs = hs + below
            outputs[first, i] = hs
    per_layer = tuple(
        jnp.concatenate([outputs[first, i] for first, _ in pieces])
        for i in range(len(layers))
    )
    return (per_layer if all_layers else per_layer[-1]), _join(states)


# Checks


def _assert_close(what: str, got, want, rtol: float, atol: float) -> None:
    got_def, want_def = jax.tree.structure(got), jax.tree.structure(want)
    if got_def != want_def:
        raise AssertionError(
            f"{what}: tree structures differ: {got_def} versus {want_def}"
        )
    for i, (a, b) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(want))):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            raise AssertionError(
                f"{what}: leaf {i} has shape {a.shape}, expected {b.shape}"
            )
        if not np.allclose(a, b, rtol=rtol, atol=atol):
            err = np.max(np.abs(a.astype(np.float64) - b))
            raise AssertionError(
                f"{what}: leaf {i} (shape {a.shape}) differs by up to {err:.3g} "
                f"(rtol={rtol}, atol={atol})"
            )


def check_depth_one_matches_cell(
    cell: AbstractCell,
    xs: Float[Array, "time input"],
    state: PyTree[Array] | None = None,
    *,
    stack: Callable[[list[AbstractCell]], eqx.Module] = StackedRNN,
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> None:
    """A stack of one `cell` equals the cell stepped over `xs` by a Python loop.

    Checks a cell of your own (its `project_input`/`recur` split, which the stack's
    fast path uses, must agree with its `__call__`), or a stack class of your own
    (`stack`, called with a list of cells, returning `(ys, final_state)`).

    **Arguments:**

    - `cell`: the cell.
    - `xs`: a sequence of shape `(time, cell.input_size)`.
    - `state`: the cell's initial state; zeros if omitted.
    - `stack`: builds a stack from a list of cells. (Keyword only argument.)
    - `rtol`, `atol`: tolerances; the loop runs op by op, the stack compiled, so
      equality holds to rounding only. (Keyword only arguments.)

    **Raises:**

    `AssertionError` saying which output differs and by how much.
    """
    state = cell.init_state() if state is None else state
    state = jax.tree.map(lambda s: s[None], state)
    ys, final = stack([cell])(xs, state)
    want_ys, want_final = stack_by_hand(StackedRNN([cell]), xs, state, inference=True)
    _assert_close("depth-1 stack outputs vs the cell", ys, want_ys, rtol, atol)
    _assert_close(
        "depth-1 stack final state vs the cell", final, want_final, rtol, atol
    )


def check_layer_wiring(
    stack: StackedRNN,
    xs: Float[Array, "time input"],
    *,
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> None:
    """Layer `l` reads the outputs of layer `l-1` (the bottom layer reads `xs`): the
    stack's outputs at inference equal [`stackrnn.testing.stack_by_hand`][]'s, its
    cells run one after another by Python loops.

    Catches the miswiring of d2l's JAX `GRU(num_layers)`, which feeds the raw input
    to every layer but the last. For any stack: reversed, bidirectional, residual,
    with wrapper cells (run at inference).

    **Arguments:**

    - `stack`: a [`stackrnn.StackedRNN`][], or a subclass of your own.
    - `xs`: a sequence of shape `(time, stack.input_size)`.
    - `rtol`, `atol`: tolerances. (Keyword only arguments.)

    **Raises:**

    `AssertionError` if the outputs differ.
    """
    ys, _ = stack(xs, inference=True)
    want, _ = stack_by_hand(stack, xs, inference=True)
    _assert_close("stack outputs vs its layers applied in order", ys, want, rtol, atol)


def check_step_matches_scan(
    model,
    xs: Float[Array, "time input"],
    state: PyTree[Array] | None = None,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> None:
    """Streaming equals reading the whole sequence: `model.step` fed `xs` one element
    at a time gives the outputs and final state of `model(xs, state)`.

    **Arguments:**

    - `model`: anything with `init_state()`, `__call__(xs, state, inference=True)`
      and `step(x, state, inference=True)` returning `(y, state)`, e.g. a
      unidirectional [`stackrnn.StackedRNN`][] or a wrapper of your own.
    - `xs`: a sequence of shape `(time, input_size)`.
    - `state`: the initial state; `model.init_state()` if omitted.
    - `rtol`, `atol`: tolerances. (Keyword only arguments.)

    **Raises:**

    `AssertionError` if a step's output or the final state differs.
    """
    state = model.init_state() if state is None else state
    ys, final = model(xs, state, inference=True)
    stepped = []
    s = state
    for x in xs:
        y, s = model.step(x, s, inference=True)
        stepped.append(y)
    _assert_close("`step` outputs vs `__call__`", jnp.stack(stepped), ys, rtol, atol)
    _assert_close("`step` final state vs `__call__`", s, final, rtol, atol)


@eqx.filter_jit
def _grads_and_clipped_norm(model, loss, args, max_norm):
    """The gradients and their global norm once clipped, in one compiled program
    (clipping eagerly compiled programs for every leaf's shape)."""
    grads = eqx.filter_grad(loss)(model, *args)
    clip = optax.clip_by_global_norm(max_norm)
    clipped, _ = clip.update(grads, clip.init(grads))
    return grads, optax.tree.norm(clipped)


def check_finite_clipped_grads(
    model,
    loss: Callable[..., Float[Array, ""]],
    *args,
    max_norm: float = 1.0,
) -> None:
    """The gradients of `loss(model, *args)` with respect to the model's arrays are
    finite, and clipped to global norm `max_norm` (as `optax.clip_by_global_norm`
    does in training) their norm is at most `max_norm`.

    Use it with large inputs or deep stacks, where a recurrence can overflow.

    **Arguments:**

    - `model`: an Equinox module (or any PyTree of arrays).
    - `loss`: a scalar function called as `loss(model, *args)`.
    - `*args`: the loss's other arguments.
    - `max_norm`: the clipping threshold. (Keyword only argument.)

    **Raises:**

    `AssertionError` naming the first non-finite gradient, or the norm.
    """
    grads, clipped_norm = _grads_and_clipped_norm(model, loss, args, max_norm)
    paths = jax.tree_util.tree_leaves_with_path(eqx.filter(grads, eqx.is_array))
    if not paths:
        raise AssertionError("the model has no floating-point arrays to differentiate")
    for path, g in paths:
        # Counted on the host: no program compiled per gradient's shape.
        finite = np.isfinite(np.asarray(g))
        if not finite.all():
            raise AssertionError(
                f"gradient of {jax.tree_util.keystr(path)} has "
                f"{finite.size - np.count_nonzero(finite)} non-finite entries"
            )
    norm = float(clipped_norm)
    if not norm <= max_norm * (1 + 1e-5):
        raise AssertionError(
            f"clipped gradients have global norm {norm}, above `max_norm`={max_norm}"
        )


def check_vmap_consistent(
    model: Callable,
    *batched_args,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    **kwargs,
) -> None:
    """`jax.vmap(model)` over a batch equals calling `model` on each example alone.

    A custom batching rule (`jax.custom_batching.custom_vmap`), state shared across
    examples, or an axis mix-up in a wrapper shows up here.

    **Arguments:**

    - `model`: the callable, taking one example.
    - `*batched_args`: its positional arguments, each with a leading batch axis.
    - `rtol`, `atol`: tolerances. (Keyword only arguments.)
    - `**kwargs`: unbatched keyword arguments passed to every call (e.g.
      `inference=True`).

    **Raises:**

    `AssertionError` naming the first example that differs.
    """
    batched = jax.vmap(lambda *a: model(*a, **kwargs))(*batched_args)
    size = jax.tree.leaves(batched_args)[0].shape[0]
    for b in range(size):
        one = model(*jax.tree.map(lambda a: a[b], batched_args), **kwargs)
        _assert_close(
            f"vmapped output of example {b} vs calling on it alone",
            jax.tree.map(lambda a: a[b], batched),
            one,
            rtol,
            atol,
        )


def check_jit_consistent(
    model: Callable,
    *args,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    **kwargs,
) -> None:
    """`eqx.filter_jit(model)` gives the outputs of the eager call.

    Python-side effects, branches on concrete values or NumPy calls inside a model
    make the two differ (or fail to trace).

    **Arguments:**

    - `model`: the callable.
    - `*args`, `**kwargs`: its arguments (non-arrays are static under `jit`).
    - `rtol`, `atol`: tolerances. (Keyword only arguments.)

    **Raises:**

    `AssertionError` if the outputs differ.
    """
    eager = model(*args, **kwargs)
    compiled = eqx.filter_jit(model)(*args, **kwargs)
    _assert_close("jitted output vs eager", compiled, eager, rtol, atol)
