import dataclasses
import math
import os
import pathlib
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, strategies as st

import stackrnn
import stackrnn.lm
from stackrnn.lm._train import _batches, _epoch, _loss_sum, _window_keys

from .helpers import tree_allclose, tree_equal


TEXT = "the time traveller for so it will be convenient to speak of him " * 4
# The epoch compiles per optimiser object and batch size: the training tests that
# need no optimiser of their own share this one and batches of 64 (150 windows: two
# full batches and a short one of 22).
OPTIMIZER = stackrnn.lm.default_optimizer()
BATCH = 64


@pytest.fixture(scope="module")
def data():
    return stackrnn.lm.CharData.from_text(TEXT, num_steps=8, num_train=150, num_val=40)


def tiny_model(data, key, cell=stackrnn.GRU):
    k1, k2 = jax.random.split(key)
    rnn = cell(len(data.vocab), 16, 2, key=k1)
    return stackrnn.lm.RNNLM(rnn, len(data.vocab), key=k2)


# Compiled, as in the epoch: one program per example, not one per operation.
_compiled_batches = jax.jit(_batches, static_argnums=(1, 2, 3))


@given(n=st.integers(1, 40), batch_size=st.integers(1, 16), multiple=st.integers(1, 3))
def test_batches_cover_every_window_once(n, batch_size, multiple):
    order = jnp.arange(n)[::-1]
    pairs = _compiled_batches(order, batch_size, jnp.float32, multiple)
    # Full batches, then one short batch with all remaining windows (d2l's
    # DataLoader with drop_last=False), nothing padded but to the device multiple.
    sizes = [batch_size] * (n // batch_size) + (
        [n % batch_size] if n % batch_size else []
    )
    got_sizes = [int(m.sum()) for _, mask in pairs for m in mask]
    assert got_sizes == sizes
    for idx, mask in pairs:
        assert idx.shape == mask.shape and idx.shape[1] % multiple == 0
        assert idx.shape[1] - int(mask[0].sum()) < multiple
    real = np.concatenate([np.asarray(i)[np.asarray(m) == 1] for i, m in pairs])
    np.testing.assert_array_equal(real, order)


@eqx.filter_jit
def batch_loss(model, x, y, mask, key, inference):
    """A batch's loss as the compiled epoch takes it on one device."""
    keys, weight_key = _window_keys(model, key, x.shape[0], inference)
    return _loss_sum(model, x, y, mask, keys, weight_key, inference) / jnp.sum(mask)


def test_padded_batch_is_the_mean_over_real_windows(data, getkey):
    model = tiny_model(data, getkey())
    x, y = jnp.asarray(data.train_x[:5]), jnp.asarray(data.train_y[:5])
    # 5 windows, padded to 8 as for 8 devices.
    ((idx, mask),) = _batches(jnp.arange(5), 8, jnp.float32, 8)
    assert idx.shape == (1, 8)
    key = getkey()

    def padded(m):
        return batch_loss(m, x[idx[0]], y[idx[0]], mask[0], key, True)

    def unpadded(m):
        return jnp.mean(jax.vmap(lambda a, b: stackrnn.lm.sequence_loss(m, a, b))(x, y))

    loss, grads = eqx.filter_jit(eqx.filter_value_and_grad(padded))(model)
    ref_loss, ref_grads = eqx.filter_jit(eqx.filter_value_and_grad(unpadded))(model)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7)


@eqx.filter_jit
def mean_loss(model, x, y):
    return jnp.mean(jax.vmap(lambda a, b: stackrnn.lm.sequence_loss(model, a, b))(x, y))


@eqx.filter_jit
def reference_step(model, opt_state, x, y):
    loss, grads = eqx.filter_value_and_grad(mean_loss)(model, x, y)
    updates, opt_state = OPTIMIZER.update(grads, opt_state, model)
    return eqx.apply_updates(model, updates), opt_state, loss


