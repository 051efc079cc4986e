"""Single steps and sampling: one time step for nb streams (Model.step, priming), drawing a token
(temperature, top-k, top-p, banned ids), and the generation loop, on one thread or with threads
splitting every layer's units.

A single step uses the cell functions of cells/ with T = 1. Layer 0's input product is a column of
weight_ih_l0: Model.step reads it in place, and the loops of many steps (priming, generation) read
rows of a transposed copy made at the start of each call, so no copy outlives a call to go stale
when the weights change. Nothing in a step allocates.
"""

import math
from collections import namedtuple

import numpy as np

from charrnn.kernels import cells, layout
from charrnn.kernels.gemm import dense_wt, pack_rows
from charrnn.kernels.jit import helper, kernel
from charrnn.kernels.layout import Layer, decoder_weights, layer_weights, thread_rows
from charrnn.kernels.mathf import copy, copy_rows
from charrnn.kernels.rng import uniform
from charrnn.kernels.sync import STOP, barrier, flag, raise_flag

Step = namedtuple("Step", [
    "gates",   # (1, nb, G*H)
    "hs",      # (2, nb, H) [0] the layer's state before the step, [1] after
    "cs",      # (2, nb, H) LSTM; (0, nb, H) otherwise
    "tcs",     # (1, nb, H) LSTM; (0, nb, H) otherwise
    "hn",      # (1, nb, H) GRU; (0, nb, H) otherwise
    "hp",      # (nb, G*H) recurrent products
    "logits",  # (nb, V) out
    "w0t",     # (V, G*H) weight_ih_l0 transposed, filled by the calls of many steps
])

Draw = namedtuple("Draw", [
    "temp", "top_k", "top_p",  # temperature (0: greedy), top-k (0: off), top-p (1: off)
    "banned",   # (V,) bool: ids never drawn
    "end_id",   # a stream is done after drawing it (-1: never)
    "state",    # (1,) uint64 generator state, advanced
    "z", "scratch",  # (V,) float64 work buffers
    "order", "order2",  # (V,) int64 work buffers
])

Gen = namedtuple("Gen", [  # threads splitting every layer's units
    "wf",      # (n, L*G*Hp*H) each thread's rows of every layer's W_hh, (G*Hp, H) per layer
    "wi",      # (n, (L-1)*G*Hp*H) its rows of W_ih of layers 1.., (G*Hp, H) per layer
    "hp",      # (n, nb*G*Hp) its recurrent products
    "gp",      # (n, nb*G*Hp) its input products
    "hs",      # (L, 2, nb, H) every layer's state, [0] before the step, [1] after
    "cs",      # (L, 2, nb, H) LSTM; (L, 0, nb, H) otherwise
    "gates",   # (1, nb, G*H)
    "tcs",     # (1, nb, H) LSTM; (0, nb, H) otherwise
    "hn",      # (1, nb, H) GRU; (0, nb, H) otherwise
    "ub",      # (n+1,) unit bounds
    "taken",   # (1,) int64 out: steps taken
])


# ----------------------------------------------------------------------------- one step
@helper
def gather_input(gates_row, W_ih0, w0t, tok_b, b_ih, b_hh, cell, u0, u1, H):
    """gates_row[g*H + u] <- W_ih0[g*H + u, tok_b] + folded biases, for units u0..u1-1 of every gate
    (a column of the layer-0 input weights: the one-hot product): from the row tok_b of w0t, their
    transposed copy, when it has rows (contiguous), else from W_ih0 in place (strided)."""
    for g in range(cell.G):
        dst = gates_row[g * H + u0 : g * H + u1]
        if w0t.shape[0] > 0:
            copy(dst, w0t[tok_b, g * H + u0 : g * H + u1])
        else:
            for j in range(u1 - u0):
                dst[j] = W_ih0[g * H + u0 + j, tok_b]
        cells.fold_bias(cell, dst, b_ih[g * H + u0 : g * H + u1], b_hh[g * H + u0 : g * H + u1])


