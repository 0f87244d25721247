"""PyTorch interop: `from_torch` reproduces `torch.nn.RNN/GRU/LSTM` outputs, final
states and gradients; `to_torch` and `from_torch` are exact inverses."""

import dataclasses
import functools
import importlib
import sys

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

import stackrnn

from .helpers import seeds, stack_of, tree_equal, x64


torch = pytest.importorskip("torch")
from stackrnn.interop.torch import from_torch, to_torch, to_torch_module  # noqa: E402


pytestmark = pytest.mark.filterwarnings(
    "ignore:LSTM with projections is not supported with oneDNN"
)

TORCH_CLASS = {
    "rnn_tanh": torch.nn.RNN,
    "rnn_relu": torch.nn.RNN,
    "gru": torch.nn.GRU,
    "lstm": torch.nn.LSTM,
}
# float32: the two libraries sum the same products in different orders.
TOLERANCE = {"float32": 1e-5, "float64": 1e-12}


@dataclasses.dataclass(frozen=True)
class TorchConfig:
    cell: str
    input_size: int
    hidden_size: int
    num_layers: int
    bias: bool
    proj_size: int
    bidirectional: bool
    time: int
    batch: int
    dtype: str
    seed: int

    @property
    def output_size(self):
        return self.proj_size or self.hidden_size

    @property
    def num_states(self):
        return self.num_layers * (1 + self.bidirectional)


@st.composite
def torch_configs(draw, dtypes=("float32", "float64")):
    cell = draw(st.sampled_from(sorted(TORCH_CLASS)))
    hidden_size = draw(st.integers(2, 5))
    return TorchConfig(
        cell=cell,
        input_size=draw(st.integers(1, 4)),
        hidden_size=hidden_size,
        num_layers=draw(st.integers(1, 4)),
        bias=draw(st.booleans()),
        proj_size=draw(st.integers(0, hidden_size - 1)) if cell == "lstm" else 0,
        bidirectional=draw(st.booleans()),
        time=draw(st.integers(1, 4)),
        batch=draw(st.integers(1, 3)),
        dtype=draw(st.sampled_from(dtypes)),
        seed=draw(st.integers(0, 2**16)),
    )


def make_module(cfg: TorchConfig, **kwargs):
    torch.manual_seed(cfg.seed)
    if cfg.cell.startswith("rnn"):
        kwargs["nonlinearity"] = cfg.cell[4:]
    if cfg.proj_size:
        kwargs["proj_size"] = cfg.proj_size
    module = TORCH_CLASS[cfg.cell](
        cfg.input_size,
        cfg.hidden_size,
        cfg.num_layers,
        bias=cfg.bias,
        bidirectional=cfg.bidirectional,
        **kwargs,
    )
    return module.to(getattr(torch, cfg.dtype))


def assert_same_state_dict(got, want):
    """Same keys in the same order, same dtypes and shapes, equal bit for bit."""
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), name


def close(jax_value, torch_value, dtype):
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(
        np.asarray(jax_value), torch_value.detach().numpy(), rtol=tol, atol=tol
    )


# Every cell kind, one to three layers, with and without biases and a projection,
# one and two directions, both dtypes: every example runs all four, at shapes fixed so
# that the examples after the first reuse their compiled programs.
PARITY = (
    TorchConfig("rnn_tanh", 3, 4, 3, True, 0, False, 4, 2, "float64", 0),
    TorchConfig("rnn_relu", 3, 4, 1, False, 0, True, 4, 2, "float32", 0),
    TorchConfig("gru", 3, 4, 2, True, 0, True, 4, 2, "float64", 0),
    TorchConfig("lstm", 3, 4, 2, False, 2, True, 4, 2, "float32", 0),
)


