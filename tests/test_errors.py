"""Bad input gets a clear error that names the argument, the expected and the received
value."""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import stackrnn


KEY = jr.key(0)
# Every check below runs at trace time, before a parameter is read: the models are
# built with `eqx.filter_eval_shape`, shapes and dtypes without values, so that no
# test compiles the random draws of its parameters.
shape_of = eqx.filter_eval_shape


def _raises(exc, *fragments):
    """Expect `exc` whose message contains every fragment, in order."""
    pattern = ".*".join(re.escape(f) for f in fragments)
    return pytest.raises(exc, match=pattern)


@pytest.fixture(scope="module")
def gru():
    return shape_of(stackrnn.GRU, 3, 4, num_layers=2, dropout=0.5, key=KEY)


@pytest.fixture(scope="module")
def lstm():
    return shape_of(stackrnn.LSTM, 3, 4, num_layers=2, key=KEY)


def test_wrong_rank(gru):
    with _raises(ValueError, "`xs`", "(time, input_size=3)", "got (3,)"):
        gru(jnp.ones((3,)), inference=True)
    with _raises(ValueError, "`xs`", "got (2, 5, 3)", "jax.vmap"):
        gru(jnp.ones((2, 5, 3)), inference=True)


def test_wrong_feature_size(gru):
    with _raises(ValueError, "`xs`", "input_size=3", "got (5, 2)"):
        gru(jnp.ones((5, 2)), inference=True)


def test_empty_sequence(gru):
    with _raises(ValueError, "`xs`", "at least one time step", "(0, 3)"):
        gru(jnp.ones((0, 3)), inference=True)


def test_integer_inputs(gru):
    with _raises(TypeError, "`xs`", "floating-point", "int32"):
        gru(jnp.ones((5, 3), jnp.int32), inference=True)


def test_wrong_state_shape(gru):
    with _raises(ValueError, "`state`", "(2, 4)", "(3, 4)"):
        gru(jnp.ones((5, 3)), jnp.zeros((3, 4)), inference=True)


def test_wrong_state_structure(lstm):
    with _raises(ValueError, "`state`", "a tuple", "(2, 4)", "got an array"):
        lstm(jnp.ones((5, 3)), jnp.zeros((2, 4)))


def test_integer_state(gru):
    with _raises(TypeError, "`state`", "floating-point"):
        gru(jnp.ones((5, 3)), jnp.zeros((2, 4), jnp.int32), inference=True)


def test_missing_dropout_key(gru):
    with _raises(RuntimeError, "`dropout` (=0.5)", "requires a `key`"):
        gru(jnp.ones((5, 3)))


@pytest.mark.parametrize("make", [stackrnn.RNN, stackrnn.GRU, stackrnn.LSTM])
@pytest.mark.parametrize(
    "kwargs, fragments",
    [
        (dict(num_layers=0), ("`num_layers`", ">= 1", "got 0")),
        (dict(num_layers=2.0), ("`num_layers`", "integer", "got 2.0")),
        (dict(hidden_size=0), ("`hidden_size`", ">= 1", "got 0")),
        (dict(hidden_size=True), ("`hidden_size`", "integer", "got True")),
        (dict(input_size=0), ("`input_size`", ">= 1", "got 0")),
        (dict(hidden_size=[4, 0], num_layers=2), ("`hidden_size[1]`", "got 0")),
        (
            dict(hidden_size=[4, 4]),
            ("`hidden_size` lists 2 widths", "`num_layers` is 1"),
        ),
        (dict(dropout=-0.1), ("`dropout`", "[0, 1)", "got -0.1")),
        (dict(dropout=1.0), ("`dropout`", "[0, 1)", "got 1.0")),
        (dict(dropout="0.5"), ("`dropout`", "number", "got '0.5'")),
        (dict(unroll=0), ("`unroll`", ">= 1", "got 0")),
    ],
)
def test_bad_configuration(make, kwargs, fragments):
    args = dict(input_size=3, hidden_size=4, num_layers=1)
    args.update(kwargs)
    with _raises(ValueError, *fragments):
        shape_of(make, **args, key=KEY)


