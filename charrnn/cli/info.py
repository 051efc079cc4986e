"""`charrnn info`: the model card of a checkpoint or run directory, and its loss curve.

Not here: the card (charrnn/info.py), the curve and the figure (curve.py).
"""

from __future__ import annotations

import click

from charrnn.cli.exits import ResultsOut, handle_errors
from charrnn.cli.options import quiet_option

EPILOG_INFO = "Example: charrnn info runs/shakespeare --plot curve.png"


@click.command(epilog=EPILOG_INFO)
@click.argument("path", metavar="MODEL|RUN", type=str)
@click.option("--json", "as_json", is_flag=True, help="The card as one JSON object (e.g. charrnn info runs/x --json | jq .best).")
@click.option("--plot", "plot_path", type=str, default=None, metavar="FILE.png",
              help="Also write a figure of the training and validation loss against steps and minutes "
                   "(needs the [plot] extra, matplotlib), e.g. --plot curve.png.")
@quiet_option
@handle_errors
def info(path, as_json, plot_path, quiet):
    """The model card of a checkpoint (MODEL.npz) or a run directory (RUN: its best.npz and
    metrics.jsonl): model, vocabulary, corpus, options as given and as fitted, progress, best
    validation loss, and for a run its loss curve as a small text plot."""
    from charrnn import curve
    from charrnn import info as card_info

    out = ResultsOut()
    if plot_path is not None:
        curve.check_plot_path(plot_path)  # a missing extra or a bad file name before any work
    notes = []
    c = card_info.card(path, notes)
    if not quiet:
        for note in notes:
            click.echo(f"charrnn: {note}", err=True)
    if plot_path is not None:
        curve.plot(c, plot_path)
        if not quiet:
            click.echo(f"charrnn: wrote {plot_path}", err=True)
    out.write(card_info.to_json(c) + "\n" if as_json else card_info.render(c))
    out.flush()


# ------------------------------------------------------------------------------------------ export
