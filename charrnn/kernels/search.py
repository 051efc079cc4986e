"""Beam search in one compiled call, and steps of several streams on packed weights.

The search (charrnn/beam.py holds its rules and reads its results) runs every position here: one
step of the live hypotheses (K streams, plus the greedy stream) on weights packed once per search,
the log-softmax, the top-K with beam.py's tie rules, the stop-string automaton, the back-pointers,
and reordering the state by the parents of the survivors. One position of a 2x256 LSTM was a BLAS
step (0.6 ms: sgemm repacks the weights on every call) and ~30 numpy calls (0.05-0.5 ms); here it
is the packed micro-kernel of gemm.py on panels packed once, and a few loops over K x V scores.

Several threads split either the units or the streams (split_streams decides, from the size of
the panels and the cache; Model.run_search asks it):
- _search_threads splits every layer's units as in training and generation (each thread packs and
  keeps its own rows of W_hh and of W_ih of layers 1..), and they meet at a barrier after each
  layer; from DECODE_SPLIT streams on, each decodes its share of the streams and takes their
  log-softmax, and they meet again; thread 0 runs the search's bookkeeping and reorders the state,
  then all meet again. Every layer's new state crosses cores.
- _search_streams gives each thread a share of the streams, stepped through every layer on its
  own copy of all the panels: no state crosses cores between layers, and the threads meet only to
  rank the candidates and around copying each one's rows from their parents.
Neither split changes a number: every product sums over k in the same order whatever the block or
the rows, so one thread and two, either way, give the same hypotheses.

The products run in float32 on gemm.py's panels, or (`sample --precision bf16`) on bfloat16 operands
with float32 sums on gemm16.py's, chosen by the type of the kernels' `prec` argument ("products, by
precision" below); everything else (the cell, the log-softmax, the search's rules) is the same code.

Steps of a beam of one (greedy decoding) use the sampler's own single-stream step (sample.step),
so a beam of one is exactly `--temp 0` sampling, in float32.

The packed copy of the weights lives for one call of _search, or for the life of a Packed made
by the caller (Model.packed_steps), which packs again on request: nothing here caches weights
between calls behind the caller's back.

Equations (temperature 1), per position, for live hypothesis r with total log-probability s_r:
    lp[r, v] = z[r, v] - (m_r + log sum_v exp(z[r, v] - m_r)),  m_r = max_v z[r, v] (0 if not finite)
    cand[r, v] = s_r + lp[r, v]  (-inf for banned v),  the K best kept, ties in flat-index order
"""

from collections import namedtuple

import numpy as np

from charrnn.kernels import cells, gemm16
from charrnn.kernels.bptt import by_precision, w_hh_bytes
from charrnn.kernels.gemm import mm_packed, pack_fwd
from charrnn.kernels.jit import helper, kernel
from charrnn.kernels.layout import Layer, decoder_weights, l2_bytes, layer_weights, thread_rows
from charrnn.kernels.mathf import copy, rows
from charrnn.kernels.sample import fill_w0t, gather_input, step
from charrnn.kernels.sync import STOP, barrier, flag, raise_flag

Packed = namedtuple("Packed", [
    "whh",    # (n, L*chunk) each block's rows of every layer's W_hh, transposed, in panels (pack_fwd)
    "wih",    # (n, max(L-1, 1)*chunk) its rows of W_ih of layers 1.., the same way
    "wd",     # (packed_size(H, V),) decoder.weight transposed, in panels
    "w0t",    # (V, G*H) weight_ih_l0 transposed: layer 0's input is a row of it
    "ub",     # (n+1,) unit bounds of the blocks
    "chunk",  # elements of one layer's panels in a block's row
    "chunk16",  # bf16: elements of one layer's bfloat16 panels in the workspace's wp row (0: float32)
])

Work = namedtuple("Work", [  # one step of up to NB streams
    "gates",   # (1, NB, G*H)
    "hs",      # (L, 2, NB, H) every layer's state, [0] before the step, [1] after
    "cs",      # (L, 2, NB, H) LSTM; (L, 0, NB, H) otherwise
    "tcs",     # (1, NB, H) LSTM; (0, NB, H) otherwise
    "hn",      # (1, NB, H) GRU; (0, NB, H) otherwise
    "hp",      # (n, NB*G*Hp) each block's recurrent products
    "gp",      # (n, NB*G*Hp) its input products (layers 1..)
    "logits",  # (NB, V)
])