@helper
def step(cell, net, tok, h, c, st, w0t):
    """One time step for nb streams: tokens tok (nb,), state h, c (L, nb, H) updated in place,
    st.logits (nb, V) out. w0t: weight_ih_l0 transposed, or no rows (read it in place)."""
    nb = tok.shape[0]
    L, H, V = net.L, net.H, net.V
    G = cell.G
    lay = Layer(st.gates, st.hs, st.cs, st.tcs, st.hn)
    g2 = st.gates[0]
    for k in range(L):
        W_ih, W_hh, b_ih, b_hh = layer_weights(net.theta, net, k, G)
        if k == 0:
            for b in range(nb):
                gather_input(g2[b], W_ih, w0t, tok[b], b_ih, b_hh, cell, 0, H, H)
        else:
            dense_wt(st.hs[1], 0, nb, W_ih, g2)  # hs[1] still holds layer k-1's output
            for b in range(nb):
                cells.fold_bias(cell, g2[b], b_ih, b_hh)
        cells.load_state(cell, lay, h[k], c[k], 0, nb)
        dense_wt(st.hs[0], 0, nb, W_hh, st.hp)
        cells.forward(cell, lay, 0, 0, nb, 0, H, st.hp, b_hh)
        cells.save_state(cell, lay, 1, h[k], c[k], 0, nb)
    Wd, bd = decoder_weights(net.theta, net)
    dense_wt(st.hs[1], 0, nb, Wd, st.logits)
    for b in range(nb):
        row = st.logits[b]
        for v in range(V):
            row[v] += bd[v]


@kernel
def _step(cell, net, tok, h, c, st):
    step(cell, net, tok, h, c, st, st.w0t[:0])


@helper
def fill_w0t(w0t, net, G):
    """w0t (V, G*H) <- weight_ih_l0^T, whole (bptt.fill_w0t_rows: a range of rows, tiled)."""
    W = layer_weights(net.theta, net, 0, G)[0]
    for g in range(W.shape[0]):
        for v in range(W.shape[1]):
            w0t[v, g] = W[g, v]


@kernel
def _feed(cell, net, tokens, h, c, st, tok):
    """Feed a token sequence (N,) to every stream in lock step (priming); st.logits: the last step's."""
    fill_w0t(st.w0t, net, cell.G)
    for i in range(tokens.shape[0]):
        tok[:] = tokens[i]
        step(cell, net, tok, h, c, st, st.w0t)


# ----------------------------------------------------------------------------- drawing
@helper
def sort_descending(a, order, tmp):
    """order (n,) <- the indices of a (n,) by decreasing value, ties in index order (a stable merge
    sort, bottom-up; tmp (n,) is a work buffer). A few loops: NumPy's argsort would compile far
    more code into every sampling kernel."""
    n = a.shape[0]
    for i in range(n):
        order[i] = i
    width = 1
    while width < n:
        for lo in range(0, n, 2 * width):
            mid, hi = min(lo + width, n), min(lo + 2 * width, n)
            i, j, k = lo, mid, lo
            while i < mid and j < hi:
                if a[order[j]] > a[order[i]]:  # strictly greater: equal values keep their order
                    tmp[k] = order[j]
                    j += 1
                else:
                    tmp[k] = order[i]
                    i += 1
                k += 1
            while i < mid:
                tmp[k] = order[i]
                i += 1
                k += 1
            while j < hi:
                tmp[k] = order[j]
                j += 1
                k += 1
        for i in range(n):
            order[i] = tmp[i]
        width *= 2


