"""Where the benchmarks find their corpus, tiny Shakespeare (Karpathy's char-rnn data set, 1,115,394
bytes): the first of

1. the file named by $CHARRNN_CORPUS (any text: set it to benchmark another corpus);
2. ../shared/corpora/tinyshakespeare.txt beside this checkout (where the project's machines keep it);
3. tinyshakespeare.txt in the user's cache ($XDG_CACHE_HOME/charrnn or ~/.cache/charrnn), where
   `download` puts it;

and when none of them exists, a download from its public address into 3, checked against its
SHA-256 before it is kept. A script's own --corpus option (where it has one) comes before all of
these, and nothing is looked for or fetched when it is given (`required`). The tests never use
this module's corpus, and nothing here runs at import.

    python benchmarks/tinyshakespeare.py     # print the path, downloading the file once if needed
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import urllib.request

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
ENV = "CHARRNN_CORPUS"
NAME = "tinyshakespeare.txt"
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cache_path() -> str:
    """Where `download` keeps the file."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "charrnn", NAME)


def candidates() -> list[str]:
    """The places looked at, in order ($CHARRNN_CORPUS first when it is set)."""
    found = [os.environ[ENV]] if os.environ.get(ENV) else []
    return found + [os.path.join(_CHECKOUT, "..", "shared", "corpora", NAME), cache_path()]


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(dest: str | None = None, url: str = URL, sha256: str = SHA256) -> str:
    """Fetch `url` to `dest` (default: cache_path()) and return `dest`. The bytes go to a temporary
    file beside it and replace `dest` only when their SHA-256 is `sha256`; otherwise ValueError, and
    nothing is left behind."""
    dest = dest or cache_path()
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(dest)), prefix=".download-")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as src:
            while block := src.read(1 << 20):
                out.write(block)
        got = sha256_of(tmp)
        if got != sha256:
            raise ValueError(f"{url}: SHA-256 {got}, expected {sha256}; not kept")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def corpus(fetch: bool = True) -> str | None:
    """The corpus path: $CHARRNN_CORPUS when set (whether or not it exists, so that a wrong path is
    an error and not a silent change of corpus), else the first candidate that exists, else a
    download when `fetch` (None if that fails, with one line on stderr)."""
    if os.environ.get(ENV):
        return os.environ[ENV]
    for path in candidates():
        if os.path.isfile(path):
            return path
    if not fetch:
        return None
    try:
        print(f"tinyshakespeare: not found; downloading {URL}", file=sys.stderr)
        return download()
    except (OSError, ValueError) as e:
        print(f"tinyshakespeare: {e}", file=sys.stderr)
        return None


def required(path: str | None = None) -> str:
    """The corpus a script runs on: `path` (its own --corpus or --source) when given, else corpus();
    when there is none, the script ends with one line on stderr and status 1."""
    path = path or corpus()
    if path is None or not os.path.isfile(path):
        sys.exit(f"corpus not found: {path}" if path else
                 f"no corpus: set ${ENV}, or put {NAME} in ../shared/corpora or {cache_path()}")
    return path


if __name__ == "__main__":
    path = corpus()
    if path is None:
        sys.exit(1)
    print(path)
