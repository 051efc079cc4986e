"""`charrnn viz`: a text coloured by the model's surprisal, as a page or for a terminal.

Not here: the analysis and the page (viz.py).
"""

from __future__ import annotations

import click

from charrnn.cli.exits import handle_errors
from charrnn.cli.options import announce_compiling, document_mode, model_option, quiet_option, threads_option
from charrnn.config import ACTIVATIONS, DOC_MODES

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
    path, _ = checkpoint.resolve(model_path)  # (the path, and whether it was guessed from ./runs)
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
    with announce_compiling(quiet, "the scorer"):
        analysis = vz.analyse(ck.model, ck.vocab, text, docs, top, activation=activation)
    if ansi:
        outfile.write(output, vz.ansi(analysis))
    else:
        name = "<stdin>" if file == "-" else os.path.basename(file)
        outfile.write(output, vz.page(ck.model, analysis, f"charrnn viz: {name}"))
    if not quiet:
        s = analysis.score
        click.echo(f"charrnn: {s.bits:.3f} bits/char over {s.tokens:,} positions; wrote {output or 'stdout'}", err=True)