@eqx.filter_jit
@eqx.filter_value_and_grad(has_aux=True)
def _value_and_grad(args, ct_ys, ct_state):
    """`((value, (ys, final)), gradients)`: a linear functional of the outputs and
    final states of `stack` run over PyTorch's `(time, batch, features)` layout
    (batched with `jax.vmap` on our side), and its gradients with respect to the
    stack, the inputs and the initial state."""
    stack, xs, state = args
    run = jax.vmap(stack, in_axes=(1, 1), out_axes=(1, 1))
    ys, final = run(xs, state)
    value = jnp.sum(ys * ct_ys) + sum(
        jnp.sum(f * ct)
        for f, ct in zip(jax.tree.leaves(final), jax.tree.leaves(ct_state))
    )
    return value, (ys, final)


@given(seed=seeds)
def test_matches_torch_outputs_states_and_gradients(seed):
    """Outputs, final states and the gradients of a random linear functional of
    them w.r.t. inputs, initial state and every weight equal PyTorch's, on
    PyTorch's `(time, batch, features)` layout with an initial state
    `(num_layers * num_directions, batch, hidden)`, batched with `jax.vmap` on our
    side."""
    for cfg in PARITY:
        _check_parity(dataclasses.replace(cfg, seed=seed))


def _check_parity(cfg):
    module = make_module(cfg)
    rng = np.random.default_rng(cfg.seed)
    S, T, B = cfg.num_states, cfg.time, cfg.batch

    def draw(*shape):
        return rng.standard_normal(shape).astype(cfg.dtype)

    xs = draw(T, B, cfg.input_size)
    h0 = draw(S, B, cfg.output_size)
    state = (h0, draw(S, B, cfg.hidden_size)) if cfg.cell == "lstm" else h0
    ct_ys = draw(T, B, cfg.output_size * (1 + cfg.bidirectional))
    ct_state = jax.tree.map(lambda s: draw(*s.shape), state)

    xs_t = torch.tensor(xs, requires_grad=True)
    state_t = jax.tree.map(lambda s: torch.tensor(s, requires_grad=True), state)
    ys_t, final_t = module(xs_t, state_t)
    loss_t = (ys_t * torch.from_numpy(ct_ys)).sum()
    for f, ct in zip(jax.tree.leaves(final_t), jax.tree.leaves(ct_state)):
        loss_t = loss_t + (f * torch.from_numpy(ct)).sum()
    loss_t.backward()

    with x64(cfg.dtype == "float64"):
        stack = from_torch(module)
        assert_same_state_dict(to_torch(stack), module.state_dict())
        args = (stack, jax.device_put(xs), jax.tree.map(jax.device_put, state))
        (_, (ys, final)), grads = _value_and_grad(args, ct_ys, ct_state)

    close(ys, ys_t, cfg.dtype)
    jax.tree.map(lambda a, b: close(a, b, cfg.dtype), final, final_t)
    grad_stack, grad_xs, grad_state = grads
    close(grad_xs, xs_t.grad, cfg.dtype)
    jax.tree.map(lambda a, b: close(a, b.grad, cfg.dtype), grad_state, state_t)
    grad_weights = to_torch(grad_stack)
    assert list(grad_weights) == [name for name, _ in module.named_parameters()]
    for name, param in module.named_parameters():
        assert grad_weights[name].dtype == param.dtype
        close(grad_weights[name], param.grad, cfg.dtype)


def test_batch_first_recipe():
    """With `batch_first=True` only the axes of `xs` and `ys` move; states keep
    PyTorch's `(num_layers, batch, hidden)` layout."""
    cfg = TorchConfig("lstm", 3, 4, 2, True, 2, False, 5, 3, "float32", 0)
    module = make_module(cfg, batch_first=True)
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((3, 5, 3)).astype(np.float32)
    state = (
        rng.standard_normal((2, 3, 2)).astype(np.float32),
        rng.standard_normal((2, 3, 4)).astype(np.float32),
    )
    with torch.no_grad():
        want_ys, want_final = module(
            torch.from_numpy(xs), tuple(map(torch.from_numpy, state))
        )
    stack = from_torch(module)
    ys, final = jax.vmap(stack, in_axes=(0, 1), out_axes=(0, 1))(xs, state)
    close(ys, want_ys, "float32")
    jax.tree.map(lambda a, b: close(a, b, "float32"), final, want_final)


