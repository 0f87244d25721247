"""Text generation from a language model: greedy (d2l's `predict`) or sampled."""

import itertools
import math
import warnings
from collections.abc import Iterator

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray

from .._checks import check_size
from ._data import preprocess, UNK, Vocab
from ._lm import RNNLM


@eqx.filter_jit
def _next_token(model, tokens, state, key, temperature):
    logits, state = model(tokens, state, inference=True)
    if temperature == 0:
        token = jnp.argmax(logits[-1])
    else:
        token = jax.random.categorical(key, logits[-1] / temperature)
    return token, state


def _check(vocab: Vocab, prefix: str, temperature, key) -> str:
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not 0 <= temperature < math.inf
    ):
        raise ValueError(
            f"`temperature` must be a finite number >= 0, got {temperature!r}"
        )
    if temperature > 0 and key is None:
        raise ValueError("sampling with `temperature` > 0 needs a `key`")
    text = preprocess(prefix)
    if not text.strip():
        raise ValueError(f"`prefix` must contain at least one letter, got {prefix!r}")
    unknown = sorted(set(text) - set(vocab.tokens))
    if unknown:
        warnings.warn(
            f"`prefix` has characters outside the vocabulary, which the model reads "
            f"as {UNK!r}: {', '.join(map(repr, unknown))}",
            stacklevel=3,
        )
    return text


def generate(
    model: RNNLM,
    vocab: Vocab,
    prefix: str,
    *,
    temperature: float = 0.0,
    key: PRNGKeyArray | None = None,
) -> Iterator[str]:
    """Generates text after `prefix`, one character at a time, for as long as it is
    iterated.

    The model reads the prefix once (warm-up), then each new character costs one
    step: the recurrent state is carried, never recomputed from the prefix.

    **Arguments:**

    - `model`: the language model.
    - `vocab`: its vocabulary.
    - `prefix`: the text to continue, preprocessed as the training text (lower-case
      letters and spaces); it must contain a letter. Characters the vocabulary
      lacks are read as `<unk>`, with a warning naming them.
    - `temperature`: 0 picks the most likely character (greedy, d2l's `predict`);
      a positive finite value samples from `softmax(logits / temperature)`.
      (Keyword only argument.)
    - `key`: a `jax.random.PRNGKey`, needed when sampling; the `i`-th character uses
      `jax.random.fold_in(key, i)`. (Keyword only argument.)

    **Returns:**

    An iterator of characters.
    """
    # Checked here, not in the generator, so that bad arguments fail at the call.
    text = _check(vocab, prefix, temperature, key)
    return _stream(model, vocab, jnp.asarray(vocab.encode(text)), temperature, key)


def _stream(model, vocab, tokens, temperature, key):
    state = model.init_state()
    for i in itertools.count():
        step_key = None if temperature == 0 else jax.random.fold_in(key, i)
        token, state = _next_token(model, tokens, state, step_key, temperature)
        yield vocab.tokens[int(token)]
        tokens = token[None]


def predict(
    model: RNNLM,
    vocab: Vocab,
    prefix: str,
    num_preds: int,
    *,
    temperature: float = 0.0,
    key: PRNGKeyArray | None = None,
) -> str:
    """d2l's `predict(prefix, num_preds)`: the (preprocessed) prefix followed by
    `num_preds` generated characters. Arguments as [`stackrnn.lm.generate`][]."""
    check_size("num_preds", num_preds, minimum=0)
    text = _check(vocab, prefix, temperature, key)
    chars = _stream(model, vocab, jnp.asarray(vocab.encode(text)), temperature, key)
    return text + "".join(itertools.islice(chars, num_preds))