def test_bad_nonlinearity():
    with _raises(ValueError, "`nonlinearity`", '"tanh" or "relu"', "'sigmoid'"):
        stackrnn.RNN(3, 4, nonlinearity="sigmoid", key=KEY)


def test_bad_proj_size():
    with _raises(ValueError, "`proj_size` (=4)", "smaller than `hidden_size` (=4)"):
        stackrnn.LSTM(3, 4, proj_size=4, key=KEY)
    with _raises(ValueError, "`proj_size`", ">= 0", "got -1"):
        stackrnn.LSTMCell(3, 4, proj_size=-1, key=KEY)


def test_bad_sigma():
    with _raises(ValueError, "`sigma`", ">= 0", "-1"):
        stackrnn.NormalInit(-1.0)


@pytest.mark.parametrize("gain", [0.0, -1.0, float("inf"), True, "1"])
def test_bad_orthogonal_gain(gain):
    with _raises(ValueError, "`gain`", "finite number > 0", repr(gain)):
        stackrnn.OrthogonalInit(gain=gain)


def test_bad_orthogonal_base():
    with _raises(TypeError, "`base`", "initialiser", "'uniform'"):
        stackrnn.OrthogonalInit(base="uniform")


def test_orthogonal_weight_hh_must_split_into_gate_blocks():
    init = stackrnn.OrthogonalInit()
    with _raises(ValueError, "`weight_hh` of shape (10, 4)", "`hidden_size` (=4)"):
        init(KEY, (10, 4), jnp.float32, role="weight_hh", hidden_size=4)


@pytest.mark.parametrize(
    "make", [stackrnn.LSTMCell, stackrnn.LayerNormLSTMCell, stackrnn.LSTM]
)
def test_bad_forget_bias(make):
    for value in (True, "1", float("nan"), [1.0]):
        with _raises(ValueError, "`forget_bias`", "finite number or None", repr(value)):
            make(3, 4, forget_bias=value, key=KEY)
    with _raises(ValueError, "`forget_bias` (=1.0)", "`bias` is False"):
        make(3, 4, forget_bias=1.0, bias=False, key=KEY)


@pytest.mark.parametrize(
    "make", [stackrnn.LayerNormGRUCell, stackrnn.LayerNormLSTMCell]
)
@pytest.mark.parametrize("eps", [0.0, -1e-5, float("inf"), False, "1e-5"])
def test_bad_layer_norm_eps(make, eps):
    with _raises(ValueError, "`eps`", "finite number > 0", repr(eps)):
        make(3, 4, eps=eps, key=KEY)


@pytest.mark.parametrize("make", [stackrnn.GRU, stackrnn.LSTM])
def test_bad_layer_norm_flag(make):
    with _raises(TypeError, "`layer_norm`", "bool", "got 1"):
        make(3, 4, layer_norm=1, key=KEY)


def test_layer_norm_lstm_proj_size():
    with _raises(ValueError, "`proj_size` (=4)", "smaller than `hidden_size` (=4)"):
        stackrnn.LSTM(3, 4, proj_size=4, layer_norm=True, key=KEY)


def test_dropout_with_one_layer_warns_at_the_callers_line():
    for make in (
        lambda: stackrnn.GRU(3, 4, num_layers=1, dropout=0.5, key=KEY),
        lambda: stackrnn.StackedRNN([stackrnn.GRUCell(3, 4, key=KEY)], dropout=0.5),
    ):
        with pytest.warns(UserWarning, match="`dropout` \\(=0.5\\) has no effect") as w:
            make()
        assert w[0].filename == __file__


def test_strings_where_objects_are_expected():
    with _raises(TypeError, "`init`", "stackrnn.OrthogonalInit()", "'orthogonal'"):
        stackrnn.GRU(3, 4, init="orthogonal", key=KEY)
    with _raises(TypeError, "`init`", "got 'pytorch'"):
        stackrnn.GRUCell(3, 4, init="pytorch", key=KEY)
    with _raises(TypeError, "`hidden_size`", "sequence of integers", "'32'"):
        stackrnn.LSTM(3, "32", key=KEY)


