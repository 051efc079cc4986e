"""Replicating a run to the other workers: rank 0 sets the run up (new or resumed) and owns its
directory; every other worker is built from rank 0's run record and arrays (never from its
trainer's attributes), on a token file of its own host, and checked against rank 0's corpus.

Not here: the launcher (launcher.py), the collectives (workers.py), a rank's run (rank.py), setting
a run up (setup.py).
"""

from __future__ import annotations

import os

import numpy as np

from charrnn.errors import CharrnnError
from charrnn.parallel.workers import LocalError, Quiet, threads_per_worker
from charrnn.run import Run


def build(workers, make, quiet: bool):
    """Every worker's Trainer: rank 0's run from `make(quiet)` (a setup.Prepared), the others'
    from what rank 0 sends (spec), each on the token file of its host (host_tokens); then rank 0's
    arrays on all. Collective. Whatever stops it (an interrupt between rank 0's make and training
    included), rank 0 gives its run directory back: removed when the run made it and saved
    nothing in it."""
    from charrnn.train import Trainer

    made = []
    try:
        prep = _prepare(workers, make, quiet, made)
    except BaseException:
        for p in made:
            p.close()
        raise
    workers.set_out(prep.out)
    # the workers that write nothing say nothing: rank 0 speaks for the run
    return Trainer(prep, quiet or not workers.root, team=workers, threads_default=threads_per_worker(workers.local_size))


def _prepare(workers, make, quiet: bool, made: list):
    prep = None
    if workers.root:
        try:
            prep = make(quiet)
            made.append(prep)
            if prep.rundir is not None and prep.rundir.created:  # the launcher's to remove if we die unsaved
                workers.tell_launcher("created", os.path.abspath(prep.out))
            workers.set_batch(prep.record.config.batch)
            spec = spec_of(prep)
        except BaseException as e:
            workers.share(("error", getattr(e, "exit_code", 1)))
            raise
        workers.share(("ok", spec))
    else:
        kind, spec = workers.share(None)
        if kind == "error":
            raise Quiet(spec)
    error = None
    try:
        if not workers.root:
            workers.set_batch(Run.from_wire(spec["run"]).config.batch)
        path = host_tokens(workers, spec)
        if not workers.root:
            prep = follow(spec, path)
    except CharrnnError as e:
        error = e
    # every worker says whether it is ready; one that is not has said why
    failed = workers.allgather(0 if error is None else error.exit_code)
    if any(failed):
        if error is not None and not isinstance(error, Quiet):
            raise LocalError(f"worker {workers.rank} on {workers.host}: {error}") from None
        raise Quiet(max(failed))
    share_arrays(workers, prep)
    return prep


def spec_of(prep) -> dict:
    """What the other workers need to become rank 0's run, but its arrays: the run record, where
    the run's directory and token file are, and this process's budget."""
    return {"run": prep.record.to_wire(), "out": prep.out, "extra_minutes": prep.extra_minutes,
            "tokens": {"path": os.path.abspath(prep.tokens.path), "meta": prep.tokens.meta}}


# Where a host other than rank 0's keeps its copy of the token file: this directory if set (a
# node-local disk), else the run directory's own file if the host sees it (a shared filesystem),
# else the temporary directory. Copies are kept by content (corpus hash, vocabulary, split), so a
# later run on the same corpus maps the one already there.
TOKEN_DIR_VARIABLE = "CHARRNN_TOKEN_DIR"


def host_tokens(workers, spec: dict) -> str:
    """The path of the token file this worker maps: on rank 0's host, the run directory's
    tokens.npy (rank 0 wrote it); on another host, the one its first worker found or built
    (_host_copy). Collective within each host: its workers map one file, so the corpus is in
    memory once per machine (the page cache's pages, shared)."""
    if workers.local_rank == 0:
        try:
            path = spec["tokens"]["path"] if workers.root else _host_copy(spec)
        except BaseException:
            workers.host_comm.bcast(None, root=0)
            raise
        workers.host_comm.bcast(path, root=0)
        return path
    path = workers.host_comm.bcast(None, root=0)
    if path is None:
        raise Quiet(1)  # this host's first worker failed, and said why
    return path


