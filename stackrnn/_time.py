"""How a stack runs over time, as objects: which path each layer takes
([`stackrnn.Reference`][], [`stackrnn.Fast`][], [`stackrnn.Fused`][],
[`stackrnn.ByWidth`][]), how time is
cut for gradient checkpointing ([`stackrnn.Chunks`][]), and both with the direction
and unrolling of the loop ([`stackrnn.Scan`][]).

Each is validated once, when built, and documented once, here.
"""

import abc
import dataclasses
import math

import equinox as eqx
import jax

from ._cells import AbstractCell
from ._checks import check_size
from ._fast import supports
from ._fused import supports as fused_supports


class AbstractPath(eqx.Module):
    """Chooses the path each layer runs on: `choose(cell)` names it.

    Every path computes the same numbers up to float rounding, and every path but
    the reference is tested against it. Calls with `length` or `resets` take the
    reference path whatever the policy says: those options exist there only.
    """

    @abc.abstractmethod
    def choose(self, cell: AbstractCell) -> str:
        """The path a layer of `cell` runs on: `"reference"`, `"fast"` or
        `"fused"`."""


class Reference(AbstractPath):
    """Every layer on the reference path: a plain `jax.lax.scan` of the cell,
    differentiated by JAX."""

    def choose(self, cell: AbstractCell) -> str:
        return "reference"


class Fast(AbstractPath):
    """Every layer whose cell the fast path supports on it: Elman, GRU and LSTM
    cells (without `proj_size`), whose input projection runs before the loop and
    whose backward pass is written by hand, with weight gradients as single matrix
    products over all steps and examples. Cells with other parameters (LayerNorm
    cells, LSTMs with `proj_size`) and cells with masks inside the loop
    ([`stackrnn.RecurrentDropout`][], [`stackrnn.Zoneout`][]) take the reference
    path."""

    def choose(self, cell: AbstractCell) -> str:
        return "fast" if supports(cell) else "reference"


class Fused(AbstractPath):
    """Every layer the optional CPU accelerator supports on the fused path: the fast
    path's split, with the loop and its reverse each one XLA FFI kernel
    (`pip install ./kernels` from the repository). It needs an Elman, GRU or LSTM
    cell (without `proj_size`) of float32 or float64, on the CPU; other layers, and
    every layer where the accelerator is not installed, choose as
    [`stackrnn.Fast`][]."""

    def choose(self, cell: AbstractCell) -> str:
        return "fused" if fused_supports(cell) else Fast().choose(cell)


class ByWidth(AbstractPath):
    """The path that measured fastest on CPU for each width: the fused path (as
    [`stackrnn.Fused`][], where the accelerator is installed) for layers of
    `hidden_size <= max_fused`, the fast path (as [`stackrnn.Fast`][]) for
    `hidden_size >= min_hidden`, the reference path between. Below `min_hidden` the
    reference path's backward pass (per-step weight-gradient products, fewer stored
    arrays) is faster than the fast path's; from it on single products over all
    steps win; above `max_fused` the fused loop's small products lose to XLA's (the
    measurement log, `benchmarks/README.md`). On a GPU, where each of the reference
    path's small per-step kernels costs a launch, every layer the fast path supports
    takes it, whatever its width. The default.

    **Arguments:**

    - `min_hidden`: the width from which the fast path is taken on CPU, default 512.
    - `max_fused`: the widest layer taken to the fused path, default 128.
    """

    min_hidden: int = eqx.field(static=True)
    max_fused: int = eqx.field(static=True)

    def __init__(self, min_hidden: int = 512, max_fused: int = 128):
        self.min_hidden = check_size("min_hidden", min_hidden)
        self.max_fused = check_size("max_fused", max_fused, minimum=0)

    def choose(self, cell: AbstractCell) -> str:
        if cell.hidden_size <= self.max_fused and fused_supports(cell):
            return "fused"
        if cell.hidden_size >= self.min_hidden or jax.default_backend() == "gpu":
            return Fast().choose(cell)
        return "reference"


