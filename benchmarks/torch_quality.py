"""PyTorch's 2x256 LSTM trained on tiny Shakespeare for a time budget: the reference curve the
issue quotes, reproduced on this machine, to compare with `benchmarks/quality_curve.py`.

The issue's setting: nn.LSTM(dropout=p) (dropout between the layers only), a linear decoder,
Adam at a constant 2e-3, batches of 32 x 64, gradient norm clipped at 5, the last 10% held out.
Two data orders:

- streams: B contiguous streams with the hidden state carried between batches (what charrnn does);
- random:  B windows at random offsets, each starting from a zero state.

Training time excludes validation (a full pass over the held-out text after each minute).

    python benchmarks/torch_quality.py --order streams --minutes 5
"""

from __future__ import annotations

import argparse
import os
import time

from tinyshakespeare import required as corpus_path  # --corpus, $CHARRNN_CORPUS, ../shared/corpora, or a download


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--order", choices=["streams", "random"], default="streams")
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--corpus", default=None)
    args = ap.parse_args()
    args.corpus = corpus_path(args.corpus)

    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    text = open(args.corpus, encoding="utf-8").read()
    chars = sorted(set(text))
    V = len(chars)
    index = {c: i for i, c in enumerate(chars)}
    ids = torch.from_numpy(np.array([index[c] for c in text], dtype=np.int64))
    cut = int(len(ids) * 0.9)
    train, val = ids[:cut], ids[cut:]
    B, T = 32, 64

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(V, args.hidden, 2, dropout=args.dropout)
            self.dec = nn.Linear(args.hidden, V)

        def forward(self, x, state=None):
            out, state = self.rnn(F.one_hot(x, V).float(), state)
            return self.dec(out), state

    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)

    def validate():
        net.eval()
        with torch.no_grad():
            logits, _ = net(val[:-1].view(-1, 1))
            loss = F.cross_entropy(logits.view(-1, V), val[1:]).item()
        net.train()
        return loss

    S = (len(train) - 1) // B
    starts = torch.arange(B) * S
    pos, state, spent, chars_done, next_mark = 0, None, 0.0, 0, 60.0
    print(f"torch {torch.__version__}, {args.threads} thread(s), order {args.order}, dropout {args.dropout}")
    while spent < args.minutes * 60:
        t0 = time.perf_counter()
        if args.order == "random":
            offs = torch.randint(0, len(train) - T - 1, (B,))
            state = None
        else:
            if pos + T > S:
                pos, state = 0, None
            offs = starts + pos
            pos += T
        idx = offs[None, :] + torch.arange(T)[:, None]
        logits, new_state = net(train[idx], state)
        loss = F.cross_entropy(logits.view(-1, V), train[idx + 1].reshape(-1))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()
        if args.order == "streams":
            state = tuple(s.detach() for s in new_state)
        chars_done += B * T
        spent += time.perf_counter() - t0
        if spent >= next_mark or spent >= args.minutes * 60:
            next_mark += 60.0
            print(f"  {spent / 60:5.2f} min  {chars_done:10,d} chars  {chars_done / spent:8,.0f} chars/s  "
                  f"val {validate():.4f}  train {loss.item():.4f}", flush=True)


if __name__ == "__main__":
    main()
