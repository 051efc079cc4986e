"""Numba options, defined once for every kernel, and the package-wide cache key.

Two decorators, one for each kind of compiled function:

- `kernel`: an entry point, called from Python (through the checked wrappers in this package). It
  is compiled once per signature and cached on disk, so a second run loads machine code instead
  of recompiling. It releases the GIL, so the worker threads of charrnn/threads.py run it side by
  side.
- `helper`: a piece of a kernel, called only from compiled code. It is compiled into the kernels
  that call it, and Numba types it with the plain types of its arguments: a helper called as
  f(t, 0) and as f(t, s) is compiled once, not once per constant (a plain @njit callee is
  specialised on every integer literal it receives, which made the first build of the old core
  several times larger than it had to be).

Options:
- nogil=True: kernels release the GIL.
- error_model="numpy": float division by zero gives inf/nan instead of a Python exception check,
  which would stop LLVM from vectorising the gate loops.
- fastmath: only the flags that keep NaN and Inf meaningful (no "nnan"/"ninf"): NaN detection of
  the loss and -inf masking in top-k sampling must keep working.

The cache key. Numba keys a cached function on its own source file only: an edit to a helper in
another file would leave stale machine code in every kernel that inlines it. So every kernel of
this package caches into one folder named after a hash of all the package's source files,
Numba's and llvmlite's versions and the options above (SALT). An edit anywhere, or an upgrade,
starts a new folder and recompiles everything. The folder lives inside NUMBA_CACHE_DIR when that
is set (a fresh NUMBA_CACHE_DIR is a cold start), else in this package's __pycache__, else in
the user's cache directory (a read-only install).
"""

import contextlib
import functools
import hashlib
import os
import shutil
import tempfile

import llvmlite
import numba
from numba.core import caching, config
from numba.core import event as ev
from numba.extending import register_jitable

FASTMATH = {"nsz", "arcp", "contract", "reassoc", "afn"}
JIT = dict(nogil=True, error_model="numpy", fastmath=FASTMATH)
HELPER = dict(error_model="numpy", fastmath=FASTMATH)

_HERE = os.path.dirname(os.path.abspath(__file__))


def _sources():
    """Every Python source file of the kernels package, in a fixed order."""
    out = []
    for root, dirs, files in os.walk(_HERE):
        dirs[:] = sorted(d for d in dirs if not d.startswith(("__pycache__", ".")))
        out += [os.path.join(root, f) for f in sorted(files) if f.endswith(".py")]
    return out


def _salt() -> str:
    h = hashlib.sha256()
    for path in _sources():
        h.update(os.path.relpath(path, _HERE).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read())
        h.update(b"\0")
    options = {k: sorted(v) if isinstance(v, set) else v for k, v in JIT.items()}  # a set's repr varies by process
    h.update(f"numba {numba.__version__} llvmlite {llvmlite.__version__} {sorted(options.items())!r}".encode())
    return h.hexdigest()[:16]


SALT = _salt()
CACHE_FOLDER = "charrnn-" + SALT


def _roots():
    """Where the salted folder may go, in order of preference."""
    if config.CACHE_DIR:
        return [config.CACHE_DIR]
    from numba.misc.appdirs import AppDirs

    return [os.path.join(_HERE, "__pycache__"), AppDirs(appname="charrnn", appauthor=False).user_cache_dir]


def cache_dir() -> str | None:
    """The salted folder the kernels cache into: the first writable one of _roots(), or None
    (nothing writable: compiled on every run, as Numba itself would)."""
    return _first_writable(tuple(_roots()))


@functools.lru_cache(maxsize=None)
def _first_writable(roots):
    for root in roots:
        path = os.path.join(root, CACHE_FOLDER)
        fresh = not os.path.isdir(path)
        try:
            os.makedirs(path, exist_ok=True)
            tempfile.TemporaryFile(dir=path).close()
        except OSError:
            continue
        if fresh and root == os.path.join(_HERE, "__pycache__"):
            _prune(root)
        return path
    return None


def _prune(root):
    """Remove the salted folders of earlier sources of this very package directory: nothing else
    caches there, and they would only pile up (each edit or upgrade starts a new one). Folders in
    NUMBA_CACHE_DIR or the user cache may belong to other installations and are left alone."""
    for name in os.listdir(root):
        if name.startswith("charrnn-") and name != CACHE_FOLDER:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


class _SaltedLocator(caching._SourceFileBackedLocatorMixin, caching._CacheLocator):
    """Numba's cache locator for the kernels of this package: <cache_dir()>/<subfolder of the file>.
    Numba still names each file after its module and function and keys each entry on the
    function's own bytecode and signature; the salt adds everything else the code depends on."""

    def __init__(self, py_func, py_file, folder):
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        rel = os.path.relpath(os.path.abspath(py_file), _HERE)
        self._inside = not rel.startswith(os.pardir)
        # a kernel defined outside this package (a test, a benchmark) gets a folder of its own
        sub = os.path.dirname(rel) if self._inside else os.path.join("_elsewhere", self.get_suitable_cache_subpath(py_file))
        self._cache_path = os.path.join(folder, sub)

    def get_cache_path(self):
        return self._cache_path

    def get_source_stamp(self):
        # the folder already says which package sources it holds; a file outside it adds its own
        return SALT if self._inside else (SALT, super().get_source_stamp())

    @classmethod
    def from_function(cls, py_func, py_file):
        folder = cache_dir()
        if folder is None:
            return None
        self = cls(py_func, py_file, folder)
        try:
            self.ensure_cache_path()
        except OSError:
            return None
        return self


class _SaltedImpl(caching.FunctionCache._impl_class):
    _locator_classes = [_SaltedLocator]


class _SaltedCache(caching.FunctionCache):
    _impl_class = _SaltedImpl


def kernel(fn):
    """An entry kernel: compiled with JIT, cached in the salted folder (see the module's docstring)."""
    disp = numba.njit(**JIT)(fn)
    try:
        disp._cache = _SaltedCache(fn)  # what Dispatcher.enable_caching does, with our locator
    except RuntimeError:
        pass  # no writable folder anywhere: compile every run, as Numba would
    return disp


def helper(fn):
    """A piece of a kernel: compiled into the kernels that call it, typed without literals."""
    return register_jitable(**HELPER)(fn)


class _Notice(ev.Listener):
    def __init__(self, callback):
        self.callback = callback
        self.said = False

    def on_start(self, event):
        fn = getattr(event.data.get("dispatcher"), "py_func", None)
        if not self.said and getattr(fn, "__module__", "").startswith(__name__.rsplit(".", 1)[0]):
            self.said = True
            self.callback()

    def on_end(self, event):
        pass


@contextlib.contextmanager
def compile_notice(callback):
    """While active, callback() runs once, when a kernel of this package starts compiling (not when
    it loads from the cache): the first run on a machine says so instead of seeming to hang."""
    with ev.install_listener("numba:compile", _Notice(callback)):
        yield
