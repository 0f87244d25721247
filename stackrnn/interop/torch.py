"""PyTorch interop: exact weight import and export for `torch.nn.RNN`, `torch.nn.GRU`
and `torch.nn.LSTM`.

Our cells keep PyTorch's parameter names, shapes and gate order, so layer `k`'s
`weight_ih_l{k}`, `weight_hh_l{k}`, `bias_ih_l{k}`, `bias_hh_l{k}` and
`weight_hr_l{k}` are `stack.cells[k].weight_ih` and so on, copied bit for bit; a
bidirectional module's `..._l{k}_reverse` are `stack.backward_cells[k]`'s.
"""

try:
    import torch
except ImportError as e:
    raise ImportError(
        '`stackrnn.interop.torch` needs PyTorch: pip install "stackrnn[torch]"'
    ) from e

import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from .._cells import AbstractCell, ElmanCell, GRUCell, LSTMCell
from .._kinds import cell_class, CELL_KINDS, CellKind, check_kind, kind_of, num_gates
from .._stack import StackedRNN
from .._wrapped import AbstractWrappedCell


# PyTorch's module for each of our cell classes; a kind's keywords suit both.
_MODULES = {ElmanCell: torch.nn.RNN, GRUCell: torch.nn.GRU, LSTMCell: torch.nn.LSTM}
_DTYPES = (np.float16, np.float32, np.float64)
_LAYER_KEY = re.compile(
    r"^(weight_ih|weight_hh|bias_ih|bias_hh|weight_hr)_l(\d+)(_reverse)?$"
)


def _key(role: str, layer: int, direction: int) -> str:
    return f"{role}_l{layer}" + ("_reverse" if direction else "")


def _layers(num_layers: int, bidirectional: bool) -> list[tuple[int, int]]:
    """`(layer, direction)` pairs in PyTorch's order, the order of its states too."""
    return [(k, d) for k in range(num_layers) for d in range(1 + bidirectional)]


def _roles(bias: bool, proj_size: int) -> tuple[str, ...]:
    """A layer's parameters, in PyTorch's `_flat_weights_names` order."""
    roles = ("weight_ih", "weight_hh")
    if bias:
        roles += ("bias_ih", "bias_hh")
    if proj_size:
        roles += ("weight_hr",)
    return roles


def _describe(
    cell, input_size, hidden_size, num_layers, bias, proj_size, bidirectional
) -> str:
    proj = f", proj_size={proj_size}" if cell == "lstm" else ""
    return (
        f"a {num_layers}-layer {cell!r} stack (input_size={input_size}, "
        f"hidden_size={hidden_size}, bias={bias}{proj}, "
        f"bidirectional={bidirectional})"
    )


def _expected_shapes(
    cell, input_size, hidden_size, num_layers, bias, proj_size, bidirectional
):
    gates = num_gates(cell) * hidden_size
    out = proj_size or hidden_size
    shapes = {}
    for layer, direction in _layers(num_layers, bidirectional):
        fan_in = input_size if layer == 0 else out * (1 + bidirectional)
        layer_shapes = dict(
            weight_ih=(gates, fan_in),
            weight_hh=(gates, out),
            bias_ih=(gates,),
            bias_hh=(gates,),
            weight_hr=(proj_size, hidden_size),
        )
        for role in _roles(bias, proj_size):
            shapes[_key(role, layer, direction)] = layer_shapes[role]
    return shapes


