"""Corpus reading (files, stdin, encodings, binary/empty/missing inputs, BOM and newline normalisation),
stream and document token streams, the train/validation split, compact id dtypes and the B-stream
batch layout (positions, shapes, resume, epoch coverage, memory)."""

import hashlib
import io
import os
import re
import subprocess
import sys
import tempfile
import tracemalloc
import types

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from charrnn import data as data_mod
from charrnn.config import DEFAULT_MAX_INPUT, format_size, parse_size
from charrnn.data import (
    BatchStream,
    Corpus,
    build_token_file,
    compact_dtype,
    decode_text,
    encode_stream,
    open_token_file,
    plan_split,
    read_corpus,
    read_text,
    split_documents,
)
from charrnn.errors import DataError
from charrnn.vocab import END_ID, START_ID, UNK_ID, Vocab
from tests import wholetext
from tests.wholetext import split_text

# Surrogate-free text without NUL (NUL means binary).
chars = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")
texts = st.text(alphabet=chars, max_size=80)
# Text rich in line endings, BOMs and blank lines.
newline_texts = st.lists(st.one_of(st.sampled_from(["\r", "\n", "\r\n", "\ufeff", " ", "\t"]), chars), max_size=60).map("".join)


def one_line(err):
    msg = str(err.value)
    assert msg and "\n" not in msg and "\r" not in msg, repr(msg)
    return msg


def normalise(text):
    """The reference: one leading BOM removed, CRLF and lone CR turned into LF."""
    if text.startswith("\ufeff"):
        text = text[1:]
    return re.sub(r"\r\n?", "\n", text)


def fake_stdin(monkeypatch, data: bytes):
    monkeypatch.setattr("sys.stdin", types.SimpleNamespace(buffer=io.BytesIO(data)))


# ----------------------------------------------------------------------------- decode_text
@given(newline_texts)
@example("\ufeffa\r\nb\rc\n\r\n\r")
@example("\r\r\n")
def test_decode_text_normalises_bom_and_newlines(text):
    out = decode_text(text.encode("utf-8"), "x.txt")
    assert out == normalise(text)
    assert "\r" not in out


def test_decode_text_examples():
    assert decode_text(b"\xef\xbb\xbfhi", "f") == "hi"  # UTF-8 BOM stripped
    assert decode_text(b"a\xef\xbb\xbfb", "f") == "a\ufeffb"  # only a leading one
    assert decode_text(b"a\r\nb\rc\n", "f") == "a\nb\nc\n"
    assert decode_text(b"\r\r\n", "f") == "\n\n"
    assert decode_text("caf\u00e9 \U0001f600".encode(), "f") == "caf\u00e9 \U0001f600"


BAD_UTF8 = [
    b"\xff",  # never valid
    b"\x80",  # lone continuation byte
    b"\xc0\xaf",  # overlong
    b"\xed\xa0\x80",  # encoded surrogate
    b"\xf4\x90\x80\x80",  # above U+10FFFF
    b"\xe2\x82x",  # truncated sequence
]


@given(texts, st.sampled_from(BAD_UTF8), texts)
@example("abc", b"\xff", "def")
@example("", b"\x80", "")
@example("\U0001f600", b"\xe2\x82x", "")
def test_invalid_utf8_reports_file_and_byte_offset(prefix, bad, suffix):
    data = prefix.encode("utf-8") + bad + suffix.encode("utf-8")
    with pytest.raises(DataError) as err:
        decode_text(data, "corpus.txt")
    msg = one_line(err)
    offset = len(prefix.encode("utf-8"))
    assert msg.startswith("corpus.txt:")
    assert f"byte offset {offset} " in msg
    assert f"0x{bad[:1].hex()}" in msg
    assert "--encoding" in msg


def test_invalid_utf8_offset_example():
    with pytest.raises(DataError) as err:
        decode_text(b"abc\xffdef", "f.txt")
    assert "offset 3 " in one_line(err)


