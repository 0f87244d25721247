"""Training a language model on optax: one compiled call per epoch.

An epoch is a single `eqx.filter_jit` call that shuffles the training windows, scans
the optimiser step over all batches (each batch `jax.vmap`s the model over its
windows), then scans the validation windows. Python runs once per epoch, never per
batch, so small models are not dominated by dispatch overhead.

With several devices the same call runs data-parallel: parameters and optimiser
state are replicated on a `jax.sharding.Mesh` with one axis, `batch`, and the loss and
gradient of every batch are computed under `jax.shard_map`, each device on its share
of the windows, then summed across devices (`jax.lax.psum`); every device applies the
same update. The arithmetic is the single-device run's up to the order of the sums.
(Leaving the split to XLA's sharding propagation instead, with a sharding constraint
on the batch, compiled a slower epoch on two CPU devices: see the measurement log,
`benchmarks/README.md`.)
"""

import dataclasses
import math
import time
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree
from tqdm.auto import tqdm

from .._checks import check_size
from .._wrapped import drop_weights, holds, WeightDrop
from ._data import CharData
from ._lm import RNNLM, sequence_loss


def default_optimizer(
    learning_rate: float = 2.0, clip: float = 1.0, *, method: str = "sgd"
) -> optax.GradientTransformation:
    """d2l's optimiser for its RNN language models: gradients clipped to global norm
    `clip`, then SGD with `learning_rate`; or Adam in SGD's place.

    **Arguments:**

    - `learning_rate`: the step size; d2l uses 2 with SGD.
    - `clip`: the largest global gradient norm; d2l's `gradient_clip_val=1`.
    - `method`: `"sgd"` (d2l's) or `"adam"` (`optax.adam`, which wants a step size
      near 1e-3). (Keyword only argument.)

    **Returns:**

    `optax.chain(optax.clip_by_global_norm(clip), optax.sgd(learning_rate))`, with
    `optax.adam` for `method="adam"`.
    """
    for name, value in (("learning_rate", learning_rate), ("clip", clip)):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not 0 < value < math.inf
        ):
            raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}")
    methods = {"sgd": optax.sgd, "adam": optax.adam}
    if method not in methods:
        raise ValueError(f"`method` must be 'sgd' or 'adam', got {method!r}")
    return optax.chain(optax.clip_by_global_norm(clip), methods[method](learning_rate))


@dataclasses.dataclass
class History:
    """Per-epoch record of a run: `train_ppl[e]` is the exponential of the mean
    training loss seen during epoch `e`, `val_ppl[e]` the validation perplexity
    after it, `seconds[e]` its wall time (the first epoch of a process includes
    compilation)."""

    train_ppl: list[float] = dataclasses.field(default_factory=list)
    val_ppl: list[float] = dataclasses.field(default_factory=list)
    seconds: list[float] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.train_ppl)


def _batches(order: Int[Array, " n"], batch_size: int, dtype, multiple: int = 1):
    """Splits `order` into batches of `batch_size` and, when `batch_size` does not
    divide it, one last batch of the remaining windows (d2l's `DataLoader`). Returns
    one `(order, mask)` pair per batch size, each of shape `(batches, size)`: the
    full batches, then the short one. Every batch is padded with window 0 to a
    multiple of `multiple` (the number of devices it is split between); the mask is
    1 for real windows and 0 for padding. The short batch is not padded to
    `batch_size`: its padding would cost as much as real windows."""
    n = order.shape[0]
    full = n // batch_size
    groups = [order[: full * batch_size].reshape(full, batch_size)] if full else []
    if n % batch_size:
        groups.append(order[full * batch_size :][None])
    pairs = []
    for group in groups:
        pad = -group.shape[1] % multiple
        mask = jnp.ones(group.shape, dtype)
        pairs.append(
            (jnp.pad(group, ((0, 0), (0, pad))), jnp.pad(mask, ((0, 0), (0, pad))))
        )
    return pairs


# Validation batches hold up to this many training batches' windows.
VAL_BATCHES = 8