@pytest.mark.slow
# Full batches and a short one, and a short one alone (more than 150 windows).
@pytest.mark.parametrize("batch_size", [BATCH, 160])
@given(seed=st.integers(0, 100))
def test_compiled_epoch_equals_a_python_loop_over_batches(data, batch_size, seed):
    # The reference: d2l's loop, one step per batch of the shuffled windows, the last
    # batch short; then the mean loss over all validation windows.
    model = tiny_model(data, jax.random.key(seed))
    opt_state = OPTIMIZER.init(eqx.filter(model, eqx.is_inexact_array))
    key = jax.random.key(seed + 1)
    arrays = tuple(
        jnp.asarray(a) for a in (data.train_x, data.train_y, data.val_x, data.val_y)
    )
    fast = _epoch(model, opt_state, arrays, key, OPTIMIZER, batch_size, None)

    perm_key, _ = jax.random.split(key)
    order = np.asarray(jax.random.permutation(perm_key, len(data.train_x)))
    total = 0.0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        model, opt_state, loss = reference_step(
            model, opt_state, data.train_x[idx], data.train_y[idx]
        )
        total += float(loss) * len(idx)
    val_loss = mean_loss(model, data.val_x, data.val_y)

    params = eqx.filter(model, eqx.is_inexact_array)
    assert tree_allclose(eqx.filter(fast[0], eqx.is_inexact_array), params, rtol=1e-4)
    np.testing.assert_allclose(fast[2], total / len(order), rtol=1e-5)
    np.testing.assert_allclose(fast[3], val_loss, rtol=1e-5)


@pytest.mark.slow
def test_loss_decreases(data, getkey):
    model = tiny_model(data, getkey())
    kwargs = dict(optimizer=OPTIMIZER, batch_size=BATCH, progress=False)
    _, _, history = stackrnn.lm.fit(model, data, epochs=20, key=getkey(), **kwargs)
    assert len(history) == 20
    assert history.train_ppl[0] > 15
    assert history.train_ppl[-1] < 0.5 * history.train_ppl[0]
    assert history.val_ppl[-1] < 0.7 * history.val_ppl[0]


@pytest.mark.slow
def test_resume_is_bit_exact(data, getkey, tmp_path):
    # Any optax optimiser: momentum is a state that must survive the checkpoint.
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.5, 0.9))
    model, key = tiny_model(data, getkey(), cell=stackrnn.LSTM), getkey()
    kwargs = dict(key=key, optimizer=optimizer, batch_size=64, progress=False)
    full = stackrnn.lm.fit(model, data, epochs=4, **kwargs)

    def save(model, opt_state, history):
        stackrnn.lm.SavedRun.save(
            tmp_path,
            (model, opt_state),
            hyperparameters={"note": "test"},
            vocab=data.vocab,
            history=history,
        )

    stackrnn.lm.fit(model, data, epochs=2, on_epoch=save, **kwargs)
    saved = stackrnn.lm.SavedRun.read(tmp_path)
    assert saved.hyperparameters == {"note": "test"}
    assert saved.vocab == data.vocab and len(saved.history) == 2
    like = (model, optimizer.init(eqx.filter(model, eqx.is_inexact_array)))
    resumed_model, resumed_state = saved.load(like)
    resumed = stackrnn.lm.fit(
        resumed_model,
        data,
        epochs=4,
        opt_state=resumed_state,
        history=saved.history,
        **kwargs,
    )
    assert tree_equal(
        eqx.filter(full[0], eqx.is_array), eqx.filter(resumed[0], eqx.is_array)
    )
    assert tree_equal(full[1], resumed[1])
    assert full[2].train_ppl == resumed[2].train_ppl
    assert full[2].val_ppl == resumed[2].val_ppl


def test_checkpoint_files(data, getkey, tmp_path):
    model = tiny_model(data, getkey())
    history = stackrnn.lm.History([9.0], [10.0], [0.5])
    for epochs in (1, 2):
        history = stackrnn.lm.History(
            *(f * epochs for f in dataclasses.astuple(history))
        )
        stackrnn.lm.SavedRun.save(
            tmp_path / "run",
            model,
            hyperparameters={},
            vocab=data.vocab,
            history=history,
        )
    # The JSON record and the newest state only: no temporary or stale files.
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "checkpoint.json",
        "state-000002.eqx",
    ]
    saved = stackrnn.lm.SavedRun.read(tmp_path / "run")
    assert saved.history == history
    assert tree_equal(
        eqx.filter(saved.load(tiny_model(data, getkey())), eqx.is_array),
        eqx.filter(model, eqx.is_array),
    )
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        stackrnn.lm.SavedRun.read(tmp_path)


