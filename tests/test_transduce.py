"""`StackedRNN.transduce`: `decode(stack(encode(inputs)))` with the encoding and the
decoding inside the checkpointed chunks. The same values, states, gradients and
masks as the call it stands for; memory that does not grow with the sequence's
inputs and outputs; the language model's loss computed that way; bad arguments
refused."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
import pytest
from hypothesis import given

import stackrnn
import stackrnn.lm

from .helpers import (
    Config,
    make_stack,
    seeds,
    structures,
    to_float64,
    tree_allclose,
    with_options,
    x64,
)


RTOL = ATOL = 1e-10  # float64: the programs differ only in the order of sums


def _encode_decode(table, readout):
    def encode(inputs):
        tokens, scales = inputs
        return table[tokens] * scales[:, None]

    def decode(ys, inputs):
        tokens, scales = inputs
        return {"out": jnp.tanh(ys @ readout) * scales[:, None], "tok": tokens}

    return encode, decode


@eqx.filter_jit
def _outputs_and_grads(model, table, readout, tokens, scales, state, keys, through):
    """Under `vmap`: `model.transduce` (`through`) or `decode` of the call, and the
    gradients of a weighted sum of the result with respect to the parameters, the
    float inputs and the initial state (compiled once per structure)."""
    encode, decode = _encode_decode(table, readout)

    def run(args):
        model, scales, state = args

        def one(tokens, scales, state, key):
            if through:
                return model.transduce(encode, decode, (tokens, scales), state, key=key)
            ys, final = model(encode((tokens, scales)), state, key=key)
            return decode(ys, (tokens, scales)), final

        decoded, final = jax.vmap(one)(tokens, scales, state, keys)
        out = decoded["out"]
        weights = jnp.arange(out.size, dtype=out.dtype).reshape(out.shape)
        total = jnp.sum(jnp.sin(out) * weights / weights.size)
        total = total + sum(jnp.sum(s**2) for s in jax.tree.leaves(final))
        return total, (decoded, final)

    grads, outputs = eqx.filter_grad(run, has_aux=True)((model, scales, state))
    return outputs, grads


# Fixed shapes: every direction, no checkpoint, one level and nested chunks, with
# and without dropout and zoneout (whose masks must be the call's).
TRANSDUCED = [
    (Config("gru", 2, (4, 4), True, 9), "forward", (4, 2), True),
    (Config("lstm", 3, (3, 4, 3), False, 9), "reverse", 3, False),
    (Config("rnn_tanh", 2, (4, 3), True, 7), "bidirectional", True, True),
    (Config("lstm_proj", 3, (4, 4), True, 7), "forward", False, True),
]


@pytest.mark.parametrize(
    "cfg, direction, checkpoint, regularised",
    structures(TRANSDUCED, quick=2, ids=[f"{c[0].kind}-{c[1]}" for c in TRANSDUCED]),
)
@given(seed=seeds)
def test_transduce_equals_decode_of_call(cfg, direction, checkpoint, regularised, seed):
    """Inputs that are a PyTree (token indices and a float array), an encoding that
    expands them and a decoding that reads them again, against
    `decode(stack(encode(inputs)))` with the same key: values, final states and
    gradients with respect to the parameters, the float inputs and the initial
    state, under `vmap`. With dropout and zoneout, the masks are the call's."""
    options = {}
    if regularised:
        options = dict(zoneout=0.2, dropout=0.5)
    with x64(True):
        kc, kt, kx, kw, ks, kd = jr.split(jr.key(seed), 6)
        stack = to_float64(make_stack(cfg, kc, direction, **options))
        stack = with_options(stack, checkpoint=checkpoint)
        vocab = 5
        table = jr.normal(kw, (vocab, cfg.input_size), jnp.float64)
        readout = jr.normal(kw, (stack.output_size, 3), jnp.float64)
        tokens = jr.randint(kt, (2, cfg.time), 0, vocab)
        scales = jr.normal(kx, (2, cfg.time), jnp.float64)
        state = jax.tree.map(
            lambda s: jr.normal(ks, (2, *s.shape), jnp.float64), stack.init_state()
        )
        args = (stack, table, readout, tokens, scales, state, jr.split(kd, 2))
        got = _outputs_and_grads(*args, through=True)
        want = _outputs_and_grads(*args, through=False)
        assert tree_allclose(got, want, rtol=RTOL, atol=ATOL)


def _lm(checkpoint, *, vocab, key, hidden=32):
    k1, k2 = jr.split(key)
    rnn = stackrnn.GRU(vocab, hidden, 2, checkpoint=checkpoint, key=k1)
    return stackrnn.lm.RNNLM(rnn, vocab, key=k2)