Search = namedtuple("Search", [  # the beam's state and record; K the width, N the length
    "banned",   # (V,) bool: tokens never taken
    "table",    # (m+1, V) int32 stop-string automaton (beam.StopMatcher); m = 0: no stop string
    "lp",       # (K+1, V) float64 the position's log-probabilities
    "top_v",    # (K,) float64 the best candidates' scores, best first
    "top_i",    # (K,) int64 their flat indices (row * V + token)
    "tok",      # (K+1,) int32 each stream's last token (the greedy stream last)
    "score",    # (K,) float64 each live hypothesis's total log-probability
    "matched",  # (K,) int32 its stop-automaton state
    "rows",     # (K,) int64 the candidates of the previous position that the live rows are
    "par",      # (K,) int64 the row each candidate extends
    "mnew",     # (K,) int32 each candidate's automaton state
    "live",     # (K,) int64 the candidates that go on
    "keep",     # (K+1,) int64 the rows the next step's state comes from
    "parent",   # (N, K) int64 back-pointers: the candidate of the previous position
    "token",    # (N, K) int32 each candidate's token
    "tlp",      # (N, K) float64 that token's log-probability
    "picked",   # (N,) int64 candidates kept at each position
    "settled",  # (K, 3) int64 settled hypotheses: position, candidate, why (0 length, 1 <END>, 2 stop)
    "g_toks",   # (N,) int32 the greedy stream's tokens
    "g_lps",    # (N,) float64 their log-probabilities
    "info",     # (INFO,) int64: the loop's scalars, see the I_ names
])

# Search.info: the loop's scalars, kept in the record so that every thread sees them and Python
# reads them at the end.
I_N, I_GREEDY, I_SLOTS, I_T, I_SETTLED, I_GTOKS, I_GEND, I_GMATCH, I_ERROR, I_DONE = range(10)
INFO = 10
END_LENGTH, END_END, END_STOP = 0, 1, 2
# From this many streams on, the threads share the decoder and the log-softmax (one more barrier a
# position); below it thread 0 does them. Measured on a 2x256 LSTM, 2 threads, against thread 0
# alone: K = 16 (17 streams) 1.08x; K = 4 (5 streams) 0.94x
DECODE_SPLIT = 8


# ----------------------------------------------------------------------------- products, by precision
# Every product of a step goes through the four functions below. Their first argument, `prec`,
# chooses the arithmetic by its type when the kernel compiles, as in bptt.py: bptt.F32, the float32
# panels of gemm.py (Packed's whh, wih and wd); or a workspace of gemm16.py (AMX or DOT), whose
# products round their operands to bfloat16 and sum in float32 (`sample --precision bf16`). Its
# panels: each thread's W_hh of layers 0..L-1 and then W_ih of layers 1..L-1 in its row of wp,
# Packed.chunk16 apart, and the decoder's in bp[0], which every thread reads. Layer 0's one-hot input
# is a row of w0t in float32 either way (a selection, not a product: as in training).
def pack_block(prec, cell, net, pk, p, u0, u1):  # pragma: no cover - overloaded below
    """Row p's panels: the rows of units u0..u1-1 of every layer's W_hh and of W_ih of layers 1.."""


def pack_shared(prec, cell, net, pk):  # pragma: no cover
    """The panels every block reads: decoder.weight^T, and w0t (float32 either way)."""


def layer_product(prec, pk, p, A, which, k, L, C, H):  # pragma: no cover
    """C (nb, G*Hp) <- A (nb, H) @ block p's rows of W_hh (which 0) or W_ih (which 1) of layer k, ^T."""


def decoder_product(prec, pk, p, A, C, H):  # pragma: no cover
    """C (rows, V) <- A (rows, H) @ decoder.weight^T, in thread p's buffers."""


def _f32_pack_block(prec, cell, net, pk, p, u0, u1):
    G, H, L = cell.G, net.H, net.L
    for k in range(L):
        W_ih, W_hh = layer_weights(net.theta, net, k, G)[:2]
        pack_fwd(W_hh, G, H, u0, u1, pk.whh[p][k * pk.chunk : (k + 1) * pk.chunk])
        if k > 0:
            pack_fwd(W_ih, G, H, u0, u1, pk.wih[p][(k - 1) * pk.chunk : k * pk.chunk])


