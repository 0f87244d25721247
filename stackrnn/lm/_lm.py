"""`RNNLM`: a character language model, tokens in, next-token logits out."""

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .._checks import check_size
from .._init import Initializer, PyTorchInit
from .._stack import StackedRNN, StackState


class RNNLM(eqx.Module):
    """A recurrent language model: tokens are one-hot encoded (as d2l's `RNNLM`) or
    embedded, run through a [`stackrnn.StackedRNN`][], and read out by a linear layer
    into logits over the vocabulary.

    The module takes one sequence of token indices; batch with `jax.vmap`.

    **Arguments:**

    - `rnn`: the recurrent stack. With one-hot inputs its `input_size` must be
      `vocab_size`; with an embedding, the embedding has `rnn.input_size` entries.
    - `vocab_size`: number of tokens.
    - `embedding`: if `True`, a learned `eqx.nn.Embedding` (N(0, 1) entries) replaces
      the one-hot encoding. (Keyword only argument.)
    - `init`: initialiser of the readout's weight (called with `role="weight_ih"`)
      and bias (`role="bias_ih"`), `hidden_size` being the stack's `output_size`. The
      default [`stackrnn.PyTorchInit`][] is `torch.nn.Linear`'s initialisation;
      [`stackrnn.NormalInit`][] is d2l's `RNNLMScratch`. (Keyword only argument.)
    - `key`: a `jax.random.PRNGKey`. (Keyword only argument.)

    !!! example

        ```python
        import jax, stackrnn

        k1, k2 = jax.random.split(jax.random.key(0))
        rnn = stackrnn.GRU(28, 32, num_layers=2, key=k1)
        model = stackrnn.lm.RNNLM(rnn, 28, key=k2)
        logits, state = model(jax.numpy.array([3, 1, 4]))  # logits: (3, 28)
        ```
    """

    rnn: StackedRNN
    embedding: eqx.nn.Embedding | None
    weight: Float[Array, "vocab hidden"]
    bias: Float[Array, " vocab"]
    vocab_size: int = eqx.field(static=True)

    def __init__(
        self,
        rnn: StackedRNN,
        vocab_size: int,
        *,
        embedding: bool = False,
        init: Initializer = PyTorchInit(),
        key: PRNGKeyArray,
    ):
        if not isinstance(rnn, StackedRNN):
            raise TypeError(f"`rnn` must be a StackedRNN, got {type(rnn).__name__}")
        if rnn.bidirectional or rnn.reverse:
            kind = "bidirectional" if rnn.bidirectional else "reverse"
            raise ValueError(
                f"`rnn` must read time forwards, got a {kind} stack: a language "
                "model predicts each token from the ones before it, and a stack that "
                "reads backwards would see the tokens it has to predict"
            )
        check_size("vocab_size", vocab_size, minimum=2)
        if not embedding and rnn.input_size != vocab_size:
            raise ValueError(
                f"`rnn.input_size` (={rnn.input_size}) must equal `vocab_size` "
                f"(={vocab_size}) for one-hot inputs; or pass `embedding=True`"
            )
        emb_key, w_key, b_key = jax.random.split(key, 3)
        dtype = jax.tree.leaves(eqx.filter(rnn, eqx.is_inexact_array))[0].dtype
        hidden = rnn.output_size
        self.embedding = (
            eqx.nn.Embedding(vocab_size, rnn.input_size, dtype=dtype, key=emb_key)
            if embedding
            else None
        )
        shape = (vocab_size, hidden)
        self.weight = init(w_key, shape, dtype, role="weight_ih", hidden_size=hidden)
        self.bias = init(b_key, shape[:1], dtype, role="bias_ih", hidden_size=hidden)
        self.rnn = rnn
        self.vocab_size = vocab_size

    def init_state(self) -> StackState:
        """The stack's zero state."""
        return self.rnn.init_state()

    def __call__(
        self,
        tokens: Int[Array, " time"],
        state: StackState | None = None,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> tuple[Float[Array, "time vocab"], StackState]:
        """Runs the model over one sequence of tokens.

        **Arguments:**

        - `tokens`: integer token indices, a JAX array of shape `(time,)`.
        - `state`: the stack's initial state; zeros if omitted.
        - `key`, `inference`: as [`stackrnn.StackedRNN`][]'s, for dropout.
          (Keyword only arguments.)

        **Returns:**

        `(logits, final_state)`: unnormalised next-token log-probabilities of shape
        `(time, vocab_size)` and the stack's state after the last token.
        """
        _check_tokens("tokens", tokens)
        return self.rnn.transduce(
            self._encode,
            lambda hs, _: self._readout(hs),
            tokens,
            state,
            key=key,
            inference=inference,
        )

    def _encode(self, tokens):
        if self.embedding is None:
            return jax.nn.one_hot(tokens, self.vocab_size, dtype=self.weight.dtype)
        return self.embedding.weight[tokens]

    def _readout(self, hs):
        return hs @ self.weight.T + self.bias


def sequence_loss(
    model: RNNLM,
    tokens: Int[Array, " time"],
    targets: Int[Array, " time"],
    *,
    key: PRNGKeyArray | None = None,
    inference: bool | None = None,
) -> Float[Array, ""]:
    """Mean cross-entropy of the next-token predictions over one sequence; the
    perplexity is its exponential.

    **Arguments:**

    - `model`: the language model.
    - `tokens`: the inputs, integer token indices of shape `(time,)`.
    - `targets`: the token that follows each input, shape `(time,)`.
    - `key`, `inference`: for dropout, as in `RNNLM.__call__`.
      (Keyword only arguments.)

    **Returns:**

    A scalar: the mean over time of `-log p(targets[t] | tokens[:t+1])`.

    With `model.rnn.checkpoint` on, the one-hot encoding (or embedding), the readout
    and the cross-entropy run inside each checkpointed chunk
    ([`stackrnn.StackedRNN.transduce`][]): the logits of the whole sequence are never
    stored, and training memory grows with the chunks, not with `time`.
    """
    _check_tokens("tokens", tokens)
    _check_tokens("targets", targets)
    if jnp.shape(targets) != jnp.shape(tokens):
        raise ValueError(
            f"`targets` must have the shape of `tokens` {jnp.shape(tokens)}, got "
            f"{jnp.shape(targets)}"
        )
    losses, _ = model.rnn.transduce(
        lambda pair: model._encode(pair[0]),
        lambda hs, pair: optax.softmax_cross_entropy_with_integer_labels(
            model._readout(hs), pair[1]
        ),
        (tokens, targets),
        key=key,
        inference=inference,
    )
    return losses.mean()


def _check_tokens(name, tokens):
    if not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
        raise TypeError(
            f"`{name}` must be an integer array of token indices, got dtype "
            f"{jnp.result_type(tokens)}"
        )
    if jnp.ndim(tokens) != 1:
        raise ValueError(
            f"`{name}` must have shape (time,), got {jnp.shape(tokens)}. Modules "
            "take one example: to run a batch, use `jax.vmap(model)(tokens)` (or "
            "`jax.vmap` over the loss)"
        )
