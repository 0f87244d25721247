import gzip
import hashlib
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, strategies as st

import stackrnn
import stackrnn.lm


# d2l's timemachine.txt, which the package ships.
SHA1 = "090b5e7e70c295757f55df93cb0a180b9691891a"


def test_preprocess_is_d2ls():
    # re.sub('[^A-Za-z]+', ' ', text).lower(), worked out by hand.
    text = "The Time--Machine, by H. G. Wells [1898]\n\nI\n"
    assert stackrnn.lm.preprocess(text) == "the time machine by h g wells i "


def test_vocab_of_a_known_string():
    # "The cat, the HAT." -> "the cat the hat " -> d2l's Vocab: sorted(set(tokens +
    # ['<unk>'])), so " " (0x20) < "<unk>" (0x3C) < letters.
    vocab = stackrnn.lm.Vocab.from_tokens(
        list(stackrnn.lm.preprocess("The cat, the HAT."))
    )
    assert vocab.tokens == (" ", "<unk>", "a", "c", "e", "h", "t")
    assert vocab.unk == 1
    np.testing.assert_array_equal(vocab.encode("hat z"), [5, 2, 6, 0, 1])
    assert vocab.decode([6, 5, 4]) == "the"


def test_windows_of_a_known_string():
    data = stackrnn.lm.CharData.from_text(
        "ab cd!ef", num_steps=3, num_train=2, num_val=9
    )
    # Preprocessed: "ab cd ef" (8 tokens): windows of 4 start at 0..4.
    assert data.vocab.tokens == (" ", "<unk>", "a", "b", "c", "d", "e", "f")
    decode = data.vocab.decode
    assert [decode(x) for x in data.train_x] == ["ab ", "b c"]
    assert [decode(y) for y in data.train_y] == ["b c", " cd"]
    # num_val is an upper bound, as d2l's slice: only 3 windows remain.
    assert [decode(x) for x in data.val_x] == [" cd", "cd ", "d e"]
    assert [decode(y) for y in data.val_y] == ["cd ", "d e", " ef"]
    assert data.train_x.dtype == np.int32 and data.num_steps == 3


@given(
    text=st.text(alphabet="ab cD,é€\n", min_size=1, max_size=60),
    num_steps=st.integers(1, 6),
    num_train=st.integers(1, 10),
    num_val=st.integers(1, 10),
    # Chunks that cut runs of non-letters and multi-byte characters.
    chunk=st.sampled_from([1, 2, 3, 5, 1 << 20]),
    from_file=st.booleans(),
)
def test_windows_match_d2ls_definition(
    tmp_path_factory, text, num_steps, num_train, num_val, chunk, from_file
):
    sizes = dict(num_steps=num_steps, num_train=num_train, num_val=num_val)
    if from_file:
        path = tmp_path_factory.mktemp("text") / "text.txt"
        path.write_bytes(text.encode())

        def build():
            return stackrnn.lm.CharData.from_file(path, **sizes)
    else:

        def build():
            return stackrnn.lm.CharData.from_text(text, **sizes)

    tokens = list(stackrnn.lm.preprocess(text))
    with mock.patch.object(stackrnn.lm._data, "_CHUNK", chunk):
        if len(tokens) - num_steps < num_train + 1:
            # A blank file is refused as empty before its windows are counted.
            blank = from_file and not text.strip()
            with pytest.raises(ValueError, match="is empty" if blank else "num_train"):
                build()
            return
        data = build()
    assert data.sha1 == hashlib.sha1(text.encode()).hexdigest()
    # d2l: array = [corpus[i:i+num_steps+1] for i in range(len(corpus)-num_steps)]
    vocab = sorted(set(tokens + ["<unk>"]))
    corpus = [vocab.index(t) for t in tokens]
    array = np.array(
        [corpus[i : i + num_steps + 1] for i in range(len(corpus) - num_steps)]
    )
    x, y = array[:, :-1], array[:, 1:]
    assert list(data.vocab.tokens) == vocab
    np.testing.assert_array_equal(data.train_x, x[:num_train])
    np.testing.assert_array_equal(data.train_y, y[:num_train])
    np.testing.assert_array_equal(data.val_x, x[num_train : num_train + num_val])
    np.testing.assert_array_equal(data.val_y, y[num_train : num_train + num_val])