def _f32_pack_shared(prec, cell, net, pk):
    Wd = decoder_weights(net.theta, net)[0]
    pack_fwd(Wd, 1, net.H, 0, net.V, pk.wd)  # one gate of V rows
    fill_w0t(pk.w0t, net, cell.G)


def _f32_layer_product(prec, pk, p, A, which, k, L, C, H):
    c = pk.chunk
    if which == 0:
        mm_packed(A, pk.whh[p][k * c : (k + 1) * c], C, H)
    else:
        mm_packed(A, pk.wih[p][(k - 1) * c : k * c], C, H)


def _f32_decoder_product(prec, pk, p, A, C, H):
    mm_packed(A, pk.wd, C, H)


def _b16_pack_block(prec, cell, net, pk, p, u0, u1):
    G, H, L = cell.G, net.H, net.L
    c = pk.chunk16
    wp = prec.wp[p]
    for k in range(L):
        W_ih, W_hh = layer_weights(net.theta, net, k, G)[:2]
        gemm16.pack_b_gates(W_hh, G, H, u0, u1, wp[k * c : (k + 1) * c], prec.ab[p])
        if k > 0:
            gemm16.pack_b_gates(W_ih, G, H, u0, u1, wp[(L + k - 1) * c : (L + k) * c], prec.ab[p])


def _b16_pack_shared(prec, cell, net, pk):
    Wd = decoder_weights(net.theta, net)[0]
    gemm16.pack_b(Wd, True, 0, net.V, prec.bp[0], prec.ab[0])
    fill_w0t(pk.w0t, net, cell.G)


def _b16_layer_product(prec, pk, p, A, which, k, L, C, H):
    c = pk.chunk16
    j = k if which == 0 else L + k - 1
    gemm16.product(prec, p, A, False, prec.wp[p][j * c : (j + 1) * c], H, C.shape[1], C, False)


def _b16_decoder_product(prec, pk, p, A, C, H):
    gemm16.product(prec, p, A, False, prec.bp[0], H, C.shape[1], C, False)


for _fn, _f32, _b16 in ((pack_block, _f32_pack_block, _b16_pack_block),
                        (pack_shared, _f32_pack_shared, _b16_pack_shared),
                        (layer_product, _f32_layer_product, _b16_layer_product),
                        (decoder_product, _f32_decoder_product, _b16_decoder_product)):
    by_precision(_fn, _f32, _b16)


@kernel
def _pack(prec, cell, net, pk):
    """Every block's panels and the shared ones, on one thread (Model.packed_steps)."""
    for p in range(pk.ub.shape[0] - 1):
        pack_block(prec, cell, net, pk, p, pk.ub[p], pk.ub[p + 1])
    pack_shared(prec, cell, net, pk)


# ----------------------------------------------------------------------------- one step, packed
@helper
def layer_block(prec, cell, net, pk, wk, tok, s0, s1, k, p, u0, u1):
    """Layer k of the step for units u0..u1-1 of streams s0..s1-1, on row p's panels (packed for
    those units) and row p of the scratch: reads hs[k-1][1] (the layer below, this step) and
    hs[k][0] (this layer, the step before); writes hs[k][1] (and cs)."""
    G, H = cell.G, net.H
    Hp, ns = u1 - u0, s1 - s0
    W_ih, W_hh, b_ih, b_hh = layer_weights(net.theta, net, k, G)
    lay = Layer(wk.gates, wk.hs[k], wk.cs[k], wk.tcs, wk.hn)
    g2 = wk.gates[0]
    hp = thread_rows(wk.hp, p, ns, G * Hp)
    if k == 0:
        for b in range(s0, s1):  # the one-hot input product: a row of w0t
            gather_input(g2[b], W_ih, pk.w0t, tok[b], b_ih, b_hh, cell, u0, u1, H)
    else:
        gp = thread_rows(wk.gp, p, ns, G * Hp)
        layer_product(prec, pk, p, rows(wk.hs[k - 1, 1], s0, s1), 1, k, net.L, gp, H)
        for b in range(s0, s1):  # the block's products into the gate-major row, biases folded
            for g in range(G):
                dst = g2[b, g * H + u0 : g * H + u1]
                copy(dst, gp[b - s0, g * Hp : (g + 1) * Hp])
                cells.fold_bias(cell, dst, b_ih[g * H + u0 : g * H + u1], b_hh[g * H + u0 : g * H + u1])
    layer_product(prec, pk, p, rows(wk.hs[k, 0], s0, s1), 0, k, net.L, hp, H)
    cells.forward(cell, lay, 0, s0, s1, u0, u1, hp, b_hh)


