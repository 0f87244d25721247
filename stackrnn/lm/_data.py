"""Character data for language models, built exactly as d2l's `TimeMachine` does.

d2l (`d2l.TimeMachine`, `d2l.Vocab`): the text is reduced to lower-case letters and
single spaces, every character is a token, the vocabulary is the sorted set of the
tokens plus `<unk>`, and the examples are the overlapping windows of `num_steps + 1`
tokens starting at every position: inputs `window[:-1]`, targets `window[1:]`. The
first `num_train` windows train, the next `num_val` validate.
"""

import codecs
import dataclasses
import gzip
import hashlib
import os
import pathlib
import re
import string
from collections.abc import Iterator, Sequence

import numpy as np

from .._checks import check_size


TIME_MACHINE = pathlib.Path(__file__).with_name("timemachine.txt.gz")
TIME_MACHINE_SHA1 = "090b5e7e70c295757f55df93cb0a180b9691891a"
UNK = "<unk>"


def preprocess(text: str) -> str:
    """d2l's `TimeMachine._preprocess`: every run of non-letters becomes one space,
    then everything is lower case."""
    return re.sub("[^A-Za-z]+", " ", text).lower()


@dataclasses.dataclass(frozen=True)
class Vocab:
    """A character vocabulary, ordered as d2l's `Vocab`: the sorted set of the tokens
    and `<unk>`. (On preprocessed text that puts `" "` first and `<unk>` second, since
    `" " < "<" < "a"`.) Characters outside the vocabulary map to `<unk>`.

    **Arguments:**

    - `tokens`: the tokens in index order.
    """

    tokens: tuple[str, ...]

    def __post_init__(self):
        if UNK not in self.tokens:
            raise ValueError(f"`tokens` must contain {UNK!r}, got {self.tokens!r}")
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError(f"`tokens` must be distinct, got {self.tokens!r}")

    @classmethod
    def from_tokens(cls, tokens: Sequence[str]) -> "Vocab":
        """The vocabulary of a token sequence, as `d2l.Vocab(tokens)` builds it."""
        return cls(tuple(sorted(set(tokens) | {UNK})))

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def unk(self) -> int:
        return self.tokens.index(UNK)

    def encode(self, tokens: Sequence[str]) -> np.ndarray:
        """Token indices, an int32 NumPy array; unknown tokens give `unk`."""
        index = {t: i for i, t in enumerate(self.tokens)}
        return np.array([index.get(t, self.unk) for t in tokens], np.int32)

    def decode(self, indices) -> str:
        return "".join(self.tokens[int(i)] for i in np.asarray(indices).ravel())


def read_text(path: str | os.PathLike) -> str:
    """Reads a UTF-8 text file.

    **Arguments:**

    - `path`: the file.

    **Returns:**

    Its text. An empty (or all-whitespace) file, or one that is not UTF-8 text (a
    binary file), raises a `ValueError` that says so.
    """
    return b"".join(_file_chunks(path)).decode("utf-8")


# Chunks small enough that a chunk's temporaries stay a few MB.
_CHUNK = 1 << 20


