"""One-line constructors `RNN`, `GRU` and `LSTM`, argued like `torch.nn.GRU`."""

from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
from jaxtyping import PRNGKeyArray

from ._cells import AbstractCell, ElmanCell, GRUCell, LSTMCell
from ._checks import check_key, check_probability, check_size
from ._init import Initializer, PyTorchInit
from ._norm_cells import LayerNormGRUCell, LayerNormLSTMCell
from ._stack import StackedRNN
from ._time import AbstractPath, ByWidth, Chunks, Scan
from ._wrapped import RecurrentDropout, WeightDrop, Zoneout


def _widths(hidden_size, num_layers: int) -> tuple[int, ...]:
    if isinstance(hidden_size, str):
        raise TypeError(
            "`hidden_size` must be an integer or a sequence of integers (one per "
            f"layer), got the string {hidden_size!r}"
        )
    if isinstance(hidden_size, Sequence):
        widths = tuple(hidden_size)
        if len(widths) != num_layers:
            raise ValueError(
                f"`hidden_size` lists {len(widths)} widths but `num_layers` is "
                f"{num_layers}; give one width per layer"
            )
        return tuple(check_size(f"hidden_size[{i}]", w) for i, w in enumerate(widths))
    return (check_size("hidden_size", hidden_size),) * num_layers


def _check_layer_norm(layer_norm):
    if not isinstance(layer_norm, bool):
        raise TypeError(f"`layer_norm` must be a bool, got {layer_norm!r}")


def _wrap(cell: AbstractCell, options: dict[str, Any]) -> AbstractCell:
    """`cell` in the wrappers its one-liner's rates ask for, innermost first."""
    if options["weight_drop"]:
        cell = WeightDrop(cell, options["weight_drop"])
    if options["recurrent_dropout"]:
        cell = RecurrentDropout(cell, options["recurrent_dropout"])
    zoneout = options["zoneout"]
    if any(zoneout) if isinstance(zoneout, tuple) else zoneout:
        cell = Zoneout(cell, zoneout)
    return cell


def _build(make: Callable[..., AbstractCell], options: dict[str, Any]) -> StackedRNN:
    """The stack a one-liner's `options` (its arguments by name) describe, its cells
    from `make(input_size, width, key=key)`."""
    check_key("key", options["key"])
    input_size = check_size("input_size", options["input_size"])
    num_layers = check_size("num_layers", options["num_layers"])
    bidirectional = options["bidirectional"]
    widths = _widths(options["hidden_size"], num_layers)
    if not isinstance(bidirectional, bool):
        raise TypeError(f"`bidirectional` must be a bool, got {bidirectional!r}")
    # Checked here as well as by the wrappers, for messages in the one-liner's names.
    for name in ("recurrent_dropout", "weight_drop"):
        check_probability(name, options[name])
    zoneout = options["zoneout"]
    for i, p in enumerate(zoneout if isinstance(zoneout, tuple) else (zoneout,)):
        check_probability(
            f"zoneout[{i}]" if isinstance(zoneout, tuple) else "zoneout", p
        )
    cells, backward_cells = [], []
    for width, k in zip(widths, jax.random.split(options["key"], num_layers)):
        if bidirectional:
            k, k_backward = jax.random.split(k)
            backward_cells.append(
                _wrap(make(input_size, width, key=k_backward), options)
            )
        cell = make(input_size, width, key=k)
        cells.append(_wrap(cell, options))
        input_size = cell.output_size * (2 if bidirectional else 1)
    return StackedRNN(
        cells,
        backward_cells=backward_cells if bidirectional else None,
        dropout=options["dropout"],
        variational=options["variational"],
        residual=options["residual"],
        scan=Scan(
            unroll=options["unroll"],
            path=options["path"],
            checkpoint=Chunks.from_flag(options["checkpoint"]),
        ),
    )


