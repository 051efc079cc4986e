"""Small checkpoints for the tests of per-character scores, the pages and the exports: random
weights scaled up so that the model has clear preferences (greedy continuations do not hinge on
near-ties), saved as a real checkpoint that the CLI loads."""


from charrnn import checkpoint
from charrnn.model import Model, ModelConfig
from charrnn.vocab import Vocab

TEXT = ('She said "hello (world)" and left.\nThe cat [sat] on the mat; {x: 1}.\n'
        'def f(a, b):\n    return "a" + b\n')


def make_checkpoint(path, cell="lstm", layers=2, hidden=16, nonlinearity="tanh", seed=0, scale=4.0, text=TEXT,
                    docs=None):
    """Save a model over `text`'s characters at `path`; returns (model, vocab)."""
    vocab = Vocab.from_text(text)
    cfg = ModelConfig(cell=cell, layers=layers, hidden=hidden, vocab_size=vocab.size, nonlinearity=nonlinearity)
    m = Model(cfg).init(seed)
    m.theta[:] *= scale if nonlinearity == "tanh" else 1.0
    checkpoint.save(str(path), m, vocab, {"train": {"docs": docs}})
    return checkpoint.load(str(path)).model, vocab
