import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

import stackrnn
import stackrnn.lm

from .helpers import tree_allclose


CONSTRUCTORS = {"rnn": stackrnn.RNN, "gru": stackrnn.GRU, "lstm": stackrnn.LSTM}


def make_lm(cell, vocab_size, hidden, layers, key, *, embedding=0):
    k1, k2 = jax.random.split(key)
    rnn = CONSTRUCTORS[cell](embedding or vocab_size, hidden, layers, key=k1)
    return stackrnn.lm.RNNLM(rnn, vocab_size, embedding=embedding > 0, key=k2)


# Every cell kind, one and several layers, one-hot and embedded tokens: fixed shapes,
# so that the examples of one structure reuse its two compiled programs.
STRUCTURES = [
    dict(cell="rnn", vocab_size=5, hidden=4, layers=2, embedding=0),
    dict(cell="gru", vocab_size=5, hidden=3, layers=1, embedding=3),
    dict(cell="lstm", vocab_size=6, hidden=4, layers=3, embedding=0),
]
TIME = 6


@eqx.filter_jit
def one_pass(model, tokens):
    return model(tokens)


@eqx.filter_jit
def one_step(model, token, state):
    return model(token, state)


@pytest.mark.parametrize("structure", STRUCTURES, ids=lambda s: s["cell"])
@given(seed=st.integers(0, 2**16))
def test_one_pass_equals_token_by_token(structure, seed):
    # Streaming invariant: carrying the state one token at a time computes the same
    # logits and final state as one pass over the whole sequence.
    key, tkey = jax.random.split(jax.random.key(seed))
    vocab_size = structure["vocab_size"]
    model = make_lm(**structure, key=key)
    tokens = jax.random.randint(tkey, (TIME,), 0, vocab_size)
    logits, final = one_pass(model, tokens)
    assert logits.shape == (TIME, vocab_size)
    state = model.init_state()
    steps = []
    for t in range(TIME):
        step_logits, state = one_step(model, tokens[t : t + 1], state)
        steps.append(step_logits[0])
    assert tree_allclose(jnp.stack(steps), logits, rtol=1e-5, atol=1e-6)
    assert tree_allclose(state, final, rtol=1e-5, atol=1e-6)


def test_one_hot_is_indexing_the_input_weights(getkey):
    # With one-hot inputs, the first layer reads column `token` of `weight_ih`:
    # the model equals the stack run on rows of the identity matrix.
    model = make_lm("gru", 5, 4, 2, getkey())
    tokens = jnp.array([4, 0, 2, 2, 1])
    hs, _ = model.rnn(jnp.eye(5)[tokens])
    logits, _ = model(tokens)
    assert tree_allclose(logits, hs @ model.weight.T + model.bias)


def test_uniform_model_has_perplexity_vocab_size(getkey):
    # Zero readout: every token gets probability 1/V, so the loss is log V.
    model = make_lm("rnn", 7, 3, 2, getkey())
    model = eqx.tree_at(lambda m: (m.weight, m.bias), model, replace_fn=jnp.zeros_like)
    tokens = jnp.array([1, 2, 3, 0])
    loss = stackrnn.lm.sequence_loss(model, tokens, jnp.array([2, 3, 0, 6]))
    np.testing.assert_allclose(np.exp(loss), 7.0, rtol=1e-6)


def test_readout_init(getkey):
    k1, k2 = getkey(), getkey()
    rnn = stackrnn.RNN(10, 16, 2, init=stackrnn.NormalInit(0.01), key=k1)
    model = stackrnn.lm.RNNLM(rnn, 10, init=stackrnn.NormalInit(0.01), key=k2)
    assert model.weight.shape == (10, 16)
    assert np.all(model.bias == 0)
    assert 0.005 < float(jnp.std(model.weight)) < 0.015
    model = stackrnn.lm.RNNLM(rnn, 10, key=k2)
    assert float(jnp.max(jnp.abs(model.weight))) <= 1 / 4  # U(-1/sqrt(16), ..)


def test_errors(getkey):
    rnn = stackrnn.GRU(5, 4, key=getkey())
    with pytest.raises(ValueError, match=r"`rnn.input_size` \(=5\) must equal"):
        stackrnn.lm.RNNLM(rnn, 6, key=getkey())
    with pytest.raises(TypeError, match="`rnn` must be a StackedRNN"):
        stackrnn.lm.RNNLM(rnn.cells[0], 5, key=getkey())
    model = stackrnn.lm.RNNLM(rnn, 5, key=getkey())
    with pytest.raises(TypeError, match="`tokens` must be an integer array"):
        model(jnp.zeros((3,)))
    with pytest.raises(ValueError, match=r"jax.vmap\(model\)"):
        model(jnp.zeros((2, 3), jnp.int32))