def _step_bytes(model, time, loss):
    """Arguments + outputs + temporary buffers of the compiled gradient step of
    `loss` on a batch of 2 sequences of `time` tokens (compiled, not run)."""
    params, static = eqx.partition(model, eqx.is_array)
    tokens = jnp.zeros((2, time), jnp.int32)

    def objective(params, tokens):
        m = eqx.combine(params, static)
        return jax.vmap(lambda t: loss(m, t, t))(tokens).mean()

    compiled = jax.jit(jax.value_and_grad(objective)).lower(params, tokens).compile()
    m = compiled.memory_analysis()
    return (
        m.temp_size_in_bytes
        + m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
    )


def _logits_loss(model, tokens, targets):
    """The loss from the whole sequence's logits (what `sequence_loss` streams)."""
    logits, _ = model(tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


@pytest.mark.slow
def test_streamed_loss_memory_does_not_grow_with_the_sequence(getkey):
    """16x the tokens: the gradient step of `sequence_loss` on a stack with nested
    chunks (about `time ** (1/3)` steps per level) hardly grows with the sequence
    (its tokens and per-step losses are small), while a loss that keeps the logits
    of the whole sequence grows, and so does the same loss without checkpointing
    (about 16x)."""
    key = getkey()
    streamed, logits, plain = [], [], []
    for time in (256, 4096):
        model = _lm((round(time ** (2 / 3)), round(time ** (1 / 3))), vocab=32, key=key)
        streamed.append(_step_bytes(model, time, stackrnn.lm.sequence_loss))
        logits.append(_step_bytes(model, time, _logits_loss))
        model = _lm(False, vocab=32, key=key)
        plain.append(_step_bytes(model, time, stackrnn.lm.sequence_loss))
    assert streamed[1] / streamed[0] < 1.5
    assert logits[1] / logits[0] > 3
    assert plain[1] / plain[0] > 10


# (A tuple case holds the arguments: the nested chunks are a tuple in a tuple.)
@pytest.mark.parametrize("checkpoint", structures([((4, 2),), True, 3], quick=1))
def test_sequence_loss_streams_the_same_loss(checkpoint, getkey):
    """The streamed loss and its gradient equal those of the plain model."""
    with x64(True):
        plain = to_float64(_lm(False, hidden=4, vocab=5, key=getkey()))
        streamed = eqx.tree_at(
            lambda m: m.rnn, plain, with_options(plain.rnn, checkpoint=checkpoint)
        )
        tokens = jr.randint(getkey(), (11,), 0, 5)
        targets = jr.randint(getkey(), (11,), 0, 5)
        f = eqx.filter_jit(eqx.filter_value_and_grad(stackrnn.lm.sequence_loss))
        # Leaves only: the two models differ in a static field.
        got = jax.tree.leaves(f(streamed, tokens, targets))
        want = jax.tree.leaves(f(plain, tokens, targets))
        assert tree_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_bad_arguments(getkey):
    stack = stackrnn.GRU(3, 4, 2, checkpoint=2, key=getkey())
    tokens = jnp.arange(5) % 3
    encode = lambda t: jax.nn.one_hot(t, 3)  # noqa: E731
    decode = lambda ys, _: ys  # noqa: E731
    with pytest.raises(ValueError, match="`inputs` must be a PyTree of arrays"):
        stack.transduce(encode, decode, ())
    with pytest.raises(ValueError, match="`inputs`' arrays must share"):
        stack.transduce(lambda p: encode(p[0]), decode, (tokens, jnp.zeros(4)))
    with pytest.raises(ValueError, match=r"`encode\(inputs\)` must have shape"):
        stack.transduce(lambda t: jax.nn.one_hot(t, 4), decode, tokens)
    with pytest.raises(TypeError, match=r"`encode\(inputs\)` must be a floating"):
        stack.transduce(lambda t: t[:, None].repeat(3, 1), decode, tokens)
    with pytest.raises(ValueError, match=r"`decode` must return arrays whose"):
        stack.transduce(encode, lambda ys, _: ys.sum(), tokens)
    with pytest.raises(ValueError, match="`state` must"):
        stack.transduce(encode, decode, tokens, jnp.zeros((3, 4)))
    model = stackrnn.lm.RNNLM(stack, 3, key=getkey())
    with pytest.raises(ValueError, match=r"`targets` must have the shape of"):
        stackrnn.lm.sequence_loss(model, tokens, tokens[:4])
    with pytest.raises(TypeError, match="`targets` must be an integer array"):
        stackrnn.lm.sequence_loss(model, tokens, jnp.zeros(5))