def _to_numpy(name, value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        if value.dtype not in (torch.float16, torch.float32, torch.float64):
            raise TypeError(
                f"`{name}` has dtype {value.dtype}; supported are float16, float32 "
                "and float64: cast the module first, e.g. `module.float()`"
            )
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _hidden_size(cell, arrays) -> int:
    """`weight_hh_l0`'s column count, unless the other tensors that give the width
    agree on another one: then `weight_hh_l0` is the badly shaped tensor, and the
    shape check names it alone rather than every other."""
    gates = num_gates(cell)
    own = arrays["weight_hh_l0"].shape[1]
    others = []
    for name in ("weight_ih_l0", "bias_ih_l0", "bias_hh_l0", "weight_hh_l1"):
        if name in arrays and arrays[name].ndim >= 1:
            rows = arrays[name].shape[0]
            others.append(rows // gates if rows % gates == 0 else None)
    if "weight_hh_l1" in arrays and arrays["weight_hh_l1"].ndim == 2:
        others.append(arrays["weight_hh_l1"].shape[1])
    if len(others) >= 2 and len(set(others)) == 1 and None not in others:
        return others[0]
    return own


def _read_config(cell, arrays):
    """Infers `(input_size, hidden_size, num_layers, bias, proj_size,
    bidirectional)` from a state dict's layer-0 parameters; the full check against
    them comes after."""
    projected = cell == "lstm" and "weight_hr_l0" in arrays
    for name in ("weight_ih_l0", "weight_hh_l0") + ("weight_hr_l0",) * projected:
        if name not in arrays or arrays[name].ndim != 2:
            found = arrays[name].shape if name in arrays else "missing"
            raise ValueError(
                f"a {cell!r} state dict needs a 2-D `{name}`, found {found}; "
                f"keys found: {sorted(arrays)}"
            )
    proj_size, hidden_size = 0, _hidden_size(cell, arrays)
    if projected:
        proj_size, hidden_size = arrays["weight_hr_l0"].shape
    layers = [int(m[2]) for m in map(_LAYER_KEY.match, arrays) if m]
    bias = "bias_ih_l0" in arrays or "bias_hh_l0" in arrays
    bidirectional = any(k.endswith("_reverse") for k in arrays)
    input_size = arrays["weight_ih_l0"].shape[1]
    return input_size, hidden_size, max(layers) + 1, bias, proj_size, bidirectional


def _check_state_dict(arrays, config):
    """Keys, shapes and one floating dtype, each error listing expected and found."""
    cell = config[0]
    want = _expected_shapes(*config)
    missing = [k for k in want if k not in arrays]
    unexpected = sorted(k for k in arrays if k not in want)
    if missing or unexpected:
        raise ValueError(
            f"the state dict does not match {_describe(*config)}: "
            f"missing keys {missing}, unexpected keys {unexpected}. "
            f"Expected keys: {list(want)}"
        )
    wrong = [
        f"`{k}`: expected {shape}, found {arrays[k].shape}"
        for k, shape in want.items()
        if arrays[k].shape != shape
    ]
    if wrong:
        hint = ""
        rows, cols = arrays["weight_hh_l0"].shape
        fits = [c for c in CELL_KINDS if rows == num_gates(c) * want["weight_hh_l0"][1]]
        if fits and cell not in fits:
            names = " or ".join(repr(c) for c in fits)
            hint = f". `weight_hh_l0` has the shape of a {names} layer: check `cell`"
        raise ValueError(
            f"the state dict does not match {_describe(*config)}; wrong shapes: "
            + "; ".join(wrong)
            + hint
        )
    dtypes = sorted({str(a.dtype) for a in arrays.values()})
    if len(dtypes) != 1 or np.dtype(dtypes[0]) not in _DTYPES:
        raise TypeError(
            "the state dict's tensors must share one dtype among float16, float32 "
            f"and float64, found {dtypes}"
        )
    if dtypes[0] == "float64" and not jax.config.jax_enable_x64:
        raise TypeError(
            "the state dict holds float64 tensors but JAX's 64-bit mode is off: "
            'enable it first with `jax.config.update("jax_enable_x64", True)`, '
            "or cast the module first with `module.float()`"
        )


def _make_cell(cell, hidden_size, bias, proj_size, params) -> AbstractCell:
    # The cells' initialiser hook hands each parameter over by its PyTorch role, so
    # the arrays go in untouched; the key is required by the signature but unused.
    def init(key, shape, dtype, *, role, hidden_size):
        return params[role]

    cls, keywords = cell_class(cell)
    if proj_size:
        keywords["proj_size"] = proj_size
    return cls(
        params["weight_ih"].shape[1],
        hidden_size,
        bias=bias,
        init=init,
        dtype=params["weight_ih"].dtype,
        key=jax.random.key(0),
        **keywords,
    )


def from_torch(
    module_or_state_dict: "torch.nn.RNNBase | Mapping[str, torch.Tensor]",
    *,
    cell: CellKind | None = None,
    dropout: float | None = None,
) -> StackedRNN:
    """Builds a [`stackrnn.StackedRNN`][] holding a PyTorch RNN's weights, bit for bit.

    Layer `k`'s `weight_ih_l{k}`, `weight_hh_l{k}`, `bias_ih_l{k}`, `bias_hh_l{k}`
    and `weight_hr_l{k}` become `cells[k].weight_ih` and so on (the `_reverse`
    keys of a bidirectional module, `backward_cells[k]`'s), in their dtype
    (float16, float32 or float64; float64 needs JAX's 64-bit mode). Every key and
    shape is checked: a mismatch raises an error listing what was expected and what
    was found.

    The result takes one sequence `(time, input_size)`, as every stackrnn module
    does; see the docs page "PyTorch interop" for running it on PyTorch's
    `(time, batch, input_size)` layout and initial states.

    **Arguments:**

    - `module_or_state_dict`: a `torch.nn.RNN`, `torch.nn.GRU` or `torch.nn.LSTM`
      (`batch_first` is irrelevant to the weights), or its `state_dict()`.
    - `cell`: the cell kind, PyTorch's `mode` in lower case: `"rnn_tanh"`,
      `"rnn_relu"`, `"gru"` or `"lstm"`. Required for a state dict, which does not
      record it; checked against a module's. (Keyword only argument.)
    - `dropout`: dropout between layers; defaults to the module's `dropout`, or 0
      for a state dict. (Keyword only argument.)

    **Returns:**

    A [`stackrnn.StackedRNN`][] with `num_layers` cells of the given type, and as
    many `backward_cells` if the module is bidirectional.
    """
    if isinstance(module_or_state_dict, torch.nn.RNNBase):
        module = module_or_state_dict
        found = module.mode.lower()
        if found not in CELL_KINDS:
            raise TypeError(f"unsupported PyTorch RNN mode {module.mode!r}")
        if cell is not None and check_kind("cell", cell) != found:
            raise ValueError(
                f"`cell` (={cell!r}) does not match the module, a "
                f"{type(module).__name__} of cell type {found!r}"
            )
        cell = found
        config = (
            cell,
            module.input_size,
            module.hidden_size,
            module.num_layers,
            module.bias,
            getattr(module, "proj_size", 0),
            module.bidirectional,
        )
        if dropout is None:
            dropout = module.dropout
        state_dict = module.state_dict()
    elif isinstance(module_or_state_dict, Mapping):
        check_kind("cell", cell)
        state_dict = module_or_state_dict
        config = None
    else:
        raise TypeError(
            "`module_or_state_dict` must be a torch.nn.RNN, torch.nn.GRU or "
            "torch.nn.LSTM, or the state dict of one, got "
            f"{type(module_or_state_dict).__name__}"
        )
    arrays = {k: _to_numpy(k, v) for k, v in state_dict.items()}
    if config is None:
        config = (cell, *_read_config(cell, arrays))
    _check_state_dict(arrays, config)
    _, _, hidden_size, num_layers, bias, proj_size, bidirectional = config
    directions: tuple[list[AbstractCell], list[AbstractCell]] = ([], [])
    for layer, direction in _layers(num_layers, bidirectional):
        params = {
            role: jnp.asarray(arrays[_key(role, layer, direction)])
            for role in _roles(bias, proj_size)
        }
        directions[direction].append(
            _make_cell(cell, hidden_size, bias, proj_size, params)
        )
    return StackedRNN(
        directions[0],
        backward_cells=directions[1] if bidirectional else None,
        dropout=0.0 if dropout is None else dropout,
    )


def _base(cell: AbstractCell) -> AbstractCell:
    """The cell inside every wrapper of `cell`: the one holding its weights."""
    while isinstance(cell, AbstractWrappedCell):
        cell = cell.cell
    return cell


def _named_cells(stack: StackedRNN) -> list[tuple[str, AbstractCell]]:
    named = [(f"stack.cells[{i}]", c) for i, c in enumerate(stack.cells)]
    return named + [
        (f"stack.backward_cells[{i}]", c)
        for i, c in enumerate(stack.backward_cells or ())
    ]


def _stack_config(stack: StackedRNN):
    """The PyTorch configuration of `stack`, or an error naming the first cell that
    has none: a PyTorch module has one cell type and width for all its cells."""
    if not isinstance(stack, StackedRNN):
        raise TypeError(f"`stack` must be a stackrnn.StackedRNN, got {type(stack)}")
    if stack.reverse:
        raise ValueError(
            "PyTorch has no stacks that read time backwards only; `stack.reverse` "
            "must be False"
        )
    named = _named_cells(stack)
    configs = []
    for name, c in named:
        c = _base(c)
        kind = kind_of(c)
        if kind is None:
            raise TypeError(
                f"`{name}` is a {type(c).__name__}; PyTorch has only ElmanCell, "
                "GRUCell and LSTMCell stacks"
            )
        configs.append(
            dict(
                cell=kind,
                hidden_size=c.hidden_size,
                bias=c.bias_ih is not None,
                proj_size=getattr(c, "proj_size", 0),
            )
        )
    for (name, _), config in zip(named[1:], configs[1:]):
        for key, value in config.items():
            if value != configs[0][key]:
                raise ValueError(
                    f"a PyTorch RNN has one `{key}` for all its cells, but "
                    f"`stack.cells[0]` has {key}={configs[0][key]!r} and `{name}` "
                    f"has {key}={value!r}"
                )
    return dict(configs[0], bidirectional=stack.bidirectional)


def _check_inference(stack: StackedRNN) -> None:
    """PyTorch's cells compute only the plain step: a wrapper cell that changes what
    a cell computes at inference too (a `Zoneout`) has no PyTorch form."""
    for name, cell in _named_cells(stack):
        xs = jnp.zeros((1, cell.input_size))
        runs = jax.eval_shape(
            lambda c=cell: c.for_sequence(xs, key=None, inference=True)[0]
        )
        if kind_of(runs) is None:
            raise ValueError(
                f"PyTorch's RNN modules have no `{type(cell).__name__}`, which "
                f"changes what the stack computes at inference too: `{name}` is "
                "one"
            )


def to_torch(stack: StackedRNN) -> dict[str, "torch.Tensor"]:
    """Exports a stack's weights as a PyTorch state dict, bit for bit.

    The inverse of [`stackrnn.interop.torch.from_torch`][]: the keys, their order,
    shapes and dtypes are those of the matching `torch.nn.RNN`, `torch.nn.GRU` or
    `torch.nn.LSTM`'s `state_dict()`. Any PyTree shaped as `stack` works, e.g. its
    gradients from `eqx.filter_grad`.

    **Arguments:**

    - `stack`: a [`stackrnn.StackedRNN`][] whose cells share one cell type, width,
      bias setting and (LSTM) `proj_size`, as PyTorch's modules require; it may be
      bidirectional but not `reverse`.
      A wrapper cell that changes what a cell computes at inference too (a
      [`stackrnn.Zoneout`][]) has no PyTorch form and raises a `ValueError`.

    **Returns:**

    A dict from PyTorch's parameter names to CPU `torch.Tensor`s.
    """
    config = _stack_config(stack)
    _check_inference(stack)
    directions = (stack.cells, stack.backward_cells or ())
    return {
        _key(role, layer, d): torch.from_numpy(
            np.array(getattr(_base(directions[d][layer]), role))
        )
        for layer, d in _layers(stack.num_layers, config["bidirectional"])
        for role in _roles(config["bias"], config["proj_size"])
    }


def to_torch_module(stack: StackedRNN) -> "torch.nn.RNNBase":
    """A ready PyTorch module computing what `stack` computes.

    **Arguments:**

    - `stack`: as for [`stackrnn.interop.torch.to_torch`][].

    **Returns:**

    A `torch.nn.RNN`, `torch.nn.GRU` or `torch.nn.LSTM` (with `batch_first=False`,
    the stack's `dropout`, and its parameters' dtype) holding `to_torch(stack)`.
    PyTorch has none of the stack's other regularisers: a stack with `residual`
    connections, or a wrapper cell that changes what a cell computes at inference
    too (a [`stackrnn.Zoneout`][]), raises a `ValueError`; the training-only ones
    (`variational` dropout, [`stackrnn.RecurrentDropout`][],
    [`stackrnn.WeightDrop`][]) are not carried over.
    """
    if stack.residual:
        raise ValueError(
            "PyTorch's RNN modules have no `residual` connections, which change "
            "what the stack computes at inference too; `stack.residual` is True"
        )
    config = _stack_config(stack)
    state_dict = to_torch(stack)
    cls, keywords = cell_class(config["cell"])
    if config["proj_size"]:
        keywords["proj_size"] = config["proj_size"]
    module = _MODULES[cls](
        input_size=stack.input_size,
        hidden_size=config["hidden_size"],
        num_layers=stack.num_layers,
        bias=config["bias"],
        dropout=stack.dropout,
        bidirectional=config["bidirectional"],
        dtype=state_dict["weight_ih_l0"].dtype,
        **keywords,
    )
    module.load_state_dict(state_dict)
    return module