def test_inference_must_be_a_bool(gru):
    with _raises(TypeError, "`inference`", "True or False", "'no'"):
        stackrnn.StackedRNN(gru.cells, inference="no")
    for value in ("no", 1, 0.0):
        with _raises(TypeError, "`inference`", "True or False or None", repr(value)):
            gru(jnp.ones((5, 3)), inference=value)
        with _raises(TypeError, "`inference`", "True or False or None"):
            gru.step(jnp.ones(3), gru.init_state(), inference=value)
    shape_of(lambda gru, xs: gru(xs, inference=np.bool_(True)), gru, jnp.ones((5, 3)))


def test_bad_cells():
    with _raises(ValueError, "`cells`", "at least one"):
        stackrnn.StackedRNN([])
    with _raises(TypeError, "`cells[0]`", "AbstractCell", "Linear"):
        stackrnn.StackedRNN([shape_of(eqx.nn.Linear, 2, 2, key=KEY)])
    a = shape_of(stackrnn.GRUCell, 3, 4, key=KEY)
    b = shape_of(stackrnn.GRUCell, 5, 4, key=KEY)
    with _raises(
        ValueError, "`cells[1].input_size` (=5)", "`cells[0].output_size` (=4)"
    ):
        stackrnn.StackedRNN([a, b])


def test_cell_inputs():
    cell = shape_of(stackrnn.LSTMCell, 3, 4, key=KEY)
    with _raises(ValueError, "`x`", "(3,)", "got (2, 3)", "jax.vmap"):
        cell(jnp.ones((2, 3)), cell.init_state())
    with _raises(ValueError, "`state`", "a tuple"):
        cell(jnp.ones((3,)), jnp.zeros((4,)))
    with _raises(TypeError, "`x`", "floating-point"):
        cell(jnp.ones((3,), jnp.int32), cell.init_state())


# Every cell kind, on both layer paths: the dtype rule is checked before a path runs.
_KINDS = [
    lambda **kw: stackrnn.RNN(3, 4, **kw),
    lambda **kw: stackrnn.RNN(3, 4, nonlinearity="relu", **kw),
    lambda **kw: stackrnn.GRU(3, 4, **kw),
    lambda **kw: stackrnn.LSTM(3, 4, **kw),
    lambda **kw: stackrnn.GRU(3, 4, layer_norm=True, **kw),
    lambda **kw: stackrnn.LSTM(3, 4, layer_norm=True, **kw),
]


@pytest.mark.parametrize("make", _KINDS)
@pytest.mark.parametrize("fast", [False, True])
def test_inputs_and_state_must_have_the_parameters_dtype(make, fast):
    path = stackrnn.Fast() if fast else stackrnn.Reference()
    stack = shape_of(make, num_layers=2, path=path, key=KEY)
    xs = np.ones((5, 3), np.float32)
    state = jax.tree.map(
        lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(stack.init_state)
    )
    for dtype in (jnp.float16, jnp.bfloat16):
        with _raises(TypeError, "`xs`", "dtype float32", f"got {jnp.dtype(dtype)}"):
            stack(xs.astype(dtype), inference=True)
        low = jax.tree.map(lambda s: s.astype(dtype), state)
        with _raises(TypeError, "`state`", "dtype float32", f"got {jnp.dtype(dtype)}"):
            stack(xs, low, inference=True)
        with _raises(TypeError, "`x`", "dtype float32", f"got {jnp.dtype(dtype)}"):
            stack.step(xs[0].astype(dtype), state, inference=True)
        with _raises(TypeError, "`state`", "dtype float32", f"got {jnp.dtype(dtype)}"):
            stack.step(xs[0], low, inference=True)
    half = shape_of(make, num_layers=2, dtype=jnp.float16, path=path, key=KEY)
    with _raises(TypeError, "`xs`", "dtype float16", "got float32"):
        half(xs, inference=True)
    ys, _ = shape_of(
        lambda half, xs: half(xs, inference=True), half, xs.astype(jnp.float16)
    )
    assert ys.dtype == jnp.float16


