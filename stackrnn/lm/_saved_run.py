"""Saved runs: a directory holding the run's arrays and a small JSON file.

("Checkpoint" in this package means rematerialisation, `checkpoint=` of a stack; the
record keeps its historical file name.)

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
import re
import secrets
from typing import Any

import equinox as eqx
from jaxtyping import PyTree

from ._data import Vocab
from ._train import History


_META = "checkpoint.json"
_FORMAT = 1


def _atomic_write(path: pathlib.Path, write) -> None:
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        try:
            # 0o666 less the umask, as every file the process writes (mkstemp's
            # 0o600 would hide the run from the other users of a shared machine).
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
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
class SavedRun:
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
    def foreign_files(directory) -> list[str]:
        """The names of the files in `directory` that `save` neither writes nor
        replaces (none if it does not exist): a directory with none holds no run
        but at most the state file of a first save that was stopped before its
        record."""
        directory = pathlib.Path(directory)
        if not directory.is_dir():
            return []
        return sorted(
            p.name
            for p in directory.iterdir()
            if p.name != _META and not _STATE_FILE.fullmatch(p.name)
        )

    @staticmethod
    def remove_stale(directory) -> list[str]:
        """Removes the temporary files that saves stopped midway (a killed run) left
        in `directory`, and returns their names. Only names of `save`'s own making
        are touched: `.checkpoint.json.XXXXXXXX` and `.state-NNNNNN.eqx.XXXXXXXX`.
        Call it when no other process is saving into `directory`."""
        directory = pathlib.Path(directory)
        if not directory.is_dir():
            return []
        stale = sorted(p.name for p in directory.iterdir() if _TEMP.fullmatch(p.name))
        for name in stale:
            (directory / name).unlink()
        return stale

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

    @property
    def record(self) -> pathlib.Path:
        """The path of the JSON record, `checkpoint.json`."""
        return self.directory / _META

    @classmethod
    def read(cls, directory) -> "SavedRun":
        """Reads the JSON record of the checkpoint in `directory`.

        A missing record raises `FileNotFoundError`; a damaged or foreign one (not
        JSON, a key missing or of the wrong type) a `ValueError` naming the file and
        what is wrong."""
        directory = pathlib.Path(directory)
        path = directory / _META
        if not path.is_file():
            raise FileNotFoundError(
                f"no checkpoint in {str(directory)!r}: {_META} is missing"
            )
        try:
            meta = json.loads(path.read_bytes())
        except (UnicodeError, json.JSONDecodeError) as e:
            raise _damaged(path, f"not JSON ({e})") from None
        if not isinstance(meta, dict):
            raise _damaged(path, f"a JSON {type(meta).__name__}, not an object")
        if meta.get("format") != _FORMAT:
            raise ValueError(
                f"{str(path)!r} has checkpoint format {meta.get('format')!r}; this "
                f"version of stackrnn reads format {_FORMAT}"
            )
        for key, kind in _KEYS.items():
            if not isinstance(meta.get(key), kind):
                found = "missing" if key not in meta else type(meta[key]).__name__
                raise _damaged(
                    path, f"`{key}` must be a JSON {_JSON[kind]}, found {found}"
                )
        if not _STATE_FILE.fullmatch(meta["state_file"]):
            raise _damaged(
                path,
                f"`state_file` must be named as state-NNNNNN.eqx, found "
                f"{meta['state_file']!r}",
            )
        if not all(isinstance(t, str) for t in meta["vocab"]):
            raise _damaged(path, "`vocab` must be a list of strings")
        try:
            vocab = Vocab(tuple(meta["vocab"]))
        except ValueError as e:
            raise _damaged(path, f"`vocab`: {e}") from None
        history = meta["history"]
        fields = [f.name for f in dataclasses.fields(History)]
        if sorted(history) != sorted(fields) or not all(
            isinstance(history[f], list)
            and len(history[f]) == len(history[fields[0]])
            and all(_is_number(x) for x in history[f])
            for f in fields
        ):
            raise _damaged(
                path, f"`history` must hold lists of numbers {fields} of one length"
            )
        return cls(
            directory,
            meta["hyperparameters"],
            vocab,
            History(**history),
            meta["state_file"],
        )

    def load(self, like: PyTree) -> PyTree:
        """The saved arrays, in a PyTree shaped as `like` (e.g. a freshly built
        `(model, opt_state)`).

        A state file that is missing, truncated, or holds other arrays than `like`
        (another model's shapes, a different number of arrays) raises an `OSError`
        or `ValueError` naming the file."""
        path = self.directory / self.state_file
        if not path.is_file():
            raise FileNotFoundError(
                f"{str(path)!r} is missing, although {str(self.record)!r} names it"
            )
        with open(path, "rb") as f:
            try:
                state = eqx.tree_deserialise_leaves(f, like)
            except (RuntimeError, ValueError, EOFError) as e:
                raise ValueError(
                    f"{str(path)!r} is damaged or does not belong to the run "
                    f"{str(self.record)!r} describes: {_root_cause(e)}"
                ) from None
            if f.read(1):
                raise ValueError(
                    f"{str(path)!r} does not belong to the run {str(self.record)!r} "
                    "describes: it holds more arrays than that model"
                )
        return state


_KEYS = dict(state_file=str, hyperparameters=dict, vocab=list, history=dict)
_JSON = {str: "string", dict: "object", list: "list"}
_STATE_FILE = re.compile(r"state-\d{6}\.eqx")
# `_atomic_write`'s temporary names (eight hex digits), and those of earlier
# versions (`tempfile.mkstemp`'s eight characters).
_TEMP = re.compile(r"\.(checkpoint\.json|state-\d{6}\.eqx)\.[a-z0-9_]{8}")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _damaged(path: pathlib.Path, what: str) -> ValueError:
    return ValueError(f"{str(path)!r} is damaged or not a checkpoint: {what}")


def _root_cause(error: BaseException) -> str:
    # Equinox wraps the reader's error ("EOF: reading array header...") in errors
    # that only name the leaf.
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return str(error).splitlines()[0] if str(error) else type(error).__name__
