"""`charrnn sample`: text from a model, streamed to stdout as the samples advance in lock step, or
one JSON object per sample; beam search; the copy check against the training text.

Not here: drawing and stop strings (generate.py), the beam search itself (beam.py), the copy check's
index (copycheck.py).
"""

from __future__ import annotations

import functools
import json
import math
import os

import click

from charrnn.cli.exits import ResultsOut, handle_errors
from charrnn.cli.options import (announce_compiling, finite, flag, given, ints, model_option, quiet_option, seed_option,
                                 threads_option)
from charrnn.config import BEAM_MAX, PRIME_MAX_BYTES, PRIME_UNKNOWN_MODES, SAMPLE_BOUNDS, SAMPLE_HELD_MAX, format_size

EPILOG_SAMPLE = """\b
Example: charrnn sample --temp 0.8 --length 500 | head -n 20
         charrnn sample --beam 8 --length 200 --num 3
         charrnn sample --prime-file intro.txt --stop $'\\n\\n' --format jsonl | jq .logprob"""


@click.command(epilog=EPILOG_SAMPLE)
@model_option
@click.option("--temp", type=finite(SAMPLE_BOUNDS["temp"]), default=1.0, help="Softmax temperature (0: greedy).")
@click.option("--top-k", type=click.IntRange(min=1), default=None, help="Sample only from the K most likely characters.")
@click.option("--top-p", type=finite(SAMPLE_BOUNDS["top_p"]), default=None, help="Sample from the smallest set holding probability P (nucleus).")
@click.option("--length", type=ints(SAMPLE_BOUNDS["length"]), default=1000,
              help="Characters per sample (0: unbounded, or until the document ends). With --format jsonl, --beam "
                   f"or --num above 1, samples are held until they end: --num x --length (x --beam) at most "
                   f"{SAMPLE_HELD_MAX:,}.")
@click.option("--num", type=ints(SAMPLE_BOUNDS["num"]), default=1, help="Number of samples, separated by a newline.")
@click.option("--prime", type=str, default="", help="Text to warm the model up with; printed first.")
@click.option("--prime-file", type=str, default=None, metavar="PATH",
              help="Read the prime from a file (- for stdin): its text exactly, a final newline included, in "
                   f"UTF-8, at most {format_size(PRIME_MAX_BYTES)} bytes. Not with --prime. Example: --prime-file intro.txt")
@click.option("--no-prime-echo", is_flag=True, help="Do not print the prime text.")
@click.option("--unknown", type=click.Choice(PRIME_UNKNOWN_MODES), default="error", help="Prime characters the model never saw.")
@click.option("--stop", type=str, default=None, metavar="STRING",
              help="End a sample at the first occurrence of STRING in the generated text; STRING itself is not "
                   "printed. Example: --stop $'\\n\\n' (at a blank line)")
@click.option("--beam", type=click.IntRange(1, BEAM_MAX), default=None, metavar="K",
              help="Beam search of width K instead of sampling: the most probable text found, scored at "
                   "temperature 1 (no --temp, --top-k, --top-p or --length 0); --num N (at most K) gives the N "
                   "best. Printed when the search ends, not streamed. Example: --beam 8 --length 200")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32",
              help="The arithmetic of --beam's matrix products: fp32, or bf16 (operands rounded to bfloat16, sums "
                   "in float32), faster on CPUs with AMX or AVX512_BF16 (elsewhere: float32, with a note). The "
                   "texts found may differ from fp32's. --beam 1 and sampling run in float32.")
@click.option("--format", "fmt", type=click.Choice(["text", "jsonl"]), default="text",
              help="text: the samples, one per line. jsonl: one JSON object per sample, with text, prime, seed, "
                   "temp, logprob (natural log, at temperature 1, of the text given the prime) and end (length, "
                   "end or stop). Example: --format jsonl | jq -r .text")
@click.option("--corpus", type=str, default=None, metavar="FILE",
              help="The training text, for the copy check (default: the run's tokens.npy when there is one).")
@click.option("--copy-min", type=click.IntRange(min=0), default=20, metavar="N",
              help="Copy check: jsonl records gain longest_copy (the longest span of the sample found verbatim in "
                   "the training text) and copied_frac (the share of its characters in such spans of at least N "
                   "characters). 0: no copy check.")
