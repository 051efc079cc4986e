"""The package-wide cache key (charrnn/kernels/jit.py): kernels are cached inside NUMBA_CACHE_DIR
in a folder salted with every kernel source file, so an edit to a helper in one file recompiles a
cached kernel in another; and helpers are compiled once, not once per integer constant."""

import json
import os
import shutil
import subprocess
import sys

from tests.common import ROOT

# Draw 2000 tokens from fixed logits with the sampler (kernels/sample.py), whose random numbers come
# from a helper in another file (kernels/rng.py: uniform); say whether anything compiled.
PROBE = """
import json, sys
import numpy as np
from charrnn.kernels import jit, sample
compiled = []
with jit.compile_notice(lambda: compiled.append(True)):
    counts = sample.draw_many(np.array([0.0, 1.0, 0.5, -1.0]), 2000, seed=3)
print(json.dumps({"counts": counts.tolist(), "compiled": bool(compiled), "folder": jit.cache_dir(),
                  "file": sample.__file__}))
"""


def _probe(pkg_root, cache):
    env = dict(os.environ, PYTHONPATH=pkg_root, NUMBA_CACHE_DIR=cache)
    res = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300, cwd=pkg_root)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_an_edit_to_a_helper_in_another_file_recompiles_the_cached_kernel(tmp_path):
    pkg = tmp_path / "pkg"
    shutil.copytree(os.path.join(ROOT, "charrnn"), pkg / "charrnn", ignore=shutil.ignore_patterns("__pycache__"))
    cache = str(tmp_path / "cache")
    first = _probe(str(pkg), cache)
    assert first["file"].startswith(str(pkg)) and first["folder"].startswith(cache)
    assert first["compiled"] and min(first["counts"][:3]) > 100  # spread over the likely tokens
    assert os.path.basename(first["folder"]).startswith("charrnn-")
    again = _probe(str(pkg), cache)
    assert not again["compiled"] and again["counts"] == first["counts"]  # loaded from the cache
    # the helper: uniform() now always returns 0, so every draw takes the first token
    rng_py = pkg / "charrnn" / "kernels" / "rng.py"
    src = rng_py.read_text()
    edited = src.replace("    return float(mix64(state[0]) >> np.uint64(11)) * (1.0 / 9007199254740992.0)", "    return 0.0")
    assert edited != src
    rng_py.write_text(edited)
    after = _probe(str(pkg), cache)
    assert after["compiled"] and after["folder"] != first["folder"]
    assert after["counts"] == [2000, 0, 0, 0]
    # a fresh NUMBA_CACHE_DIR is a cold start
    assert _probe(str(pkg), str(tmp_path / "cache2"))["compiled"]


LITERALS = """
import json
import numpy as np
from numba.core import event
from charrnn.model import Model, ModelConfig

seen = []


class Record(event.Listener):
    def on_start(self, ev):
        fn = getattr(ev.data.get("dispatcher"), "py_func", None)
        seen.append([getattr(fn, "__module__", "") + "." + getattr(fn, "__name__", "?"), str(ev.data.get("args"))])

    def on_end(self, ev):
        pass


with event.install_listener("numba:compile", Record()):
    m = Model(ModelConfig(cell="rnn", layers=2, hidden=8, vocab_size=6), dtype=np.float64).init(0)
    m.step(np.array([1, 2], dtype=np.int32), m.new_state(2))
print(json.dumps(seen))
"""


def test_helpers_are_not_specialised_on_integer_constants(tmp_path):
    """A plain @njit callee called as f(t, 0) and as f(t, s) is compiled twice, because Numba
    types the 0 as a literal; that made the old core's first build several times larger than it
    had to be. The helpers of this package are typed with plain types: a cold build of Model.step,
    which calls its helpers with constants, compiles none of them for a literal."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    res = subprocess.run([sys.executable, "-c", LITERALS], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    seen = json.loads(res.stdout.strip().splitlines()[-1])
    ours = [(name, args) for name, args in seen if name.startswith("charrnn.")]
    assert len(ours) >= 5  # the kernel and its helpers really compiled
    assert any(name.endswith(".dense_wt") for name, _ in ours)
    assert not [(name, args) for name, args in ours if "Literal" in args]
