"""Fixtures for every test module."""

import os

import pytest

from charrnn import threads
from tests.common import ROOT


@pytest.fixture
def restore_threads():
    """Put the thread count back as it was after a test that changes it."""
    n = threads.get_threads()
    yield
    threads.set_threads(n)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The first 12,000 characters of corpora/markov.txt, as a file path (tests/test_train.py,
    tests/test_rundir.py; a module may define its own `corpus` instead)."""
    d = tmp_path_factory.mktemp("corpus")
    p = d / "markov.txt"
    with open(os.path.join(ROOT, "corpora", "markov.txt"), encoding="utf-8") as f:
        p.write_text(f.read()[:12000], encoding="utf-8")
    return str(p)