@helper
def decode(prec, net, pk, wk, p, r0, r1):
    """logits[r0:r1] <- the top layer's new state of streams r0..r1-1 @ decoder.weight^T + decoder.bias,
    in thread p's buffers."""
    L, V = net.L, net.V
    if r1 <= r0:
        return
    bd = decoder_weights(net.theta, net)[1]
    decoder_product(prec, pk, p, rows(wk.hs[L - 1, 1], r0, r1), rows(wk.logits, r0, r1), net.H)
    for b in range(r0, r1):
        row = wk.logits[b]
        for v in range(V):
            row[v] += bd[v]


@kernel
def _packed_step(prec, cell, net, pk, wk, tok, h, c):
    """One step of nb = tok.shape[0] streams from state h, c (L, nb, H), updated in place;
    wk.logits[:nb] out. Every block in turn, on this thread."""
    nb = tok.shape[0]
    L = net.L
    lstm = wk.cs.shape[1] > 0
    gemm16.tiles_on(prec, 0)
    for k in range(L):
        for b in range(nb):
            copy(wk.hs[k, 0, b], h[k, b])
            if lstm:
                copy(wk.cs[k, 0, b], c[k, b])
    for k in range(L):
        for p in range(pk.ub.shape[0] - 1):
            layer_block(prec, cell, net, pk, wk, tok, 0, nb, k, p, pk.ub[p], pk.ub[p + 1])
    decode(prec, net, pk, wk, 0, 0, nb)
    for k in range(L):
        for b in range(nb):
            copy(h[k, b], wk.hs[k, 1, b])
            if lstm:
                copy(c[k, b], wk.cs[k, 1, b])
    gemm16.tiles_off(prec)


# ----------------------------------------------------------------------------- one position of the search
@helper
def log_softmax_row(z, out):
    """out (V,) float64 <- log softmax of z (V,), as beam.log_softmax: a NaN anywhere, or a max of
    +-inf, shifts by 0 (so the row comes out NaN or -inf rather than wrong)."""
    V = z.shape[0]
    m = -np.inf
    nan = False
    for v in range(V):
        x = np.float64(z[v])
        if x != x:
            nan = True
        elif x > m:
            m = x
    if nan or not (-np.inf < m < np.inf):
        m = 0.0
    s = 0.0
    for v in range(V):
        s += np.exp(np.float64(z[v]) - m)
    lse = m + np.log(s)
    for v in range(V):
        out[v] = np.float64(z[v]) - lse


@helper
def top_insert(top_v, top_i, cnt, k, x, i):
    """Offer candidate (x, i) to the k best so far, kept best first with ties in index order; i is
    larger than every index offered before. Returns the new count."""
    if cnt == k:
        if not x > top_v[k - 1]:  # a tie with the worst kept loses: its index is larger
            return cnt
        j = k - 1
    else:
        j = cnt
        cnt += 1
    while j > 0 and top_v[j - 1] < x:  # past the strictly worse; an equal one keeps its place ahead
        top_v[j] = top_v[j - 1]
        top_i[j] = top_i[j - 1]
        j -= 1
    top_v[j] = x
    top_i[j] = i
    return cnt


@helper
def argmax_allowed(z, banned):
    """The first allowed token of the largest logit (NaN never wins; 0 if none is above -inf), as
    beam._argmax_allowed."""
    best, bv = 0, -np.inf
    for v in range(z.shape[0]):
        x = np.float64(z[v])
        if banned[v] or x != x:
            continue
        if x > bv:
            best, bv = v, x
    return best


