"""The publishable package: its name (not the index's unrelated `charrnn`), its metadata, and what
`python -m build` puts in the sdist and the wheel. CI also installs the wheel into a fresh
virtualenv and runs it (.ci/wheel_check); this checks the archives themselves."""

import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile

import pytest

from charrnn import DISTRIBUTION, __version__
from tests.common import ROOT_PATH as ROOT


def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_distribution_name_and_metadata():
    project = pyproject()["project"]
    assert project["name"] == DISTRIBUTION and DISTRIBUTION != "charrnn"  # the index's charrnn is another project
    assert project["scripts"] == {"charrnn": "charrnn.cli:main"}  # the command keeps its name
    assert {"plot", "mpi", "test"} <= set(project["optional-dependencies"])
    assert any(d.startswith("matplotlib") for d in project["optional-dependencies"]["plot"])
    for key in ("description", "readme", "requires-python", "license", "keywords", "classifiers"):
        assert project.get(key), key
    readme = (ROOT / "README.md").read_text()
    assert f"pip install {DISTRIBUTION}\n" in readme and f"'{DISTRIBUTION}[plot]'" in readme


def test_version_is_the_installed_distributions():
    res = subprocess.run([sys.executable, "-m", "charrnn", "--version"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and __version__ in res.stdout
    try:
        installed = importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{DISTRIBUTION} is not installed (running from a source tree)")
    assert installed == __version__


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """sdist and wheel, built by `python -m build` (the wheel from the sdist) from a copy of the
    source tree, so the build's leftovers stay out of the checkout."""
    if importlib.util.find_spec("build") is None:
        pytest.skip("the 'build' package is not installed (it comes with the [test] extra)")
    tmp = tmp_path_factory.mktemp("build")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "venv", "runs", "build", "dist",
                                                             "__pycache__", "*.egg-info", ".pytest_cache",
                                                             ".hypothesis"))
    res = subprocess.run([sys.executable, "-m", "build", "--outdir", str(tmp / "dist"), str(src)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    wheels, sdists = list((tmp / "dist").glob("*.whl")), list((tmp / "dist").glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1
    return wheels[0], sdists[0]


@pytest.mark.slow
def test_wheel_holds_the_package_alone(built):
    wheel, _ = built
    assert wheel.name == f"{DISTRIBUTION.replace('-', '_')}-{__version__}-py3-none-any.whl"
    info = f"{DISTRIBUTION.replace('-', '_')}-{__version__}.dist-info/"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta = zf.read(info + "METADATA").decode()
        entry_points = zf.read(info + "entry_points.txt").decode()
    assert all(n.startswith(("charrnn/", info)) for n in names), sorted(n for n in names if not n.startswith("charrnn/"))
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "charrnn").rglob("*.py") if "__pycache__" not in p.parts}
    assert sources and sources <= names, sorted(sources - names)  # every module, the kernels' included
    assert not any(n.endswith((".pyc", ".nbi", ".nbc")) for n in names)
    assert f"Name: {DISTRIBUTION}\n" in meta and f"Version: {__version__}\n" in meta
    assert "Requires-Python: >=3.11" in meta and "Provides-Extra: plot" in meta and "Provides-Extra: mpi" in meta
    assert "License-Expression: MIT" in meta and "Description-Content-Type: text/markdown" in meta
    assert "charrnn = charrnn.cli:main" in entry_points


@pytest.mark.slow
def test_sdist_holds_what_builds_and_checks_it(built):
    _, sdist = built
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    for need in ("pyproject.toml", "README.md", "MANIFEST.in", "charrnn/cli/__init__.py", "charrnn/kernels/cells/lstm.py",
                 "tests/test_info.py", "tests/data/pre_restructure_lstm.npz", "corpora/arithmetic.txt", ".ci/run",
                 ".ci/wheel_check"):
        assert need in names, need
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    assert not any(n.startswith((".venv/", "runs/", ".git/")) for n in names)
