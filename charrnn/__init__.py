"""charrnn: character-level language models on the command line.

The package is importable as a library; `charrnn.cli` is a thin Click layer on top.
Importing the package is cheap: heavy modules (numba kernels) load on first use.
"""

__version__ = "0.1.0"
# The name on the package index (`pip install charrnn-cli`): "charrnn" there is an unrelated
# project. The command and the import name stay `charrnn`. Install hints name this.
DISTRIBUTION = "charrnn-cli"


def pip_hint(*requirements: str) -> str:
    """The command that installs `requirements` into the Python charrnn runs on, shell-quoted so it
    can be pasted (the distribution's extras are not on the package index: its "charrnn" is
    another project, and charrnn-cli is not published)."""
    import shlex
    import sys

    return " ".join(shlex.quote(a) for a in (sys.executable or "python3", "-m", "pip", "install", *requirements))