def test_latin1_escape_hatch(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes(b"caf\xe9\r\nna\xefve\r")
    with pytest.raises(DataError) as err:
        read_text(str(path))
    assert "offset 3 " in one_line(err) and str(path) in str(err.value)
    assert read_text(str(path), encoding="latin-1") == "caf\u00e9\nna\u00efve\n"
    assert read_text(str(path), encoding="LATIN_1") == "caf\u00e9\nna\u00efve\n"


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32"])
def test_utf16_and_utf32(tmp_path, encoding):
    text = "h\u00e9llo\r\nw\U0001f600rld\r"
    path = tmp_path / "wide.txt"
    data = text.encode(encoding)
    assert b"\x00" in data  # NUL bytes here are not a sign of binary input
    path.write_bytes(data)
    out = read_text(str(path), encoding=encoding)
    assert out == "h\u00e9llo\nw\U0001f600rld\n"  # the BOM of utf-16/utf-32 is gone


def test_utf16_with_explicit_bom_character(tmp_path):
    path = tmp_path / "bom16.txt"
    path.write_bytes(b"\xff\xfe" + "ab\r\nc".encode("utf-16-le"))
    assert read_text(str(path), encoding="utf-16") == "ab\nc"
    assert read_text(str(path), encoding="utf-16-le") == "ab\nc"  # BOM read as U+FEFF, then dropped


def test_utf8_sig_encoding(tmp_path):
    path = tmp_path / "sig.txt"
    path.write_bytes(b"\xef\xbb\xbfx\r\n")
    assert read_text(str(path), encoding="utf-8-sig") == "x\n"


def test_wrong_declared_encoding_reports_offset():
    with pytest.raises(DataError) as err:
        decode_text(b"ab\x80", "f", encoding="ascii")
    msg = one_line(err)
    assert "ASCII" in msg and "offset 2 " in msg


@given(texts, texts)
@example("", "")
@example("\x89PNG", "\r\n\x1a\n")
def test_nul_byte_means_binary(before, after):
    data = before.encode() + b"\x00" + after.encode()
    with pytest.raises(DataError) as err:
        decode_text(data, "img.png")
    msg = one_line(err)
    assert "binary" in msg and msg.startswith("img.png:")
    assert re.search(rf"offset {len(before.encode())}\b", msg)


def test_nul_character_in_other_encodings_means_binary():
    with pytest.raises(DataError) as err:
        decode_text(b"ab\x00cd", "f", encoding="latin-1")
    assert "binary" in one_line(err)
    with pytest.raises(DataError) as err:
        decode_text("ab\x00".encode("utf-16"), "f", encoding="utf-16")
    assert "binary" in one_line(err)


@pytest.mark.parametrize("encoding", ["no-such-codec", "rot13", "base64"])
def test_unknown_encoding(encoding):
    with pytest.raises(DataError) as err:
        decode_text(b"abc", "f", encoding=encoding)
    assert encoding in one_line(err)


# ----------------------------------------------------------------------------- read_text / read_corpus
def test_read_text_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("\ufeffline one\r\nline two\r".encode())
    assert read_text(str(path)) == "line one\nline two\n"


def test_read_text_stdin(monkeypatch):
    fake_stdin(monkeypatch, b"\xef\xbb\xbffrom\r\nstdin \xf0\x9f\x98\x80")
    assert read_text("-") == "from\nstdin \U0001f600"


def test_stdin_errors_name_stdin(monkeypatch):
    fake_stdin(monkeypatch, b"ok\xff")
    with pytest.raises(DataError) as err:
        read_text("-")
    assert one_line(err).startswith("<stdin>:") and "offset 2 " in str(err.value)
    fake_stdin(monkeypatch, b"")
    with pytest.raises(DataError) as err:
        read_text("-")
    assert "<stdin>" in one_line(err) and "empty" in str(err.value)


@pytest.mark.parametrize("data", [b"", b"\xef\xbb\xbf"])
def test_empty_file_is_rejected(tmp_path, data):
    path = tmp_path / "empty.txt"
    path.write_bytes(data)
    with pytest.raises(DataError) as err:
        read_text(str(path))
    msg = one_line(err)
    assert str(path) in msg and "empty" in msg


def test_missing_file_and_directory(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError) as err:
        read_text(str(missing))
    assert str(missing) in one_line(err) and "no such file" in str(err.value)
    with pytest.raises(DataError) as err:
        read_corpus([str(tmp_path)])
    assert str(tmp_path) in one_line(err) and "directory" in str(err.value)


def test_binary_file_is_rejected(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(range(256)))
    with pytest.raises(DataError) as err:
        read_text(str(path))
    msg = one_line(err)
    assert str(path) in msg and "binary" in msg


def test_read_corpus_concatenates_in_order(tmp_path, monkeypatch):
    a, b = tmp_path / "b_first.txt", tmp_path / "a_second.txt"
    a.write_bytes(b"\xef\xbb\xbfone\r\n")
    b.write_bytes("two \u00e9\r".encode())
    fake_stdin(monkeypatch, b"three")
    corpus = read_corpus([str(a), "-", str(b)])
    assert isinstance(corpus, Corpus)
    text = "".join(corpus.text_chunks())  # read again: stdin from its spool
    assert text == "one\nthreetwo \u00e9\n" and corpus.chars == len(text)
    assert corpus.paths == (str(a), "-", str(b))
    assert corpus.sha256 == hashlib.sha256(text.encode()).hexdigest()
    assert corpus.vocab == Vocab.from_text(text)
    assert corpus.name == "b_first"
    corpus.close()
    assert "".join(read_corpus([str(b), str(a)]).text_chunks()) == "two \u00e9\none\n"


def test_read_corpus_errors(tmp_path, monkeypatch):
    good = tmp_path / "good.txt"
    good.write_text("fine")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\nthen \xfe")
    with pytest.raises(DataError) as err:
        read_corpus([str(good), str(bad)])
    msg = one_line(err)
    assert str(bad) in msg and "offset 10 " in msg
    with pytest.raises(DataError):
        read_corpus([])
    fake_stdin(monkeypatch, b"x")
    with pytest.raises(DataError) as err:
        read_corpus(["-", str(good), "-"])
    one_line(err)


def test_corpus_names(tmp_path, monkeypatch):
    fake_stdin(monkeypatch, b"x")
    assert read_corpus(["-"]).name == "stdin"
    path = tmp_path / "shakespeare.txt"
    path.write_text("x")
    assert read_corpus([str(path)]).name == "shakespeare"


# ----------------------------------------------------------------------------- documents
line_docs = st.lists(st.text(alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="\n"), min_size=1, max_size=12).filter(str.strip), max_size=8)
paragraph = st.lists(
    st.text(alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="\n"), min_size=1, max_size=10).filter(str.strip),
    min_size=1,
    max_size=3,
).map("\n".join)