@st.composite
def stack_configs(draw):
    cell = draw(st.sampled_from(sorted(TORCH_CLASS)))
    num_layers = draw(st.integers(1, 4))
    hidden_size = draw(st.integers(2, 5))
    return dict(
        cell=cell,
        input_size=draw(st.integers(1, 4)),
        hidden_size=hidden_size,
        num_layers=num_layers,
        bias=draw(st.booleans()),
        proj_size=draw(st.integers(0, hidden_size - 1)) if cell == "lstm" else 0,
        bidirectional=draw(st.booleans()),
        dropout=draw(st.sampled_from([0.0, 0.25])) if num_layers > 1 else 0.0,
        dtype=draw(st.sampled_from(["float16", "float32", "float64"])),
        seed=draw(st.integers(0, 2**16)),
    )


def make_stack(cfg):
    """The stack of `cfg`, its parameters drawn by NumPy: the round trips compile
    nothing, where JAX's generators compile a program for every new shape."""
    kwargs = dict(
        num_layers=cfg["num_layers"],
        bias=cfg["bias"],
        bidirectional=cfg["bidirectional"],
        dropout=cfg["dropout"],
        dtype=getattr(jnp, cfg["dtype"]),
        key=jax.random.key(cfg["seed"]),
    )
    args = (cfg["input_size"], cfg["hidden_size"])
    if cfg["cell"] == "gru":
        make = functools.partial(stackrnn.GRU, *args, **kwargs)
    elif cfg["cell"] == "lstm":
        make = functools.partial(
            stackrnn.LSTM, *args, proj_size=cfg["proj_size"], **kwargs
        )
    else:
        make = functools.partial(
            stackrnn.RNN, *args, nonlinearity=cfg["cell"][4:], **kwargs
        )
    rng = np.random.default_rng(cfg["seed"])

    def draw(x):
        if not isinstance(x, jax.ShapeDtypeStruct):
            return x
        return jax.device_put(rng.standard_normal(x.shape).astype(x.dtype))

    return jax.tree.map(draw, eqx.filter_eval_shape(make))


@given(torch_configs())
def test_torch_round_trip_is_exact(cfg):
    """`to_torch(from_torch(m))` is `m.state_dict()`, through a module or a state
    dict, and `to_torch_module` rebuilds `m`'s configuration."""
    module = make_module(cfg)
    with x64(cfg.dtype == "float64"):
        from_module = from_torch(module)
        from_dict = from_torch(module.state_dict(), cell=cfg.cell)
        assert tree_equal(from_module, from_dict)
        assert jax.tree.structure(from_module) == jax.tree.structure(from_dict)
        assert_same_state_dict(to_torch(from_dict), module.state_dict())
        rebuilt = to_torch_module(from_module)
    assert repr(rebuilt) == repr(module)
    assert_same_state_dict(rebuilt.state_dict(), module.state_dict())


def dtypes(tree):
    return [a.dtype for a in jax.tree.leaves(eqx.filter(tree, eqx.is_array))]


@given(stack_configs())
def test_stackrnn_round_trip_is_exact(cfg):
    """`from_torch(to_torch(s))` and `from_torch(to_torch_module(s))` are `s`: same
    cells, configuration, dtypes and bits."""
    with x64(cfg["dtype"] == "float64"):
        stack = make_stack(cfg)
        state_dict = to_torch(stack)
        assert {str(v.dtype) for v in state_dict.values()} == {f"torch.{cfg['dtype']}"}
        via_dict = from_torch(state_dict, cell=cfg["cell"], dropout=cfg["dropout"])
        via_module = from_torch(to_torch_module(stack))
    for back in (via_dict, via_module):
        assert jax.tree.structure(back) == jax.tree.structure(stack)
        assert tree_equal(back, stack)
        assert dtypes(back) == dtypes(stack)
        assert back.dropout == stack.dropout


# Bad input: every message names what was expected and what was found.


def gru_state_dict():
    torch.manual_seed(0)
    return dict(torch.nn.GRU(3, 4, 2).state_dict())


