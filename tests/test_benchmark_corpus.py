"""benchmarks/tinyshakespeare.py, offline: where the benchmarks look for their corpus, and a download
kept only when its SHA-256 matches (exercised on file:// addresses; nothing here uses the network or
tiny Shakespeare itself)."""

import hashlib
import importlib.util
import os

import pytest

from tests.common import ROOT


@pytest.fixture
def ts(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("tinyshakespeare", os.path.join(ROOT, "benchmarks", "tinyshakespeare.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.delenv(mod.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "checkout").mkdir()
    monkeypatch.setattr(mod, "_CHECKOUT", str(tmp_path / "checkout"))  # no ../shared beside it yet
    return mod


def test_the_environment_variable_comes_first_even_when_its_file_is_missing(ts, monkeypatch, tmp_path):
    monkeypatch.setenv(ts.ENV, str(tmp_path / "mine.txt"))
    assert ts.candidates()[0] == str(tmp_path / "mine.txt")
    assert ts.corpus(fetch=False) == str(tmp_path / "mine.txt")


def test_falls_back_to_shared_then_the_cache(ts, tmp_path):
    assert ts.corpus(fetch=False) is None
    cached = tmp_path / "cache" / "charrnn" / "tinyshakespeare.txt"
    cached.parent.mkdir(parents=True)
    cached.write_text("cached")
    assert ts.corpus(fetch=False) == str(cached)
    shared = tmp_path / "shared" / "corpora" / "tinyshakespeare.txt"
    shared.parent.mkdir(parents=True)
    shared.write_text("shared")
    assert os.path.samefile(ts.corpus(fetch=False), shared)


def test_download_keeps_the_file_only_when_its_checksum_matches(ts, tmp_path):
    src = tmp_path / "input.txt"
    src.write_bytes(b"First Citizen:\nBefore we proceed any further, hear me speak.\n")
    good = hashlib.sha256(src.read_bytes()).hexdigest()
    dest = tmp_path / "out" / "tinyshakespeare.txt"
    with pytest.raises(ValueError, match="SHA-256"):
        ts.download(str(dest), url=src.as_uri(), sha256="0" * 64)
    assert not dest.exists() and os.listdir(dest.parent) == []  # the temporary file is gone too
    assert ts.download(str(dest), url=src.as_uri(), sha256=good) == str(dest)
    assert dest.read_bytes() == src.read_bytes() and ts.sha256_of(str(dest)) == good


def test_the_published_checksum_is_tiny_shakespeares():
    shared = os.path.join(ROOT, "..", "shared", "corpora", "tinyshakespeare.txt")
    if not os.path.isfile(shared):
        pytest.skip("tiny Shakespeare is not beside this checkout")
    spec = importlib.util.spec_from_file_location("tinyshakespeare", os.path.join(ROOT, "benchmarks", "tinyshakespeare.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.sha256_of(shared) == mod.SHA256


def test_a_scripts_own_path_is_used_without_looking_further_and_a_missing_one_is_one_line(ts, monkeypatch, tmp_path):
    mine = tmp_path / "mine.txt"
    mine.write_text("text")
    monkeypatch.setattr(ts, "corpus", lambda fetch=True: pytest.fail("looked for another corpus"))
    assert ts.required(str(mine)) == str(mine)
    with pytest.raises(SystemExit, match="corpus not found: .*absent.txt"):
        ts.required(str(tmp_path / "absent.txt"))


def test_no_corpus_anywhere_ends_the_script_with_one_line_not_a_traceback(ts, monkeypatch):
    monkeypatch.setattr(ts, "download", lambda *a, **k: (_ for _ in ()).throw(OSError("no network")))
    with pytest.raises(SystemExit, match=r"no corpus: set \$CHARRNN_CORPUS"):
        ts.required(None)
