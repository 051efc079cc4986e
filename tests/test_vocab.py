"""Vocab: special tokens and ids, encode/decode round trips over arbitrary Unicode, unknown characters,
strict from_tokens validation, the JSON form, real one-hot encoding (and that it equals the row/column
gather the kernels use), encoding speed on a large text, and --max-vocab's capped vocabularies."""

import json
import time

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import charrnn.vocab as vocab_mod
from charrnn.errors import VocabError
from charrnn.data import read_corpus
from charrnn.vocab import END, END_ID, SPECIALS, START, START_ID, UNK, UNK_ID, Vocab, capped_vocab

# Surrogate-free by default (category Cs excluded); astral-plane characters are included.
texts = st.text(max_size=60)
astral = st.characters(min_codepoint=0x10000, max_codepoint=0x10FFFF, exclude_categories=("Cs",))
mixed_texts = st.text(alphabet=st.one_of(st.characters(exclude_categories=("Cs",)), astral), max_size=60)
# Distinct characters in code-point order: a valid vocabulary body.
char_sets = st.sets(st.characters(exclude_categories=("Cs",)), max_size=30).map(sorted)


# ----------------------------------------------------------------------------- ids and order
def test_special_tokens_have_fixed_ids():
    v = Vocab.from_text("hello")
    assert SPECIALS == ("<START>", "<END>", "<UNK>")
    assert v.tokens[:3] == SPECIALS
    assert (v.id_of(START), v.id_of(END), v.id_of(UNK)) == (START_ID, END_ID, UNK_ID) == (0, 1, 2)
    assert v.tokens[3:] == ("e", "h", "l", "o")
    assert len(v) == v.size == 7


@given(mixed_texts)
@example("\U0001f600 \U0010ffff a")
def test_from_text_is_sorted_distinct_characters(text):
    v = Vocab.from_text(text)
    assert list(v.chars) == sorted(set(text))
    assert [ord(c) for c in v.chars] == sorted(ord(c) for c in set(text))
    assert v.size == len(set(text)) + 3
    for i, ch in enumerate(v.chars):
        assert v.id_of(ch) == i + 3
        assert ch in v


def test_empty_vocabulary_has_only_specials():
    v = Vocab.from_text("")
    assert v.tokens == SPECIALS
    assert v.encode("", unknown="error").dtype == np.int32
    assert v.encode("", unknown="error").shape == (0,)
    assert v.encode("xy", unknown="unk").tolist() == [UNK_ID, UNK_ID]
    assert v.encode("xy", unknown="skip").tolist() == []


# ----------------------------------------------------------------------------- round trips
@given(mixed_texts)
@example("")
@example("\U0001f600")
@example("\U0010ffff")
@example("e\u0301")
@example("<START><END><UNK>")
@example("\r\n\t\x00\x7f\u2028\ufeff\ufffd")
def test_encode_decode_round_trip(text):
    v = Vocab.from_text(text)
    ids = v.encode(text)
    assert ids.dtype == np.int32
    assert ids.shape == (len(text),)  # one token per code point
    assert (ids >= 3).all()  # no character ever becomes a special token
    assert v.decode(ids) == text
    assert v.decode(ids, specials="show") == text
    assert v.decode(ids.tolist()) == text


@given(mixed_texts, texts)
def test_round_trip_in_a_larger_vocabulary(text, extra):
    v = Vocab.from_text(text + extra)
    assert v.decode(v.encode(text)) == text


@given(mixed_texts, mixed_texts, st.sampled_from([np.uint8, np.uint16, np.uint32, np.int32, np.int64]))
@example("ab", "a\x00b\u00ff\u0100\U0010ffff", np.uint8)  # code points on and past the table's edges
@example("", "xyz", np.uint16)
def test_dense_table_encoding_matches_a_dictionary(known, text, dtype):
    """Encoding gathers from a dense table indexed by code point (ASCII text as bytes, other text
    as UTF-32, clipped to the table): the ids a plain dictionary gives, for every unknown mode and
    id type."""
    v = Vocab.from_text(known)
    ids = {c: i for i, c in enumerate(v.tokens) if len(c) == 1}
    assert v.encode(text, unknown="unk", dtype=dtype).tolist() == [ids.get(c, UNK_ID) for c in text]
    assert v.encode(text, unknown="skip", dtype=dtype).tolist() == [ids[c] for c in text if c in ids]
    assert v.encode(text, unknown="unk", dtype=dtype).dtype == dtype
    assert v.unknown_chars(text) == sorted(set(c for c in text if c not in ids))