@pytest.mark.slow
def test_divergence_stops_at_the_last_finite_epoch(data, getkey):
    # Updates turn NaN from the 7th step on: 3 steps an epoch (64 + 64 + 22
    # windows), so epoch 3 diverges.
    poison = optax.scale_by_schedule(lambda step: jnp.where(step >= 6, jnp.nan, 1.0))
    optimizer = optax.chain(stackrnn.lm.default_optimizer(0.5), poison)
    seen = []

    def on_epoch(model, opt_state, history):
        leaves = jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))
        seen.append((len(history), all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)))

    model = tiny_model(data, getkey())
    kwargs = dict(key=getkey(), optimizer=optimizer, batch_size=64, progress=False)
    with pytest.raises(
        FloatingPointError, match="diverged in epoch 3: the perplexities are not"
    ):
        stackrnn.lm.fit(model, data, epochs=5, on_epoch=on_epoch, **kwargs)
    assert seen == [(1, True), (2, True)]
    # Unchecked, the run goes on and records the non-finite perplexities.
    _, _, history = stackrnn.lm.fit(model, data, epochs=4, check_finite=False, **kwargs)
    assert all(math.isfinite(p) for p in history.train_ppl[:2])
    assert not any(math.isfinite(p) for p in history.val_ppl[2:])


@pytest.mark.slow
def test_infinite_perplexity_of_a_finite_loss(data, getkey):
    # Readout weights of 1e4 give losses of thousands of nats: finite, but exp()
    # overflows. That is divergence too; unchecked, the perplexity is inf, without
    # a RuntimeWarning (an error here). (Clipped steps barely move such weights.)
    model = tiny_model(data, getkey())
    model = eqx.tree_at(lambda m: m.weight, model, model.weight * 1e4)
    kwargs = dict(key=getkey(), optimizer=OPTIMIZER, batch_size=BATCH, progress=False)
    with pytest.raises(
        FloatingPointError, match="diverged in epoch 1: the perplexities are not"
    ):
        stackrnn.lm.fit(model, data, epochs=1, **kwargs)
    _, _, history = stackrnn.lm.fit(model, data, epochs=1, check_finite=False, **kwargs)
    assert history.train_ppl == [math.inf] and history.val_ppl == [math.inf]


# A save that dies in its first rename (as under SIGKILL: no cleanup runs).
_KILLED_SAVE = """
import os, sys, stackrnn.lm
os.replace = lambda *args: os._exit(3)
stackrnn.lm.SavedRun.save(sys.argv[1], {}, hyperparameters={},
                            vocab=stackrnn.lm.Vocab(("<unk>",)),
                            history=stackrnn.lm.History())
"""


@pytest.mark.slow
def test_killed_saves_leave_files_that_remove_stale_removes(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).parents[1])}
    for _ in range(2):
        command = [sys.executable, "-c", _KILLED_SAVE, str(tmp_path)]
        assert subprocess.run(command, env=env).returncode == 3
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 2 and all(n.startswith(".state-000000.eqx.") for n in left)
    (tmp_path / "mine.txt").write_text("")
    assert stackrnn.lm.SavedRun.remove_stale(tmp_path) == left
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_files_follow_the_umask(data, getkey, tmp_path, umask):
    model = tiny_model(data, getkey())
    before = os.umask(umask)
    try:
        stackrnn.lm.SavedRun.save(
            tmp_path,
            model,
            hyperparameters={},
            vocab=data.vocab,
            history=stackrnn.lm.History(),
        )
    finally:
        os.umask(before)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    mode = 0o666 & ~umask
    assert modes == {"checkpoint.json": mode, "state-000000.eqx": mode}