def test_cell_inputs_and_state_must_have_the_parameters_dtype():
    cell = shape_of(stackrnn.LSTMCell, 3, 4, key=KEY)
    h, c = cell.init_state()
    with _raises(TypeError, "`x`", "dtype float32", "got bfloat16"):
        cell(jnp.ones(3, jnp.bfloat16), (h, c))
    with _raises(TypeError, "`state`", "dtype float32", "got float16"):
        cell(jnp.ones(3), (h, c.astype(jnp.float16)))


def test_transduce_encoding_must_have_the_parameters_dtype(gru):
    tokens = jnp.arange(5) % 3
    with _raises(TypeError, "`encode(inputs)`", "dtype float32", "got float16"):
        gru.transduce(
            lambda t: jax.nn.one_hot(t, 3, dtype=jnp.float16),
            lambda ys, t: ys,
            tokens,
            inference=True,
        )


def test_numpy_scalars_are_numbers():
    # Closed over, not passed: `shape_of` would trace NumPy scalars as arrays.
    stack = shape_of(
        lambda: stackrnn.LSTM(
            np.int64(3),
            np.int32(4),
            num_layers=np.int64(2),
            dropout=np.float32(0.25),
            forget_bias=np.float32(1.0),
            key=KEY,
        )
    )
    assert stack.num_layers == 2 and stack.dropout == 0.25
    assert type(stack.input_size) is int and type(stack.cells[1].hidden_size) is int
    assert type(stack.dropout) is float
    shape_of(lambda: stackrnn.GRU(3, [np.int64(4), 5], num_layers=2, key=KEY))
    shape_of(lambda: stackrnn.LayerNormGRUCell(3, 4, eps=np.float32(1e-3), key=KEY))
    stackrnn.NormalInit(np.float32(0.1))
    stackrnn.OrthogonalInit(gain=np.float64(2.0))
    with _raises(ValueError, "`dropout`", "number in [0, 1)", "True"):
        shape_of(
            lambda: stackrnn.GRU(3, 4, num_layers=2, dropout=np.bool_(True), key=KEY)
        )


@pytest.mark.parametrize(
    "make",
    [
        lambda key: stackrnn.GRU(3, 4, key=key),
        lambda key: stackrnn.LSTM(3, 4, num_layers=2, bidirectional=True, key=key),
        lambda key: stackrnn.ElmanCell(3, 4, key=key),
        lambda key: stackrnn.GRUCell(3, 4, key=key),
        lambda key: stackrnn.LSTMCell(3, 4, key=key),
        lambda key: stackrnn.LayerNormGRUCell(3, 4, key=key),
        lambda key: stackrnn.LayerNormLSTMCell(3, 4, key=key),
    ],
)
def test_bad_key(make):
    for key, got in [(None, "got None"), (0, "got 0"), (jr.split(KEY), "(2,)")]:
        with _raises(TypeError, "`key`", "JAX PRNG key", got):
            make(key)
    shape_of(make, jr.PRNGKey(0))  # the legacy form is a key too


def test_sizes_that_cannot_fit_are_refused_before_allocating(monkeypatch):
    # Terabytes of weights: refused from the shapes alone (an attempt to allocate
    # would abort the process or fail at first use).
    with _raises(MemoryError, "`hidden_size` (=1000000)", "GiB for its parameters"):
        stackrnn.GRU(28, 10**6, key=KEY)
    with _raises(MemoryError, "`hidden_size` (=1000000)"):
        stackrnn.LayerNormLSTMCell(28, 10**6, key=KEY)
    # The bound is the device's memory: here made 1 MiB, which a cell of width 512
    # (about 6 MiB of float32 GRU weights) exceeds and one of width 64 does not.
    monkeypatch.setattr(stackrnn._gates, "device_memory", lambda: 2**20)
    with _raises(MemoryError, "`hidden_size` (=512)", "more than the 0.0 GiB"):
        stackrnn.GRUCell(512, 512, key=KEY)
    shape_of(stackrnn.GRUCell, 64, 64, key=KEY)
