"""The GRU cell, in one place: its gates, its forward and backward blocks, its bias fold and its
state slots. PyTorch's equations and gate order:

    r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
    z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
    h' = (1 - z) * n + z * h

b_hh stays out of the input products (b_hn sits inside r * (...)), so the input side folds only
b_ih and the recurrent side adds b_hh itself. State slots of a layer's buffers (Layer): hs (h at
every step, [0] the initial state) and hn (W_hn h_{t-1} + b_hn at every step, saved: the
gradient of r needs it). A GRU's backward has two gradients of the gate pre-activations: dG on the
input side and dGh on the recurrent side, which differ in the n part (times r), and a direct path
from h_t to h_{t-1} through z.

Blocks, hp and the callers: as in lstm.py.
"""

from collections import namedtuple

from charrnn.kernels.cells import common
from charrnn.kernels.mathf import cast, sigmoid, tanh

GRU = namedtuple("GRU", ["G"], defaults=[3])
SLOTS = {"hn", "dGh"}  # beside gates and hs: W_hn h + b_hn for backward, and the recurrent side's own gradient
FORGET_GATE = None


def fold_bias(cell, row, b_ih, b_hh):
    """row (G*n,) += the biases folded into the input products: b_ih only."""
    for j in range(row.shape[0]):
        row[j] += b_ih[j]


def forward(cell, lay, t, s0, s1, u0, u1, hp, b_hh):
    """Step t of the block. lay.gates[t] in: x W_ih^T + b_ih; out: activated r, z, n. Writes
    hs[t+1] and hn[t] for the block. hp (s1-s0, 3*Hp): h_{t-1} @ W_hh^T without b_hh."""
    H = lay.hs.shape[2]
    Hp = u1 - u0
    one = cast(lay.gates[0, 0, 0], 1.0)
    br, bz, bn = b_hh[u0:u1], b_hh[H + u0 : H + u1], b_hh[2 * H + u0 : 2 * H + u1]
    for b in range(s0, s1):
        row, p = lay.gates[t, b], hp[b - s0]
        gr, gz, gn = row[u0:u1], row[H + u0 : H + u1], row[2 * H + u0 : 2 * H + u1]
        pr, pz, pn = p[:Hp], p[Hp : 2 * Hp], p[2 * Hp : 3 * Hp]
        h_prev, h_t, hn_t = lay.hs[t, b, u0:u1], lay.hs[t + 1, b, u0:u1], lay.hn[t, b, u0:u1]
        for j in range(Hp):
            r = sigmoid(gr[j] + pr[j] + br[j])
            z = sigmoid(gz[j] + pz[j] + bz[j])
            hnj = pn[j] + bn[j]
            n = tanh(gn[j] + r * hnj)
            gr[j] = r
            gz[j] = z
            gn[j] = n
            hn_t[j] = hnj
            h_t[j] = (one - z) * n + z * h_prev[j]


def backward(cell, lay, grad, t, s0, s1, u0, u1, dh, dc, direct):
    """Gate gradients of the block at step t: grad.dG[t] (input side) and grad.dGh[t] (recurrent
    side). dh (s1-s0, Hp) in: gradient on h_t through step t+1; direct out: its share on h_{t-1}
    through z (added to the recurrent product's by carry)."""
    H = lay.hs.shape[2]
    Hp = u1 - u0
    one = cast(lay.gates[0, 0, 0], 1.0)
    for b in range(s0, s1):
        row, d, e = lay.gates[t, b], grad.dG[t, b], grad.dGh[t, b]
        gr, gz, gn = row[u0:u1], row[H + u0 : H + u1], row[2 * H + u0 : 2 * H + u1]
        dr, dz, dn = d[u0:u1], d[H + u0 : H + u1], d[2 * H + u0 : 2 * H + u1]
        er, ez, en = e[u0:u1], e[H + u0 : H + u1], e[2 * H + u0 : 2 * H + u1]
        h_prev, hn_t, dH_t = lay.hs[t, b, u0:u1], lay.hn[t, b, u0:u1], grad.dH[t, b, u0:u1]
        dh_b, dd = dh[b - s0], direct[b - s0]
        for j in range(Hp):
            r = gr[j]
            z = gz[j]
            n = gn[j]
            dht = dH_t[j] + dh_b[j]
            dn_pre = dht * (one - z) * (one - n * n)
            dr_pre = dn_pre * hn_t[j] * r * (one - r)
            dz_pre = dht * (h_prev[j] - n) * z * (one - z)
            dr[j] = dr_pre
            dz[j] = dz_pre
            dn[j] = dn_pre
            er[j] = dr_pre
            ez[j] = dz_pre
            en[j] = dn_pre * r
            dd[j] = dht * z  # the direct path h' = ... + z * h


def recurrent_grad(cell, grad):
    """The gradient of W_hh h + b_hh: dGh, which differs from dG in the n part."""
    return grad.dGh


def carry(cell, dh, direct):
    """dh (the gradient on h_{t-1} through W_hh) += the direct path through z."""
    for b in range(dh.shape[0]):
        d, s = dh[b], direct[b]
        for j in range(dh.shape[1]):
            d[j] += s[j]


load_state, save_state, save_state_grad = common.load_h, common.save_h, common.save_h_grad  # h only: no c