@helper
def draw(z, dr):
    """A token id from logits z (V,) float64: temperature, top-k, top-p; never a banned id.
    temp == 0 is greedy (argmax, the first of ties).

    Each weight is exp((z[v] - m) / temp) with m the largest allowed logit: the shift comes before
    the division, so the argmax's weight is exactly 1 at any temperature and the others are in
    [0, 1]. (Dividing first, exp(z / temp - m / temp), goes wrong for a tiny temp: z / temp is
    ~1e38 and, under fastmath, is not rounded the same way in both places, so the argmax's
    exponent became a rounding residual of ~1e22 and every weight 0 or inf.) So a tiny temp
    samples uniformly among the tied maxima, the limit of sampling as temp -> 0, and a huge one
    uniformly among the allowed ids. If the weights are unusable anyway (NaN logits), the draw
    falls back to the argmax: it never returns a banned id while one id is allowed."""
    V = z.shape[0]
    temp, top_k, top_p, banned, scratch, order = dr.temp, dr.top_k, dr.top_p, dr.banned, dr.scratch, dr.order
    best = -1
    for v in range(V):
        if not banned[v] and (best < 0 or z[v] > z[best]):
            best = v
    if temp == 0.0 or best < 0:
        return best
    m = z[best]
    if top_k <= 0 and top_p >= 1.0:
        # the common case: plain softmax with temperature, no sort
        s = 0.0
        for v in range(V):
            e = 0.0
            if not banned[v]:
                d = z[v] - m
                # d == 0 skips the division: 0 * (1 / temp) is NaN when 1 / temp overflows
                e = 1.0 if d == 0.0 else math.exp(d / temp)
            scratch[v] = e
            s += e
        if not s > 0.0:
            return best
        u = uniform(dr.state) * s
        acc = 0.0
        last = best
        for v in range(V):
            if scratch[v] > 0.0:
                acc += scratch[v]
                last = v
                if u < acc:
                    return v
        return last
    # filtered: sort by logit, descending (stable, so ties keep id order), keep exactly the top k,
    # then the smallest prefix with probability mass >= top_p
    for v in range(V):
        scratch[v] = -np.inf if banned[v] else z[v]
    sort_descending(scratch, order, dr.order2)
    n = V
    for v in range(V):
        if banned[v]:
            n -= 1
    if top_k > 0:
        n = min(n, top_k)
    s = 0.0
    for i in range(n):
        d = scratch[order[i]] - m
        e = 1.0 if d == 0.0 else math.exp(d / temp)
        scratch[order[i]] = e
        s += e
    if not s > 0.0:
        return best
    if top_p < 1.0:
        acc = 0.0
        for i in range(n):
            acc += scratch[order[i]]
            if acc >= top_p * s * (1.0 - 1e-12):  # slack: an exact boundary must not lose to rounding
                n = i + 1
                s = acc
                break
    u = uniform(dr.state) * s
    acc = 0.0
    last = best
    for i in range(n):
        e = scratch[order[i]]
        if e > 0.0:  # an id of weight 0 (underflow, or banned when NaN upset the sort) is never drawn
            acc += e
            last = order[i]
            if u < acc:
                return last
    return last


@helper
def draw_all(s, logits, out, tok, done, dr):
    """Draw the next token of every unfinished stream from its logits; record it in out[s] (-1 for
    a stream already done)."""
    nb, V = logits.shape
    for b in range(nb):
        if done[b]:
            out[s, b] = -1
            continue
        for v in range(V):
            dr.z[v] = logits[b, v]
        t = draw(dr.z, dr)
        out[s, b] = t
        tok[b] = t
        if t == dr.end_id:
            done[b] = True


@helper
def all_done(done):
    for b in range(done.shape[0]):
        if not done[b]:
            return False
    return True


@kernel
def _draw_many(z, dr, n, counts):
    """counts[v] += how often v is drawn from z in n draws (tests of the sampler's distribution)."""
    for _ in range(n):
        counts[draw(z, dr)] += 1


# ----------------------------------------------------------------------------- generation, one thread
@kernel
def _generate(cell, net, tok, h, c, out, done, dr, st):
    """Up to out.shape[0] tokens for nb streams. tok (nb,) each stream's last token, updated; h, c
    the state; out (n_steps, nb) the tokens (-1 once a stream is done); a stream is done after it
    draws dr.end_id. Returns the steps taken."""
    fill_w0t(st.w0t, net, cell.G)
    for s in range(out.shape[0]):
        if all_done(done):
            return s
        step(cell, net, tok, h, c, st, st.w0t)
        draw_all(s, st.logits, out, tok, done, dr)
    return out.shape[0]


