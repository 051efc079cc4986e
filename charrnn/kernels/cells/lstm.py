"""The LSTM cell, in one place: its gates, its forward and backward blocks, its bias fold and its
state slots. PyTorch's equations and gate order:

    i, f, g, o = split(W_ih x + b_ih + W_hh h + b_hh)     (i, f, o sigmoid; g tanh)
    c' = f * c + i * g
    h' = o * tanh(c')

State slots of a layer's buffers (charrnn/kernels/layout.py, Layer): hs and cs (h and c at every
step, [0] the initial state) and tcs (tanh(c) at every step, saved for the backward pass).

Every function here works on one block: step t, streams s0..s1-1, units u0..u1-1. The loops that
call them (bptt.py for training, score.py for scoring, sample.py for sampling) decide the blocks
and compute the recurrent product hp = h_{t-1} @ W_hh^T for the block's rows of W_hh, gate-major
(hp row b: [i of units u0..u1-1, f ..., g ..., o ...]).
"""

from collections import namedtuple

from charrnn.kernels.cells import common
from charrnn.kernels.mathf import cast, copy, sigmoid, tanh

LSTM = namedtuple("LSTM", ["G"], defaults=[4])
SLOTS = {"cs", "tcs"}  # the buffers it uses beside gates and hs (layout.Layer): c, and tanh(c) for backward
FORGET_GATE = 1  # the gate block an initial forget bias goes to (i, f, g, o)


def forward(cell, lay, t, s0, s1, u0, u1, hp, b_hh):
    """Step t of the block. lay.gates[t] in: x W_ih^T + b_ih + b_hh; out: activated i, f, g, o.
    Writes hs[t+1], cs[t+1], tcs[t] for the block. hp (s1-s0, 4*Hp)."""
    H = lay.hs.shape[2]
    Hp = u1 - u0
    for b in range(s0, s1):
        row, p = lay.gates[t, b], hp[b - s0]
        gi, gf, gg, go = row[u0:u1], row[H + u0 : H + u1], row[2 * H + u0 : 2 * H + u1], row[3 * H + u0 : 3 * H + u1]
        pi, pf, pg, po = p[:Hp], p[Hp : 2 * Hp], p[2 * Hp : 3 * Hp], p[3 * Hp : 4 * Hp]
        c_prev, c_t = lay.cs[t, b, u0:u1], lay.cs[t + 1, b, u0:u1]
        h_t, tc_t = lay.hs[t + 1, b, u0:u1], lay.tcs[t, b, u0:u1]
        for j in range(Hp):
            i = sigmoid(gi[j] + pi[j])
            f = sigmoid(gf[j] + pf[j])
            g = tanh(gg[j] + pg[j])
            o = sigmoid(go[j] + po[j])
            c = f * c_prev[j] + i * g
            tc = tanh(c)
            gi[j] = i
            gf[j] = f
            gg[j] = g
            go[j] = o
            c_t[j] = c
            tc_t[j] = tc
            h_t[j] = o * tc


def backward(cell, lay, grad, t, s0, s1, u0, u1, dh, dc, direct):
    """Gate gradients of the block at step t into grad.dG[t] (the recurrent side is the same).
    dh (s1-s0, Hp) in: gradient on h_t through step t+1; dc in: gradient on c_t from step t+1,
    out: gradient on c_{t-1}. grad.dH[t] in: gradient arriving at h_t from above."""
    H = lay.cs.shape[2]
    Hp = u1 - u0
    one = cast(lay.gates[0, 0, 0], 1.0)
    for b in range(s0, s1):
        row, d = lay.gates[t, b], grad.dG[t, b]
        gi, gf, gg, go = row[u0:u1], row[H + u0 : H + u1], row[2 * H + u0 : 2 * H + u1], row[3 * H + u0 : 3 * H + u1]
        di, df, dg, do = d[u0:u1], d[H + u0 : H + u1], d[2 * H + u0 : 2 * H + u1], d[3 * H + u0 : 3 * H + u1]
        c_prev, tc_t, dH_t = lay.cs[t, b, u0:u1], lay.tcs[t, b, u0:u1], grad.dH[t, b, u0:u1]
        dh_b, dc_b = dh[b - s0], dc[b - s0]
        for j in range(Hp):
            i = gi[j]
            f = gf[j]
            g = gg[j]
            o = go[j]
            tc = tc_t[j]
            dht = dH_t[j] + dh_b[j]
            dct = dc_b[j] + dht * o * (one - tc * tc)
            di[j] = dct * g * i * (one - i)
            df[j] = dct * c_prev[j] * f * (one - f)
            dg[j] = dct * i * (one - g * g)
            do[j] = dht * tc * o * (one - o)
            dc_b[j] = dct * f


def load_state(cell, lay, h, c, s0, s1):
    """hs[0], cs[0] <- the initial state h, c (B, H) for streams s0..s1-1."""
    for b in range(s0, s1):
        copy(lay.hs[0, b], h[b])
        copy(lay.cs[0, b], c[b])


def save_state(cell, lay, T, h, c, s0, s1):
    """h, c (B, H) <- hs[T], cs[T] for streams s0..s1-1."""
    for b in range(s0, s1):
        copy(h[b], lay.hs[T, b])
        copy(c[b], lay.cs[T, b])


def save_state_grad(cell, dh, dc, dh0, dc0, s0, s1, u0, u1):
    """dh0, dc0 (B, H) <- the gradients on the initial state of the block (dh, dc (s1-s0, Hp))."""
    for b in range(s0, s1):
        copy(dh0[b, u0:u1], dh[b - s0])
        copy(dc0[b, u0:u1], dc[b - s0])


fold_bias = common.fold_both_biases  # row += b_ih + b_hh
recurrent_grad = common.input_side_grad  # the recurrent side's gradient is dG itself
carry = common.no_carry  # nothing reaches h_{t-1} but through W_hh