def _host_copy(spec: dict) -> str:
    """The token file of a host that is not rank 0's: rank 0's own (a shared filesystem), one built
    earlier, or a new one, encoded from this host's copy of the corpus after checking its hash."""
    import hashlib
    import json
    import tempfile

    from charrnn.data import TOKENS_FILE, build_token_file, map_token_file, read_corpus

    meta = spec["tokens"]["meta"]
    base = os.environ.get(TOKEN_DIR_VARIABLE)
    if not base and map_token_file(spec["tokens"]["path"], meta) is not None:
        return spec["tokens"]["path"]
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:24]
    directory = os.path.join(base or os.path.join(tempfile.gettempdir(), f"charrnn-tokens-{os.getuid()}"), key)
    path = os.path.join(directory, TOKENS_FILE)
    if map_token_file(path, meta) is not None:
        return path
    run = Run.from_wire(spec["run"])
    given, paths = run.given, list(run.corpus.paths)
    corpus = read_corpus(paths, given.encoding, given.docs, given.max_input)
    try:
        if corpus.sha256 != run.corpus.sha256:
            raise CharrnnError(f"the corpus {', '.join(paths)} is not rank 0's (its hash differs); "
                               "every host needs the same corpus at the same path")
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            raise CharrnnError(f"cannot make {directory} for this host's token file: {e.strerror or e} (set "
                               f"{TOKEN_DIR_VARIABLE})") from None
        tokens = build_token_file(corpus, run.vocab, given.val_frac, path)
    finally:
        corpus.close()
    if tokens.meta != meta:
        raise CharrnnError(f"this host's token file {path} differs from rank 0's (another charrnn version?)")
    return path


def follow(spec: dict, path: str):
    """A run like rank 0's (setup.Prepared), for a worker that writes nothing, on the token file at
    `path`; its arrays come from rank 0 (share_arrays)."""
    import platform

    from charrnn import precision
    from charrnn.data import map_token_file
    from charrnn.model import Model
    from charrnn.setup import Prepared

    tokens = map_token_file(path, spec["tokens"]["meta"])
    if tokens is None:
        raise CharrnnError(f"cannot map the token file {path} (missing, or not rank 0's)")
    run = Run.from_wire(spec["run"])
    if run.fitted.precision == "bf16" and precision.backend() is None:  # every worker computes as rank 0 does
        raise CharrnnError(f"this worker's CPU ({platform.node()}) has no bfloat16 products, and rank 0 chose "
                           "bf16: give --precision fp32")
    model = Model(run.model, dtype=np.dtype(run.dtype))
    opt = run.make_optimizer(model.n_params, model.dtype)
    return Prepared(run, model, opt, tokens, spec["out"], extra_minutes=spec["extra_minutes"])


def share_arrays(workers, prep):
    """Rank 0's parameters, optimizer moments, step count and averaged weights on every worker, and
    each worker's streams of the carried state (prep.carried: rank 0's every stream, then each
    worker's own)."""
    model = prep.model
    workers.share_array(model.theta)
    bufs = prep.opt.state_buffers()
    for key in sorted(bufs):
        workers.share_array(bufs[key])
    t = workers.share(prep.opt.t)
    prep.opt.load_state(bufs, t)
    if prep.record.config.average != "off":
        if prep.averaged is None:
            prep.averaged = np.zeros(model.n_params, model.dtype)
        workers.share_array(prep.averaged)
    if workers.root:
        h_all, c_all = prep.carried if prep.carried is not None else model.zero_state(prep.record.config.batch)
    else:
        h_all = c_all = None
    h, c = model.zero_state(workers.b1 - workers.b0)
    workers.scatter_state(h_all, c_all, h, c)
    prep.carried = (h, c)
