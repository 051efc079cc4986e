"""The copy check (charrnn/copycheck.py, sample --format jsonl / --copy-report): the suffix array
against sorting by Python's own string comparison, matching statistics and copied_frac against
brute force, and the CLI against the run's tokens.npy and against --corpus FILE."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from charrnn import copycheck
from charrnn.cli import cli
from tests.inspect_helpers import make_checkpoint


def brute_ms(text: str, q: str) -> list[int]:
    out = []
    for i in range(len(q)):
        lo, hi = 0, len(q) - i  # the longest prefix of q[i:] in text: binary search on its length
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if q[i : i + mid] in text:
                lo = mid
            else:
                hi = mid - 1
        out.append(lo)
    return out


def brute_frac(text: str, q: str, k: int) -> float:
    cov = [False] * len(q)
    for i in range(len(q)):
        for j in range(i + k, len(q) + 1):
            if q[i:j] in text:
                cov[i:j] = [True] * (j - i)
    return sum(cov) / len(q) if q else 0.0


ids = st.lists(st.integers(0, 3), max_size=80)


@settings(max_examples=150, deadline=None)
@given(ids, st.lists(st.integers(0, 4), max_size=30), st.sampled_from([1, 3, 8, 1 << 16]), st.integers(1, 6))
def test_matches_brute_force(text, q, depth, k):
    idx = copycheck.CopyIndex(np.array(text, dtype=np.uint8), max_depth=depth)
    s = "".join(chr(65 + t) for t in text)
    # suffixes in the order of their first `depth` tokens (at least; ties in any order)
    keys = [s[i:][: idx.depth] for i in idx.sa.tolist()]
    assert idx.depth >= depth
    assert keys == sorted(keys) and sorted(idx.sa.tolist()) == list(range(len(text)))
    qs = "".join(chr(65 + t) for t in q)
    want = brute_ms(s, qs)
    got = idx.matching_statistics(np.array(q, dtype=np.int32)).tolist()
    for g, w in zip(got, want):  # exact below the depth; a lower bound of at least the depth above it
        assert g == w if w < idx.depth else idx.depth <= g <= w
    if depth == 1 << 16:
        c = copycheck.check(idx, np.array(q, dtype=np.int32), k)
        assert c.longest_copy == max(want, default=0)
        assert c.copied_frac == pytest.approx(brute_frac(s, qs, k))


def test_large_vocabularies_pack_fewer_tokens_a_key():
    rng = np.random.default_rng(0)
    for V in (300, 70000):
        text = rng.integers(0, 4, 500) * (V // 4)  # ids beyond a byte (and beyond 16 bits)
        idx = copycheck.CopyIndex(text.astype(np.int64))
        keys = [tuple(text[i:].tolist()) for i in idx.sa.tolist()]
        assert keys == sorted(keys)
        q = text[100:160]
        assert copycheck.check(idx, q, 20).longest_copy == 60


def run(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def samples(res):
    assert res.exit_code == 0, res.output
    return [json.loads(ln) for ln in res.stdout.splitlines()]


def test_sample_checks_against_corpus_file(tmp_path):
    model = tmp_path / "m.npz"
    make_checkpoint(model, "lstm", seed=4)
    args = ["sample", "--model", str(model), "--temp", "0", "--length", "60", "--format", "jsonl", "-q"]
    text = samples(run(args))[0]["text"]
    assert len(text) == 60
    copied = tmp_path / "copied.txt"
    copied.write_text("some other words\n" + text + "\nmore")
    rec = samples(run(args + ["--corpus", str(copied)]))[0]
    assert rec["longest_copy"] == 60 and rec["copied_frac"] == 1.0
    # the same text with one character changed at 25: the longest copy is the part after it
    broken = tmp_path / "broken.txt"
    changed = "@" if text[25] != "@" else "#"
    broken.write_text(text[:25] + changed + text[26:])
    rec = samples(run(args + ["--corpus", str(broken)]))[0]
    s = broken.read_text()
    assert rec["longest_copy"] == max(brute_ms(s, text))
    assert rec["copied_frac"] == pytest.approx(brute_frac(s, text, 20))
    # --copy-min 0: no check
    assert "longest_copy" not in samples(run(args + ["--copy-min", "0"]))[0]


def test_sample_checks_against_the_runs_tokens(tmp_path):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("the cat sat on the mat. " * 40 + "a dog ran off.\n")
    res = run(["train", str(corpus), "--out", str(tmp_path / "run"), "--hidden", "16", "--layers", "1",
               "--steps", "30", "--batch", "4", "--seq", "16", "-q"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, ["sample", "--model", str(tmp_path / "run"), "--temp", "0.5", "--seed", "1",
                                   "--length", "120", "--num", "2", "--format", "jsonl"])
    recs = samples(res)
    meta = json.loads((tmp_path / "run" / "tokens.json").read_text())
    ids = np.load(tmp_path / "run" / "tokens.npy")[: meta["n_train"]]
    train = "".join(meta["tokens"][i] if i > 2 else "\x00" for i in ids.tolist())
    for rec in recs:
        assert rec["longest_copy"] == max(brute_ms(train, rec["text"]))
        assert 0.0 <= rec["copied_frac"] <= 1.0
    assert "copy check against" in res.stderr
    res = CliRunner().invoke(cli, ["sample", "--model", str(tmp_path / "run"), "--length", "50", "--copy-report"])
    assert res.exit_code == 0 and "sample 1: longest copy" in res.stderr


def test_copy_check_errors(tmp_path):
    model = tmp_path / "m.npz"
    make_checkpoint(model)
    res = CliRunner().invoke(cli, ["sample", "--model", str(model), "--format", "jsonl", "--length", "5", "-q",
                                   "--corpus", str(tmp_path / "missing.txt")])
    assert res.exit_code == 1 and "--corpus" in res.output and res.output.strip().count("\n") == 0
    res = CliRunner().invoke(cli, ["sample", "--model", str(model), "--length", "5", "--corpus", str(model)])
    assert res.exit_code == 2 and "--corpus is for the copy check" in res.output
    # a model without a run directory and no --corpus: no keys, and a note says why
    res = CliRunner().invoke(cli, ["sample", "--model", str(model), "--format", "jsonl", "--length", "5"])
    assert res.exit_code == 0 and "no copy check" in res.stderr and "longest_copy" not in res.stdout
