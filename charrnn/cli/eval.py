"""`charrnn eval`: a score per file (nats, bits per character, perplexity), or one JSON line per
scored character (--per-char); files read in chunks and scored as they come.

Not here: the score (evaluate.py, perchar.py), reading text (data/).
"""

from __future__ import annotations

import json

import click

from charrnn.cli.exits import ResultsOut, handle_errors
from charrnn.cli.options import announce_compiling, document_mode, given, max_input_option, model_option, quiet_option, threads_option
from charrnn.config import DOC_MODES

EPILOG_EVAL = "Example: charrnn eval sonnets.txt --json"


@click.command("eval", epilog=EPILOG_EVAL)
@click.argument("files", nargs=-1, required=True, type=str)
@model_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per file on stdout.")
@click.option("--docs", type=click.Choice([*DOC_MODES, "none"]), default=None,
              help="Score as documents (default: as the model was trained).")
@click.option("--encoding", type=str, default=None, help="Text encoding of the files (default: strict UTF-8).")
@click.option("--per-char", is_flag=True,
              help="One JSON object per scored character instead (char, logprob, rank, top), streamed; one FILE. "
                   "Example: charrnn eval notes.txt --per-char | jq -c 'select(.rank > 10)'")
@click.option("--top", type=click.IntRange(0, 100), default=5, metavar="N",
              help="--per-char: the model's N best guesses at each character, as [char, probability] pairs.")
@max_input_option
@threads_option
@quiet_option
@handle_errors
def eval_cmd(files, model_path, as_json, docs, per_char, top, encoding, max_input, threads, quiet):
    """Score text: negative log-likelihood per character (nats), bits per character, perplexity.

    With --per-char: one line of JSON per scored position (a document's <END> too, in document
    mode): its char, logprob (natural log), rank (1: the model's first guess) and top guesses;
    the logprobs sum to -nll of the file's score."""
    from charrnn import checkpoint
    from charrnn import threads as th
    from charrnn.data import Source
    from charrnn.errors import UsageError
    from charrnn.evaluate import score_chunks

    out = ResultsOut()
    if files.count("-") > 1:
        raise UsageError("stdin ('-') can be given only once")
    if per_char and (len(files) > 1 or as_json):
        raise UsageError("--per-char scores one FILE and writes its own JSON lines (no --json)")
    if not per_char and given(click.get_current_context(), "top"):
        raise UsageError("--top goes with --per-char")
    path, _ = checkpoint.resolve(model_path)  # (the path, and whether it was guessed from ./runs)
    ck = checkpoint.load(path)
    if not quiet:
        click.echo(f"charrnn: scoring with {path}", err=True)
    th.set_threads(threads)
    docs = document_mode(docs, ck.meta)
    for fname in files:
        # read in chunks of 1 MiB and scored as they come: memory does not grow with the file
        with Source([fname], encoding, max_input, chunk_bytes=1 << 20, reread=False) as source:
            tally = _progress(fname, quiet)
            progress = None if tally.quiet else tally.add
            try:
                with announce_compiling(quiet, "the scorer"):
                    if per_char:
                        score = _per_char(ck, source.chunks(), docs, top, progress, out)
                    else:
                        score = score_chunks(ck.model, ck.vocab, source.chunks(), docs=docs, progress=progress)
            finally:
                tally.close()
        name = "<stdin>" if fname == "-" else fname
        if per_char:
            if not quiet:
                click.echo(f"charrnn: {name}: {score.nats:.4f} nats/char over {score.tokens:,} positions "
                           f"(the logprobs sum to {-score.nll:.6f})", err=True)
            continue
        if as_json:
            record = {"file": name, "model": path, "docs": docs}
            record.update(score.to_dict())
            out.write(json.dumps(record) + "\n")
        else:
            out.write(f"{name}: {score.nats:.4f} nats/char, {score.bits:.4f} bits/char, perplexity {score.perplexity:.3f}, "
                      f"{score.tokens:,} {'tokens' if docs else 'chars'} scored ({score.unk:,} unknown)\n")
        out.flush()


def _per_char(ck, chunks, docs, top, progress, out: "ResultsOut"):
    """eval --per-char: the JSON lines, written as the spans are scored; returns the file's Score."""
    from charrnn.perchar import PerCharScorer, iter_positions

    scorer = PerCharScorer(ck.model, ck.vocab, top, progress)
    for p in iter_positions(scorer, chunks, docs):
        out.write(json.dumps(p.to_dict(), ensure_ascii=False) + "\n")
    out.flush()
    return scorer.score


def _progress(fname: str, quiet: bool):
    """The characters of `fname` scored so far, on stderr (progress.Tally): a bar on a terminal,
    else a line every 30 s (only long inputs get one); nothing with -q."""
    from charrnn.progress import Tally

    name = "<stdin>" if fname == "-" else fname
    return Tally(quiet, name, "char",
                 lambda n, rate: f"charrnn: scoring {name}: {n:,} characters so far, {rate:,.0f} chars/s")