@given(st.lists(mixed_texts, max_size=5))
def test_char_set_is_the_set_of_characters(parts):
    seen = vocab_mod.CharSet()
    for p in parts:
        seen.add(vocab_mod.code_points(p))
    assert seen.chars() == sorted(set("".join(parts)))


@given(mixed_texts)
def test_chunked_encoding_matches_unchunked(text):
    """The encoder works on chunks; chunk boundaries (even inside an astral run) must not matter."""
    v = Vocab.from_text(text)
    expected = [v.id_of(c) for c in text]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vocab_mod, "_CHUNK", 3)
        assert Vocab.from_text(text) == v
        assert v.encode(text).tolist() == expected
        assert v.encode(text, unknown="unk").tolist() == expected
        assert v.unknown_chars(text + "\U0001f9ff") == ([] if "\U0001f9ff" in text else ["\U0001f9ff"])


def test_combining_mark_stays_two_tokens():
    text = "e\u0301"  # e + COMBINING ACUTE ACCENT, not the precomposed U+00E9
    v = Vocab.from_text(text)
    ids = v.encode(text)
    assert ids.tolist() == [v.id_of("e"), v.id_of("\u0301")]
    assert "\u00e9" not in v
    assert v.decode(ids) == text


def test_astral_characters_are_single_tokens():
    text = "a\U0001f600b\U0010ffff"
    v = Vocab.from_text(text)
    assert v.chars == ("a", "b", "\U0001f600", "\U0010ffff")
    ids = v.encode(text)
    assert ids.tolist() == [3, 5, 4, 6]
    assert v.decode(ids) == text


def test_text_that_looks_like_special_tokens_is_ordinary_characters():
    text = "<START>"
    v = Vocab.from_text(text)
    ids = v.encode(text)
    assert len(ids) == 7
    assert START_ID not in ids.tolist() and END_ID not in ids.tolist() and UNK_ID not in ids.tolist()
    assert v.decode(ids) == "<START>"
    # And the real special token decodes differently from the same text.
    assert v.decode([START_ID], specials="show") == "<START>"
    assert v.decode([START_ID]) == ""
    assert v.chars == tuple(sorted(set("<START>")))


def test_decode_specials():
    v = Vocab.from_text("ab")
    a, b = v.id_of("a"), v.id_of("b")
    ids = [START_ID, a, UNK_ID, b, END_ID]
    assert v.decode(ids) == "a\ufffdb"
    assert v.decode(ids, specials="show") == "<START>a<UNK>b<END>"
    assert v.decode(np.array(ids, dtype=np.uint8)) == "a\ufffdb"
    with pytest.raises(ValueError):
        v.decode(ids, specials="nope")


@pytest.mark.parametrize("bad", [[-1], [5], [0, 1, 2, 3, 4, 5]])
def test_decode_rejects_out_of_range_ids(bad):
    v = Vocab.from_text("ab")  # V = 5
    with pytest.raises(ValueError):
        v.decode(bad)


# ----------------------------------------------------------------------------- unknown characters
@given(texts, texts)
def test_unknown_modes(known, text):
    v = Vocab.from_text(known)
    missing = sorted(set(text) - set(known))
    assert v.unknown_chars(text) == missing

    unk = v.encode(text, unknown="unk")
    assert unk.dtype == np.int32 and len(unk) == len(text)
    for ch, i in zip(text, unk.tolist()):
        assert i == (v.id_of(ch) if ch in known else UNK_ID)

    skip = v.encode(text, unknown="skip")
    kept = "".join(c for c in text if c in known)
    assert skip.tolist() == v.encode(kept).tolist()
    assert v.decode(skip) == kept

    if missing:
        with pytest.raises(VocabError) as err:
            v.encode(text, unknown="error")
        assert list(err.value.unknown) == missing
        msg = str(err.value)
        assert "\n" not in msg and "\r" not in msg
        assert str(len(missing)) in msg
    else:
        assert v.encode(text, unknown="error").tolist() == unk.tolist()


def test_unknown_error_lists_the_characters():
    v = Vocab.from_text("abc")
    with pytest.raises(VocabError) as err:
        v.encode("abxcy\U0001f600\n", unknown="error")
    msg = str(err.value)
    assert "'x'" in msg and "'y'" in msg and "U+000A" in msg and "\U0001f600" in msg
    assert err.value.unknown == ("\n", "x", "y", "\U0001f600")


def test_unknown_mode_is_validated():
    with pytest.raises(ValueError):
        Vocab.from_text("a").encode("a", unknown="ignore")


def test_encode_dtype():
    v = Vocab.from_text("abc")
    ids = v.encode("cab", dtype=np.uint8)
    assert ids.dtype == np.uint8 and ids.tolist() == [5, 3, 4]


