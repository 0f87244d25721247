import itertools
import math
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, strategies as st

import stackrnn
import stackrnn.lm


VOCAB = stackrnn.lm.Vocab.from_tokens(list("abcdefgh "))


@pytest.fixture(scope="module")
def model():
    k1, k2 = jax.random.split(jax.random.key(3))
    rnn = stackrnn.GRU(len(VOCAB), 8, 2, key=k1)
    return stackrnn.lm.RNNLM(rnn, len(VOCAB), key=k2)


# Prefixes of 3 characters and 8 new ones: every text the reference reads fits in
# TEXT_LENGTH tokens.
PREFIX, NUM = 3, 8
TEXT_LENGTH = PREFIX + NUM


@eqx.filter_jit
def logits_at(model, tokens, position):
    return model(tokens)[0][position]


def rerun_prefix(model, prefix, num, temperature, key):
    """The slow reference: re-read the whole text so far for every new character.
    The text is padded to one length, so that this compiles once: the model reads
    left to right, so what follows a position cannot change its logits."""
    tokens = list(VOCAB.encode(prefix))
    for i in range(num):
        padded = jnp.zeros(TEXT_LENGTH, jnp.int32).at[: len(tokens)].set(tokens)
        logits = logits_at(model, padded, len(tokens) - 1)
        if temperature == 0:
            token = int(jnp.argmax(logits))
        else:
            sub = jax.random.fold_in(key, i)
            token = int(jax.random.categorical(sub, logits / temperature))
        tokens.append(token)
    return prefix + "".join(VOCAB.tokens[t] for t in tokens[len(prefix) :])


@given(
    # Preprocessing keeps letters and single spaces, so these stay 3 tokens long.
    prefix=st.text(alphabet="abcdefgh ", min_size=PREFIX, max_size=PREFIX).filter(
        lambda s: s.strip() and "  " not in s
    ),
    temperature=st.sampled_from([0.0, 0.7]),
    seed=st.integers(0, 100),
)
def test_streaming_equals_rerunning_the_prefix(model, prefix, temperature, seed):
    key = jax.random.key(seed)
    expected = rerun_prefix(model, prefix, NUM, temperature, key)
    got = stackrnn.lm.predict(
        model, VOCAB, prefix, NUM, temperature=temperature, key=key
    )
    assert got == expected


def test_predict_is_prefix_plus_predictions(model):
    # The prefix is preprocessed as the training text; then come 10 tokens (an
    # untrained model may well predict `<unk>`, which d2l's predict prints as is).
    chars = list(itertools.islice(stackrnn.lm.generate(model, VOCAB, "Bad, ach!"), 10))
    assert len(chars) == 10 and set(chars) <= set(VOCAB.tokens)
    assert stackrnn.lm.predict(model, VOCAB, "Bad, ach!", 10) == "bad ach " + "".join(
        chars
    )


def test_sampling_is_deterministic_for_a_key(model):
    def sample(seed):
        return stackrnn.lm.predict(
            model, VOCAB, "abc", 30, temperature=0.7, key=jax.random.key(seed)
        )

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_generate_streams(model):
    chars = stackrnn.lm.generate(model, VOCAB, "abc")
    first = list(itertools.islice(chars, 5))
    more = list(itertools.islice(chars, 5))
    assert "".join(first + more) == stackrnn.lm.predict(model, VOCAB, "abc", 10)[3:]


def test_greedy_ignores_the_key(model):
    a = stackrnn.lm.predict(model, VOCAB, "abc", 10, key=jax.random.key(1))
    b = stackrnn.lm.predict(model, VOCAB, "abc", 10, key=jax.random.key(2))
    assert a == b


def test_errors(model):
    for temperature in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="`temperature` must be a finite number"):
            stackrnn.lm.generate(model, VOCAB, "abc", temperature=temperature)
    with pytest.raises(ValueError, match="needs a `key`"):
        stackrnn.lm.generate(model, VOCAB, "abc", temperature=0.5)
    with pytest.raises(ValueError, match="`prefix` must contain at least one letter"):
        stackrnn.lm.predict(model, VOCAB, "!?", 3)
    with pytest.raises(ValueError, match="`num_preds`"):
        stackrnn.lm.predict(model, VOCAB, "abc", -1)
    assert stackrnn.lm.predict(model, VOCAB, "abc", 0) == "abc"


def test_unknown_prefix_characters_are_warned_about(model):
    with pytest.warns(UserWarning, match="reads as '<unk>': 'i', 'q', 'u', 'z'"):
        stackrnn.lm.generate(model, VOCAB, "Quiz a")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        text = stackrnn.lm.predict(model, VOCAB, "quiz a", 3)
    assert len(caught) == 1 and caught[0].filename == __file__
    assert text.startswith("quiz a")
