"""Training: the forward pass and backprop-through-time of a (T, B) batch through the whole network
(layers, dropout, decoder, softmax cross-entropy), and the gradient of the mean loss.

Speed structure. The input products of all T steps are one matrix product per layer; inside the
time loop only h @ W_hh^T remains, over W_hh packed once per batch (gemm.py), followed by the
cell's fused gate loop (cells/). The weight gradients are one product over all T*B positions
after the loop. Threads share the time loop by blocks of units (large H: every thread takes all B
streams, so its products keep all B rows; one barrier per step) or by blocks of streams (small H:
no barrier inside the loop), and everything outside it by rows of the T*B positions. Each thread
writes its own share of the gradient, and the shares are summed in a fixed order, so a fixed
thread count gives identical results.

One call of _forward_backward runs one thread's part from start to end (charrnn/threads.py starts
all of them); the threads meet at the barriers below. Nothing here allocates.
"""

import math
from collections import namedtuple

import numpy as np
from numba.extending import overload

from charrnn.kernels import cells, gemm16
from charrnn.kernels.gemm import pack_bwd, pack_cols, pack_fwd, pack_rows, packed_size, times_w, times_wt
from charrnn.kernels.jit import HELPER, helper, kernel
from charrnn.kernels import layout
from charrnn.kernels.layout import LayerGrad, decoder_weights, layer, layer_weights, part_of, thread_rows
from charrnn.kernels.mathf import cast, colsum, copy, exp, rows
from charrnn.kernels.sync import barrier


# ----------------------------------------------------------------------------- a thread's block
@helper
def block(plan, p, B, H):
    """Thread p's block of the time loop: (s0, s1, u0, u1), streams s0..s1-1 and units u0..u1-1."""
    if plan.by_units:
        return 0, B, plan.ub[p], plan.ub[p + 1]
    return plan.sb[p], plan.sb[p + 1], 0, H


@helper
def pack_block(scr, p, W_hh, G, H, nb, u0, u1, backward):
    """Fill the thread's copy of its part of W_hh: packed panels for several streams; for one
    stream the rows (forward) and columns (backward) as matrices, or nothing when the block is
    all units (W_hh itself serves)."""
    Hp = u1 - u0
    if nb > 1:
        if backward:
            pack_bwd(W_hh, u0, u1, scr.wbp[p])
        else:
            pack_fwd(W_hh, G, H, u0, u1, scr.wfp[p])
    elif Hp < H:
        if backward:
            pack_cols(W_hh, u0, u1, thread_rows(scr.wb, p, G * H, Hp))
        else:
            pack_rows(W_hh, G, H, u0, u1, thread_rows(scr.wf, p, G * Hp, H))


@helper
def block_weights(scr, p, W_hh, G, H, nb, u0, u1, backward):
    """(W, Wp) for the block's recurrent product: forward (times_wt) its rows of W_hh as a matrix W
    (G*Hp, H), backward (times_w) its columns (G*H, Hp); or W_hh itself for a block of all units;
    or, for several streams, packed in Wp (then not empty), as pack_block filled them."""
    Hp = u1 - u0
    if nb > 1:
        return W_hh, scr.wbp[p] if backward else scr.wfp[p]
    if Hp == H:
        return W_hh, scr.wfp[p][:0]
    if backward:
        return thread_rows(scr.wb, p, G * H, Hp), scr.wbp[p][:0]
    return thread_rows(scr.wf, p, G * Hp, H), scr.wfp[p][:0]


# ----------------------------------------------------------------------------- the products, by precision
# Every matrix product of a batch goes through one of the five functions below. Their first
# argument, `prec`, chooses the arithmetic by its type when the kernel compiles: F32 (float32
# products: BLAS and the packed float32 tile of gemm.py) or a bfloat16 workspace of gemm16.py
# (gemm16.AMX or gemm16.DOT: operands rounded to bfloat16, float32 sums). So a float32 run
# compiles exactly the float32 code, and a bf16 run only its backend's.
F32 = namedtuple("F32", ["unused"])