def test_time_machine():
    text = stackrnn.lm.load_text()
    assert hashlib.sha1(text.encode()).hexdigest() == SHA1
    data = stackrnn.lm.CharData.from_text(text)
    streamed = stackrnn.lm.CharData.from_file()
    assert data.sha1 == streamed.sha1 == SHA1
    assert data.vocab == streamed.vocab
    for field in ("train_x", "train_y", "val_x", "val_y"):
        np.testing.assert_array_equal(getattr(data, field), getattr(streamed, field))
    assert len(data.vocab) == 28
    assert data.vocab.tokens[:3] == (" ", "<unk>", "a")
    assert data.train_x.shape == data.train_y.shape == (10000, 32)
    assert data.val_x.shape == data.val_y.shape == (5000, 32)
    assert data.vocab.decode(data.train_x[0]) == "the time machine by h g wells i "
    np.testing.assert_array_equal(data.train_x[1:, :], data.train_y[:-1, :])


def test_vocabulary_can_be_given():
    vocab = stackrnn.lm.Vocab((" ", "<unk>", "a", "b"))
    data = stackrnn.lm.CharData.from_text(
        "abcab ab", num_steps=2, num_train=2, num_val=1, vocab=vocab
    )
    assert data.vocab is vocab
    assert vocab.decode(data.train_x[0]) == "ab"
    assert vocab.decode(data.train_x[1]) == "b<unk>"


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "is empty"),
        (b" \n\t ", "is empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "not UTF-8 text"),
        (b"caf\xe9 au lait " * 50, r"not UTF-8 text \(byte 3: invalid continuation"),
        (b"caf\xc3\xa9 au lait " * 50 + b"\xe2\x82", "ends inside a character"),
        (b"only a few words", "windows"),
        (b"1234567890 " * 100, "windows"),
    ],
)
@pytest.mark.parametrize("chunk", [2, 1 << 20])
def test_bad_files(tmp_path, content, match, chunk, monkeypatch):
    monkeypatch.setattr(stackrnn.lm._data, "_CHUNK", chunk)
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    sizes = dict(num_steps=32, num_train=10, num_val=5)
    with pytest.raises(ValueError, match=match):
        stackrnn.lm.CharData.from_text(stackrnn.lm.load_text(path), **sizes)
    with pytest.raises(ValueError, match=match):
        stackrnn.lm.CharData.from_file(path, **sizes)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        stackrnn.lm.load_text(tmp_path / "nope.txt")
    with pytest.raises(IsADirectoryError, match="is a directory; give a UTF-8 text"):
        stackrnn.lm.load_text(tmp_path)


def test_bad_vocab():
    with pytest.raises(ValueError, match="<unk>"):
        stackrnn.lm.Vocab(("a", "b"))
    with pytest.raises(ValueError, match="distinct"):
        stackrnn.lm.Vocab(("<unk>", "a", "a"))


def test_load_text(tmp_path, monkeypatch):
    own = tmp_path / "own.txt"
    own.write_text("my own text")
    assert stackrnn.lm.load_text(own) == "my own text"
    # The packaged copy is d2l's file, byte for byte, read with no network.
    text = stackrnn.lm.load_text()
    assert len(text.encode()) == 178979
    assert hashlib.sha1(text.encode()).hexdigest() == SHA1


def test_damaged_packaged_text(tmp_path, monkeypatch):
    bad = tmp_path / "timemachine.txt.gz"
    bad.write_bytes(gzip.compress(b"not the book"))
    monkeypatch.setattr(stackrnn.lm._data, "TIME_MACHINE", bad)
    with pytest.raises(ValueError, match="damaged.*reinstall"):
        stackrnn.lm.load_text()