def RNN(
    input_size: int,
    hidden_size: int | Sequence[int],
    num_layers: int = 1,
    *,
    nonlinearity: Literal["tanh", "relu"] = "tanh",
    dropout: float = 0.0,
    variational: bool = False,
    recurrent_dropout: float = 0.0,
    zoneout: float | tuple[float, ...] = 0.0,
    weight_drop: float = 0.0,
    residual: bool = False,
    bias: bool = True,
    init: Initializer = PyTorchInit(),
    unroll: int = 1,
    bidirectional: bool = False,
    checkpoint: bool | int | tuple[int, ...] | Chunks = False,
    path: AbstractPath = ByWidth(),
    dtype=None,
    key: PRNGKeyArray,
) -> StackedRNN:
    """A stack of Elman cells, like `torch.nn.RNN`.

    **Arguments:**

    - `input_size`: size of each input vector.
    - `hidden_size`: width of every layer, or a sequence with one width per layer.
    - `num_layers`: number of stacked layers.
    - `nonlinearity`: `"tanh"` or `"relu"`. (Keyword only argument.)
    - `dropout`: dropout probability between layers. (Keyword only argument.)
    - `variational`, `recurrent_dropout`, `zoneout`, `weight_drop`, `residual`:
      the regularisers of [`stackrnn.StackedRNN`][], all off by default.
      (Keyword only arguments.)
    - `bias`: whether the cells have biases. (Keyword only argument.)
    - `init`: the parameter initialiser: [`stackrnn.PyTorchInit`][] (default),
      [`stackrnn.NormalInit`][] (d2l's `StackedRNNScratch`) or
      [`stackrnn.OrthogonalInit`][]. (Keyword only argument.)
    - `unroll`: passed to `jax.lax.scan` over time. (Keyword only argument.)
    - `bidirectional`: if `True`, every layer also reads time backwards with its own
      cells, and the next layer reads both directions concatenated, forward first;
      the state then holds `2 * num_layers` entries, in PyTorch's order
      `layer * 2 + direction`. (Keyword only argument.)
    - `checkpoint`: gradient checkpointing over time for long sequences: `False`
      (default), `True` (chunks of about `sqrt(time)` steps), a chunk length, or a
      tuple of lengths for nested chunks; see [`stackrnn.StackedRNN`][]. (Keyword
      only argument.)
    - `dtype`: parameter dtype. (Keyword only argument.)
    - `key`: a `jax.random.PRNGKey`. (Keyword only argument.)

    **Returns:**

    A [`stackrnn.StackedRNN`][].
    """
    options = dict(locals())

    def make(i, h, *, key):
        return ElmanCell(
            i, h, nonlinearity=nonlinearity, bias=bias, init=init, dtype=dtype, key=key
        )

    return _build(make, options)


def GRU(
    input_size: int,
    hidden_size: int | Sequence[int],
    num_layers: int = 1,
    *,
    dropout: float = 0.0,
    variational: bool = False,
    recurrent_dropout: float = 0.0,
    zoneout: float | tuple[float, ...] = 0.0,
    weight_drop: float = 0.0,
    residual: bool = False,
    bias: bool = True,
    layer_norm: bool = False,
    init: Initializer = PyTorchInit(),
    unroll: int = 1,
    bidirectional: bool = False,
    checkpoint: bool | int | tuple[int, ...] | Chunks = False,
    path: AbstractPath = ByWidth(),
    dtype=None,
    key: PRNGKeyArray,
) -> StackedRNN:
    """A stack of GRU cells, like `torch.nn.GRU`. Arguments as [`stackrnn.RNN`][]
    without `nonlinearity`, plus `layer_norm` (keyword only): if `True`, the cells
    are [`stackrnn.LayerNormGRUCell`][]s, and `bias` says whether their
    normalisations have shifts."""
    options = dict(locals())
    _check_layer_norm(layer_norm)
    cell = LayerNormGRUCell if layer_norm else GRUCell

    def make(i, h, *, key):
        return cell(i, h, bias=bias, init=init, dtype=dtype, key=key)

    return _build(make, options)


def LSTM(
    input_size: int,
    hidden_size: int | Sequence[int],
    num_layers: int = 1,
    *,
    proj_size: int = 0,
    dropout: float = 0.0,
    variational: bool = False,
    recurrent_dropout: float = 0.0,
    zoneout: float | tuple[float, ...] = 0.0,
    weight_drop: float = 0.0,
    residual: bool = False,
    bias: bool = True,
    forget_bias: float | None = None,
    layer_norm: bool = False,
    init: Initializer = PyTorchInit(),
    unroll: int = 1,
    bidirectional: bool = False,
    checkpoint: bool | int | tuple[int, ...] | Chunks = False,
    path: AbstractPath = ByWidth(),
    dtype=None,
    key: PRNGKeyArray,
) -> StackedRNN:
    """A stack of LSTM cells, like `torch.nn.LSTM`. Arguments as [`stackrnn.GRU`][]
    (with `layer_norm=True` the cells are [`stackrnn.LayerNormLSTMCell`][]s), plus,
    keyword only, `proj_size`: the size of each layer's projected output, 0 for
    none; and `forget_bias`: the forget gate's starting bias in every cell, `None`
    to leave the initialiser's draw (see [`stackrnn.LSTMCell`][]). The state is a
    tuple `(h, c)`."""
    options = dict(locals())
    _check_layer_norm(layer_norm)
    cell = LayerNormLSTMCell if layer_norm else LSTMCell

    def make(i, h, *, key):
        return cell(
            i,
            h,
            proj_size=proj_size,
            bias=bias,
            forget_bias=forget_bias,
            init=init,
            dtype=dtype,
            key=key,
        )

    return _build(make, options)