@helper
def position(sr, logits, t, end_id):
    """Position t of the search from the step's logits (n + greedy rows) and their log-softmax,
    which the caller has put in sr.lp; returns the rows of the next step (0: the search is over).
    Mirrors beam.py's rules line for line (its docstring)."""
    info = sr.info
    V = logits.shape[1]
    n, gon, slots = info[I_N], info[I_GREEDY], info[I_SLOTS]
    stop_len = sr.table.shape[0] - 1
    # ---- the beam: the best `slots` of the n x V continuations
    cnt = 0
    if n == 1 and slots == 1:
        # one row: rank by its logits, so a beam of one is exactly greedy decoding
        for v in range(V):
            x = np.float64(logits[0, v])
            if not sr.banned[v] and x > -np.inf:
                cnt = top_insert(sr.top_v, sr.top_i, cnt, slots, x, v)
    else:
        for r in range(n):
            s, lpr = sr.score[r], sr.lp[r]
            for v in range(V):
                x = s + lpr[v]
                if not sr.banned[v] and x > -np.inf:  # NaN and -inf are never chosen
                    cnt = top_insert(sr.top_v, sr.top_i, cnt, slots, x, r * V + v)
    if cnt == 0 and n > 0:
        info[I_ERROR] = 1  # the model's outputs are not finite numbers
        return 0
    sr.picked[t] = cnt
    nl = 0
    for i in range(cnt):
        par, tk = sr.top_i[i] // V, sr.top_i[i] % V
        sr.par[i] = par
        sr.parent[t, i] = sr.rows[par]
        sr.token[t, i] = tk
        sr.tlp[t, i] = sr.lp[par, tk]
        stopped = False
        if stop_len > 0:
            sr.mnew[i] = sr.table[sr.matched[par], tk]
            stopped = sr.mnew[i] == stop_len
        if tk == end_id or stopped:
            ns = info[I_SETTLED]
            sr.settled[ns, 0], sr.settled[ns, 1] = t, i
            sr.settled[ns, 2] = END_END if tk == end_id else END_STOP
            info[I_SETTLED] = ns + 1
        else:
            sr.live[nl] = i
            nl += 1
    info[I_SLOTS] = slots - (cnt - nl)
    for j in range(nl):
        sr.keep[j] = sr.par[sr.live[j]]
    nk = nl
    # ---- the greedy stream: the argmax, as --temp 0 draws it
    gt = -1
    if gon:
        gt = argmax_allowed(logits[n], sr.banned)
        g = info[I_GTOKS]
        sr.g_toks[g] = gt
        sr.g_lps[g] = sr.lp[n, gt]
        info[I_GTOKS] = g + 1
        if stop_len > 0:
            info[I_GMATCH] = sr.table[info[I_GMATCH], gt]
        if gt == end_id:
            info[I_GEND] = END_END
        elif stop_len > 0 and info[I_GMATCH] == stop_len:
            info[I_GEND] = END_STOP
        if info[I_GEND] < 0:
            sr.keep[nk] = n
            nk += 1
        else:
            info[I_GREEDY] = 0
    info[I_T] = t
    info[I_N] = nl
    if nl == 0 and info[I_GREEDY] == 0:
        return 0
    # the survivors become the rows of the next step; their scores go through top_v (free now),
    # since a parent's score may be read after an earlier survivor has taken its slot
    for j in range(nl):
        i = sr.live[j]
        sr.top_v[j] = sr.score[sr.par[i]] + sr.tlp[t, i]
    for j in range(nl):
        i = sr.live[j]
        sr.tok[j] = sr.token[t, i]
        sr.score[j] = sr.top_v[j]
        sr.matched[j] = sr.mnew[i]
        sr.rows[j] = i
    if info[I_GREEDY]:
        sr.tok[nl] = gt
    return nk


@helper
def finish(sr):
    """The search is over: the hypotheses still going after the last position settle by length."""
    info = sr.info
    info[I_DONE] = 1
    if info[I_ERROR]:
        return
    for j in range(info[I_N]):
        ns = info[I_SETTLED]
        sr.settled[ns, 0], sr.settled[ns, 1], sr.settled[ns, 2] = info[I_T], sr.rows[j], END_LENGTH
        info[I_SETTLED] = ns + 1