def test_plot(tmp_path):
    history = stackrnn.lm.History([20.0, 10.0, 8.0], [21.0, 12.0, 9.0], [1.0, 0.2, 0.2])
    stackrnn.lm.plot_history(history, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments(data, getkey):
    with pytest.raises(ValueError, match="`learning_rate` must be a finite number > 0"):
        stackrnn.lm.default_optimizer(0)
    with pytest.raises(ValueError, match="`clip` must be a finite number > 0"):
        stackrnn.lm.default_optimizer(2.0, -1.0)
    for value in (math.inf, math.nan):
        with pytest.raises(ValueError, match="`learning_rate` must be a finite"):
            stackrnn.lm.default_optimizer(value)
        with pytest.raises(ValueError, match="`clip` must be a finite number > 0"):
            stackrnn.lm.default_optimizer(2.0, value)
    with pytest.raises(ValueError, match="`method` must be 'sgd' or 'adam', got 'sdg'"):
        stackrnn.lm.default_optimizer(method="sdg")
    model = tiny_model(data, getkey())
    with pytest.raises(ValueError, match="`batch_size` must be an integer >= 1"):
        stackrnn.lm.fit(model, data, epochs=1, key=getkey(), batch_size=0)


# Run in a fresh interpreter: the device count is fixed when JAX starts.
_DATA_PARALLEL = """
import os
os.environ["JAX_NUM_CPU_DEVICES"] = "4"
import equinox as eqx, jax, numpy as np, stackrnn
from stackrnn.lm._train import _epoch, _mesh

assert jax.device_count() == 4
text = "the time traveller for so it will be convenient to speak of him " * 4
data = stackrnn.lm.CharData.from_text(text, num_steps=8, num_train=150, num_val=40)
k1, k2 = jax.random.split(jax.random.key(0))
rnn = stackrnn.GRU(len(data.vocab), 16, 2, dropout=0.3, key=k1)
model = stackrnn.lm.RNNLM(rnn, len(data.vocab), key=k2)
# 30 windows a batch: padded to 32 with masked windows, 8 a device.
for batch_size in (30,):
    one, four = (
        stackrnn.lm.fit(model, data, epochs=2, key=jax.random.key(1),
                     batch_size=batch_size, progress=False, devices=d)
        for d in (1, 4)
    )
    for field in ("train_ppl", "val_ppl"):
        np.testing.assert_allclose(
            np.log(getattr(four[2], field)), np.log(getattr(one[2], field)),
            rtol=1e-6, atol=1e-6,
        )
    leaves = [jax.tree.leaves(eqx.filter(r[:2], eqx.is_array)) for r in (one, four)]
    for a, b in zip(*leaves):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-6)
        assert len(b.sharding.device_set) == 4 and b.sharding.is_fully_replicated
# The batch is split, not copied: the compiled epoch sums gradients across devices.
arrays = tuple(jax.numpy.asarray(a) for a in (data.train_x, data.train_y,
               data.val_x, data.val_y))
opt = stackrnn.lm.default_optimizer()
state = opt.init(eqx.filter(model, eqx.is_inexact_array))
lowered = _epoch.lower(model, state, arrays, k1, opt, 30, _mesh(4))
assert "all-reduce" in lowered.compile().compiled.as_text()
print("ok")
"""


@pytest.mark.slow
def test_data_parallel_equals_one_device():
    out = subprocess.run(
        [sys.executable, "-c", _DATA_PARALLEL], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok"


def test_bad_devices(data, getkey):
    model = tiny_model(data, getkey())
    with pytest.raises(ValueError, match="`devices` must be an integer >= 1"):
        stackrnn.lm.fit(model, data, epochs=1, key=getkey(), devices=0)
    with pytest.raises(ValueError, match=r"`devices` \(=99\) must be at most"):
        stackrnn.lm.fit(model, data, epochs=1, key=getkey(), devices=99)
    # The suite runs on the CPU, as one device: the error says how to split it.
    with pytest.raises(ValueError, match="JAX_NUM_CPU_DEVICES=2 before JAX starts"):
        stackrnn.lm.fit(model, data, epochs=1, key=getkey(), devices=2)


def test_weight_drop_is_one_mask_per_batch(data, getkey):
    """With weight drop the only mask, a batch of copies of one window has the loss
    of that window alone under the same key: every window of a batch reads the same
    masked weights. (With a mask per window, the copies' losses would differ.)"""
    k1, k2 = jax.random.split(getkey())
    rnn = stackrnn.GRU(len(data.vocab), 16, 2, weight_drop=0.5, key=k1)
    model = stackrnn.lm.RNNLM(rnn, len(data.vocab), key=k2)
    x, y = data.train_x[:1], data.train_y[:1]
    xs, ys = jnp.repeat(x, 8, axis=0), jnp.repeat(y, 8, axis=0)
    key = getkey()
    one = batch_loss(model, x, y, jnp.ones(1), key, False)
    batch = batch_loss(model, xs, ys, jnp.ones(8), key, False)
    assert np.allclose(one, batch, rtol=1e-6)
    other = batch_loss(model, x, y, jnp.ones(1), getkey(), False)
    assert not np.allclose(one, other)
    plain = batch_loss(model, x, y, jnp.ones(1), key, True)
    assert not np.allclose(one, plain)
