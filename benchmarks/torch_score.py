"""Score a charrnn checkpoint with PyTorch alone: an independent check of the number that training
and `charrnn eval` report.

The checkpoint's parameters are loaded by name into torch.nn.LSTM / GRU / RNN + nn.Linear (none
of charrnn's code runs). The held-out split is the one `charrnn train` makes in stream mode: the
characters from round(N * (1 - val_frac)) on. It is fed as <START> c1 ... cN from a zero state, in
spans that carry the state, and every c1..cN is scored; characters outside the vocabulary count as
<UNK>, as in `charrnn eval`.

    python benchmarks/torch_score.py runs/tinyshakespeare/best.npz ../shared/corpora/tinyshakespeare.txt
"""

from __future__ import annotations

import argparse
import json
import math

SPAN = 16_384


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a charrnn .npz (best.npz holds the weights validation used)")
    ap.add_argument("corpus", help="the text the model was trained on")
    ap.add_argument("--val-frac", type=float, default=0.1, help="the run's --val-frac (default 0.1)")
    ap.add_argument("--whole", action="store_true", help="score the whole file instead of its held-out end")
    args = ap.parse_args()

    import numpy as np
    import torch
    from torch import nn

    z = np.load(args.checkpoint, allow_pickle=False)
    meta = json.loads(str(z["meta"]))
    vocab, cell, layers, hidden = meta["vocab"], meta["cell"], meta["layers"], meta["hidden"]
    ids = {tok: i for i, tok in enumerate(vocab)}
    if cell == "rnn":
        rnn = nn.RNN(len(vocab), hidden, layers, nonlinearity=meta.get("nonlinearity", "tanh"))
    else:
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell](len(vocab), hidden, layers)
    dec = nn.Linear(hidden, len(vocab))
    with torch.no_grad():
        for prefix, module in (("rnn.", rnn), ("decoder.", dec)):
            for name, p in module.named_parameters():
                value = torch.from_numpy(np.ascontiguousarray(z[prefix + name]))
                if tuple(value.shape) != tuple(p.shape):
                    raise SystemExit(f"{prefix}{name}: shape {tuple(value.shape)}, torch wants {tuple(p.shape)}")
                p.copy_(value)

    with open(args.corpus, encoding="utf-8") as f:
        text = f.read()
    held = text if args.whole else text[int(round(len(text) * (1.0 - args.val_frac))):]
    unk = ids["<UNK>"]
    tokens = torch.tensor([ids["<START>"]] + [ids.get(ch, unk) for ch in held])
    unknown = int((tokens == unk).sum())  # no character of a text is the token <UNK> itself

    total, state = 0.0, None
    with torch.no_grad():
        for a in range(0, len(tokens) - 1, SPAN):
            y = tokens[a + 1:a + SPAN + 1]
            x = tokens[a:a + len(y)]
            onehot = nn.functional.one_hot(x, len(vocab)).to(torch.float32).unsqueeze(1)
            out, state = rnn(onehot, state)
            logp = torch.log_softmax(dec(out.squeeze(1)).to(torch.float64), dim=-1)
            total -= logp[torch.arange(len(y)), y].sum().item()
    n = len(tokens) - 1
    nats = total / n
    print(f"{args.checkpoint}: torch.nn.{type(rnn).__name__} {layers}x{hidden} + Linear, torch {torch.__version__}")
    print(f"{n:,} characters ({unknown:,} unknown): {nats:.4f} nats/char, {nats / math.log(2):.4f} bits/char")


if __name__ == "__main__":
    main()