@given(line_docs, st.lists(st.integers(1, 3), min_size=9, max_size=9), st.booleans())
def test_split_documents_line(docs, gaps, trailing):
    text = "".join(d + "\n" * g for d, g in zip(docs, gaps))
    if not trailing and text:
        text = text.rstrip("\n")
    assert split_documents(text, "line") == docs


@given(st.lists(paragraph, max_size=6), st.lists(st.sampled_from(["\n\n", "\n\n\n", "\n \n", "\n\t\n\n"]), min_size=6, max_size=6))
def test_split_documents_blank(docs, seps):
    text = "".join(d + s for d, s in zip(docs, seps))
    assert split_documents(text, "blank") == docs


def test_split_documents_drops_empty_and_rejects_bad_mode():
    assert split_documents("\n\n  \n\t\n", "line") == []
    assert split_documents("\n\n \n\n", "blank") == []
    assert split_documents("", "line") == []
    assert split_documents("a\n\nb\nc\n\n\n", "blank") == ["a", "b\nc"]
    with pytest.raises(ValueError):
        split_documents("a", "para")


def test_crlf_documents():
    text = decode_text(b"one\r\ntwo\r\n\r\nthree\r\n", "f")
    assert split_documents(text, "line") == ["one", "two", "three"]
    assert split_documents(text, "blank") == ["one\ntwo", "three"]
    text = decode_text(b"one\rtwo\r\r\rthree\r", "f")  # old Mac line endings
    assert split_documents(text, "blank") == ["one\ntwo", "three"]


# ----------------------------------------------------------------------------- encode_stream
@given(texts)
@example("<START><END>")
def test_stream_mode(text):
    v = Vocab.from_text(text)
    ids = encode_stream(v, text, None)
    assert ids.dtype == np.int32
    assert ids.tolist() == [START_ID] + v.encode(text).tolist() + [END_ID]
    no_end = encode_stream(v, text, None, end=False)
    assert no_end.tolist() == [START_ID] + v.encode(text).tolist()
    small = encode_stream(v, text, None, dtype=compact_dtype(v.size))
    assert small.dtype == compact_dtype(v.size) and small.tolist() == ids.tolist()


def expected_doc_ids(v, docs, unknown="unk"):
    out = []
    for d in docs:
        out += [START_ID] + v.encode(d, unknown=unknown).tolist() + [END_ID]
    return out


@given(line_docs, st.lists(st.integers(1, 3), min_size=9, max_size=9))
def test_line_document_mode(docs, gaps):
    text = "".join(d + "\n" * g for d, g in zip(docs, gaps))
    v = Vocab.from_text(text)
    ids = encode_stream(v, text, "line")
    assert ids.dtype == np.int32
    assert ids.tolist() == expected_doc_ids(v, docs)
    assert (ids == START_ID).sum() == (ids == END_ID).sum() == len(docs)
    assert v.id_of("\n") not in ids.tolist() if "\n" in v else True
    small = encode_stream(v, text, "line", dtype=np.uint16)
    assert small.dtype == np.uint16 and small.tolist() == ids.tolist()


@given(st.lists(paragraph, max_size=5), st.sampled_from(["\n\n", "\n\n\n", "\n \n"]))
def test_blank_document_mode(docs, sep):
    text = sep.join(docs) + "\n"
    v = Vocab.from_text(text)
    assert encode_stream(v, text, "blank").tolist() == expected_doc_ids(v, docs)


def test_document_mode_example():
    v = Vocab.from_text("abcd\n")
    a, b, c, d = (v.id_of(ch) for ch in "abcd")
    assert encode_stream(v, "ab\n\ncd\n", "line").tolist() == [0, a, b, 1, 0, c, d, 1]
    assert encode_stream(v, "ab\ncd\n\n\nb", "blank").tolist() == [0, a, b, v.id_of("\n"), c, d, 1, 0, b, 1]
    assert encode_stream(v, "\n\n\n", "line").tolist() == []
    assert encode_stream(v, "", "blank").tolist() == []


@given(texts, line_docs)
def test_document_mode_unknown_characters(known, docs):
    v = Vocab.from_text(known)
    text = "\n".join(docs)
    assert encode_stream(v, text, "line").tolist() == expected_doc_ids(v, docs, "unk")
    assert encode_stream(v, text, "line", unknown="skip").tolist() == expected_doc_ids(v, docs, "skip")
    assert encode_stream(v, text, None, unknown="skip").tolist() == [START_ID] + v.encode(text, unknown="skip").tolist() + [END_ID]


def test_stream_mode_maps_unknown_to_unk_by_default():
    v = Vocab.from_text("ab")
    assert encode_stream(v, "axb", None).tolist() == [0, 3, UNK_ID, 4, 1]


# ----------------------------------------------------------------------------- compact_dtype
@pytest.mark.parametrize(
    "V, dtype", [(3, np.uint8), (256, np.uint8), (257, np.uint16), (65536, np.uint16), (65537, np.uint32), (1_114_115, np.uint32)]
)
def test_compact_dtype(V, dtype):
    assert compact_dtype(V) == dtype
    assert np.iinfo(compact_dtype(V)).max >= V - 1


@given(st.integers(3, 2_000_000))
def test_compact_dtype_holds_every_id(V):
    dt = np.dtype(compact_dtype(V))
    assert np.iinfo(dt).max >= V - 1
    assert dt.itemsize == (1 if V <= 256 else 2 if V <= 65536 else 4)


