"""`charrnn export`: a model handed out as a one-file HTML sampler or an ONNX model.

Not here: the exports themselves (export_html.py, export_onnx.py).
"""

from __future__ import annotations

import click

from charrnn.cli.exits import handle_errors
from charrnn.cli.options import quiet_option

EPILOG_EXPORT = """\b
Example: charrnn export runs/shakespeare --format html -o sampler.html
         charrnn export runs/shakespeare --format onnx -o model.onnx   (needs charrnn-cli[export])"""


@click.command(epilog=EPILOG_EXPORT)
@click.argument("model_path", metavar="MODEL|RUN", type=str)
@click.option("--format", "fmt", type=click.Choice(["html", "onnx"]), required=True,
              help="html: a self-contained page that samples in a browser (weights inline, no network). "
                   "onnx: a step graph (token, h0[, c0] -> logits, h1[, c1]) with ONNX's LSTM/GRU/RNN operators.")
@click.option("-o", "--output", type=str, default=None, metavar="FILE", help="Write here (default: stdout).")
@quiet_option
@handle_errors
def export(model_path, fmt, output, quiet):
    """Take a model out of charrnn: one HTML page that samples from it in a browser, or an ONNX
    model for any ONNX runtime (docs/inspect-and-export.md shows both). Exit status 0 on success,
    1 for a failed operation (a bad checkpoint, an unwritable output, no onnx package), 2 for bad
    usage."""
    import os

    from charrnn import checkpoint, outfile
    from charrnn.rundir import CHECKPOINTS

    outfile.check_writable(output, binary=fmt == "onnx")
    path, _ = checkpoint.resolve(model_path)  # (the path, and whether it was guessed from ./runs)
    ck = checkpoint.load(path)
    if fmt == "onnx":
        from charrnn import export_onnx

        data = export_onnx.to_bytes(ck.model, ck.vocab, ck.meta)
    else:
        from charrnn import export_html

        in_run = os.path.basename(path) in CHECKPOINTS  # a run's best.npz or last.npz: named after the run
        name = os.path.basename(os.path.dirname(os.path.abspath(path)) if in_run else path)
        data = export_html.page(ck.model, ck.vocab, ck.meta, name)
    outfile.write(output, data)
    if not quiet:
        size = len(data.encode("utf-8") if isinstance(data, str) else data)
        click.echo(f"charrnn: wrote {output or 'stdout'} ({fmt}, {size:,} bytes) from {path}", err=True)


# ------------------------------------------------------------------------------------------ viz
