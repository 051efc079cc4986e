"""Tests for corpora/make_corpora.py and the committed corpora in corpora/.

Checks determinism (same seed -> identical bytes, different seed -> different),
that the committed files match a fresh generation with the default seed, and
the content of each corpus (correct arithmetic, balanced brackets, Markov
empirical entropy close to the reported true entropy rate).
"""

import json
import math
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

CORPORA = Path(__file__).resolve().parent.parent / "corpora"
SCRIPT = CORPORA / "make_corpora.py"
TEXT_FILES = ["markov.txt", "arithmetic.txt", "brackets.txt"]
ALL_FILES = TEXT_FILES + ["markov.json"]
DEFAULT_SEED = 1234


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three fresh generations (run concurrently): default seed twice, another seed once."""
    seeds = {"a": DEFAULT_SEED, "b": DEFAULT_SEED, "other": DEFAULT_SEED + 1}
    outs = {key: tmp_path_factory.mktemp(key) for key in seeds}
    procs = {key: subprocess.Popen([sys.executable, str(SCRIPT), "--seed", str(seed),
                                    "--out", str(outs[key])],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for key, seed in seeds.items()}
    for key, proc in procs.items():
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
    return outs


def test_same_seed_is_byte_identical(runs):
    for name in ALL_FILES:
        assert (runs["a"] / name).read_bytes() == (runs["b"] / name).read_bytes(), name


def test_different_seed_differs(runs):
    for name in TEXT_FILES:
        assert (runs["a"] / name).read_bytes() != (runs["other"] / name).read_bytes(), name


def test_committed_files_match_fresh_generation(runs):
    for name in TEXT_FILES:
        assert (CORPORA / name).read_bytes() == (runs["a"] / name).read_bytes(), (
            f"corpora/{name} is stale: rerun python corpora/make_corpora.py")
    committed = json.loads((CORPORA / "markov.json").read_text())
    fresh = json.loads((runs["a"] / "markov.json").read_text())
    assert committed.keys() == fresh.keys()
    for key, value in fresh.items():   # floats compared loosely (last-ulp libm differences)
        if isinstance(value, float):
            assert math.isclose(committed[key], value, rel_tol=1e-12), key
        else:
            assert committed[key] == value, key


def test_sizes_under_1mb():
    for name in TEXT_FILES:
        assert 0 < (CORPORA / name).stat().st_size < 1_000_000, name


EQUATION = re.compile(r"(\d{1,2})([+\-*])(\d{1,2})=(\d+)")


def test_arithmetic_lines_are_correct():
    lines = (CORPORA / "arithmetic.txt").read_text().split("\n")
    assert lines[-1] == ""          # file ends with a newline
    lines = lines[:-1]
    assert 20_000 <= len(lines) <= 30_000
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    seen_ops = set()
    for line in lines:
        m = EQUATION.fullmatch(line)
        assert m, line
        a, op, b, result = int(m[1]), m[2], int(m[3]), int(m[4])
        assert ops[op](a, b) == result >= 0, line
        assert str(result) == m[4], line   # no leading zeros
        seen_ops.add(op)
    assert seen_ops == {"+", "-", "*"}


def is_balanced(s: str) -> bool:
    closer = {"(": ")", "[": "]", "{": "}"}
    stack = []
    for ch in s:
        if ch in closer:
            stack.append(closer[ch])
        elif not stack or stack.pop() != ch:
            return False
    return not stack


def test_bracket_lines_are_balanced():
    lines = (CORPORA / "brackets.txt").read_text().split("\n")
    assert lines[-1] == ""
    lines = lines[:-1]
    assert len(lines) >= 5_000
    for line in lines:
        assert 2 <= len(line) <= 80 and is_balanced(line), line
    assert set("".join(lines)) == set("()[]{}")
    assert not is_balanced("([)]") and not is_balanced("(()")


def test_markov_empirical_entropy_matches_true_entropy():
    info = json.loads((CORPORA / "markov.json").read_text())
    text = (CORPORA / "markov.txt").read_text(encoding="utf-8")
    order, h_true = info["order"], info["entropy_nats_per_char"]
    assert len(text) == info["n_chars"]
    assert set(text) <= set(info["alphabet"])
    assert math.isclose(info["entropy_bits_per_char"], h_true / math.log(2), rel_tol=1e-12)
    assert 0.5 < h_true < 2.5
    # Independent plug-in estimate of H(X_t | X_{t-order..t-1}) from counts.
    n = len(text) - order
    full = Counter(text[i:i + order + 1] for i in range(n))
    ctx = Counter(text[i:i + order] for i in range(n))
    h_emp = -sum(k / n * math.log(k / ctx[f[:-1]]) for f, k in full.items())
    assert abs(h_emp - h_true) < 0.02, (h_emp, h_true)