# ----------------------------------------------------------------------------- split_text
@given(texts, st.floats(0.0, 0.99))
def test_split_stream_mode(text, frac):
    s = split_text(text, frac, None)
    assert s.train_text + s.val_text == text
    if frac == 0.0:
        assert s.val_text == ""
    else:
        assert len(s.train_text) == int(round(len(text) * (1 - frac)))


def test_split_examples():
    assert split_text("abcdefghij", 0.1, None) == type(split_text("", 0.0, None))("abcdefghi", "j")
    assert split_text("abcdefghij", 0.0, "line").val_text == ""
    s = split_text("aaaa\nbbbb\ncccc\ndddd\n", 0.3, "line")  # nominal cut inside "cccc"
    assert (s.train_text, s.val_text) == ("aaaa\nbbbb\ncccc\n", "dddd\n")
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError):
            split_text("abc", bad, None)


@given(st.lists(paragraph, min_size=1, max_size=8), st.sampled_from(["line", "blank"]), st.floats(0.0, 0.99))
def test_split_document_mode_never_cuts_a_document(docs, mode, frac):
    sep = "\n" if mode == "line" else "\n\n"
    text = sep.join(docs) + "\n"
    s = split_text(text, frac, mode)
    assert s.train_text + s.val_text == text
    assert split_documents(s.train_text, mode) + split_documents(s.val_text, mode) == split_documents(text, mode)
    assert len(s.train_text) >= int(round(len(text) * (1 - frac))) or frac == 0.0


def line_boundaries(text):
    return [i + 1 for i, c in enumerate(text) if c == "\n"] + [len(text)]


@given(line_docs.filter(bool), st.floats(0.01, 0.99))
def test_split_line_mode_cuts_at_the_first_boundary_at_or_after_the_nominal_cut(docs, frac):
    text = "\n".join(docs) + "\n"
    nominal = int(round(len(text) * (1 - frac)))
    s = split_text(text, frac, "line")
    assert len(s.train_text) == min(b for b in line_boundaries(text) if b >= nominal)


@pytest.mark.parametrize(
    "text, frac, mode, val",
    [
        ("a\nb\n", 0.5, "line", "b\n"),  # cut = 2, exactly after "a\n"
        ("aa\n\nbb\n", 0.5, "blank", "bb\n"),  # cut = 4, exactly after the blank line
        ("aa\n\nbb", 0.5, "blank", "bb"),  # cut = 3, between the two newlines of the separator
        ("a\n \nb\n \nc", 0.5, "blank", "b\n \nc"),  # cut = 4, after a blank line holding a space
    ],
)
def test_split_document_mode_keeps_a_validation_set(text, frac, mode, val):
    assert split_text(text, frac, mode).val_text == val