@click.option("--copy-report", is_flag=True, help="Text mode: each sample's copy check on stderr.")
@seed_option(None, "Seed for identical output on every run (default: random).")
@threads_option
@quiet_option
@handle_errors
def sample(model_path, temp, top_k, top_p, length, num, prime, prime_file, no_prime_echo, unknown, stop, beam, precision,
           fmt, corpus, copy_min, copy_report, seed, threads, quiet):
    """Generate text from a trained model, streamed to stdout (beam search prints each text when
    the search ends)."""
    from charrnn import checkpoint
    from charrnn import threads as th
    from charrnn.errors import UsageError, VocabError
    from charrnn.generate import SampleOptions, in_order, prime_tokens, random_seed, sample_pieces

    prime, stop = _text_argument("--prime", prime), _text_argument("--stop", stop)
    _check_sample_options(click.get_current_context(), prime, prime_file, stop, beam, length, num, precision)
    held = _held_chars(fmt, beam, num, length)  # what is held in memory, bounded before any work
    out = ResultsOut()
    path, _ = checkpoint.resolve(model_path)  # (the path, and whether it was guessed from ./runs)
    ck = checkpoint.load(path)
    if not quiet:
        cfg = ck.model.cfg
        click.echo(f"charrnn: sampling from {path} ({cfg.cell} {cfg.layers}x{cfg.hidden})", err=True)
    th.set_threads(threads)
    from charrnn.run import Recorded  # the document mode the model was trained in

    documents = Recorded(ck.meta).docs is not None
    if fmt == "jsonl" and length == 0 and not documents and stop is None:
        raise UsageError("--format jsonl writes a sample when it ends, and with --length 0 a sample of a model "
                         "trained without --docs never does: give --length N or --stop STRING")
    if held and fmt == "jsonl" and length == 0:  # until the document ends or --stop, within what may be held
        length = SAMPLE_HELD_MAX // num
    if prime_file is not None:
        prime = _read_prime(prime_file)
    if stop is not None and not quiet and ck.vocab.unknown_chars(stop):
        click.echo(f"charrnn: note: --stop {stop!r} holds characters the model never writes, so it never stops a "
                   "sample", err=True)
    try:
        prime_ids = prime_tokens(ck.vocab, prime, unknown)
    except VocabError as e:
        raise UsageError(f"{'--prime-file' if prime_file is not None else '--prime'}: {e} "
                         "(use --unknown skip or --unknown unk to go on anyway)") from None
    echo = prime if (prime and not no_prime_echo) else ""
    copies = _copy_checker(ck, path, corpus, copy_min, fmt == "jsonl" or copy_report, quiet)
    if beam is not None:
        _beam(ck, prime, prime_ids, beam, length, num, documents, stop, fmt, echo, quiet, out, copies, precision)
        return
    seed = seed if seed is not None else random_seed()  # known, so jsonl can say which
    opts = SampleOptions(temp=temp, top_k=top_k or 0, top_p=top_p if top_p is not None else 1.0,
                         length=length, num=num, prime=prime, unknown=unknown, seed=seed, stop=stop)
    pieces = in_order(sample_pieces(ck.model, ck.vocab, opts, documents=documents))
    with announce_compiling(quiet, "the sampler"):
        if fmt == "jsonl":
            record = functools.partial(_sample_record, ck.model, ck.vocab, prime, prime_ids, seed, temp, copies)
            _write_jsonl_samples(pieces, record, out)
        else:
            report = _copy_report(copies) if copy_report and copies is not None else None
            _write_samples(pieces, num, echo, out, report)


