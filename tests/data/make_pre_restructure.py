"""How tests/data/pre_restructure_* were made: checkpoints written by charrnn before the kernels
were split (commit ff38e64), and what that code computed with them. tests/test_checkpoint.py
checks that today's code loads them, gives the same logits, samples and scores, and resumes the
LSTM run to the same weights as the old code's uninterrupted run.

    git worktree add /tmp/old ff38e64
    PYTHONPATH=/tmp/old python tests/data/make_pre_restructure.py

Not part of the test suite (it needs the old code).
"""

import json
import os
import shutil
import sys
import tempfile

import numpy as np
from click.testing import CliRunner

import charrnn
from charrnn import checkpoint
from charrnn.cli import cli
from charrnn.evaluate import score_text
from charrnn.generate import SampleOptions, sample_chunks

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SMALL = ["--hidden", "16", "--layers", "2", "--batch", "8", "--seq", "16", "--threads", "1", "-q", "--seq-warmup", "4"]
PROBE = "the cat sat. and then"


def main():
    old = os.path.exists(os.path.join(os.path.dirname(charrnn.__file__), "kernels", "core.py"))
    assert old, "run this with the old code on PYTHONPATH"
    tmp = tempfile.mkdtemp()
    corpus = os.path.join(tmp, "markov.txt")
    with open(os.path.join(ROOT, "corpora", "markov.txt"), encoding="utf-8") as f:
        text = f.read()[:12000]
    with open(corpus, "w", encoding="utf-8") as f:
        f.write(text)
    record = {"corpus": "corpora/markov.txt, first 12000 characters", "probe": PROBE, "runs": {}}
    finals = {}  # the weights of the same runs trained for 8 steps without stopping
    for name, extra in (("lstm", ["--cell", "lstm", "--dropout", "0.2"]), ("gru", ["--cell", "gru"]),
                        ("rnn", ["--cell", "rnn", "--nonlinearity", "relu"])):
        full, part = os.path.join(tmp, name + "-full"), os.path.join(tmp, name + "-part")
        for out, steps in ((full, 8), (part, 4)):
            res = CliRunner().invoke(cli, ["train", corpus, "--out", out, "--steps", str(steps), "--eval-every", "4",
                                           *extra, *SMALL], catch_exceptions=False)
            assert res.exit_code == 0, res.output
        shutil.copy(os.path.join(part, "last.npz"), os.path.join(HERE, f"pre_restructure_{name}.npz"))
        ck = checkpoint.load(os.path.join(part, "last.npz"))
        m, v = ck.model, ck.vocab
        ids = v.encode(PROBE, unknown="unk")
        h, c = m.zero_state(1)
        logits = [m.feed(np.array([0]), h, c)[0].tolist()]
        for i in ids[:-1]:
            logits.append(m.feed(np.array([i]), h, c)[0].tolist())
        greedy = "".join(t for _, t, _ in sample_chunks(m, v, SampleOptions(temp=0.0, length=60, prime="the ", seed=1)))
        with np.load(os.path.join(full, "last.npz"), allow_pickle=False) as z:
            finals.update({f"{name}/{k}": z[k] for k in z.files if k.startswith(("rnn.", "decoder."))})
        record["runs"][name] = {"logits": logits, "greedy": greedy, "score": score_text(m, v, PROBE).nll}
    with open(os.path.join(HERE, "pre_restructure.json"), "w", encoding="utf-8") as f:
        json.dump(record, f)
    np.savez_compressed(os.path.join(HERE, "pre_restructure_final.npz"), **finals)
    print("wrote", sorted(os.listdir(HERE)))


if __name__ == "__main__":
    sys.exit(main())