@dataclasses.dataclass(frozen=True, init=False)
class Chunks:
    """Gradient checkpointing over time, for long sequences: time cut into chunks
    whose forward pass is recomputed during the backward pass.

    `Chunks(n)`: chunks of `n` steps; `Chunks.sqrt()`: chunks of `ceil(sqrt(time))`
    steps. The backward pass then keeps only the state at the start of each chunk
    and recomputes the chunk's forward pass (about one more forward pass in all), so
    a unidirectional stack needs memory for about `sqrt(time)` steps of every layer,
    besides the inputs and outputs: the chunks are the outer loop and run all layers
    inside. `Chunks(c1, c2, ...)`, outermost first, nests them: `(c1, c2)` cuts each
    chunk of `c1` steps into checkpointed chunks of `c2`, one more forward pass per
    level for memory of about `time / c1 + c1 / c2 + c2` steps
    (`Chunks(round(time ** (2 / 3)), round(time ** (1 / 3)))` for about
    `3 * time ** (1 / 3)`). [`stackrnn.StackedRNN.transduce`][] also keeps the
    inputs' encoding and the outputs' decoding inside the chunks.

    A bidirectional stack cannot interleave its layers that way (the backward
    direction of layer `l` needs all of layer `l-1`), so each of its layers is
    checkpointed on its own: every layer's outputs are kept, the per-step values
    inside the layers are not.

    Same numbers as without checkpointing up to float rounding, except for the masks
    a unidirectional stack draws per step (`dropout` unless `variational`, and
    [`stackrnn.Zoneout`][]'s): the (innermost) chunk from step `s` draws them from
    their key folded with `s` (`jax.random.fold_in`). See "Long sequences" on the
    sequences page.

    **Arguments:**

    - `*lengths`: one or more chunk lengths, integers >= 1, outermost first.
    """

    lengths: tuple[int, ...]

    def __init__(self, *lengths: int):
        if not lengths:
            raise TypeError(
                "`Chunks` needs at least one chunk length; for chunks of about "
                "sqrt(time) steps use `Chunks.sqrt()`"
            )
        for i, n in enumerate(lengths):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(
                    f"`Chunks`'s lengths must be integers >= 1, got {n!r} at "
                    f"position {i}"
                )
        object.__setattr__(self, "lengths", lengths)

    @classmethod
    def sqrt(cls) -> "Chunks":
        """Chunks of `ceil(sqrt(time))` steps, for a sequence of `time` steps."""
        chunks = cls.__new__(cls)
        object.__setattr__(chunks, "lengths", ())
        return chunks

    def for_time(self, time: int) -> tuple[int, ...]:
        """The chunk lengths, outermost first, for a sequence of `time` steps."""
        return self.lengths or (math.isqrt(time - 1) + 1,)

    @classmethod
    def from_flag(cls, checkpoint) -> "Chunks | None":
        """The one-liners' `checkpoint`: `False` or `None` for none, `True` for
        `Chunks.sqrt()`, a chunk length or a tuple of lengths for `Chunks(*lengths)`,
        or a `Chunks`."""
        if checkpoint is None or checkpoint is False:
            return None
        if checkpoint is True:
            return cls.sqrt()
        if isinstance(checkpoint, Chunks):
            return checkpoint
        if isinstance(checkpoint, int):
            return cls(checkpoint)
        if isinstance(checkpoint, tuple) and checkpoint:
            return cls(*checkpoint)
        raise TypeError(
            "`checkpoint` must be True, False, a chunk length (an integer >= 1), a "
            f"tuple of chunk lengths (outermost first) or a `Chunks`, got "
            f"{checkpoint!r}"
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Scan:
    """How every layer of a stack runs over time.

    **Arguments:** (all keyword only)

    - `reverse`: if `True`, a unidirectional stack reads time backwards: every layer
      starts at the last step, and outputs stay aligned with their inputs.
    - `unroll`: passed to `jax.lax.scan` over time, an integer >= 1.
    - `path`: which path each layer takes, an [`stackrnn.AbstractPath`][]; default
      [`stackrnn.ByWidth`][]`()`.
    - `checkpoint`: `None` (default) for no gradient checkpointing, else a
      [`stackrnn.Chunks`][].
    - `scan_layers`: `None` (default) folds the layers with a Python loop, the
      reference; an integer >= 2 folds every run of at least that many alike layers
      (the same cells but for their parameters' values, as layers 2..L of a
      one-liner's stack are) with one `jax.lax.scan` over their parameters, stacked
      at each call (they stay stored one layer at a time). It traces one layer
      where the loop traces each, which shortens the compilation of a very deep
      stack's forward pass; its gradient compiles slower, as XLA then compiles a
      slice per layer and parameter (the measurement log, `benchmarks/README.md`).
      Same numbers up to float rounding, with the same masks.
    """

    reverse: bool = False
    unroll: int = 1
    path: AbstractPath = ByWidth()
    checkpoint: Chunks | None = None
    scan_layers: int | None = None

    def __post_init__(self):
        if not isinstance(self.reverse, bool):
            raise TypeError(f"`reverse` must be a bool, got {self.reverse!r}")
        check_size("unroll", self.unroll)
        if not isinstance(self.path, AbstractPath):
            raise TypeError(
                "`path` must be a path policy such as `stackrnn.Fast()`, "
                f"`stackrnn.Reference()` or `stackrnn.ByWidth()`, got {self.path!r}"
            )
        if self.scan_layers is not None:
            check_size("scan_layers", self.scan_layers, minimum=2)
        if self.checkpoint is not None and not isinstance(self.checkpoint, Chunks):
            raise TypeError(
                "`checkpoint` must be None or a `stackrnn.Chunks`, e.g. "
                f"`Chunks(32)` or `Chunks.sqrt()`, got {self.checkpoint!r}"
            )