def _window_keys(model, key, size, inference, num_keys=None):
    """The dropout keys of a batch of `size` windows: `(keys, weight_key)`, one key
    per window and the batch's weight-drop key (`None` when weights are not dropped).

    The window keys are the first `size` of `split(key, num_keys)` (default: one per
    window), repeated over windows beyond `num_keys`: a short last batch draws the
    masks of a full one's first windows, and a batch padded for several devices
    those of the unpadded one. Weight drop draws one mask for the whole batch, as
    AWD-LSTM does (`stackrnn.drop_weights`): one per window would multiply the
    recurrent weights by the batch size."""
    weight_key = None
    if not inference and holds(model, WeightDrop):
        key, weight_key = jax.random.split(key)
    keys = jax.random.split(key, num_keys or size)
    if keys.shape[0] != size:
        keys = keys[jnp.arange(size) % keys.shape[0]]
    return keys, weight_key


def _loss_sum(model, x, y, mask, keys, weight_key, inference):
    """The sum of the windows' mean losses, each weighted by `mask` (1 for a real
    window, 0 for padding)."""
    if weight_key is not None:
        model = drop_weights(model, weight_key)
    losses = jax.vmap(
        lambda x, y, k: sequence_loss(model, x, y, key=k, inference=inference)
    )(x, y, keys)
    return jnp.sum(losses * mask)