# ----------------------------------------------------------------------------- generation, threads
# One step of a few streams is memory-bound on the weights (a 2x512 LSTM reads 12 MB per character).
# Threads split each layer's units as in training, each keeping its own rows of W_ih and W_hh
# (copied once per call, not per step) in its own cache, and meet at a barrier after each layer
# and after the draw (thread 0 decodes and draws).
@kernel
def _generate_threads(p, n, cell, net, tok, h, c, out, done, dr, st, gen, sync):
    """Thread p of n: its units of every layer for every step of _generate's loop."""
    nb = tok.shape[0]
    L, H = net.L, net.H
    G = cell.G
    u0, u1 = gen.ub[p], gen.ub[p + 1]
    Hp = u1 - u0
    hp = thread_rows(gen.hp, p, nb, G * Hp)
    gp = thread_rows(gen.gp, p, nb, G * Hp)
    for k in range(L):  # this thread's rows of the recurrent and input weights, once
        W_ih, W_hh, b_ih, b_hh = layer_weights(net.theta, net, k, G)
        pack_rows(W_hh, G, H, u0, u1, gen.wf[p][k * G * Hp * H : (k + 1) * G * Hp * H].reshape((G * Hp, H)))
        if k > 0:
            pack_rows(W_ih, G, H, u0, u1, gen.wi[p][(k - 1) * G * Hp * H : k * G * Hp * H].reshape((G * Hp, H)))
    if p == 0:
        fill_w0t(st.w0t, net, G)
        for k in range(L):
            copy_rows(gen.hs[k, 0], h[k], 0, nb)
            if gen.cs.shape[1] > 0:
                copy_rows(gen.cs[k, 0], c[k], 0, nb)
        raise_flag(sync, STOP, 1 if all_done(done) else 0)
    ep = barrier(sync, p, n, 1)
    s = 0
    while s < out.shape[0] and flag(sync, STOP) == 0:
        for k in range(L):
            W_ih, W_hh, b_ih, b_hh = layer_weights(net.theta, net, k, G)
            Wf = gen.wf[p][k * G * Hp * H : (k + 1) * G * Hp * H].reshape((G * Hp, H))
            lay = Layer(gen.gates, gen.hs[k], gen.cs[k], gen.tcs, gen.hn)
            g2 = gen.gates[0]
            if k == 0:
                for b in range(nb):
                    gather_input(g2[b], W_ih, st.w0t, tok[b], b_ih, b_hh, cell, u0, u1, H)
            else:
                Wi = gen.wi[p][(k - 1) * G * Hp * H : k * G * Hp * H].reshape((G * Hp, H))
                dense_wt(gen.hs[k - 1, 1], 0, nb, Wi, gp)  # this block's input products
                for b in range(nb):
                    for g in range(G):
                        dst = g2[b, g * H + u0 : g * H + u1]
                        copy(dst, gp[b, g * Hp : (g + 1) * Hp])
                        cells.fold_bias(cell, dst, b_ih[g * H + u0 : g * H + u1], b_hh[g * H + u0 : g * H + u1])
            dense_wt(gen.hs[k, 0], 0, nb, Wf, hp)
            cells.forward(cell, lay, 0, 0, nb, u0, u1, hp, b_hh)
            ep = barrier(sync, p, n, ep)  # layer k's new state is complete
            for b in range(nb):  # own units: the new state becomes the previous one of the next step
                copy(gen.hs[k, 0, b, u0:u1], gen.hs[k, 1, b, u0:u1])
                if gen.cs.shape[1] > 0:
                    copy(gen.cs[k, 0, b, u0:u1], gen.cs[k, 1, b, u0:u1])
        if p == 0:
            Wd, bd = decoder_weights(net.theta, net)
            dense_wt(gen.hs[L - 1, 1], 0, nb, Wd, st.logits)
            for b in range(nb):
                row = st.logits[b]
                for v in range(net.V):
                    row[v] += bd[v]
            draw_all(s, st.logits, out, tok, done, dr)
            if all_done(done):
                raise_flag(sync, STOP, 1)
        s += 1
        ep = barrier(sync, p, n, ep)  # the drawn tokens and the stop flag are visible
    if p == 0:
        gen.taken[0] = s
        for k in range(L):
            copy_rows(h[k], gen.hs[k, 0], 0, nb)
            if gen.cs.shape[1] > 0:
                copy_rows(c[k], gen.cs[k, 0], 0, nb)