def _file_chunks(path: str | os.PathLike) -> Iterator[bytes]:
    """The bytes of the file at `path`, a chunk at a time, checked as they come:
    UTF-8 text without NUL bytes, not empty."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            f"data file {str(path)!r} is a directory; give a UTF-8 text file"
        )
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, blank = 0, True
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            try:
                if b"\0" in chunk:
                    raise UnicodeError("contains NUL bytes")
                start = offset - len(decoder.getstate()[0])
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as e:
                    raise UnicodeError(f"byte {start + e.start}: {e.reason}") from None
            except UnicodeError as e:
                raise ValueError(
                    f"data file {str(path)!r} is not UTF-8 text ({e}); give a text file"
                ) from None
            offset += len(chunk)
            blank = blank and not chunk.strip()
            yield chunk
    if blank:
        raise ValueError(f"data file {str(path)!r} is empty; give a UTF-8 text file")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
        raise ValueError(
            f"data file {str(path)!r} is not UTF-8 text (it ends inside a character: "
            f"{e.reason}); give a text file"
        ) from None


def load_text(path: str | os.PathLike | None = None) -> str:
    """The training text: the file at `path`, or The Time Machine.

    The Time Machine (H. G. Wells, public domain; d2l's `timemachine.txt`) ships with
    the package, so the main job runs offline; its SHA-1 is checked on every read.

    **Arguments:**

    - `path`: a UTF-8 text file, or `None` for The Time Machine.

    **Returns:**

    The text, unprocessed.
    """
    if path is not None:
        return read_text(path)
    raw = gzip.decompress(TIME_MACHINE.read_bytes())
    if hashlib.sha1(raw).hexdigest() != TIME_MACHINE_SHA1:
        raise ValueError(
            f"the packaged {TIME_MACHINE.name!r} is damaged (SHA-1 mismatch); "
            "reinstall stackrnn"
        )
    return raw.decode("utf-8")


@dataclasses.dataclass(frozen=True)
class CharData:
    """Windows of a character corpus for language modelling, as d2l's `TimeMachine`.

    `train_x[i]` is the window of `num_steps` tokens starting at corpus position `i`
    and `train_y[i]` the same window shifted by one; the validation windows start at
    positions `num_train, ..., num_train + num_val - 1`.

    Only those windows' characters are tokenised, with a lookup table over the
    bytes; the rest of the text is read only for its letters (d2l builds the
    vocabulary from all of it) and its SHA-1, a chunk at a time.

    **Fields:** `vocab` (a [`stackrnn.lm.Vocab`][]), `train_x`, `train_y`, `val_x`,
    `val_y` (int32 NumPy arrays of shape `(windows, num_steps)`), `sha1` (the SHA-1
    of the text's UTF-8 bytes, which a saved run records to recognise its text).
    """

    vocab: Vocab
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    sha1: str | None = None

    @property
    def num_steps(self) -> int:
        return self.train_x.shape[1]

    @classmethod
    def from_text(
        cls,
        text: str,
        *,
        num_steps: int = 32,
        num_train: int = 10000,
        num_val: int = 5000,
        vocab: Vocab | None = None,
    ) -> "CharData":
        """Builds the windows of `text` as d2l's `TimeMachine(batch_size, num_steps,
        num_train, num_val)`.

        **Arguments:**

        - `text`: the raw text; it is preprocessed with [`stackrnn.lm.preprocess`][].
        - `num_steps`: tokens per window. (Keyword only argument.)
        - `num_train`: number of training windows. (Keyword only argument.)
        - `num_val`: at most this many validation windows follow the training ones;
          fewer when the text ends first, as in d2l. (Keyword only argument.)
        - `vocab`: the vocabulary to encode with; by default the text's own.
          (Keyword only argument.)

        **Returns:**

        A `CharData`.
        """
        raw = memoryview(text.encode("utf-8", "surrogatepass"))
        chunks = (raw[i : i + _CHUNK] for i in range(0, len(raw), _CHUNK))
        return _windows(chunks, num_steps, num_train, num_val, vocab)

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike | None = None,
        *,
        num_steps: int = 32,
        num_train: int = 10000,
        num_val: int = 5000,
        vocab: Vocab | None = None,
    ) -> "CharData":
        """`CharData.from_text(load_text(path), ...)`, without holding the text:
        the file is read a chunk at a time, so a corpus of any size costs the
        memory of the windows.

        **Arguments:**

        - `path`: a UTF-8 text file, or `None` for The Time Machine (the packaged
          copy [`stackrnn.lm.load_text`][] reads).
        - `num_steps`, `num_train`, `num_val`, `vocab`: as
          [`stackrnn.lm.CharData.from_text`][]. (Keyword only arguments.)

        **Returns:**

        A `CharData`. A file that is missing, a directory, empty or not UTF-8 text
        raises the error [`stackrnn.lm.read_text`][] raises.
        """
        if path is None:
            chunks = [load_text().encode()]
        else:
            chunks = _file_chunks(path)
        return _windows(chunks, num_steps, num_train, num_val, vocab)


_NON_LETTERS = re.compile(rb"[^A-Za-z]+")
_LETTERS = np.zeros(256, bool)
_LETTERS[np.frombuffer(string.ascii_letters.encode(), np.uint8)] = True


def _windows(chunks, num_steps, num_train, num_val, vocab) -> CharData:
    """The windows of the text whose UTF-8 bytes `chunks` yields. Preprocessing
    works on the bytes as on the text: a non-ASCII character's bytes are all
    non-letters, so they fall in one run of non-letters with it."""
    check_size("num_steps", num_steps)
    check_size("num_train", num_train)
    check_size("num_val", num_val)
    need = num_train + num_val + num_steps
    digest = hashlib.sha1()
    counts = np.zeros(256, np.int64)
    kept, kept_length, space_last = [], 0, False
    for chunk in chunks:
        digest.update(chunk)
        counts += np.bincount(np.frombuffer(chunk, np.uint8), minlength=256)
        if kept_length < need:
            piece = _NON_LETTERS.sub(b" ", chunk).lower()
            if space_last and piece.startswith(b" "):
                piece = piece[1:]  # a run of non-letters across two chunks
            if piece:
                kept.append(piece)
                kept_length += len(piece)
                space_last = piece.endswith(b" ")
    if vocab is None:
        letters = {chr(b).lower() for b in np.flatnonzero(counts * _LETTERS)}
        vocab = Vocab.from_tokens(
            letters | ({" "} if counts[~_LETTERS].any() else set())
        )
    table = np.full(256, vocab.unk, np.int32)
    for i, token in enumerate(vocab.tokens):
        if len(token) == 1 and token.isascii():
            table[ord(token)] = i
    corpus = table[np.frombuffer(b"".join(kept), np.uint8)[:need]]
    num_windows = len(corpus) - num_steps
    if num_windows < num_train + 1:
        raise ValueError(
            f"the text has {len(corpus)} characters after preprocessing, which "
            f"give {max(num_windows, 0)} windows of `num_steps + 1` "
            f"(={num_steps + 1}) tokens; `num_train` (={num_train}) windows "
            "and at least one validation window need "
            f"{num_train + num_steps + 1} characters. Use a longer text or lower "
            "`num_train`/`num_steps`"
        )
    num_val = min(num_val, num_windows - num_train)
    starts = np.arange(num_train + num_val)
    windows = corpus[starts[:, None] + np.arange(num_steps + 1)]
    x, y = windows[:, :-1], windows[:, 1:]
    return CharData(
        vocab,
        x[:num_train],
        y[:num_train],
        x[num_train:],
        y[num_train:],
        digest.hexdigest(),
    )