@eqx.filter_jit
def _epoch(
    model: RNNLM,
    opt_state: PyTree,
    data: tuple[Int[Array, "n time"], ...],
    key: PRNGKeyArray,
    optimizer: optax.GradientTransformation,
    batch_size: int,
    mesh: Mesh | None = None,
) -> tuple[RNNLM, PyTree, Float[Array, ""], Float[Array, ""]]:
    train_x, train_y, val_x, val_y = data
    dtype = model.weight.dtype
    devices = 1 if mesh is None else mesh.size
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def per_device(f):
        # `f(params, x, y, mask, keys, weight_key)` on each device's share of the
        # batch; `total` sums over the devices.
        if mesh is None:
            return f
        split, whole = PartitionSpec("batch"), PartitionSpec()
        return jax.shard_map(
            f,
            mesh=mesh,
            in_specs=(whole, split, split, split, split, whole),
            out_specs=whole,
            # The layers' scans start from a state shared by all devices and carry
            # one that differs between them, which the type check rejects.
            check_vma=False,
        )

    def total(x):
        return x if mesh is None else jax.lax.psum(x, "batch")

    def batch_mean(params, x, y, mask, keys, weight_key, inference):
        model = eqx.combine(params, static)
        loss = _loss_sum(model, x, y, mask, keys, weight_key, inference)
        return loss / total(jnp.sum(mask))

    @per_device
    def train_grads(params, x, y, mask, keys, weight_key):
        loss, grads = jax.value_and_grad(batch_mean)(
            params, x, y, mask, keys, weight_key, False
        )
        return total(loss), total(grads)

    @per_device
    def val_mean(params, x, y, mask, keys, weight_key):
        return total(batch_mean(params, x, y, mask, keys, weight_key, True))

    perm_key, step_key = jax.random.split(key)
    batches = _batches(
        jax.random.permutation(perm_key, train_x.shape[0]), batch_size, dtype, devices
    )

    def step(carry, batch):
        params, opt_state = carry
        idx, mask, k = batch
        keys, weight_key = _window_keys(model, k, idx.shape[0], False, batch_size)
        loss, grads = train_grads(
            params, train_x[idx], train_y[idx], mask, keys, weight_key
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (eqx.apply_updates(params, updates), opt_state), loss * jnp.sum(mask)

    step_keys = jax.random.split(step_key, sum(order.shape[0] for order, _ in batches))
    carry, train_total, start = (params, opt_state), 0.0, 0
    for order, mask in batches:  # the full batches, then the short one
        keys = step_keys[start : start + order.shape[0]]
        carry, losses = jax.lax.scan(step, carry, (order, mask, keys))
        train_total, start = train_total + jnp.sum(losses), start + order.shape[0]
    params, opt_state = carry
    train_loss = train_total / train_x.shape[0]

    def evaluate(val_total, batch):
        idx, mask = batch
        keys, _ = _window_keys(model, key, idx.shape[0], True)
        loss = val_mean(params, val_x[idx], val_y[idx], mask, keys, None)
        return val_total + loss * jnp.sum(mask), None

    # Validation keeps nothing for a backward pass: batches of up to 8x the
    # training batch cost no more memory and run fewer, larger products.
    val_total = jnp.zeros((), dtype)
    for batch in _batches(
        jnp.arange(val_x.shape[0]), VAL_BATCHES * batch_size, dtype, devices
    ):
        val_total, _ = jax.lax.scan(evaluate, val_total, batch)
    model = eqx.combine(params, static)
    return model, opt_state, train_loss, val_total / val_x.shape[0]


def fit(
    model: RNNLM,
    data: CharData,
    *,
    epochs: int,
    key: PRNGKeyArray,
    optimizer: optax.GradientTransformation | None = None,
    batch_size: int = 1024,
    opt_state: PyTree | None = None,
    history: History | None = None,
    on_epoch: Callable[[RNNLM, PyTree, History], None] | None = None,
    progress: bool = True,
    devices: int | None = None,
    check_finite: bool = True,
) -> tuple[RNNLM, PyTree, History]:
    """Trains a language model for `epochs` epochs, or continues a run up to them.

    Each epoch shuffles the training windows with the key `fold_in(key, epoch)` and
    takes one optimiser step per batch of `batch_size` windows (the last batch keeps
    the remaining windows, as d2l's `DataLoader`). Since an epoch depends only on
    `key`, its number and the state before it, a run resumed from the model,
    optimiser state and history saved after epoch `k` continues exactly as the
    uninterrupted run, bit for bit.

    Dropout masks are drawn per window, except weight drop's: one mask per batch
    (AWD-LSTM's choice; see [`stackrnn.drop_weights`][]).

    **Arguments:**

    - `model`: the language model.
    - `data`: the windows to train and validate on.
    - `epochs`: the total number of epochs of the run (including any in `history`).
      (Keyword only argument.)
    - `key`: the run's `jax.random.PRNGKey`, for shuffling and dropout.
      (Keyword only argument.)
    - `optimizer`: any optax optimiser; default [`stackrnn.lm.default_optimizer`][]`()`.
      (Keyword only argument.)
    - `batch_size`: windows per step. (Keyword only argument.)
    - `opt_state`: the optimiser state to continue from; `optimizer.init` of the
      model's parameters if omitted. (Keyword only argument.)
    - `history`: the record of the epochs already run, to continue a run.
      (Keyword only argument.)
    - `on_epoch`: called as `on_epoch(model, opt_state, history)` after every epoch,
      e.g. to save a checkpoint. (Keyword only argument.)
    - `progress`: show a progress bar with epoch, perplexities and tokens/s.
      (Keyword only argument.)
    - `devices`: train data-parallel on the first `devices` of `jax.devices()`
      (every process's devices after `jax.distributed.initialize()`): each batch
      is split between them, padded with masked windows to a multiple of
      `devices`, the parameters are replicated and the gradients summed across the
      devices. Default: all devices. The result is the one-device run's up to
      rounding (the sums are taken in another order). On a CPU, JAX sees one
      device unless told to split it (`JAX_NUM_CPU_DEVICES=N`, see "Training on
      several devices" in the docs). (Keyword only argument.)
    - `check_finite`: stop with a `FloatingPointError` naming the epoch when its
      training or validation perplexity is not finite: the loss is NaN, infinite,
      or above the log of the largest float (the run diverged). That epoch's state
      is dropped: `on_epoch` has seen every finite epoch and nothing after, so a
      checkpoint it writes stays the last finite one. With `False`, a diverged run
      goes on and records `inf`/`nan` perplexities. (Keyword only argument.)

    **Returns:**

    `(model, opt_state, history)` after the last epoch.
    """
    check_size("epochs", epochs, minimum=0)
    check_size("batch_size", batch_size)
    mesh = _mesh(devices)
    if optimizer is None:
        optimizer = default_optimizer()
    if opt_state is None:
        opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    # A copy: the caller's history stays as it was.
    history = History() if history is None else History(*dataclasses.astuple(history))
    arrays = (data.train_x, data.train_y, data.val_x, data.val_y)
    if mesh is None:
        arrays = tuple(jnp.asarray(a) for a in arrays)
    else:
        model, opt_state, arrays = _replicate((model, opt_state, arrays), mesh)
    train_tokens = data.train_x.size
    bar = tqdm(total=epochs, initial=len(history), unit="epoch", disable=not progress)
    with bar:
        for epoch in range(len(history), epochs):
            start = time.perf_counter()
            model, opt_state, train_loss, val_loss = _epoch(
                model,
                opt_state,
                arrays,
                jax.random.fold_in(key, epoch),
                optimizer,
                batch_size,
                mesh,
            )
            train_loss, val_loss = float(train_loss), float(val_loss)
            train_ppl, val_ppl = _perplexity(train_loss), _perplexity(val_loss)
            if check_finite and not (
                math.isfinite(train_ppl) and math.isfinite(val_ppl)
            ):
                raise FloatingPointError(
                    f"training diverged in epoch {epoch + 1}: the perplexities are "
                    f"not finite (training loss {train_loss:.6g}, validation loss "
                    f"{val_loss:.6g}); try a smaller learning rate or gradient clip"
                )
            seconds = time.perf_counter() - start
            history.train_ppl.append(train_ppl)
            history.val_ppl.append(val_ppl)
            history.seconds.append(seconds)
            bar.set_postfix(
                train_ppl=f"{train_ppl:.2f}",
                val_ppl=f"{val_ppl:.2f}",
                tok_s=f"{train_tokens / seconds:.3g}",
            )
            bar.update()
            if on_epoch is not None:
                on_epoch(model, opt_state, history)
    return model, opt_state, history


def _perplexity(loss: float) -> float:
    # A finite loss above log(max float) has an infinite perplexity, not an overflow.
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def _mesh(devices: int | None) -> Mesh | None:
    """A mesh over the first `devices` devices with one axis, `batch`; `None` for a
    single device, which then runs without any sharding."""
    available = jax.device_count()
    if devices is None:
        devices = available
    check_size("devices", devices)
    if devices > available:
        hint = ""
        if all(d.platform == "cpu" for d in jax.devices()):
            hint = (
                "; to split the CPU into several devices, set the environment "
                f"variable JAX_NUM_CPU_DEVICES={devices} before JAX starts"
            )
        raise ValueError(
            f"`devices` (={devices}) must be at most the number of devices "
            f"(={available}: {jax.devices()}){hint}"
        )
    if devices == 1:
        return None
    return Mesh(np.asarray(jax.devices()[:devices]), ("batch",))


def _replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Every array of `tree` copied whole onto each device of `mesh`. Built from
    each process's own copy, so every process of a multi-host run must pass the same
    values (as it does when each runs the same script with the same seed)."""
    sharding = NamedSharding(mesh, PartitionSpec())

    def put(x):
        if not eqx.is_array_like(x) or isinstance(x, (bool, int, float)):
            return x
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda i: host[i])

    return jax.tree.map(put, tree)


def plot_history(history: History, path) -> None:
    """Draws the training and validation perplexity per epoch (d2l's curves) into a
    PNG file at `path`."""
    # A bare Figure needs neither pyplot nor a GUI backend.
    from matplotlib.figure import Figure

    epochs = np.arange(1, len(history) + 1)
    fig = Figure(figsize=(5, 3.5), layout="constrained")
    ax = fig.subplots()
    ax.plot(epochs, history.train_ppl, label="train ppl")
    ax.plot(epochs, history.val_ppl, "--", label="val ppl")
    ax.set_xlabel("epoch")
    ax.set_ylabel("perplexity")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=100)
