"""Checkpoints: a directory holding the run's arrays and a small JSON file.

`checkpoint.json` records the hyper-parameters, the vocabulary, the history and the
name of the file with the arrays (`state-<epoch>.eqx`, written by
`eqx.tree_serialise_leaves`). Every file is written to a temporary name and renamed
into place, and the JSON file is written last: a run stopped at any moment leaves
the previous checkpoint or the new one, never a mix.
"""

import dataclasses
import json
import os
import pathlib
import tempfile
from typing import Any

import equinox as eqx
from jaxtyping import PyTree

from ._data import Vocab
from ._train import History


_META = "checkpoint.json"
_FORMAT = 1


def _atomic_write(path: pathlib.Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint directory records about a run.

    **Fields:**

    - `directory`: the checkpoint directory.
    - `hyperparameters`: a JSON-compatible dict, as given to `save`.
    - `vocab`: the run's [`stackrnn.lm.Vocab`][].
    - `history`: the run's [`stackrnn.lm.History`][] up to the saved epoch.
    - `state_file`: the name of the file holding the arrays.
    """

    directory: pathlib.Path
    hyperparameters: dict[str, Any]
    vocab: Vocab
    history: History
    state_file: str

    @staticmethod
    def exists(directory) -> bool:
        return (pathlib.Path(directory) / _META).is_file()

    @staticmethod
    def save(
        directory,
        state: PyTree,
        *,
        hyperparameters: dict[str, Any],
        vocab: Vocab,
        history: History,
    ) -> None:
        """Writes a checkpoint atomically, replacing the one in `directory`.

        **Arguments:**

        - `directory`: where to write; created if missing.
        - `state`: the PyTree of arrays to save, e.g. `(model, opt_state)`.
        - `hyperparameters`: a JSON-compatible dict to rebuild the run from.
          (Keyword only argument.)
        - `vocab`: the vocabulary. (Keyword only argument.)
        - `history`: the run so far; its length names the state file.
          (Keyword only argument.)
        """
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state_file = f"state-{len(history):06d}.eqx"
        _atomic_write(
            directory / state_file, lambda f: eqx.tree_serialise_leaves(f, state)
        )
        meta = {
            "format": _FORMAT,
            "state_file": state_file,
            "hyperparameters": hyperparameters,
            "vocab": list(vocab.tokens),
            "history": dataclasses.asdict(history),
        }
        text = json.dumps(meta, indent=1).encode()
        _atomic_write(directory / _META, lambda f: f.write(text))
        for old in directory.glob("state-*.eqx"):
            if old.name != state_file:
                old.unlink()

    @classmethod
    def read(cls, directory) -> "Checkpoint":
        """Reads the JSON record of the checkpoint in `directory`."""
        directory = pathlib.Path(directory)
        path = directory / _META
        if not path.is_file():
            raise FileNotFoundError(
                f"no checkpoint in {str(directory)!r}: {_META} is missing"
            )
        meta = json.loads(path.read_text())
        if meta.get("format") != _FORMAT:
            raise ValueError(
                f"{str(path)!r} has checkpoint format {meta.get('format')!r}; this "
                f"version of stackrnn reads format {_FORMAT}"
            )
        return cls(
            directory,
            meta["hyperparameters"],
            Vocab(tuple(meta["vocab"])),
            History(**meta["history"]),
            meta["state_file"],
        )

    def load(self, like: PyTree) -> PyTree:
        """The saved arrays, in a PyTree shaped as `like` (e.g. a freshly built
        `(model, opt_state)`)."""
        return eqx.tree_deserialise_leaves(self.directory / self.state_file, like)
