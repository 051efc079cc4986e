"""The Elman RNN cell, in one place: PyTorch's equations,

    h' = act(W_ih x + b_ih + W_hh h + b_hh),   act = tanh, or relu when cell.relu

State slots of a layer's buffers (Layer): hs only; the activated gates (= h_t) are saved in
gates. Blocks, hp and the callers: as in lstm.py.
"""

from collections import namedtuple

from charrnn.kernels.cells import common
from charrnn.kernels.mathf import cast, tanh

RNN = namedtuple("RNN", ["G", "relu"], defaults=[1, False])
SLOTS = set()  # gates and hs only
FORGET_GATE = None


def forward(cell, lay, t, s0, s1, u0, u1, hp, b_hh):
    """Step t of the block. lay.gates[t] in: x W_ih^T + b_ih + b_hh; out: h_t (saved). Writes
    hs[t+1] for the block. hp (s1-s0, Hp)."""
    Hp = u1 - u0
    zero = cast(lay.gates[0, 0, 0], 0.0)
    relu = cell.relu
    for b in range(s0, s1):
        g, p, h_t = lay.gates[t, b, u0:u1], hp[b - s0], lay.hs[t + 1, b, u0:u1]
        for j in range(Hp):
            a = g[j] + p[j]
            h = max(a, zero) if relu else tanh(a)
            g[j] = h
            h_t[j] = h


def backward(cell, lay, grad, t, s0, s1, u0, u1, dh, dc, direct):
    """Gradient of the block's pre-activations at step t into grad.dG[t] (the recurrent side is
    the same). dh (s1-s0, Hp) in: gradient on h_t through step t+1."""
    Hp = u1 - u0
    one = cast(lay.gates[0, 0, 0], 1.0)
    zero = cast(lay.gates[0, 0, 0], 0.0)
    relu = cell.relu
    for b in range(s0, s1):
        g, d, dH_t, dh_b = lay.gates[t, b, u0:u1], grad.dG[t, b, u0:u1], grad.dH[t, b, u0:u1], dh[b - s0]
        for j in range(Hp):
            h = g[j]
            dht = dH_t[j] + dh_b[j]
            if relu:
                d[j] = dht if h > zero else zero
            else:
                d[j] = dht * (one - h * h)


fold_bias = common.fold_both_biases  # row += b_ih + b_hh
recurrent_grad = common.input_side_grad  # the recurrent side's gradient is dG itself
carry = common.no_carry  # nothing reaches h_{t-1} but through W_hh
load_state, save_state, save_state_grad = common.load_h, common.save_h, common.save_h_grad  # h only