# ----------------------------------------------------------------------------- BatchStream
@settings(max_examples=150)
@given(st.integers(1, 9), st.integers(0, 200), st.integers(1, 25), st.data())
def test_batch_layout_and_epoch_coverage(B, extra, T, data):
    N = B + 1 + extra
    ids = np.arange(N, dtype=np.int64)  # a token's value is its position, so layout is checkable
    bs = BatchStream(ids, B)
    S = (N - 1) // B
    assert bs.S == S and bs.B == B
    n_batches = bs.batches_per_epoch(T)
    assert n_batches == -(-S // T)

    seen = []
    p = 0
    for k in range(n_batches):
        x, y = bs.get(p, T)
        steps = min(T, S - p)
        assert x.shape == y.shape == (steps, B)
        assert x.dtype == y.dtype == np.int32
        assert x.flags.c_contiguous and y.flags.c_contiguous
        # stream b at step p holds ids[b*S + p]; targets are the next token of the same stream.
        expected = (np.arange(B) * S)[None, :] + np.arange(p, p + steps)[:, None]
        np.testing.assert_array_equal(x, expected)
        np.testing.assert_array_equal(y, expected + 1)
        if k < n_batches - 1:
            assert steps == T
        seen.append(x.ravel())
        p += steps
    assert p == S
    seen = np.sort(np.concatenate(seen))
    # Every token but the last of each stream (and the < B leftover tokens) is an input exactly once.
    np.testing.assert_array_equal(seen, np.arange(B * S))

    # get(p, T) depends only on p: same answer after other calls and from a fresh stream.
    q = data.draw(st.integers(0, S - 1))
    x1, y1 = bs.get(q, T)
    bs.get(0, T), bs.get(S - 1, 1)
    x2, y2 = BatchStream(ids, B).get(q, T)
    x3, y3 = bs.get(q, T)
    for a, b in ((x1, x2), (x1, x3), (y1, y2), (y1, y3)):
        np.testing.assert_array_equal(a, b)


def test_batch_stream_example():
    ids = np.array([0, 10, 11, 12, 13, 14, 15, 1], dtype=np.uint8)  # N = 8, B = 2 -> S = 3
    bs = BatchStream(ids, 2)
    x, y = bs.get(0, 2)
    assert x.tolist() == [[0, 12], [10, 13]] and y.tolist() == [[10, 13], [11, 14]]
    x, y = bs.get(2, 2)  # last batch is shorter; the leftover token 1 is never used
    assert x.tolist() == [[11, 14]] and y.tolist() == [[12, 15]]
    assert x.dtype == np.int32


@given(st.integers(1, 50), st.data())
def test_too_small_input_raises(B, data):
    N = data.draw(st.integers(0, B))
    with pytest.raises(DataError) as err:
        BatchStream(np.zeros(N, dtype=np.int32), B)
    assert str(B) in one_line(err)
    assert BatchStream(np.zeros(B + 1, dtype=np.int32), B).S == 1


def test_bad_positions_and_batch():
    bs = BatchStream(np.arange(11), 2)  # S = 5
    for p in (-1, 5, 100):
        with pytest.raises(IndexError):
            bs.get(p, 3)
    with pytest.raises(ValueError):
        BatchStream(np.arange(10), 0)


# ----------------------------------------------------------------------------- memory
def test_batch_stream_adds_no_copy_of_the_ids():
    """Batches are gathered from the ids (a mapped token file in training): building the stream
    allocates next to nothing, and a batch only its own (T + 1, B)."""
    N = 4_000_000
    ids = np.random.default_rng(0).integers(0, 100, size=N, dtype=np.uint8)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        bs = BatchStream(ids, 50)
        built = tracemalloc.get_traced_memory()[1] - base
        x, y = bs.get(1000, 64)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert built < 4096, f"{built} bytes to build the stream"
    assert peak < 256 * 1024, f"{peak} bytes for one batch"  # a copy of the ids: 4 MB
    assert x.shape == (64, 50) and x[0, 1] == ids[bs.S + 1000]


def _peak_building(tmp_path, n_chars, monkeypatch):
    text = np.random.default_rng(1).integers(32, 127, size=n_chars, dtype=np.uint8)
    text[::61] = 10  # lines
    path = tmp_path / f"c{n_chars}.txt"
    path.write_bytes(text.tobytes())
    tracemalloc.start()
    try:
        corpus = read_corpus([str(path)], chunk_bytes=1 << 20)
        tf = build_token_file(corpus, corpus.vocab, 0.1, str(tmp_path / "tokens.npy"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert tf.ids.dtype == np.uint8 and len(tf.ids) == n_chars + 2
    del tf
    return peak


def test_reading_and_encoding_memory_does_not_grow_with_the_corpus(tmp_path, monkeypatch):
    """Pass 1 and pass 2 hold a few chunks, never the corpus: the peak for 24 MB of text is the
    peak for 6 MB (1 MiB chunks), and a few MB in all."""
    small = _peak_building(tmp_path, 6_000_000, monkeypatch)
    big = _peak_building(tmp_path, 24_000_000, monkeypatch)
    assert big < 16 * 2**20, f"peak {big / 2**20:.1f} MiB"
    assert big < small * 1.25 + 2**20, (small, big)


# ----------------------------------------------------------------------------- chunked = whole-text pipeline
# Pieces that, with chunks of 1..17 bytes, put every edge case on a chunk boundary: CRLF and lone
# CR, BOMs, 2-, 3- and 4-byte UTF-8, blank-line separators with spaces and tabs, blank lines.
PIECES = ["\r", "\n", "\r\n", "\ufeff", " ", "\t", "a", "b", "Z", "\u00e9", "\u20ac", "\U0001f600", "\n\n", "\n \n",
          "\n\t\n\n", "x y", "\r\r\n", "\x0c"]
piece_texts = st.lists(st.sampled_from(PIECES), max_size=40).map("".join)
chunk_sizes = st.integers(1, 17)
ENCODINGS = [None, "utf-8-sig", "latin-1", "utf-16", "utf-16-le", "utf-32", "ascii", "cp1252"]


def outcome(fn):
    """("ok", value) or ("error", the one-line message)."""
    try:
        return "ok", fn()
    except DataError as e:
        return "error", one_line(types.SimpleNamespace(value=e))


def chunked_decode(data, encoding, k, name="f"):
    return "".join(data_mod.reading._text_chunks(io.BytesIO(data), name, encoding, k, data_mod.ByteLimit(None)))


@settings(max_examples=400, deadline=None)
@given(st.data(), st.sampled_from(ENCODINGS), chunk_sizes)
def test_chunked_decoding_equals_whole_decoding(data, encoding, k):
    """Text (or text with bad bytes and NULs spliced in) decodes chunk by chunk to exactly what the
    whole-text decoder gave, or fails with exactly its message (byte offsets in the file)."""
    text = data.draw(piece_texts)
    try:
        raw = text.encode(encoding or "utf-8")
    except UnicodeEncodeError:
        raw = text.encode("utf-8")
    if data.draw(st.booleans()):
        at = data.draw(st.integers(0, len(raw)))
        raw = raw[:at] + data.draw(st.sampled_from(BAD_UTF8 + [b"\x00", b"\r", b"\xef\xbb\xbf"])) + raw[at:]
    got, want = outcome(lambda: chunked_decode(raw, encoding, k)), outcome(lambda: wholetext.decode_whole(raw, "f", encoding))
    if got[0] == want[0] == "error" and "binary" in got[1] and "not valid" in want[1]:
        # both faults present: the whole-text decoder names the bad byte it meets decoding; the
        # chunked reader stops at a NUL in an earlier chunk, before it reaches the bad byte
        bad_at = int(re.search(r"byte offset (\d+)", want[1]).group(1))
        assert "\x00" in raw[:bad_at].decode(encoding or "utf-8", errors="replace")
    else:
        assert got == want


@pytest.mark.parametrize("k", [1, 2, 3, 5, 7])
def test_chunk_edges_examples(k):
    assert chunked_decode(b"\xef\xbb\xbfa\r\nb\r\rc\r", None, k) == "a\nb\n\nc\n"
    assert chunked_decode("\u20ac\U0001f600\r\n".encode(), None, k) == "\u20ac\U0001f600\n"
    with pytest.raises(DataError) as err:
        chunked_decode(b"abc\xe2\x82x", None, k)
    assert "byte offset 3 " in one_line(err)
    with pytest.raises(DataError) as err:
        chunked_decode(b"abcdefgh\xe2\x82", None, k)  # truncated at the very end
    assert "byte offset 8 " in one_line(err)
    with pytest.raises(DataError) as err:
        chunked_decode(b"abcdefgh\x00", None, k)
    assert "offset 8" in one_line(err) and "binary" in str(err.value)


file_texts = piece_texts.filter(lambda t: wholetext.decode_whole(t.encode(), "f") != "")


def _write(d, files):
    paths = []
    for i, data in enumerate(files):
        p = os.path.join(d, f"f{i}.txt")
        with open(p, "wb") as f:
            f.write(data)
        paths.append(p)
    return paths


@settings(max_examples=300, deadline=None)
@given(st.lists(piece_texts.map(str.encode), min_size=1, max_size=3), st.sampled_from([None, "line", "blank"]), chunk_sizes)
@example([b"a\r", b"\nb"], None, 1)
@example([b"\xef\xbb\xbf"], None, 1)  # empty after normalisation
def test_read_corpus_equals_whole_text(files, docs, k):
    """One chunked reading of several files gives today's hash (so runs made before resume),
    length, vocabulary (documents only, in document mode) and document counts; or today's error."""
    with tempfile.TemporaryDirectory() as d:
        paths = _write(d, files)
        want = outcome(lambda: wholetext.corpus_text(files))
        if want[0] == "error":
            want = ("error", want[1].replace(want[1].split(":")[0], os.path.join(d, want[1].split(":")[0] + ".txt"), 1))
        got = outcome(lambda: read_corpus(paths, docs=docs, chunk_bytes=k))
        assert got[0] == want[0], (got, want)
        if got[0] == "error":
            assert got[1] == want[1]
            return
        text, sha = want[1]
        corpus = got[1]
        assert corpus.sha256 == sha == hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
        assert corpus.chars == len(text)
        assert corpus.vocab == wholetext.corpus_vocab(text, docs)
        if docs is not None:
            documents = split_documents(text, docs)
            assert (corpus.doc_count, corpus.doc_chars) == (len(documents), sum(map(len, documents)))
        assert "".join(corpus.text_chunks()) == text


VAL_FRACS = st.one_of(st.sampled_from([0.0, 0.05, 0.1, 0.3, 0.5, 0.9, 0.99]), st.floats(0.0, 0.99))


@settings(max_examples=300, deadline=None)
@given(st.lists(file_texts.map(str.encode), min_size=1, max_size=3), st.sampled_from([None, "line", "blank"]),
       VAL_FRACS, chunk_sizes, st.integers(1, 4), st.integers(1, 6))
@example([b"aa\n\nbb"], "blank", 0.5, 1, 1, 2)  # the cut between the two newlines of a separator
@example([b"a\n \nb\n \nc"], "blank", 0.5, 2, 1, 3)
@example([b"a\n", b"\n", b"\n\nb\n\n\n\nc"], "blank", 0.3, 1, 1, 1)
@example([b"ab\r", b"\ncd\r\n\r\nef"], "line", 0.4, 1, 2, 2)
def test_token_file_equals_whole_text_streams(files, docs, val_frac, k, B, T):
    """The token file holds exactly today's training ids and validation ids (split where the whole
    text was split), and batches gathered from it are today's batches, however the corpus is
    chunked."""
    text, _ = wholetext.corpus_text(files)
    with tempfile.TemporaryDirectory() as d:
        paths = _write(d, files)
        corpus = read_corpus(paths, docs=docs, chunk_bytes=k)
        vocab = corpus.vocab
        dtype = compact_dtype(vocab.size)
        want_train, want_val = wholetext.train_val_ids(text, vocab, docs, val_frac, dtype)
        planned = plan_split(corpus, val_frac)
        assert (planned.n_train, planned.n_val, planned.has_val) == (
            len(want_train), 0 if want_val is None else len(want_val), want_val is not None)
        tf = build_token_file(corpus, vocab, val_frac, os.path.join(d, "tokens.npy"))
        assert tf.split == planned and len(tf.ids) == data_mod.total_tokens(corpus, val_frac)
        assert tf.ids.dtype == dtype and isinstance(tf.ids, np.memmap)
        assert tf.train.tolist() == want_train.tolist()
        assert (tf.val is None) == (want_val is None)
        if want_val is not None:
            assert tf.val.tolist() == want_val.tolist()
        if len(want_train) >= B + 1:
            new, old = BatchStream(tf.train, B), wholetext.GridBatches(want_train, B)
            assert new.S == old.S
            for p in range(new.S):
                for a, b in zip(new.get(p, T), old.get(p, T)):
                    assert a.dtype == b.dtype == np.int32
                    np.testing.assert_array_equal(a, b)
        again = open_token_file(os.path.join(d, "tokens.npy"), corpus, vocab, val_frac)
        assert again is not None and again.ids.tolist() == tf.ids.tolist()
        del tf, again


def test_token_file_is_checked_before_reuse(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("hello world\n" * 50)
    corpus = read_corpus([str(path)])
    tok = str(tmp_path / "run" / "tokens.npy")
    os.makedirs(os.path.dirname(tok))
    assert open_token_file(tok, corpus, corpus.vocab, 0.1) is None  # none yet
    tf = build_token_file(corpus, corpus.vocab, 0.1, tok)
    assert sorted(os.listdir(tmp_path / "run")) == ["tokens.json", "tokens.npy"]  # no temporary left
    assert open_token_file(tok, corpus, corpus.vocab, 0.1) is not None
    assert open_token_file(tok, corpus, corpus.vocab, 0.2) is None  # another split
    assert open_token_file(tok, corpus, Vocab.from_text("helo wrd!"), 0.1) is None  # another vocabulary
    other = read_corpus([str(path)], docs="line")
    assert open_token_file(tok, other, other.vocab, 0.1) is None
    with open(tok, "r+b") as f:  # a damaged (truncated) file
        f.truncate(os.path.getsize(tok) - 1)
    assert open_token_file(tok, corpus, corpus.vocab, 0.1) is None
    del tf


def test_a_failed_build_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "c.txt"
    path.write_text("hello world\n" * 50)
    corpus = read_corpus([str(path)])
    run = tmp_path / "run"
    run.mkdir()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(data_mod.tokenfile.os, "fsync", boom)
    with pytest.raises(DataError, match="could not write .*tokens.npy: disk full"):  # one line, not a traceback
        build_token_file(corpus, corpus.vocab, 0.1, str(run / "tokens.npy"))
    assert os.listdir(run) == []


def test_stdin_is_spooled_once_and_cleaned_up(tmp_path, monkeypatch):
    """stdin is read once, its bytes copied in chunks to an anonymous temporary file (never a
    visible file, gone once closed), and the second reading comes from there."""
    spool_dir = tmp_path / "tmp"
    spool_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool_dir))
    data = "\ufeffone\r\ntwo \u20ac\r".encode() * 100
    fake_stdin(monkeypatch, data)
    corpus = read_corpus(["-"], chunk_bytes=7)
    fake_stdin(monkeypatch, b"")  # stdin is used up: the second reading must not need it
    assert os.listdir(spool_dir) == []
    text = wholetext.decode_whole(data, "<stdin>")
    assert "".join(corpus.text_chunks()) == text and corpus.sha256 == hashlib.sha256(text.encode()).hexdigest()
    tf = build_token_file(corpus, corpus.vocab, 0.1, str(tmp_path / "tokens.npy"))
    want_train, want_val = wholetext.train_val_ids(text, corpus.vocab, None, 0.1, np.uint8)
    assert tf.train.tolist() == want_train.tolist() and tf.val.tolist() == want_val.tolist()
    (spool,) = corpus.source._spools.values()
    corpus.close()
    assert spool.closed and os.listdir(spool_dir) == []


def test_a_fifo_or_a_pipe_given_as_a_file_is_read_once_like_stdin(tmp_path):
    """`charrnn train <(command)` or a named pipe: a stream that cannot be read twice is copied on
    its first reading, as stdin is; the run gets the same corpus as from the file itself."""
    text = "a FIFO of text\n" * 500
    fifo = tmp_path / "c.fifo"
    os.mkfifo(fifo)

    def writer():
        with open(fifo, "w", encoding="utf-8") as f:
            f.write(text)

    import threading

    t = threading.Thread(target=writer)
    t.start()
    corpus = read_corpus([str(fifo)], chunk_bytes=64)
    t.join()
    try:
        assert "".join(corpus.text_chunks()) == text  # the second reading: from the copy, not the FIFO
        assert "".join(corpus.text_chunks()) == text
        assert corpus.sha256 == hashlib.sha256(text.encode()).hexdigest()
    finally:
        corpus.close()


# ----------------------------------------------------------------------------- the input limit
@pytest.mark.parametrize("text, n", [("4G", 4 * 2**30), ("500M", 500 * 2**20), ("64k", 65536), ("1000", 1000),
                                     ("1.5G", 3 * 2**29), ("2GiB", 2 * 2**30), ("10MB", 10 * 2**20)])
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("bad", ["", "G", "four", "-1M", "0", "1X", "nan", "inf"])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_default_limit_is_well_above_a_gigabyte():
    assert DEFAULT_MAX_INPUT >= 4 * 2**30 and format_size(DEFAULT_MAX_INPUT) == "4G"
    assert parse_size(format_size(DEFAULT_MAX_INPUT)) == DEFAULT_MAX_INPUT


def test_limit_counts_bytes_of_all_files(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_bytes(b"x" * 600)
    b.write_bytes(b"y" * 400)
    assert read_corpus([str(a), str(b)], max_input=1000, chunk_bytes=64).chars == 1000  # exactly the limit
    with pytest.raises(DataError) as err:
        read_corpus([str(a), str(b)], max_input=999, chunk_bytes=64)
    msg = one_line(err)
    assert msg.startswith(str(b)) and "--max-input" in msg and "limit" in msg


class EndlessStdin:
    """`yes |`: stdin that never ends; counts what was read."""

    def __init__(self):
        self.read_bytes = 0

    def read(self, n):
        self.read_bytes += n
        return b"y\n" * (n // 2) or b"y"


def test_endless_stdin_stops_at_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    endless = EndlessStdin()
    monkeypatch.setattr("sys.stdin", types.SimpleNamespace(buffer=endless))
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as err:
            read_corpus(["-"], max_input=8 * 2**20, chunk_bytes=2**16)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "<stdin>" in one_line(err) and "--max-input" in str(err.value)
    assert 8 * 2**20 < endless.read_bytes <= 8 * 2**20 + 2**16
    assert peak < 2 * 2**20, f"{peak} bytes"  # chunks, never the whole input
    assert os.listdir(tmp_path) == []


def _charrnn(args, **kw):
    return subprocess.run([sys.executable, "-m", "charrnn", *args], capture_output=True, text=True, timeout=120, **kw)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_dev_zero_and_yes_end_with_one_line_errors(tmp_path):
    """`charrnn train /dev/zero` stops at the first chunk (binary); `yes | charrnn train -` at
    --max-input; neither leaves a run directory."""
    out = tmp_path / "out"
    res = _charrnn(["train", "/dev/zero", "--out", str(out)])
    assert res.returncode == 1 and "binary" in res.stderr and "offset 0" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    yes = subprocess.Popen(["yes"], stdout=subprocess.PIPE)
    try:
        res = _charrnn(["train", "-", "--max-input", "3M", "--out", str(out)], stdin=yes.stdout)
    finally:
        yes.kill()
        yes.wait()
    assert res.returncode == 1 and "--max-input" in res.stderr and "<stdin>" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert not out.exists()
    res = _charrnn(["train", "x", "--max-input", "lots"])
    assert res.returncode == 2 and "--max-input" in res.stderr


def test_a_vocabulary_over_65536_characters_gives_a_uint32_token_file(tmp_path):
    chars = [chr(cp) for cp in range(0x100, 0x100 + 70_000) if not 0xD800 <= cp < 0xE000 and chr(cp).strip()]
    text = "".join(chars) + "\n" + "".join(reversed(chars))
    path = tmp_path / "wide.txt"
    path.write_text(text, encoding="utf-8")
    corpus = read_corpus([str(path)], chunk_bytes=4096)
    assert corpus.vocab.size > 65536
    tf = build_token_file(corpus, corpus.vocab, 0.1, str(tmp_path / "tokens.npy"))
    want_train, want_val = wholetext.train_val_ids(text, corpus.vocab, None, 0.1, np.int64)
    assert tf.ids.dtype == np.uint32
    assert tf.train.tolist() == want_train.tolist() and tf.val.tolist() == want_val.tolist()
    del tf


@settings(max_examples=300, deadline=None)
@given(st.lists(file_texts.map(str.encode), min_size=1, max_size=3), st.sampled_from([None, "line", "blank"]),
       VAL_FRACS, chunk_sizes, st.integers(1, 5), st.integers(1, 5))
def test_size_check_before_writing_equals_the_exact_one(files, docs, val_frac, k, B, T):
    """check_sizes decides from pass 1's marks (a lower bound on the training tokens) and reads
    the text again only when that bound is too small: the same errors as the exact layout."""
    with tempfile.TemporaryDirectory() as d:
        corpus = read_corpus(_write(d, files), docs=docs, chunk_bytes=k)
        exact = plan_split(corpus, val_frac)
        c = int(round(corpus.chars * (1 - val_frac))) if val_frac else corpus.chars
        assert all(tokens <= exact.n_train for end, tokens in corpus.marks if end <= c)
        assert outcome(lambda: data_mod.check_sizes(corpus, val_frac, B, T)) == outcome(
            lambda: data_mod.check_split(exact, B, T))


def test_a_full_temporary_directory_or_run_directory_is_a_one_line_error(tmp_path, monkeypatch):
    import errno

    class Full(io.BytesIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    fake_stdin(monkeypatch, b"some text\n" * 100)
    monkeypatch.setattr(tempfile, "TemporaryFile", lambda *a, **k: Full())
    with pytest.raises(DataError, match="cannot keep a copy .* No space left on device .*TMPDIR"):
        read_corpus(["-"])
    p = tmp_path / "c.txt"
    p.write_text("some text\n" * 100, encoding="utf-8")
    corpus = read_corpus([str(p)])
    try:
        with pytest.raises(DataError, match="could not write"):
            build_token_file(corpus, corpus.vocab, 0.1, str(tmp_path / "gone" / "tokens.npy"))
    finally:
        corpus.close()


def test_a_document_longer_than_the_limit_is_an_error_not_unbounded_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod.documents, "MAX_DOCUMENT_CHARS", 1000)
    p = tmp_path / "c.txt"
    p.write_text("short one\n\n" + "x" * 5000 + "\n\nand another\n", encoding="utf-8")
    with pytest.raises(DataError, match="a document of more than 1,000 characters"):
        read_corpus([str(p)], docs="blank", chunk_bytes=64)
    with pytest.raises(DataError, match=r"a document of more than 1,000 characters \(no newline"):
        read_corpus([str(p)], docs="line", chunk_bytes=64)
    p.write_text(("a line of text\n" * 40 + "\n") * 20, encoding="utf-8")  # 12k characters, short documents
    corpus = read_corpus([str(p)], docs="blank", chunk_bytes=64)
    assert corpus.doc_count == 20
    corpus.close()