# ----------------------------------------------------------------------------- id_of / contains
@given(texts, st.characters(exclude_categories=("Cs",)))
def test_id_of_and_contains(text, probe):
    v = Vocab.from_text(text)
    for tok in v.tokens:
        assert tok in v
        assert v.tokens[v.id_of(tok)] == tok
    assert (probe in v) == (probe in set(text))
    if probe not in set(text):
        with pytest.raises(KeyError):
            v.id_of(probe)


def test_multi_character_strings_are_not_characters():
    v = Vocab.from_text("ab")
    assert "ab" not in v
    assert "<STAR" not in v
    with pytest.raises(KeyError):
        v.id_of("ab")


# ----------------------------------------------------------------------------- from_tokens / JSON
@given(char_sets)
def test_from_tokens_accepts_valid_lists(chars):
    tokens = list(SPECIALS) + chars
    v = Vocab.from_tokens(tokens)
    assert list(v.tokens) == tokens
    assert Vocab.from_tokens(v.tokens) == v
    assert hash(Vocab.from_tokens(tokens)) == hash(v)


@pytest.mark.parametrize(
    "tokens",
    [
        [],
        ["a", "b"],
        ["<START>", "<END>"],  # specials missing
        ["<END>", "<START>", "<UNK>", "a"],  # specials out of order
        ["<START>", "<END>", "<unk>", "a"],  # wrong spelling
        ["<START>", "<END>", "<UNK>", "b", "a"],  # unsorted
        ["<START>", "<END>", "<UNK>", "a", "a"],  # duplicate
        ["<START>", "<END>", "<UNK>", "ab"],  # multi-char entry
        ["<START>", "<END>", "<UNK>", ""],  # empty entry
        ["<START>", "<END>", "<UNK>", "<START>"],  # special repeated as a character
        ["<START>", "<END>", "<UNK>", "\U0001f600", "a"],  # sorted by UTF-16, not by code point
        ["<START>", "<END>", "<UNK>", 7],  # not a string
    ],
)
def test_from_tokens_rejects_invalid_lists(tokens):
    with pytest.raises(ValueError):
        Vocab.from_tokens(tokens)


@pytest.mark.parametrize(
    "tokens", [["<START>", "<END>", "<UNK>", 7, "a"], ["<START>", "<END>", "<UNK>", None, "a"], ["<START>", "<END>", "<UNK>", ["a"]]]
)
def test_from_tokens_rejects_non_strings_among_strings(tokens):
    # TypeError is accepted here (the checkpoint loader catches it); ValueError would be cleaner.
    with pytest.raises((ValueError, TypeError)):
        Vocab.from_tokens(tokens)


@given(char_sets.filter(lambda cs: len(cs) >= 2), st.randoms(use_true_random=False))
def test_from_tokens_rejects_any_unsorted_order(chars, rnd):
    shuffled = list(chars)
    while shuffled == chars:
        rnd.shuffle(shuffled)
    with pytest.raises(ValueError):
        Vocab.from_tokens(list(SPECIALS) + shuffled)


@given(char_sets, st.data())
def test_from_tokens_rejects_duplicates(chars, data):
    if not chars:
        chars = ["a"]
    dup = data.draw(st.sampled_from(chars))
    body = sorted(chars + [dup])
    with pytest.raises(ValueError):
        Vocab.from_tokens(list(SPECIALS) + body)


@given(mixed_texts)
@example("<START>\"\\\n\u2028\U0010ffff")
def test_json_round_trip(text):
    v = Vocab.from_text(text)
    s = v.to_json()
    s.encode("ascii")  # ensure_ascii: safe in any file or terminal
    assert json.loads(s) == {"tokens": list(v.tokens)}
    w = Vocab.from_json(s)
    assert w == v
    assert w.tokens == v.tokens
    assert w.decode(w.encode(text)) == text


@pytest.mark.parametrize(
    "data",
    [
        "[]",
        "{}",
        '{"tokens": 3}',
        '{"tokens": ["<START>", "<END>"]}',
        '{"tokens": ["<START>", "<END>", "<UNK>", "b", "a"]}',
    ],
)
def test_from_json_rejects_invalid(data):
    with pytest.raises(ValueError):
        Vocab.from_json(data)


def test_equality_is_by_tokens():
    assert Vocab.from_text("abc") == Vocab.from_text("cba")
    assert Vocab.from_text("abc") != Vocab.from_text("abd")
    assert Vocab.from_text("abc") != ("<START>", "<END>", "<UNK>", "a", "b", "c")