# ----------------------------------------------------------------------------- Python side
def step_buffers(cell_name: str, G: int, nb: int, H: int, V: int, dtype) -> Step:
    uses = lambda slot: cells.uses(cell_name, slot)  # noqa: E731
    e = layout.empty
    return Step(gates=e((1, nb, G * H), dtype), hs=e((2, nb, H), dtype), cs=e((2 if uses("cs") else 0, nb, H), dtype),
                tcs=e((1 if uses("tcs") else 0, nb, H), dtype), hn=e((1 if uses("hn") else 0, nb, H), dtype),
                hp=e((nb, G * H), dtype), logits=e((nb, V), dtype), w0t=e((V, G * H), dtype))


def gen_buffers(cell_name: str, G: int, L: int, nb: int, H: int, ub, dtype) -> Gen:
    n = len(ub) - 1
    Hp = int(np.max(np.diff(ub)))
    uses = lambda slot: cells.uses(cell_name, slot)  # noqa: E731
    e, pt = layout.empty, layout.per_thread
    return Gen(wf=pt(n, L * G * Hp * H, dtype, huge=True), wi=pt(n, max(L - 1, 0) * G * Hp * H, dtype, huge=True),
               hp=pt(n, nb * G * Hp, dtype), gp=pt(n, nb * G * Hp, dtype),
               hs=e((L, 2, nb, H), dtype), cs=e((L, 2 if uses("cs") else 0, nb, H), dtype), gates=e((1, nb, G * H), dtype),
               tcs=e((1 if uses("tcs") else 0, nb, H), dtype), hn=e((1 if uses("hn") else 0, nb, H), dtype),
               ub=np.asarray(ub, dtype=np.int64), taken=np.zeros(1, dtype=np.int64))


def draw_options(V: int, temp: float, top_k: int, top_p: float, banned, end_id: int, state) -> Draw:
    return Draw(float(temp), int(top_k), float(top_p), banned, int(end_id), state,
                np.empty(V, dtype=np.float64), np.empty(V, dtype=np.float64), np.empty(V, dtype=np.int64),
                np.empty(V, dtype=np.int64))


def draw_many(z, n: int, temp=1.0, top_k=0, top_p=1.0, banned=None, seed=0) -> np.ndarray:
    """How often each id is drawn in n draws from logits z (V,): the sampler's distribution, for
    tests and for checking a setting by hand."""
    z = np.ascontiguousarray(z, dtype=np.float64)
    V = z.shape[0]
    banned = np.zeros(V, dtype=np.bool_) if banned is None else np.ascontiguousarray(banned, dtype=np.bool_)
    counts = np.zeros(V, dtype=np.int64)
    from charrnn.kernels.rng import seed_state

    _draw_many(z, draw_options(V, temp, top_k, top_p, banned, -1, seed_state(seed)), int(n), counts)
    return counts


def generate_threads(cell, net, tok, h, c, out, done, dr, st, gen, team, sync) -> int:
    n = len(gen.ub) - 1
    team.run(n, _generate_threads, n, cell, net, tok, h, c, out, done, dr, st, gen, sync, sync=sync)
    return int(gen.taken[0])
