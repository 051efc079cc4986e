"""The commands that read a model and show it or hand it out: `charrnn info` (the model card),
`charrnn export` (an HTML page or an ONNX model) and `charrnn viz` (a text coloured by surprisal).

Not here: the card (info.py), the exports (export_html.py, export_onnx.py), the analysis (viz.py).
"""

from __future__ import annotations

import click

from charrnn.cli.exits import ResultsOut, handle_errors
from charrnn.cli.options import compile_notice, document_mode, model_option, quiet_option, threads_option
from charrnn.config import ACTIVATIONS, DOC_MODES

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
    path, guessed = checkpoint.resolve(model_path)
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
EPILOG_VIZ = """\b
Example: charrnn viz sonnets.txt --model runs/shakespeare -o sonnets.html
         head -c 3000 notes.txt | charrnn viz - --ansi | less -R"""


@click.command(epilog=EPILOG_VIZ)
@click.argument("file", type=str)
@model_option
@click.option("-o", "--output", type=str, default=None, metavar="FILE", help="Write the page here (default: stdout).")
@click.option("--ansi", is_flag=True, help="Print the text coloured by surprisal for a terminal instead of a page.")
@click.option("--docs", type=click.Choice([*DOC_MODES, "none"]), default=None,
              help="Score as documents (default: as the model was trained).")
@click.option("--top", type=click.IntRange(1, 20), default=5, metavar="N", help="Guesses shown per character.")
@click.option("--activation", type=click.Choice(ACTIVATIONS), default=None,
              help="What a unit shows: cell, an LSTM's cell state tanh(c) (the default for LSTMs), or h, the "
                   "hidden state (the only one of a GRU or RNN).")
@click.option("--encoding", type=str, default=None, help="Text encoding of FILE (default: strict UTF-8).")
@threads_option
@quiet_option
@handle_errors
def viz(file, model_path, output, ansi, docs, top, activation, encoding, threads, quiet):
    """Show what a model learned on a text (up to 20,000 characters; - for stdin): one
    self-contained HTML page with the text coloured by the model's surprisal, its top guesses at
    each character, and any hidden unit's activation, with a ranked list of units that follow
    quotes, brackets, line position or word starts (docs/inspect-and-export.md). Exit status 0 on
    success, 1 for a failed operation (a bad checkpoint or text, a text too long, an unwritable
    output), 2 for bad usage."""
    import os

    from charrnn import checkpoint, outfile
    from charrnn import threads as th
    from charrnn import viz as vz
    from charrnn.data import InputTooLarge, read_text
    from charrnn.errors import DataError

    outfile.check_writable(output)
    path, guessed = checkpoint.resolve(model_path)
    ck = checkpoint.load(path)
    th.set_threads(threads)
    try:
        text = read_text(file, encoding, max_input=4 * vz.MAX_CHARS + 4)  # UTF-8: at most 4 bytes a character
    except InputTooLarge:
        text = None
    if text is None or len(text) > vz.MAX_CHARS:
        raise DataError(f"{file}: text too long for a page: "
                        f"{f'more than {vz.MAX_CHARS:,}' if text is None else f'{len(text):,}'} characters, the limit is "
                        f"{vz.MAX_CHARS:,} "
                        f"(show a part, e.g. head -c {vz.MAX_CHARS} {file} > part.txt)")
    docs = document_mode(docs, ck.meta)
    if not quiet:
        click.echo(f"charrnn: scoring {len(text):,} characters with {path}", err=True)
    with compile_notice(quiet, "the scorer"):
        analysis = vz.analyse(ck.model, ck.vocab, text, docs, top, activation=activation)
    if ansi:
        outfile.write(output, vz.ansi(analysis))
    else:
        name = "<stdin>" if file == "-" else os.path.basename(file)
        outfile.write(output, vz.page(ck.model, analysis, f"charrnn viz: {name}"))
    if not quiet:
        s = analysis.score
        click.echo(f"charrnn: {s.bits:.3f} bits/char over {s.tokens:,} positions; wrote {output or 'stdout'}", err=True)