# ----------------------------------------------------------------------------- one-hot
@given(
    st.integers(1, 40),
    st.lists(st.integers(0, 10), min_size=0, max_size=3),
    st.integers(0, 2**32 - 1),
)
def test_one_hot_times_matrix_is_a_gather(n_chars, shape, seed):
    v = Vocab(chr(0x61 + i) for i in range(n_chars))
    V = v.size
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, size=tuple(shape))
    oh = v.one_hot(ids)
    assert oh.dtype == np.float32
    assert oh.shape == ids.shape + (V,)
    assert set(np.unique(oh).tolist()) <= {0.0, 1.0}
    assert (oh.sum(axis=-1) == 1).all()
    if ids.size:
        assert (oh.argmax(axis=-1) == ids).all()

    # Row gather (decoder / embedding form): one_hot(ids) @ W == W[ids].
    H = 5
    W = rng.normal(size=(V, H))
    oh64 = v.one_hot(ids, dtype=np.float64)
    np.testing.assert_array_equal(oh64 @ W, W[ids])
    # Column gather (what layer 0 does with weight_ih_l0, shape (G*H, V)): W_ih @ x == W_ih[:, id].
    W_ih = rng.normal(size=(4 * H, V)).astype(np.float32)
    flat = ids.reshape(-1)
    np.testing.assert_array_equal(W_ih @ v.one_hot(flat).T, W_ih[:, flat])


def test_one_hot_of_encoded_text():
    v = Vocab.from_text("hello")
    ids = v.encode("hol")
    oh = v.one_hot(ids)
    assert oh.tolist() == [
        [0, 0, 0, 0, 1, 0, 0],
        [0, 0, 0, 0, 0, 0, 1],
        [0, 0, 0, 0, 0, 1, 0],
    ]
    assert v.one_hot(START_ID).tolist() == [1, 0, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("bad", [[-1], [7], [[0, 8]]])
def test_one_hot_rejects_out_of_range_ids(bad):
    with pytest.raises(ValueError):
        Vocab.from_text("hello").one_hot(bad)  # V = 7


# ----------------------------------------------------------------------------- large text
def test_large_text_encodes_quickly_and_correctly():
    rng = np.random.default_rng(0)
    alphabet = np.array(list("abcdefghij \n.,\u00e9\u4e2d\U0001f600"))
    text = "".join(alphabet[rng.integers(0, len(alphabet), size=5_000_000)].tolist())
    t0 = time.perf_counter()
    v = Vocab.from_text(text)
    ids = v.encode(text)
    elapsed = time.perf_counter() - t0
    assert elapsed < 3.0, f"vocab + encode of 5M characters took {elapsed:.2f} s"
    assert ids.shape == (5_000_000,) and ids.dtype == np.int32
    # Spot checks across chunk boundaries, and a full count per character.
    for i in (0, 1, (1 << 22) - 1, 1 << 22, (1 << 22) + 1, len(text) - 1):
        assert ids[i] == v.id_of(text[i])
    counts = np.bincount(ids, minlength=v.size)
    for ch in v.chars:
        assert counts[v.id_of(ch)] == text.count(ch)


# ----------------------------------------------------------------------------- --max-vocab
def _corpus_of(tmp_path, text, docs=None):
    p = tmp_path / "c.txt"
    p.write_text(text, encoding="utf-8")
    return read_corpus([str(p)], docs=docs)


def test_capped_vocab_keeps_the_most_frequent_characters_in_code_point_order(tmp_path):
    text = "c" * 5 + "a" * 3 + "b" * 3 + "d" * 3 + "é" * 9 + "z"
    corpus = _corpus_of(tmp_path, text)
    try:
        assert capped_vocab(corpus, None) is None
        assert capped_vocab(corpus, 6) is None  # no more characters than the cap: nothing read
        capped = capped_vocab(corpus, 3)
        # é 9, c 5, then a 3-way tie of a, b, d at 3: the lowest code point, a, wins
        assert capped.vocab.chars == ("a", "c", "é")
        assert (capped.dropped, capped.dropped_chars, capped.chars) == (3, 7, len(text))
        # the vocabulary the whole text would give, cut by the plain-Python rule
        counts = {ch: text.count(ch) for ch in set(text)}
        want = sorted(sorted(counts, key=lambda ch: (-counts[ch], ch))[:3])
        assert list(capped.vocab.chars) == want
    finally:
        corpus.close()


def test_capped_vocab_in_document_mode_never_keeps_a_separator(tmp_path):
    text = "ab\n" * 50 + "xyz\n"  # \n is the most frequent character, but a separator in line mode
    corpus = _corpus_of(tmp_path, text, docs="line")
    try:
        assert "\n" not in corpus.vocab.chars
        capped = capped_vocab(corpus, 2)
        assert capped.vocab.chars == ("a", "b")
    finally:
        corpus.close()