def _copy_checker(ck, path, corpus, copy_min, wanted, quiet):
    """sample's copy check: a function text -> {longest_copy, copied_frac}, or None when it is off
    (--copy-min 0, nothing asks for it) or no training text is at hand (the run's tokens.npy, or
    --corpus FILE). Builds the suffix array once, before sampling (copycheck.py)."""
    from charrnn import copycheck
    from charrnn.errors import UsageError

    if copy_min == 0 or not wanted:
        if corpus is not None:
            raise UsageError("--corpus is for the copy check: give --format jsonl or --copy-report, and --copy-min > 0")
        return None
    if corpus is not None:
        text = _read_corpus(corpus)
        ids = ck.vocab.encode(text, unknown="unk")
        source = corpus
    else:
        run_dir = os.path.dirname(os.path.abspath(path))
        ids = copycheck.training_ids(run_dir, ck.vocab)
        if ids is None:
            if not quiet:
                click.echo("charrnn: note: no copy check: no training text at hand (the run's tokens.npy, or "
                           "--corpus FILE)", err=True)
            return None
        from charrnn.data import TOKENS_FILE

        source = os.path.join(run_dir, TOKENS_FILE)
    index = copycheck.CopyIndex(ids)
    if not quiet:
        click.echo(f"charrnn: copy check against {source}: {len(index):,} tokens indexed in {index.build_s:.1f} s",
                   err=True)

    def check(text: str) -> dict:
        return copycheck.check(index, ck.vocab.encode(text, unknown="unk"), copy_min).to_dict()

    return check


def _copy_report(copies):
    """--copy-report: report(sample, text), the copy check of a sample that has ended, on stderr."""

    def report(sample: int, text: str):
        c = copies(text)
        click.echo(f"charrnn: sample {sample + 1}: longest copy {c['longest_copy']} characters, "
                   f"{100 * c['copied_frac']:.1f}% in copies", err=True)

    return report


def _read_corpus(path: str) -> str:
    from charrnn.data import read_text
    from charrnn.errors import DataError

    try:
        return read_text(path)
    except DataError as e:  # without the reader's hint, which names train's and eval's --encoding
        raise DataError(f"--corpus: {e.reason}") from None


def _check_sample_options(ctx, prime, prime_file, stop, beam, length, num, precision="fp32"):
    """The usage errors of `sample` that need no model: one line each, exit status 2."""
    from charrnn.errors import UsageError

    if prime_file is not None and given(ctx, "prime"):
        raise UsageError("give --prime or --prime-file, not both")
    if stop is not None and not stop:
        raise UsageError("--stop needs a non-empty STRING")
    if beam is None:
        if precision != "fp32":
            raise UsageError(f"--precision {precision} is for --beam K; sampling runs in float32: drop --precision "
                             "or add --beam")
        return
    sampling = [flag(n) for n in ("temp", "top_k", "top_p") if given(ctx, n)]
    if sampling:
        raise UsageError(f"--beam searches for the most probable text at temperature 1 and draws nothing: "
                         f"drop {', '.join(sampling)}")
    if length == 0:
        raise UsageError("--beam needs a --length of at least 1 (a beam search settles nothing until it ends)")
    if num > beam:
        raise UsageError(f"--num {num} needs --beam {num} or wider (the beam returns its N best texts)")


def _held_chars(fmt: str, beam, num: int, length: int) -> bool:
    """Whether the samples are held in memory before they are written (--format jsonl writes a
    sample when it ends, --beam when the search ends, and with --num above 1 a later sample waits
    for the ones before it); then --num x --length (x --beam) is at most SAMPLE_HELD_MAX
    characters, a usage error otherwise (--format text with one sample streams any length)."""
    from charrnn.errors import UsageError

    held = fmt == "jsonl" or beam is not None or num > 1
    if held and length * num * (beam or 1) > SAMPLE_HELD_MAX:
        what = "--format jsonl" if fmt == "jsonl" else "--beam" if beam is not None else "--num above 1"
        raise UsageError(f"with {what} samples are held in memory until they end: --num x --length"
                         f"{' x --beam' if beam else ''} may be at most {SAMPLE_HELD_MAX:,} characters "
                         f"(here {length * num * (beam or 1):,}); one --format text sample streams any --length")
    return held


def _text_argument(name: str, value):
    """A command-line argument that is text (not a path), read as UTF-8 whatever the locale: under
    a C locale Python decodes arguments as ASCII, keeping each other byte as a lone surrogate, so
    the argument's own bytes are decoded again. UsageError when they are not UTF-8 (such bytes
    would be lone surrogates, which no output can write)."""
    from charrnn.errors import UsageError

    if not value:
        return value
    try:
        return os.fsencode(value).decode("utf-8")
    except UnicodeError:
        raise UsageError(f"{name} is not valid UTF-8 text") from None


