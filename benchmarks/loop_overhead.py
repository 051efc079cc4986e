"""What the training loop adds to the bare training steps.

Bare: forward + backward + clipping + Adam on batches of tiny Shakespeare, in a plain Python loop.
Loop: `charrnn train` (through charrnn.train.Trainer) on the same corpus, model, batch and steps,
with validation excluded from its timing (it reports chars/s over the training steps only: batch
assembly, dropout masks, the non-finite check, the schedule, progress reporting and bookkeeping).
Interleaved rounds, medians; the target is an overhead under 5%. The two rates move with the
machine's speed (20-30% within minutes on shared machines), so the loop's own time is also
measured inside its run: step time minus the time in the calls the bare loop makes too.

    python benchmarks/loop_overhead.py [--hidden 256] [--steps 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np

from tinyshakespeare import required as corpus_path  # --corpus, $CHARRNN_CORPUS, ../shared/corpora, or a download


def bare(text, hidden, batch, seq, steps, dropout):
    from charrnn import threads
    from charrnn.data import BatchStream, encode_stream
    from charrnn.model import Model, ModelConfig
    from charrnn.optim import clip_grad_norm, make_optimizer
    from charrnn.vocab import Vocab

    threads.set_threads(None)
    vocab = Vocab.from_text(text)
    stream = BatchStream(encode_stream(vocab, text[: int(len(text) * 0.9)], None, dtype=np.uint8), batch)
    m = Model(ModelConfig(layers=2, hidden=hidden, vocab_size=vocab.size, dropout=dropout)).init(1)
    opt = make_optimizer("adam", m.n_params, m.dtype, 2e-3)
    h, c = m.zero_state(batch)
    masks = None
    pos = 0
    t0 = None
    for step in range(steps + 5):
        if step == 5:
            t0 = time.perf_counter()
        x, y = stream.get(pos, seq)
        if dropout:
            masks = m.dropout_masks(seq, batch, 1, step, out=masks)
        out = m.forward_backward(x, y, h, c, masks=masks)
        clip_grad_norm(out["grad"], 5.0)
        opt.step(m.theta, out["grad"], 2e-3)
        h, c = out["h"], out["c"]
        pos = (pos + seq) % (stream.S - seq)
    return steps * batch * seq / (time.perf_counter() - t0)


def loop(corpus, hidden, batch, seq, steps, dropout):
    """chars/s of `charrnn train`'s steps, and the share of their time spent outside the work the
    bare loop also does (forward/backward, dropout masks, clipping, the Adam update), timed in the
    same steps: unlike the two rates, that share does not move when the machine's speed does."""
    from charrnn import step, train
    from charrnn.config import TrainConfig
    from charrnn.model import Model

    work = [0.0]

    def timed(f):
        def g(*args, **kwargs):
            t = time.perf_counter()
            try:
                return f(*args, **kwargs)
            finally:
                work[0] += time.perf_counter() - t
        return g

    def warm_up(self, *args, _orig=Model.warm_up, **kwargs):
        _orig(self, *args, **kwargs)
        work[0] = 0.0  # compilation and warm-up steps are not training steps

    saved = (Model.forward_backward, Model.dropout_masks, Model.warm_up, step.clip_grad_norm)
    Model.forward_backward, Model.dropout_masks = timed(Model.forward_backward), timed(Model.dropout_masks)
    Model.warm_up, step.clip_grad_norm = warm_up, timed(step.clip_grad_norm)
    try:
        with tempfile.TemporaryDirectory() as d:
            # no --seq-warmup: its short steps would compare the curriculum, not the loop, with bare steps
            cfg = TrainConfig(hidden=hidden, batch=batch, seq=seq, steps=steps, dropout=dropout, eval_every=10**9, seq_warmup=0)
            tr = train.Trainer.new([corpus], cfg, os.path.join(d, "run"), quiet=True)
            tr.precompile.wait()  # its warm-up calls are not the run's
            tr.opt.step = timed(tr.opt.step)
            cps = tr.run()["chars_per_s"]
    finally:
        Model.forward_backward, Model.dropout_masks, Model.warm_up, step.clip_grad_norm = saved
    t_steps = steps * batch * seq / cps
    return cps, (t_steps - work[0]) / work[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--corpus", default=None)
    args = ap.parse_args()
    args.corpus = corpus_path(args.corpus)
    text = open(args.corpus, encoding="utf-8").read()
    b, lp, own = [], [], []
    for r in range(args.rounds):
        b.append(bare(text, args.hidden, args.batch, args.seq, args.steps, args.dropout))
        cps, share = loop(args.corpus, args.hidden, args.batch, args.seq, args.steps, args.dropout)
        lp.append(cps)
        own.append(share)
        print(f"round {r}: bare {b[-1]:,.0f} chars/s, loop {lp[-1]:,.0f} chars/s, "
              f"loop's own time {100 * share:.2f}% of its steps' work", flush=True)
    mb, ml = statistics.median(b), statistics.median(lp)
    print(f"median: bare {mb:,.0f} chars/s, loop {ml:,.0f} chars/s, overhead {100 * (mb / ml - 1):.1f}%; "
          f"loop's own time {100 * statistics.median(own):.2f}% of the work inside its steps")


if __name__ == "__main__":
    main()
