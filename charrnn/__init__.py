"""charrnn: character-level language models on the command line.

The package is importable as a library; `charrnn.cli` is a thin Click layer on top.
Importing the package is cheap: heavy modules (numba kernels) load on first use.
"""

__version__ = "0.1.0"