def test_missing_and_unexpected_keys():
    state_dict = gru_state_dict()
    del state_dict["bias_hh_l1"]
    state_dict["weight_hr_l0"] = torch.zeros(2, 4)
    with pytest.raises(ValueError) as e:
        from_torch(state_dict, cell="gru")
    msg = str(e.value)
    config = "input_size=3, hidden_size=4, bias=True, bidirectional=False"
    assert f"2-layer 'gru' stack ({config})" in msg
    assert "missing keys ['bias_hh_l1']" in msg
    assert "unexpected keys ['weight_hr_l0']" in msg
    assert "'weight_ih_l1', 'weight_hh_l1', 'bias_ih_l1', 'bias_hh_l1']" in msg


def test_missing_bias_in_a_biased_stack():
    state_dict = gru_state_dict()
    del state_dict["bias_ih_l0"]
    with pytest.raises(ValueError, match=r"missing keys \['bias_ih_l0'\]"):
        from_torch(state_dict, cell="gru")


def test_missing_first_layer_weight():
    state_dict = gru_state_dict()
    del state_dict["weight_ih_l0"]
    with pytest.raises(ValueError, match="needs a 2-D `weight_ih_l0`, found missing"):
        from_torch(state_dict, cell="gru")


def test_projection_must_be_a_matrix():
    state_dict = dict(torch.nn.LSTM(3, 4, proj_size=2).state_dict())
    state_dict["weight_hr_l0"] = torch.zeros(8)
    with pytest.raises(ValueError, match=r"needs a 2-D `weight_hr_l0`, found \(8,\)"):
        from_torch(state_dict, cell="lstm")


def test_wrong_shape():
    state_dict = gru_state_dict()
    state_dict["weight_hh_l1"] = torch.zeros(12, 5)
    with pytest.raises(ValueError) as e:
        from_torch(state_dict, cell="gru")
    assert "wrong shapes: `weight_hh_l1`: expected (12, 4), found (12, 5)" in str(
        e.value
    )


@pytest.mark.parametrize("layers", [1, 2])
def test_one_bad_recurrent_weight_is_named_alone(layers):
    """The width comes from the tensors that agree, not from the broken one."""
    state_dict = dict(torch.nn.GRU(3, 4, layers).state_dict())
    state_dict["weight_hh_l0"] = torch.zeros(15, 5)
    with pytest.raises(ValueError) as e:
        from_torch(state_dict, cell="gru")
    message = str(e.value)
    assert "hidden_size=4" in message
    assert message.endswith(
        "wrong shapes: `weight_hh_l0`: expected (12, 4), found (15, 5)"
    ), message


# The refusals below read a stack's structure, not its values: the stacks are
# traced (`eqx.filter_eval_shape`), not drawn.
shape_of = eqx.filter_eval_shape


def test_to_torch_refuses_zoneout(getkey):
    stack = shape_of(stackrnn.GRU, 3, 4, num_layers=2, zoneout=0.1, key=getkey())
    with pytest.raises(ValueError, match=r"no `Zoneout`.*`stack.cells\[0\]`"):
        to_torch(stack)


def test_lstm_state_dict_given_as_gru():
    state_dict = torch.nn.LSTM(3, 4).state_dict()
    with pytest.raises(ValueError) as e:
        from_torch(state_dict, cell="gru")
    msg = str(e.value)
    assert "`weight_hh_l0`: expected (12, 4), found (16, 4)" in msg
    assert "has the shape of a 'lstm' layer" in msg


def test_gru_state_dict_given_as_rnn():
    with pytest.raises(ValueError, match="has the shape of a 'gru' layer"):
        from_torch(gru_state_dict(), cell="rnn_tanh")


def test_projected_lstm_state_dict_given_as_gru():
    state_dict = torch.nn.LSTM(3, 4, proj_size=2).state_dict()
    with pytest.raises(ValueError, match=r"unexpected keys \['weight_hr_l0'\]"):
        from_torch(state_dict, cell="gru")


def test_state_dict_needs_cell():
    with pytest.raises(
        ValueError, match="`cell` must name a cell kind, .* or .lstm., got None"
    ):
        from_torch(gru_state_dict())


