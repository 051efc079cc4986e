"""Pieces several cells share, named for what they do; each cell module says which it uses (an
LSTM and an RNN fold both biases into the input products, a GRU and an RNN keep only h as state).
Called through the generic functions of cells/__init__.py, with the same parameters."""

from charrnn.kernels.mathf import copy


def fold_both_biases(cell, row, b_ih, b_hh):
    """row (n,) += b_ih + b_hh: both biases folded into the input products."""
    for j in range(row.shape[0]):
        row[j] += b_ih[j] + b_hh[j]


def input_side_grad(cell, grad):
    """The gradient of W_hh h + b_hh is the input side's, dG."""
    return grad.dG


def no_carry(cell, dh, direct):
    """Nothing reaches h_{t-1} but through W_hh."""
    pass


def load_h(cell, lay, h, c, s0, s1):
    """hs[0] <- the initial state h (B, H) for streams s0..s1-1 (no c)."""
    for b in range(s0, s1):
        copy(lay.hs[0, b], h[b])


def save_h(cell, lay, T, h, c, s0, s1):
    """h (B, H) <- hs[T] for streams s0..s1-1."""
    for b in range(s0, s1):
        copy(h[b], lay.hs[T, b])


def save_h_grad(cell, dh, dc, dh0, dc0, s0, s1, u0, u1):
    """dh0 (B, H) <- the gradient on the initial h of the block (dh (s1-s0, Hp))."""
    for b in range(s0, s1):
        copy(dh0[b, u0:u1], dh[b - s0])