# ----------------------------------------------------------------------------- the search's loops
@helper
def start(prec, cell, net, pk, wk, sr, h, c, p, u0, u1):
    """The start of a search, thread p: its row of panels (units u0..u1-1); thread 0 also the shared
    panels and every stream's state, the prime's h, c (L, 1, H)."""
    pack_block(prec, cell, net, pk, p, u0, u1)
    if p == 0:
        pack_shared(prec, cell, net, pk)
        for k in range(net.L):
            for b in range(sr.info[I_N] + sr.info[I_GREEDY]):
                copy(wk.hs[k, 0, b], h[k, 0])
                if wk.cs.shape[1] > 0:
                    copy(wk.cs[k, 0, b], c[k, 0])


@kernel
def _search_threads(p, n, prec, cell, net, pk, wk, sr, h, c, end_id, t0, t1, sync):
    """Thread p of n: positions t0..t1-1 of the search of sr.parent.shape[0] positions (everything
    it carries from one call to the next lives in sr and wk). At t0 = 0 every stream starts from
    the state h, c (L, 1, H), the prime's, and the weights are packed: each thread its block of
    units, thread 0 the shared panels. Thread 0 decodes and runs the bookkeeping."""
    L = net.L
    N = sr.parent.shape[0]
    lstm = wk.cs.shape[1] > 0
    gemm16.tiles_on(prec, p)
    if t0 == 0:
        start(prec, cell, net, pk, wk, sr, h, c, p, pk.ub[p], pk.ub[p + 1])
    ep = barrier(sync, p, n, 1)
    for t in range(t0, t1):
        nb = sr.info[I_N] + sr.info[I_GREEDY]
        for k in range(L):
            layer_block(prec, cell, net, pk, wk, sr.tok, 0, nb, k, p, pk.ub[p], pk.ub[p + 1])
            ep = barrier(sync, p, n, ep)  # layer k's new state is complete
        split = nb >= DECODE_SPLIT  # each thread decodes its share of the streams, or thread 0 all
        if split or p == 0:
            r0, r1 = ((nb * p) // n, (nb * (p + 1)) // n) if split else (0, nb)
            decode(prec, net, pk, wk, p, r0, r1)
            for r in range(r0, r1):
                log_softmax_row(wk.logits[r], sr.lp[r])
        if split:
            ep = barrier(sync, p, n, ep)  # every stream's logits and log-softmax are complete
        if p == 0:
            nk = position(sr, rows(wk.logits, 0, nb), t, end_id)
            if nk == 0:
                raise_flag(sync, STOP, 1)
            for k in range(L):  # the parents' new states become the next step's previous ones
                for j in range(nk):
                    copy(wk.hs[k, 0, j], wk.hs[k, 1, sr.keep[j]])
                    if lstm:
                        copy(wk.cs[k, 0, j], wk.cs[k, 1, sr.keep[j]])
        ep = barrier(sync, p, n, ep)  # the tokens, the reordered state and the stop flag are visible
        if flag(sync, STOP) != 0:
            break
    if p == 0 and (flag(sync, STOP) != 0 or t1 == N):
        finish(sr)
    gemm16.tiles_off(prec)


@kernel
def _search_streams(p, n, prec, cell, net, pk, wk, sr, h, c, end_id, t0, t1, sync):
    """As _search_threads, with the streams split between the threads instead of the units: thread
    p steps its share of the rows through every layer on its own copy of all the panels (row p of
    pk, packed for units 0..H-1), so no state crosses cores between layers and the threads meet
    only to rank the candidates (thread 0) and after each has copied its own rows' parents. For a
    model whose panels fit one core's cache (Model.run_search decides)."""
    L, H = net.L, net.H
    N = sr.parent.shape[0]
    lstm = wk.cs.shape[1] > 0
    gemm16.tiles_on(prec, p)
    if t0 == 0:
        start(prec, cell, net, pk, wk, sr, h, c, p, 0, H)
    ep = barrier(sync, p, n, 1)
    for t in range(t0, t1):
        nb = sr.info[I_N] + sr.info[I_GREEDY]
        s0, s1 = (nb * p) // n, (nb * (p + 1)) // n
        for k in range(L):
            layer_block(prec, cell, net, pk, wk, sr.tok, s0, s1, k, p, 0, H)
        decode(prec, net, pk, wk, p, s0, s1)
        for r in range(s0, s1):
            log_softmax_row(wk.logits[r], sr.lp[r])
        ep = barrier(sync, p, n, ep)  # every stream's log-softmax is complete
        if p == 0:
            if position(sr, rows(wk.logits, 0, nb), t, end_id) == 0:
                raise_flag(sync, STOP, 1)
        ep = barrier(sync, p, n, ep)  # the tokens, the parents and the stop flag are visible
        if flag(sync, STOP) != 0:
            break
        nk = sr.info[I_N] + sr.info[I_GREEDY]
        for k in range(L):  # each thread its own rows of the next step, from their parents
            for j in range((nk * p) // n, (nk * (p + 1)) // n):
                copy(wk.hs[k, 0, j], wk.hs[k, 1, sr.keep[j]])
                if lstm:
                    copy(wk.cs[k, 0, j], wk.cs[k, 1, sr.keep[j]])
        ep = barrier(sync, p, n, ep)  # read every parent before any thread writes hs[k][1] again
    if p == 0 and (flag(sync, STOP) != 0 or t1 == N):
        finish(sr)
    gemm16.tiles_off(prec)


@kernel
def _search_one(cell, net, sr, st, h, c, end_id, t0, t1):
    """Positions t0..t1-1 of a beam of one (greedy decoding) from state h, c (L, 1, H), updated:
    the sampler's own single-stream step, so its logits are exactly those of `--temp 0` sampling."""
    tok = sr.tok[:1]
    for t in range(t0, t1):
        step(cell, net, tok, h, c, st, st.w0t[:0])
        log_softmax_row(st.logits[0], sr.lp[0])
        if position(sr, st.logits, t, end_id) == 0:
            finish(sr)
            return
    if t1 == sr.parent.shape[0]:
        finish(sr)


# ----------------------------------------------------------------------------- Python side
def packed_buffers(cell_name: str, G: int, L: int, H: int, V: int, ub, dtype, backend: str = "fp32",
                   n: int | None = None) -> Packed:
    """The packed weights' buffers: float32 panels for backend "fp32"; for a bfloat16 backend ("amx",
    "dot") only w0t and the stride of the panels in the workspace (products_buffers). One row of
    panels per block of units ub, or n rows of the widest block (the streams split: n threads)."""
    from charrnn.kernels import gemm, layout

    n = len(ub) - 1 if n is None else n
    Hp = int(np.max(np.diff(ub)))
    pt = layout.per_thread
    if backend != "fp32":
        return Packed(whh=pt(n, 1, dtype), wih=pt(n, 1, dtype), wd=layout.empty(1, dtype),
                      w0t=layout.empty((V, G * H), dtype), ub=np.asarray(ub, dtype=np.int64), chunk=0,
                      chunk16=int(gemm16.packed_b_size(H, G * Hp)))
    chunk = gemm.packed_size(H, G * Hp)
    return Packed(whh=pt(n, L * chunk, dtype, huge=True), wih=pt(n, max(L - 1, 1) * chunk, dtype, huge=True),
                  wd=layout.empty(gemm.packed_size(H, V), dtype), w0t=layout.empty((V, G * H), dtype),
                  ub=np.asarray(ub, dtype=np.int64), chunk=int(chunk), chunk16=0)


def products_buffers(backend: str, pk: Packed, G: int, L: int, H: int, V: int):
    """The kernels' `prec` for the panels pk (packed_buffers of the same backend): bptt.F32 for
    "fp32"; for "amx" or "dot" a gemm16 workspace whose wp rows hold each of pk's rows of bfloat16
    panels (2L - 1 layers' worth, pk.chunk16 apart) and whose bp[0] holds the decoder's."""
    from charrnn.kernels.bptt import F32

    if backend == "fp32":
        return F32(0)
    Hp = int(np.max(np.diff(pk.ub)))
    return gemm16.workspace(backend, pk.whh.shape[0], H, max(G * Hp, V), gemm16.packed_b_size(H, V),
                            (2 * L - 1) * pk.chunk16)


def work_buffers(cell_name: str, G: int, L: int, NB: int, H: int, V: int, ub, dtype, n: int | None = None) -> Work:
    from charrnn.kernels import layout

    n = len(ub) - 1 if n is None else n
    Hp = int(np.max(np.diff(ub)))
    uses = lambda slot: cells.uses(cell_name, slot)  # noqa: E731
    e, pt = layout.empty, layout.per_thread
    return Work(gates=e((1, NB, G * H), dtype), hs=e((L, 2, NB, H), dtype),
                cs=e((L, 2 if uses("cs") else 0, NB, H), dtype), tcs=e((1 if uses("tcs") else 0, NB, H), dtype),
                hn=e((1 if uses("hn") else 0, NB, H), dtype), hp=pt(n, NB * G * Hp, dtype),
                gp=pt(n, NB * G * Hp, dtype), logits=e((NB, V), dtype))


def search_buffers(width: int, length: int, V: int, banned, table, greedy: bool, first_token: int) -> Search:
    """The record of a search of `width` hypotheses over `length` positions, at its start: one live
    hypothesis (the prime), and the greedy stream beside it when `greedy`."""
    K, N = int(width), int(length)
    info = np.zeros(INFO, dtype=np.int64)
    info[I_N], info[I_GREEDY], info[I_SLOTS], info[I_T], info[I_GEND] = 1, int(greedy), K, -1, -1
    sr = Search(banned=np.ascontiguousarray(banned, dtype=np.bool_), table=np.ascontiguousarray(table, dtype=np.int32),
                lp=np.zeros((K + 1, V)), top_v=np.zeros(K), top_i=np.zeros(K, dtype=np.int64),
                tok=np.full(K + 1, first_token, dtype=np.int32), score=np.zeros(K), matched=np.zeros(K, dtype=np.int32),
                rows=np.zeros(K, dtype=np.int64), par=np.zeros(K, dtype=np.int64), mnew=np.zeros(K, dtype=np.int32),
                live=np.zeros(K, dtype=np.int64), keep=np.zeros(K + 1, dtype=np.int64),
                parent=np.zeros((N, K), dtype=np.int64), token=np.zeros((N, K), dtype=np.int32), tlp=np.zeros((N, K)),
                picked=np.zeros(N, dtype=np.int64), settled=np.zeros((K, 3), dtype=np.int64),
                g_toks=np.zeros(N, dtype=np.int32), g_lps=np.zeros(N), info=info)
    return sr


def panel_bytes(backend: str, G: int, L: int, H: int, itemsize: int) -> int:
    """Bytes of the panels of every layer's products for all H units (2L - 1 matrices of G*H x H):
    what each thread reads at every position when the threads split the streams. `itemsize`: the
    float32 panels' element size (the model's dtype); bfloat16 panels are 2 bytes."""
    return (2 * L - 1) * w_hh_bytes(backend, G, H, itemsize)


def split_streams(panel_bytes: int, streams: int, l2: int | None = None) -> bool:
    """Whether a beam search of `streams` streams on several threads should split the streams
    between them rather than the units, when all the panels of its products take `panel_bytes`.

    Splitting units keeps each core's share of the weights small but sends every layer's new state
    across cores: about 33 us a position on a 2-core VM, whatever the size. Splitting streams sends
    none, but every thread reads all the panels at every position: a good trade when they fit in
    half of one core's L2, or in all of it from 16 streams on (8 rows a thread at two threads) to
    share the reads.
    Measured on the Xeon of benchmarks/results/beam_throughput.txt (2 MiB of L2), 2-layer LSTMs,
    streams against units: 1.12-1.54x at 0.4-0.9 MB of panels (K = 4 to 16); at 1.6-1.8 MB 1.14-1.19x
    for K = 16, 0.78-0.96x for K = 4 and 8; 0.45-0.93x at 3.1 MB and more."""
    l2 = l2_bytes() if l2 is None else l2
    return panel_bytes <= l2 // 2 or (panel_bytes <= l2 and streams >= 16)


def search_threads(prec, cell, net, pk, wk, sr, h, c, end_id, t0, t1, team, sync, streams: bool = False) -> None:
    """Positions t0..t1-1 on the team: the units split between the threads (pk's blocks), or with
    `streams` the streams (pk one block of all units, a row of panels per thread)."""
    n = pk.whh.shape[0]  # a row of panels per thread, either way
    run = _search_streams if streams else _search_threads
    team.run(n, run, n, prec, cell, net, pk, wk, sr, h, c, int(end_id), int(t0), int(t1), sync, sync=sync)