def _precision_of(prec):
    return getattr(prec, "instance_class", type(prec)).__name__


def times_t(prec, p, A, W, C):  # pragma: no cover - overloaded below
    """C (M, N) <- A (M, K) @ W^T for W (N, K): input products, logits."""


def times(prec, p, A, W, C):  # pragma: no cover
    """C (M, N) <- A (M, K) @ W for W (K, N): gradients flowing down through a weight."""


def t_times(prec, p, A, B, C):  # pragma: no cover
    """C (M, N) <- A^T @ B for A (K, M), B (K, N): weight gradients, K the positions."""


def rec_pack(prec, scr, p, W_hh, G, H, nb, u0, u1, backward):  # pragma: no cover
    """Pack the thread's block of W_hh for the time loop's products (pack_block's job)."""


def rec_times(prec, scr, p, A, W_hh, G, H, nb, u0, u1, backward, C):  # pragma: no cover
    """The time loop's product of the block: forward C (nb, G*Hp) <- A (nb, H) @ (its rows of W_hh)^T,
    backward C (nb, Hp) <- A (nb, G*H) @ W_hh[:, u0:u1], from what rec_pack packed."""


def _f32_times_t(prec, p, A, W, C):
    np.dot(A, W.T, C)


def _f32_times(prec, p, A, W, C):
    np.dot(A, W, C)


def _f32_t_times(prec, p, A, B, C):
    np.dot(A.T, B, C)


def _f32_rec_pack(prec, scr, p, W_hh, G, H, nb, u0, u1, backward):
    pack_block(scr, p, W_hh, G, H, nb, u0, u1, backward)


def _f32_rec_times(prec, scr, p, A, W_hh, G, H, nb, u0, u1, backward, C):
    W, Wp = block_weights(scr, p, W_hh, G, H, nb, u0, u1, backward)
    if backward:
        times_w(A, 0, nb, W, Wp, C)
    else:
        times_wt(A, 0, nb, W, Wp, C)


def _b16_times_t(prec, p, A, W, C):
    gemm16.mm_bt(prec, p, A, W, C)


def _b16_times(prec, p, A, W, C):
    gemm16.mm_nn(prec, p, A, W, C)


def _b16_t_times(prec, p, A, B, C):
    gemm16.mm_tn(prec, p, A, B, C)


def _b16_rec_pack(prec, scr, p, W_hh, G, H, nb, u0, u1, backward):
    if backward:
        gemm16.pack_b(W_hh, False, u0, u1, prec.wp[p], prec.ab[p])
    else:
        gemm16.pack_b_gates(W_hh, G, H, u0, u1, prec.wp[p], prec.ab[p])


def _b16_rec_times(prec, scr, p, A, W_hh, G, H, nb, u0, u1, backward, C):
    K, N = (G * H, u1 - u0) if backward else (H, G * (u1 - u0))
    gemm16.product(prec, p, A, False, prec.wp[p], K, N, C, False)


def by_precision(fn, f32, b16):
    """Make `fn(prec, ...)` compile to `f32` when prec is an F32 and to `b16` for a gemm16 workspace
    (also kernels/search.py's products)."""
    @overload(fn, jit_options=HELPER, strict=False)
    def _ov(prec, *args):
        return f32 if _precision_of(prec) == "F32" else b16


for _fn, _f32, _b16 in ((times_t, _f32_times_t, _b16_times_t), (times, _f32_times, _b16_times),
                        (t_times, _f32_t_times, _b16_t_times), (rec_pack, _f32_rec_pack, _b16_rec_pack),
                        (rec_times, _f32_rec_times, _b16_rec_times)):
    by_precision(_fn, _f32, _b16)


