"""The command line: `charrnn train`, `charrnn sample`, `charrnn eval`, `charrnn info`, `charrnn
export`, `charrnn viz`.

Thin on purpose: parse options, call the library, report. Results (samples, scores) go to stdout;
everything else (progress, notes, errors) to stderr. Errors are one line and an exit status:
1 a failed operation, 2 bad usage, 130 / 143 after SIGINT / SIGTERM. Heavy imports (numpy, numba)
happen inside the commands so `--help` stays fast.

Every numeric option is range-checked by Click from the tables in config.py (floats through
Finite, which also refuses NaN and inf), and a stdout that is closed or fails (a full disk) is a
one-line error, while a reader that goes away (`| head`) ends the program quietly.

  app.py      the group and main(), the console script: exit statuses, start-up and shut-down
  exits.py    one-line errors and their exit statuses (handle_errors), stdout for results
  options.py  the options and Click types the commands share
  train.py, sample.py, eval.py, info.py, export.py, viz.py: one command each
"""

from charrnn.cli.app import cli, main
from charrnn.cli.exits import ResultsOut, handle_errors
from charrnn.cli.options import Finite

__all__ = ["Finite", "ResultsOut", "cli", "handle_errors", "main"]