def _read_prime(path: str) -> str:
    """--prime-file: the text of a file or stdin, read as corpora are (strict UTF-8, a BOM dropped,
    CRLF as \\n); one-line errors for a missing, binary, empty or undecodable file."""
    from charrnn.data import InputTooLarge, Source
    from charrnn.errors import DataError

    try:  # small chunks: an endless pipe (`yes |`) stops at the limit, not 16 MiB later
        with Source([path], None, PRIME_MAX_BYTES, chunk_bytes=1 << 16, reread=False) as src:
            return "".join(src.chunks())
    except InputTooLarge:
        size = format_size(PRIME_MAX_BYTES)
        raise DataError(f"--prime-file: more than {size} bytes, the most a prime may hold (its end may do: "
                        f"tail -c {size} FILE | charrnn sample --prime-file - ...)") from None
    except DataError as e:  # without the reader's hint, which names train's and eval's --encoding
        raise DataError(f"--prime-file: {e.reason}") from None


def _sample_record(model, vocab, prime, prime_ids, seed, temp, copies, text, end) -> dict:
    """The JSON object of one sample: its log-probability is scored once it has ended; with a
    copy check, longest_copy and copied_frac too."""
    from charrnn.generate import continuation_logprob

    logprob = continuation_logprob(model, prime_ids, vocab.encode(text))
    record = {"text": text, "prime": prime, "seed": seed, "temp": temp, "logprob": logprob, "end": end}
    if copies is not None:
        record.update(copies(text))
    return record


def _json_line(record: dict) -> str:
    """One line of JSON (a log-probability that is not finite becomes null: JSON has no -Infinity)."""
    lp = record.get("logprob")
    if lp is not None and not math.isfinite(lp):
        record = dict(record, logprob=None)
    return json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n"


def _write_samples(pieces, num: int, echo: str, out: ResultsOut, report=None):
    """--format text: the samples on stdout as they come, each after the prime `echo`, one per
    line; `pieces` are in sample order (generate.in_order holds a later sample until its turn).
    `report(sample, text)` runs as each sample ends, after it is written."""
    out.write(echo)
    out.flush()
    texts = []  # the current sample's text, for report
    for p in pieces:
        out.write(p.text)
        if report is not None:
            texts.append(p.text)
        if p.end is not None:
            out.write("\n" + (echo if p.stream + 1 < num else ""))
        out.flush()
        if p.end is not None and report is not None:
            report(p.stream, "".join(texts))
            texts = []


def _write_jsonl_samples(pieces, record, out: ResultsOut):
    """--format jsonl: one JSON object per sample, written and flushed as soon as it has ended;
    `pieces` are in sample order (generate.in_order), so each follows the samples before it."""
    texts = []  # the current sample's text
    for p in pieces:
        texts.append(p.text)
        if p.end is not None:
            out.write(_json_line(record("".join(texts), p.end)))
            out.flush()
            texts = []


def _beam(ck, prime, prime_ids, width, length, num, documents, stop, fmt, echo, quiet, out: "ResultsOut",
          copies=None, precision="fp32"):
    """sample --beam: search, then print the texts, best first; each one's log-probability on stderr."""
    from charrnn import precision as prec
    from charrnn.beam import beam_search

    if precision == "bf16" and width > 1:
        if prec.backend() is None:
            click.echo("charrnn: note: this CPU has no bfloat16 products (AVX512_BF16 or AMX); searching in float32",
                       err=True)
            precision = "fp32"
        elif not quiet:
            click.echo(f"charrnn: beam search on {prec.describe('bf16')}", err=True)
    with announce_compiling(quiet, "the beam search"):
        found = beam_search(ck.model, ck.vocab, prime_ids, width, length, num=num, documents=documents, stop=stop,
                            precision=precision)
    for rank, h in enumerate(found, 1):
        if not quiet:
            n = len(h.ids)
            click.echo(f"charrnn: beam {rank}/{len(found)}: log-probability {h.logprob:.4f} nats, {n} "
                       f"character{'' if n == 1 else 's'}, ended by {h.end}; ranked by {h.score:.4f} nats per token",
                       err=True)
        if fmt == "jsonl":
            record = {"text": h.text, "prime": prime, "seed": None, "temp": None, "logprob": h.logprob, "end": h.end}
            out.write(_json_line(dict(record, **(copies(h.text) if copies else {}))))
        else:
            out.write(echo + h.text + "\n")
        out.flush()