# ----------------------------------------------------------------------------- row pieces
@helper
def input_rows(prec, p, cell, r0, r1, g2, x, w0t, inp2, W_ih, b_ih, b_hh, B):
    """Rows r0..r1-1 (position t*B + b) of a layer's input products g2 (T*B, G*H), with the
    cell's folded biases. Layer 0 (inp2 with no rows) gathers rows of w0t by token id instead."""
    GH = g2.shape[1]
    if inp2.shape[0] == 0:
        for r in range(r0, r1):  # the biases folded into each row while it is in L1
            dst, src = g2[r], w0t[x[r // B, r % B]]
            for j in range(GH):
                dst[j] = src[j]
            cells.fold_bias(cell, dst, b_ih, b_hh)
    else:
        times_t(prec, p, rows(inp2, r0, r1), W_ih, rows(g2, r0, r1))
        for r in range(r0, r1):
            cells.fold_bias(cell, g2[r], b_ih, b_hh)


@helper
def layer_output(acts, k, dropout, T, s0, s1, H):
    """Layer k's output in the part of streams s0..s1-1 as the layer above (or the decoder) sees it,
    (T*nb, H): after dropout, or the part's hidden states after step 0."""
    nb = s1 - s0
    if dropout:
        return acts.xs[k][T * s0 * H : T * s1 * H].reshape((T * nb, H))
    return acts.hs[k][(T + 1) * s0 * H : (T + 1) * s1 * H][nb * H :].reshape((T * nb, H))


@helper
def fill_w0t_rows(w0t, W_ih0, v0, v1):
    """Rows v0..v1-1 of w0t (V, G*H) <- weight_ih_l0^T (G*H, V), in 32 x 32 tiles: an element-wise
    transpose misses the cache on every element one side strides over (V x G*H of them, 10M for a
    10,000-character vocabulary at H = 256)."""
    GH = W_ih0.shape[0]
    for g0 in range(0, GH, 32):
        g1 = min(g0 + 32, GH)
        for a in range(v0, v1, 32):
            b = min(a + 32, v1)
            for g in range(g0, g1):
                src = W_ih0[g]
                for v in range(a, b):
                    w0t[v, g] = src[v]


@helper
def mask_rows(r0, r1, out2, h2, masks_k, s0, nb):
    """out = h * mask for rows r0..r1-1 of a part (dropout on a layer's output); the part's row
    t*nb + b reads the mask of position (t, s0 + b) of masks_k (T, B, H)."""
    H = out2.shape[1]
    for r in range(r0, r1):
        dst, src, m = out2[r], h2[r], masks_k[r // nb, s0 + r % nb]
        for j in range(H):
            dst[j] = src[j] * m[j]


@helper
def scale_rows(r0, r1, d2, masks_k, s0, nb):
    """d *= mask for rows r0..r1-1 of a part (back through dropout), masks as in mask_rows."""
    H = d2.shape[1]
    for r in range(r0, r1):
        d, m = d2[r], masks_k[r // nb, s0 + r % nb]
        for j in range(H):
            d[j] *= m[j]


@helper
def decoder_rows(prec, p, r0, r1, top2, Wd, bd, P2, y, nll, B):
    """Logits, softmax and -log p(y) for rows r0..r1-1; P2 (T*B, V) keeps the probabilities."""
    V = P2.shape[1]
    times_t(prec, p, rows(top2, r0, r1), Wd, rows(P2, r0, r1))
    for r in range(r0, r1):
        row = P2[r]
        m = cast(bd[0], -np.inf)  # the max in the row's own type, so exp() gets float32 in float32
        for v in range(V):
            row[v] += bd[v]
            m = max(m, row[v])
        zt = row[y[r // B, r % B]]
        for v in range(V):  # no reduction in this loop, so LLVM vectorises the exp
            row[v] = exp(row[v] - m)
        s = 0.0
        for v in range(V):
            s += row[v]  # in float64
        nll[r // B, r % B] = m + math.log(s) - zt  # log-sum-exp minus the target's logit
        inv = 1.0 / s
        for v in range(V):
            row[v] *= inv


@helper
def decoder_bwd_rows(prec, p, r0, r1, top2, Wd, P2, y, scale, gWd, gbd, dH2, B):
    """d logits = (softmax - onehot(y)) * scale in place for rows r0..r1-1, their share of the
    decoder's gradients (written), and the gradient at the top layer's output (dH2 rows)."""
    V = P2.shape[1]
    for r in range(r0, r1):
        row = P2[r]
        row[y[r // B, r % B]] -= 1
        for v in range(V):
            row[v] *= scale
    dl = rows(P2, r0, r1)
    t_times(prec, p, dl, rows(top2, r0, r1), gWd)
    colsum(dl, gbd)
    times(prec, p, dl, Wd, rows(dH2, r0, r1))


@helper
def layer_grad_rows(prec, p, r0, r1, dG2, dGr2, hprev2, inp2, x, B, W_ih, gW_ih, gW_hh, gb_ih, gb_hh, dH2, w0g):
    """Rows r0..r1-1's share of a layer's weight gradients (written, not accumulated), and for
    layers above 0 the gradient at the layer below's output (dH2 rows). dGr2: the recurrent
    side's gradient (dG2 itself except for a GRU)."""
    zero = cast(W_ih[0, 0], 0.0)
    dG = rows(dG2, r0, r1)
    dGr = rows(dGr2, r0, r1)
    t_times(prec, p, dGr, rows(hprev2, r0, r1), gW_hh)
    colsum(dGr, gb_hh)
    colsum(dG, gb_ih)
    if inp2.shape[0] > 0:
        t_times(prec, p, dG, rows(inp2, r0, r1), gW_ih)
        times(prec, p, dG, W_ih, rows(dH2, r0, r1))
    else:
        # one-hot input: scatter-add rows of dG into rows of (W_ih)^T, then transpose
        GH, V = gW_ih.shape
        if V <= r1 - r0:  # most tokens occur: zero the whole of (W_ih)^T, transpose it whole
            w0g[:] = zero
            for r in range(r0, r1):
                dst, src = w0g[x[r // B, r % B]], dG2[r]
                for j in range(GH):
                    dst[j] += src[j]
            for g in range(GH):
                for v in range(V):
                    gW_ih[g, v] = w0g[v, g]
        else:  # a large vocabulary: only the columns of tokens that occur are not zero
            gW_ih[:] = zero
            for r in range(r0, r1):
                dst = w0g[x[r // B, r % B]]
                for j in range(GH):
                    dst[j] = zero
            for r in range(r0, r1):
                dst, src = w0g[x[r // B, r % B]], dG2[r]
                for j in range(GH):
                    dst[j] += src[j]
            for r in range(r0, r1):  # a token's column written once per occurrence: the same sums
                v = x[r // B, r % B]
                src = w0g[v]
                for g in range(GH):
                    gW_ih[g, v] = src[g]


# ----------------------------------------------------------------------------- one thread's part
@kernel
def _forward_backward(p, cell, net, bt, acts, scr, plan, backward, prec):
    """Thread p's part of the forward pass (and, if `backward`, backprop-through-time) of the batch
    bt (layout.Batch): writes bt.hT, cT, nll and, with backward, grad, dh0, dc0.

    Splitting the streams, thread p owns a part (the streams plan.sb[p]..plan.sb[p+1]-1) and runs
    all of it alone: its threads-in-part q, m are 0, 1 and the barriers inside are no-ops.
    Splitting the units, all threads share one part of all streams: q, m are p, n, each thread
    takes the units plan.ub[q].. of every step (a barrier per step) and the rows plan.rb[q].. of
    everything outside the time loop. Either way the same code, position by position."""
    T = bt.T
    B = bt.h0.shape[1]
    L, H = net.L, net.H
    G = cell.G
    GH = G * H
    n, sync = plan.n, plan.sync
    dropout = bt.masks.shape[0] > 0
    if plan.by_units:
        q, m, s0, s1 = p, n, 0, B
        u0, u1, r0, r1 = plan.ub[p], plan.ub[p + 1], plan.rb[p], plan.rb[p + 1]
    else:
        q, m, s0, s1 = 0, 1, plan.sb[p], plan.sb[p + 1]
        u0, u1, r0, r1 = 0, H, 0, T * (s1 - s0)
    nb, Hp = s1 - s0, u1 - u0
    x, y = bt.x[T * s0 : T * s1].reshape((T, nb)), bt.y[T * s0 : T * s1].reshape((T, nb))
    nll = bt.nll[T * s0 : T * s1].reshape((T, nb))
    probs = acts.probs[T * s0 * net.V : T * s1 * net.V].reshape((T * nb, net.V))
    grad = LayerGrad(part_of(acts.dG, T, s0, s1, GH), part_of(acts.dGh, T, s0, s1, GH), part_of(acts.dH, T, s0, s1, H))
    dH2 = grad.dH.reshape((T * nb, H))
    hp = thread_rows(scr.hp, p, nb, G * Hp)
    gemm16.tiles_on(prec, p)
    ep = 1
    vb = (net.V + n - 1) // n  # each thread transposes a block of the vocabulary
    fill_w0t_rows(acts.w0t, layer_weights(net.theta, net, 0, G)[0], min(net.V, p * vb), min(net.V, (p + 1) * vb))
    ep = barrier(sync, p, n, ep)
    for k in range(L):
        lay = layer(acts, k, T, s0, s1, G)
        W_ih, W_hh, b_ih, b_hh = layer_weights(net.theta, net, k, G)
        inp2 = layer_output(acts, k - 1, dropout, T, s0, s1, H) if k > 0 else dH2[:0]
        # 1. input products of all T steps (this thread's rows); this thread's part of W_hh packed
        input_rows(prec, p, cell, r0, r1, lay.gates.reshape((T * nb, GH)), x, acts.w0t, inp2, W_ih, b_ih, b_hh, nb)
        rec_pack(prec, scr, p, W_hh, G, H, nb, u0, u1, False)
        if q == 0:
            cells.load_state(cell, lay, bt.h0[k][s0:s1], bt.c0[k][s0:s1], 0, nb)
        ep = barrier(sync, q, m, ep)
        # 2. the recurrence: the only product inside the time loop, then the cell's gates
        for t in range(T):
            rec_times(prec, scr, p, lay.hs[t], W_hh, G, H, nb, u0, u1, False, hp)
            cells.forward(cell, lay, t, 0, nb, u0, u1, hp, b_hh)
            ep = barrier(sync, q, m, ep)
        if q == 0:
            cells.save_state(cell, lay, T, bt.hT[k][s0:s1], bt.cT[k][s0:s1], 0, nb)
        # 3. dropout on the output fed upward (the recurrent copy in hs stays unmasked)
        if dropout:
            mask_rows(r0, r1, layer_output(acts, k, True, T, s0, s1, H), layer_output(acts, k, False, T, s0, s1, H),
                      bt.masks[k], s0, nb)
        ep = barrier(sync, q, m, ep)
    # 4. decoder and softmax cross-entropy
    Wd, bd = decoder_weights(net.theta, net)
    top2 = layer_output(acts, L - 1, dropout, T, s0, s1, H)
    decoder_rows(prec, p, r0, r1, top2, Wd, bd, probs, y, nll, nb)
    if backward:
        gws = scr.gws[p]
        gWd, gbd = decoder_weights(gws, net)
        decoder_bwd_rows(prec, p, r0, r1, top2, Wd, probs, y, 1.0 / (T * B), gWd, gbd, dH2, nb)
        ep = barrier(sync, q, m, ep)
        dGr = cells.recurrent_grad(cell, grad)
        dh = thread_rows(scr.dh, p, nb, Hp)
        dc = thread_rows(scr.dc, p, nb, Hp)
        direct = thread_rows(scr.direct, p, nb, Hp)
        for k in range(L - 1, -1, -1):
            lay = layer(acts, k, T, s0, s1, G)
            W_ih, W_hh, b_ih, b_hh = layer_weights(net.theta, net, k, G)
            # 1. back through dropout (output = h * mask); this thread's part of W_hh packed again
            #    (the forward's packing of later layers has overwritten it)
            if dropout:
                scale_rows(r0, r1, dH2, bt.masks[k], s0, nb)
            rec_pack(prec, scr, p, W_hh, G, H, nb, u0, u1, True)
            ep = barrier(sync, q, m, ep)
            # 2. backprop through time: step t-1's gate gradients for a block of units need only
            #    dGr[t] @ W_hh for those units, which the same thread computes
            dh[:] = 0
            dc[:] = 0
            cells.backward(cell, lay, grad, T - 1, 0, nb, u0, u1, dh, dc, direct)
            ep = barrier(sync, q, m, ep)
            for t in range(T - 1, 0, -1):
                rec_times(prec, scr, p, dGr[t], W_hh, G, H, nb, u0, u1, True, dh)
                cells.carry(cell, dh, direct)
                cells.backward(cell, lay, grad, t - 1, 0, nb, u0, u1, dh, dc, direct)
                ep = barrier(sync, q, m, ep)
            rec_times(prec, scr, p, dGr[0], W_hh, G, H, nb, u0, u1, True, dh)
            cells.carry(cell, dh, direct)
            cells.save_state_grad(cell, dh, dc, bt.dh0[k][s0:s1], bt.dc0[k][s0:s1], 0, nb, u0, u1)
            ep = barrier(sync, q, m, ep)
            # 3. weight gradients (one product each over this thread's rows) and the gradient below
            gW_ih, gW_hh, gb_ih, gb_hh = layer_weights(gws, net, k, G)
            hprev2 = lay.hs[:T].reshape((T * nb, H))
            inp2 = layer_output(acts, k - 1, dropout, T, s0, s1, H) if k > 0 else dH2[:0]
            layer_grad_rows(prec, p, r0, r1, grad.dG.reshape((T * nb, GH)), dGr.reshape((T * nb, GH)), hprev2, inp2, x, nb,
                            W_ih, gW_ih, gW_hh, gb_ih, gb_hh, dH2, thread_rows(scr.w0g, p, net.V, GH))
            ep = barrier(sync, q, m, ep)
    ep = barrier(sync, p, n, ep)  # every part done
    gemm16.tiles_off(prec)
    if not backward:
        return
    # 5. the gradient: the threads' shares summed in a fixed order, each thread a slice
    P = bt.grad.shape[0]
    per = (P + n - 1) // n
    i0, i1 = min(P, p * per), min(P, (p + 1) * per)
    out = bt.grad[i0:i1]
    copy(out, scr.gws[0][i0:i1])
    for q2 in range(1, n):
        src = scr.gws[q2][i0:i1]
        for i in range(i1 - i0):
            out[i] += src[i]


# ----------------------------------------------------------------------------- Python side
# Threads share the time loop by blocks of streams when each gets at least MIN_STREAMS_PER_THREAD
# of them (its products keep enough rows for the tile, and the threads meet once per phase, not
# once per step), and by blocks of hidden units otherwise, from UNITS_SPLIT_MIN_H units on (every
# thread takes all streams; a barrier per step). On this 2-core machine (benchmarks/results/
# train_throughput.txt) the split by streams was as fast or faster at 2x128 50x50 (118-125k
# against 116-118k chars/s), 2x256 32x64 (33-37k against 27-35k), 2x512 and 3x512 (equal), and
# lost far less when the host made the two cores slow to talk to each other (95k against 74k at
# 2x128: a barrier then took 250 ns instead of 55). With 8 streams per thread the two were even.
# A big machine (32 streams on 16 threads) splits by units.
#
# One more case splits by units: a layer's packed W_hh as large as one core's L2. Split by streams,
# every thread then reads all of it from L3 at every step, for its few rows; split by units, each
# reads its share for all of them. On a 2-core Xeon with 2 MiB of L2 (benchmarks/results/
# bf16_throughput.txt, whole steps), units against streams at 32 x 64: bf16 2x512 (2 MiB of panels)
# 1.11x, 2x640 1.19x, 2x768 1.14x, 2x1024 1.15x, but 2x384 (1.1 MiB) 0.97x; float32 2x384 to 2x1024
# 1.03-1.05x; 2x768 with 48 streams 1.14x (bf16) and with 64 even, as 2x512 with 50 (0.98x).
UNITS_SPLIT_MIN_H = 128
MIN_UNITS_PER_THREAD = 32
MIN_STREAMS_PER_THREAD = 8
MIN_STREAMS_PER_THREAD_PAST_L2 = 32


def bounds(n: int, parts: int, align: int = 1) -> np.ndarray:
    """Split range(n) into at most `parts` contiguous non-empty blocks, each (but the last) a
    multiple of `align` long."""
    parts = max(1, min(parts, n))
    size = -(-n // parts)
    size = -(-size // align) * align
    edges = [min(i * size, n) for i in range(parts)] + [n]
    out = [edges[0]]
    for e in edges[1:]:
        if e > out[-1]:
            out.append(e)
    return np.array(out, dtype=np.int64)


def w_hh_bytes(precision: str, G: int, H: int, itemsize: int) -> int:
    """Bytes of one layer's W_hh (G*H x H) packed for the time loop's products: gemm.py's float32
    panels of `itemsize` for "fp32", gemm16.py's bfloat16 panels (2 bytes) for "amx" or "dot"."""
    if precision == "fp32":
        return packed_size(H, G * H) * itemsize
    return gemm16.packed_b_size(H, G * H) * 2


def plan(T: int, B: int, H: int, threads: int, panel_bytes: int = 0) -> layout.Plan:
    """How `threads` threads share a (T, B) batch of a model with H units per layer, whose W_hh takes
    `panel_bytes` packed for the time loop's products (0: small enough for any cache)."""
    n = max(1, min(threads, T * B))
    few = MIN_STREAMS_PER_THREAD_PAST_L2 if panel_bytes >= layout.l2_bytes() else MIN_STREAMS_PER_THREAD
    by_units = B == 1 or (H >= UNITS_SPLIT_MIN_H and B < few * n)
    if by_units:
        n = min(n, max(1, H // MIN_UNITS_PER_THREAD))
        if B * H < 256 and MIN_UNITS_PER_THREAD >= 32:  # a barrier per step would cost more than the step
            n = 1
        ub = bounds(H, n, align=16 if H >= 16 * n else 1)
        n = len(ub) - 1
        sb = np.array([0, B], dtype=np.int64)
    else:
        sb = bounds(B, n)
        n = len(sb) - 1
        ub = np.array([0, H], dtype=np.int64)
    return layout.Plan(n, by_units, ub, sb, bounds(T * B, n), layout.new_sync(n))


PRECISIONS = ("fp32", "amx", "dot")  # float32; bfloat16 products by AMX tiles or by VDPBF16PS


class Workspace:
    """The buffers of forward_backward for batches of one shape, reused from call to call (a fresh
    20 MB gradient per step costs page faults)."""

    def __init__(self, cell_name, G, net, T, B, threads, backward, dropout, dtype, precision="fp32"):
        self.key = (T, B, threads, backward, dropout, np.dtype(dtype), precision)
        self.plan = plan(T, B, net.H, threads, w_hh_bytes(precision, G, net.H, np.dtype(dtype).itemsize))
        self.acts = layout.acts(cell_name, G, net.L, T, B, net.H, net.V, dropout, dtype)
        self.scratch = layout.scratch(self.plan, G, B, net.H, net.V, net.theta.shape[0], backward, dtype)
        self.grad = layout.empty(net.theta.shape[0] if backward else 1, dtype)
        self.prec = F32(0) if precision == "fp32" else bf16_workspace(precision, self.plan, G, T, B, net.H, net.V)


def bf16_workspace(backend, pl, G, T, B, H, V):
    """Each thread's bfloat16 buffers (gemm16.workspace) for the largest product of a (T, B) batch
    under plan pl: K up to the thread's positions (weight gradients), N up to G*H or V columns (a
    weight gradient packs the wider of its two operands: the decoder's is (positions, V))."""
    GH = G * H
    rows = int(np.max(np.diff(pl.rb))) if pl.by_units else T * int(np.max(np.diff(pl.sb)))
    Hp = int(np.max(np.diff(pl.ub))) if pl.by_units else H
    size = gemm16.packed_b_size
    kn = max(size(H, GH), size(H, V), size(rows, max(H, GH, V)), size(V, H), size(GH, H))
    wp = max(size(H, G * Hp), size(GH, Hp))
    return gemm16.workspace(backend, pl.n, max(H, GH, V, rows), max(GH, V, H), kn, wp)


def by_part(a, sb):
    """A (T, B) array's positions by part (layout.Acts): (T*B,), part after part, time-major."""
    if len(sb) == 2:
        return a.reshape(-1)
    return np.concatenate([a[:, s0:s1].ravel() for s0, s1 in zip(sb[:-1], sb[1:])])


def from_parts(flat, T, sb):
    """The inverse of by_part: (T, B) from (T*B,)."""
    B = int(sb[-1])
    if len(sb) == 2:
        return flat.reshape(T, B)
    out = np.empty((T, B), dtype=flat.dtype)
    for s0, s1 in zip(sb[:-1], sb[1:]):
        out[:, s0:s1] = flat[T * s0 : T * s1].reshape(T, s1 - s0)
    return out


def forward_backward(cell, cell_name, net, x, y, h0, c0, masks, backward, team, ws=None, precision="fp32"):
    """Forward (and backward) of a (T, B) batch; the caller has checked shapes and dtypes.
    `precision`: "fp32", or bfloat16 products by "amx" or "dot" (float32 arrays only; the caller
    has checked that the CPU has them). Returns (batch, workspace): batch.nll, hT, cT and, with
    backward, grad (the workspace's own buffer, valid until the next call with it), dh0, dc0."""
    T, B = x.shape
    dtype = net.theta.dtype
    dropout = masks is not None
    key = (T, B, team.size, backward, dropout, np.dtype(dtype), precision)
    if ws is None or ws.key != key:
        ws = Workspace(cell_name, cell.G, net, T, B, team.size, backward, dropout, dtype, precision)
    shape = h0.shape
    sb = ws.plan.sb
    nll = np.zeros(T * B, dtype=np.float64)
    bt = layout.Batch(
        T=T, x=by_part(x, sb), y=by_part(y, sb), h0=h0, c0=c0,
        masks=masks if dropout else np.zeros((0, 1, 1, 1), dtype=dtype),
        hT=np.zeros(shape, dtype), cT=np.zeros(shape, dtype), nll=nll,
        grad=ws.grad, dh0=np.zeros(shape, dtype), dc0=np.zeros(shape, dtype),
    )
    team.run(ws.plan.n, _forward_backward, cell, net, bt, ws.acts, ws.scratch, ws.plan, backward, ws.prec,
             sync=ws.plan.sync)
    bt = bt._replace(nll=from_parts(nll, T, sb))
    return bt, ws