@pytest.mark.parametrize("source", [gru_state_dict, lambda: torch.nn.GRU(3, 4)])
def test_bad_cell_lists_the_kinds(source):
    kinds = "'rnn_tanh', 'rnn_relu', 'gru' or 'lstm'"
    with pytest.raises(
        ValueError, match=f"`cell` must name a cell kind, {kinds}, got 'GRU'"
    ):
        from_torch(source(), cell="GRU")


def test_module_and_cell_disagree():
    with pytest.raises(ValueError, match=r"`cell` \(='lstm'\).*cell type 'gru'"):
        from_torch(torch.nn.GRU(3, 4), cell="lstm")


def test_not_an_rnn():
    with pytest.raises(TypeError, match="got Linear"):
        from_torch(torch.nn.Linear(3, 4))


def test_missing_reverse_key():
    state_dict = dict(torch.nn.GRU(3, 4, 2, bidirectional=True).state_dict())
    del state_dict["weight_hh_l1_reverse"]
    with pytest.raises(ValueError) as e:
        from_torch(state_dict, cell="gru")
    msg = str(e.value)
    assert "bias=True, bidirectional=True)" in msg
    assert "missing keys ['weight_hh_l1_reverse']" in msg


def test_float64_needs_x64():
    with x64(False), pytest.raises(TypeError, match="jax_enable_x64"):
        from_torch(torch.nn.GRU(3, 4).double())


def test_mixed_and_unsupported_dtypes():
    state_dict = gru_state_dict()
    state_dict["bias_hh_l0"] = state_dict["bias_hh_l0"].double()
    with pytest.raises(TypeError, match=r"share one dtype.*\['float32', 'float64'\]"):
        from_torch(state_dict, cell="gru")
    with pytest.raises(TypeError, match="`weight_ih_l0` has dtype torch.bfloat16"):
        from_torch(torch.nn.GRU(3, 4).bfloat16())


def test_to_torch_needs_a_uniform_stack(getkey):
    mixed_widths = shape_of(stackrnn.GRU, 3, [4, 5], num_layers=2, key=getkey())
    with pytest.raises(ValueError, match=r"`stack.cells\[1\]` has hidden_size=5"):
        to_torch(mixed_widths)
    gru = shape_of(stackrnn.GRUCell, 3, 4, key=getkey())
    mixed_cells = stack_of([gru, shape_of(stackrnn.LSTMCell, 4, 4, key=getkey())])
    with pytest.raises(ValueError, match=r"cells\[0\]` has cell='gru'.*cell='lstm'"):
        to_torch_module(mixed_cells)
    cells = [gru, gru]
    backward = [shape_of(stackrnn.GRUCell, 3, 5, key=getkey())] + cells[1:]
    mixed_directions = stack_of(cells[:1], backward_cells=backward[:1])
    with pytest.raises(ValueError, match=r"`stack.backward_cells\[0\]` has hidden"):
        to_torch(mixed_directions)
    with pytest.raises(ValueError, match="`stack.reverse` must be False"):
        to_torch(stack_of(cells[:1], reverse=True))
    with pytest.raises(TypeError, match="must be a stackrnn.StackedRNN"):
        to_torch(gru)


def test_to_torch_rejects_cells_pytorch_lacks(getkey):
    """PyTorch's RNN modules have no layer normalisation."""
    for layer_norm_stack in (
        shape_of(stackrnn.GRU, 3, 4, num_layers=2, layer_norm=True, key=getkey()),
        shape_of(
            stackrnn.LSTM, 3, 4, layer_norm=True, bidirectional=True, key=getkey()
        ),
    ):
        name = type(layer_norm_stack.cells[0]).__name__
        for export in (to_torch, to_torch_module):
            with pytest.raises(
                TypeError, match=rf"`stack.cells\[0\]` is a {name}; PyTorch has only"
            ):
                export(layer_norm_stack)


def test_clear_error_without_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.delitem(sys.modules, "stackrnn.interop.torch")
    with pytest.raises(ImportError, match=r'pip install "stackrnn\[torch\]"'):
        importlib.import_module("stackrnn.interop.torch")
