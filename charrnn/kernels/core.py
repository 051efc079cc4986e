"""The compiled core: LSTM, GRU and RNN forward, backprop-through-time, single-step forward and the
sampling loop, for the whole network (layers, dropout, decoder, softmax cross-entropy).

Numba only: no I/O, no Click, no Python objects. Everything that calls everything else lives in this
one file because Numba's cache does not notice edits in other files. The Python-facing checks
(dtypes, shapes, contiguity) live in charrnn/model.py, which calls these `_` kernels.

Conventions (fixed across the project): T time steps, B streams, H hidden, V vocabulary, L layers,
G gates (4 LSTM, 3 GRU, 1 RNN). Equations and gate order are PyTorch's:
    LSTM  i,f,g,o = split(W_ih x + b_ih + W_hh h + b_hh); c' = f*c + i*g; h' = o*tanh(c')
          (i, f, o sigmoid; g tanh)
    GRU   r = s(W_ir x + b_ir + W_hr h + b_hr); z = s(W_iz x + b_iz + W_hz h + b_hz)
          n = tanh(W_in x + b_in + r * (W_hn h + b_hn)); h' = (1 - z) * n + z * h
    RNN   h' = act(W_ih x + b_ih + W_hh h + b_hh), act = tanh or relu
Dropout multiplies each layer's output (fed upward and, for the top layer, to the decoder) by a
mask; the recurrent path is never masked. Layer 0 reads one-hot input, so its input product is a
gather of columns of W_ih (rows of its transpose W0T, (V, G*H)).

Parameters live in one flat buffer `theta`; `offs` (L+1, 4) holds the start of each named view:
row k < L = [weight_ih, weight_hh, bias_ih, bias_hh] of layer k, row L = [decoder.weight,
decoder.bias, 0, 0].

Speed structure: the batch is cut into `nch` chunks of streams, one per thread, and each thread
runs the whole forward and backward of its chunk with single-threaded BLAS calls (streams are
independent, so no synchronisation inside the time loop). Per-thread gradients are summed in a
fixed order afterwards, so a fixed thread count gives identical results. Inside a chunk: input
products of all T steps as one GEMM, only h @ W_hh^T in the time loop, fused gate loops, and weight
gradients as one GEMM over all T steps after the loop.
"""

import math

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from charrnn.kernels.jit import JIT, JIT_PARALLEL

LSTM, GRU, RNN_TANH, RNN_RELU = 0, 1, 2, 3


def n_gates(cell):
    return 4 if cell == LSTM else (3 if cell == GRU else 1)


# ----------------------------------------------------------------------------- scalar maths
# float32 uses a rational approximation of tanh (max abs error ~3e-7, below float32 resolution near
# 1) that LLVM vectorises; libm's tanh/exp are scalar calls and cost 5-20 ns each. float64 (used for
# gradient checks) uses the exact libm functions. NaN propagates through both.
_TANH_CLAMP = 7.90531110763549805


def _tanh(x):  # pragma: no cover - replaced by the overload below inside compiled code
    return math.tanh(x)


def _sigmoid(x):  # pragma: no cover
    return 1.0 / (1.0 + math.exp(-x))


def _cast(x, v):  # pragma: no cover - `v` as the float type of `x`
    return v


@overload(_tanh, jit_options=dict(fastmath=set(JIT["fastmath"]), error_model="numpy"))
def _tanh_ov(x):
    if isinstance(x, types.Float) and x.bitwidth == 32:
        c = np.float32(_TANH_CLAMP)

        def impl(x):
            x = min(x, c)
            x = max(x, -c)
            x2 = x * x
            # odd numerator / even denominator polynomials (minimax fit of tanh on [-c, c])
            p = np.float32(-2.76076847742355e-16)
            p = p * x2 + np.float32(2.00018790482477e-13)
            p = p * x2 + np.float32(-8.60467152213735e-11)
            p = p * x2 + np.float32(5.12229709037114e-08)
            p = p * x2 + np.float32(1.48572235717979e-05)
            p = p * x2 + np.float32(6.37261928875436e-04)
            p = p * x2 + np.float32(4.89352455891786e-03)
            q = np.float32(1.19825839466702e-06)
            q = q * x2 + np.float32(1.18534705686654e-04)
            q = q * x2 + np.float32(2.26843463243900e-03)
            q = q * x2 + np.float32(4.89352518554385e-03)
            return x * p / q

        return impl

    def impl64(x):
        return math.tanh(x)

    return impl64


@overload(_sigmoid, jit_options=dict(fastmath=set(JIT["fastmath"]), error_model="numpy"))
def _sigmoid_ov(x):
    if isinstance(x, types.Float) and x.bitwidth == 32:
        half = np.float32(0.5)

        def impl(x):
            # sigma(x) = (1 + tanh(x/2)) / 2: one vectorisable rational function, no exp
            return half + half * _tanh(half * x)

        return impl

    def impl64(x):
        return 1.0 / (1.0 + math.exp(-x))

    return impl64


@overload(_cast)
def _cast_ov(x, v):
    if isinstance(x, types.Float) and x.bitwidth == 32:
        return lambda x, v: np.float32(v)
    return lambda x, v: np.float64(v)


# ----------------------------------------------------------------------------- random numbers
# One counter-based generator for everything random in the core: splitmix64's output function
# applied to a counter. Dropout masks hash (seed, step, element index), so they do not depend on
# the number of threads, and resuming needs only the step number.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


@njit(**JIT)
def _mix64(z):
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


@njit(**JIT)
def _uniform(state):
    """A float64 in [0, 1) from the generator state (a 1-element uint64 array), advancing it."""
    state[0] += _GOLDEN
    return float(_mix64(state[0]) >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@njit(**JIT_PARALLEL)
def _dropout_masks(masks, seed, step, p):
    """masks (L, T, B, H) <- 0 with probability p, else 1/(1-p) (inverted dropout).

    Element e of the mask at training step `step` is decided by hash(seed, step, e) alone.
    """
    L, T, B, H = masks.shape
    key = _mix64(_mix64(np.uint64(seed) + _GOLDEN) + np.uint64(step) * _M1)
    keep = _cast(masks[0, 0, 0, 0], 1.0 / (1.0 - p))
    zero = _cast(masks[0, 0, 0, 0], 0.0)
    # keep when the top 32 bits, read as a fraction, are >= p
    threshold = np.uint64(min(int(p * 4294967296.0), 4294967295))
    n_rows = L * T * B
    flat = masks.reshape((n_rows, H))
    for r in prange(n_rows):
        base = key + np.uint64(r) * np.uint64(H) * _GOLDEN
        for j in range(H):
            u = _mix64(base + np.uint64(j) * _GOLDEN) >> np.uint64(32)
            flat[r, j] = keep if u >= threshold else zero


@njit(**JIT)
def _seed_state(seed):
    state = np.zeros(1, dtype=np.uint64)
    state[0] = _mix64(np.uint64(seed) ^ _M2)
    return state


# ----------------------------------------------------------------------------- parameter views
@njit(**JIT)
def _layer_weights(theta, offs, k, GH, In, H):
    """Views (W_ih (GH, In), W_hh (GH, H), b_ih (GH,), b_hh (GH,)) of layer k in the flat buffer."""
    W_ih = theta[offs[k, 0] : offs[k, 0] + GH * In].reshape((GH, In))
    W_hh = theta[offs[k, 1] : offs[k, 1] + GH * H].reshape((GH, H))
    b_ih = theta[offs[k, 2] : offs[k, 2] + GH]
    b_hh = theta[offs[k, 3] : offs[k, 3] + GH]
    return W_ih, W_hh, b_ih, b_hh


@njit(**JIT)
def _decoder_weights(theta, offs, L, V, H):
    Wd = theta[offs[L, 0] : offs[L, 0] + V * H].reshape((V, H))
    bd = theta[offs[L, 1] : offs[L, 1] + V]
    return Wd, bd


# ----------------------------------------------------------------------------- one layer, T steps
@njit(**JIT)
def _lstm_forward(gates, hs, cs, tcs, W_hh, hp):
    """LSTM over T steps for one chunk of streams.

    gates (T, b, 4H)  in: x W_ih^T + b_ih + b_hh;  out: activated i, f, g, o (saved for backward)
    hs    (T+1, b, H) hs[0] = h0 in; hs[t+1] = h_t out
    cs    (T+1, b, H) cs[0] = c0 in; cs[t+1] = c_t out
    tcs   (T, b, H)   tanh(c_t) out
    W_hh  (4H, H);  hp (b, 4H) scratch
    """
    T, nb, GH = gates.shape
    H = GH // 4
    for t in range(T):
        np.dot(hs[t], W_hh.T, hp)  # the only product inside the time loop
        g_t, c_prev, c_t, h_t, tc_t = gates[t], cs[t], cs[t + 1], hs[t + 1], tcs[t]
        for b in range(nb):
            for j in range(H):
                i = _sigmoid(g_t[b, j] + hp[b, j])
                f = _sigmoid(g_t[b, H + j] + hp[b, H + j])
                g = _tanh(g_t[b, 2 * H + j] + hp[b, 2 * H + j])
                o = _sigmoid(g_t[b, 3 * H + j] + hp[b, 3 * H + j])
                c = f * c_prev[b, j] + i * g
                tc = _tanh(c)
                g_t[b, j] = i
                g_t[b, H + j] = f
                g_t[b, 2 * H + j] = g
                g_t[b, 3 * H + j] = o
                c_t[b, j] = c
                tc_t[b, j] = tc
                h_t[b, j] = o * tc


@njit(**JIT)
def _lstm_backward(dG, dh0, dc0, dH, gates, cs, tcs, W_hh):
    """Backward of _lstm_forward.

    dG   (T, b, 4H) out: gradient of the gate pre-activations (= of both biases and of x W_ih^T)
    dh0, dc0 (b, H) out: gradient of the initial state
    dH   (T, b, H)  in: gradient arriving at each output h_t from above
    """
    T, nb, GH = gates.shape
    H = GH // 4
    one = _cast(gates[0, 0, 0], 1.0)
    dh_next = dh0  # (b, H): gradient on h_t from step t+1; ends as dh0
    dc_next = dc0
    dh_next[:] = 0
    dc_next[:] = 0
    for t in range(T - 1, -1, -1):
        g_t, c_prev, tc_t, dG_t, dH_t = gates[t], cs[t], tcs[t], dG[t], dH[t]
        for b in range(nb):
            for j in range(H):
                i = g_t[b, j]
                f = g_t[b, H + j]
                g = g_t[b, 2 * H + j]
                o = g_t[b, 3 * H + j]
                tc = tc_t[b, j]
                dh = dH_t[b, j] + dh_next[b, j]
                dc = dc_next[b, j] + dh * o * (one - tc * tc)
                dG_t[b, j] = dc * g * i * (one - i)
                dG_t[b, H + j] = dc * c_prev[b, j] * f * (one - f)
                dG_t[b, 2 * H + j] = dc * i * (one - g * g)
                dG_t[b, 3 * H + j] = dh * tc * o * (one - o)
                dc_next[b, j] = dc * f
        np.dot(dG_t, W_hh, dh_next)  # gradient on h_{t-1} through the recurrence


@njit(**JIT)
def _gru_forward(gates, hs, hn, W_hh, b_hh, hp):
    """GRU over T steps for one chunk.

    gates (T, b, 3H) in: x W_ih^T + b_ih;  out: activated r, z, n (saved)
    hs    (T+1, b, H) hs[0] = h0 in; hs[t+1] = h_t out
    hn    (T, b, H)   out: W_hn h_{t-1} + b_hn (saved: the n gradient needs it)
    """
    T, nb, GH = gates.shape
    H = GH // 3
    one = _cast(gates[0, 0, 0], 1.0)
    for t in range(T):
        np.dot(hs[t], W_hh.T, hp)
        g_t, h_prev, h_t, hn_t = gates[t], hs[t], hs[t + 1], hn[t]
        for b in range(nb):
            for j in range(H):
                r = _sigmoid(g_t[b, j] + hp[b, j] + b_hh[j])
                z = _sigmoid(g_t[b, H + j] + hp[b, H + j] + b_hh[H + j])
                hnj = hp[b, 2 * H + j] + b_hh[2 * H + j]
                n = _tanh(g_t[b, 2 * H + j] + r * hnj)
                g_t[b, j] = r
                g_t[b, H + j] = z
                g_t[b, 2 * H + j] = n
                hn_t[b, j] = hnj
                h_t[b, j] = (one - z) * n + z * h_prev[b, j]


@njit(**JIT)
def _gru_backward(dG, dGh, dh0, dH, gates, hs, hn, W_hh, tmp):
    """Backward of _gru_forward.

    dG  (T, b, 3H) out: gradient of x W_ih^T + b_ih  (r, z, n pre-activations)
    dGh (T, b, 3H) out: gradient of W_hh h + b_hh     (differs from dG in the n part: times r)
    tmp (b, H) scratch
    """
    T, nb, GH = gates.shape
    H = GH // 3
    one = _cast(gates[0, 0, 0], 1.0)
    dh_next = dh0
    dh_next[:] = 0
    for t in range(T - 1, -1, -1):
        g_t, h_prev, hn_t, dG_t, dGh_t, dH_t = gates[t], hs[t], hn[t], dG[t], dGh[t], dH[t]
        for b in range(nb):
            for j in range(H):
                r = g_t[b, j]
                z = g_t[b, H + j]
                n = g_t[b, 2 * H + j]
                dh = dH_t[b, j] + dh_next[b, j]
                dn_pre = dh * (one - z) * (one - n * n)
                dr_pre = dn_pre * hn_t[b, j] * r * (one - r)
                dz_pre = dh * (h_prev[b, j] - n) * z * (one - z)
                dG_t[b, j] = dr_pre
                dG_t[b, H + j] = dz_pre
                dG_t[b, 2 * H + j] = dn_pre
                dGh_t[b, j] = dr_pre
                dGh_t[b, H + j] = dz_pre
                dGh_t[b, 2 * H + j] = dn_pre * r
                tmp[b, j] = dh * z  # the direct path h' = ... + z * h
        np.dot(dGh_t, W_hh, dh_next)  # the path through W_hh h
        dh_next += tmp


@njit(**JIT)
def _rnn_forward(gates, hs, W_hh, hp, relu):
    """Elman RNN over T steps. gates (T, b, H) in: x W_ih^T + b_ih + b_hh; out: h_t (saved)."""
    T, nb, H = gates.shape
    zero = _cast(gates[0, 0, 0], 0.0)
    for t in range(T):
        np.dot(hs[t], W_hh.T, hp)
        g_t, h_t = gates[t], hs[t + 1]
        for b in range(nb):
            for j in range(H):
                a = g_t[b, j] + hp[b, j]
                h = max(a, zero) if relu else _tanh(a)
                g_t[b, j] = h
                h_t[b, j] = h


@njit(**JIT)
def _rnn_backward(dG, dh0, dH, gates, W_hh, relu):
    T, nb, H = gates.shape
    one = _cast(gates[0, 0, 0], 1.0)
    zero = _cast(gates[0, 0, 0], 0.0)
    dh_next = dh0
    dh_next[:] = 0
    for t in range(T - 1, -1, -1):
        g_t, dG_t, dH_t = gates[t], dG[t], dH[t]
        for b in range(nb):
            for j in range(H):
                h = g_t[b, j]
                dh = dH_t[b, j] + dh_next[b, j]
                if relu:
                    dG_t[b, j] = dh if h > zero else zero
                else:
                    dG_t[b, j] = dh * (one - h * h)
        np.dot(dG_t, W_hh, dh_next)


# ----------------------------------------------------------------------------- workspace layout
@njit(**JIT)
def _n_gates(cell):
    return 4 if cell == LSTM else (3 if cell == GRU else 1)


@njit(**JIT)
def _ws_sizes(cell, L, T, nb, H, V):
    """Sizes of the regions of one chunk's workspace (see _carve), in elements."""
    GH = _n_gates(cell) * H
    sizes = np.empty(12, dtype=np.int64)
    sizes[0] = L * T * nb * GH  # gates, per layer (T, nb, GH)
    sizes[1] = L * (T + 1) * nb * H  # hs, per layer (T+1, nb, H)
    sizes[2] = L * (T + 1) * nb * H  # cs (LSTM) / hn (GRU)
    sizes[3] = L * T * nb * H  # tanh(c) (LSTM)
    sizes[4] = L * T * nb * H  # masked outputs (dropout)
    sizes[5] = T * nb * V  # probabilities, then d logits
    sizes[6] = T * nb * GH  # dG
    sizes[7] = T * nb * GH  # dGh (GRU)
    sizes[8] = T * nb * H  # gradient arriving at the current layer's outputs
    sizes[9] = nb * GH  # hp: h @ W_hh^T of one step
    sizes[10] = 3 * nb * H  # small per-step scratch
    sizes[11] = V * GH  # layer-0 weight gradient, transposed, before the final transpose
    return sizes


@njit(**JIT)
def _ws_size(cell, L, T, nb, H, V):
    return _ws_sizes(cell, L, T, nb, H, V).sum()


@njit(**JIT)
def _carve(ws, cell, L, T, nb, H, V):
    sizes = _ws_sizes(cell, L, T, nb, H, V)
    starts = np.zeros(13, dtype=np.int64)
    for i in range(12):
        starts[i + 1] = starts[i] + sizes[i]
    return (
        ws[starts[0] : starts[1]],
        ws[starts[1] : starts[2]],
        ws[starts[2] : starts[3]],
        ws[starts[3] : starts[4]],
        ws[starts[4] : starts[5]],
        ws[starts[5] : starts[6]],
        ws[starts[6] : starts[7]],
        ws[starts[7] : starts[8]],
        ws[starts[8] : starts[9]],
        ws[starts[9] : starts[10]],
        ws[starts[10] : starts[11]],
        ws[starts[11] : starts[12]],
    )


# ----------------------------------------------------------------------------- one chunk, all layers
@njit(**JIT)
def _chunk_forward(cell, L, H, V, theta, offs, w0t, x, y, b0, nb, h0, c0, masks, hT, cT, nll, ws):
    """Forward of streams b0 .. b0+nb-1 through all layers, the decoder and the loss.

    x, y (T, B) token ids; h0, c0 (L, B, H) initial state; masks (L, T, B, H) or empty (no dropout)
    hT, cT (L, B, H) out: final state; nll (T, B) out: -log p(y) at every position.
    Leaves in `ws` what the backward needs (activations, probabilities).
    """
    T = x.shape[0]
    GH = _n_gates(cell) * H
    relu = cell == RNN_RELU
    dropout = masks.shape[0] > 0
    G_all, HS_all, CS_all, TC_all, XS_all, P, _dG, _dGh, _dH, hp_flat, _scr, _w0g = _carve(ws, cell, L, T, nb, H, V)
    hp = hp_flat.reshape((nb, GH))
    for k in range(L):
        In = V if k == 0 else H
        W_ih, W_hh, b_ih, b_hh = _layer_weights(theta, offs, k, GH, In, H)
        gates = G_all[k * T * nb * GH : (k + 1) * T * nb * GH].reshape((T, nb, GH))
        hs_flat = HS_all[k * (T + 1) * nb * H : (k + 1) * (T + 1) * nb * H]
        hs = hs_flat.reshape((T + 1, nb, H))
        cs = CS_all[k * (T + 1) * nb * H : (k + 1) * (T + 1) * nb * H].reshape((T + 1, nb, H))
        g2 = gates.reshape((T * nb, GH))
        # 1. input products of all T steps at once (+ biases that can be folded in)
        if k == 0:
            for t in range(T):  # one-hot input: gather rows of W_ih^T
                for b in range(nb):
                    g2[t * nb + b] = w0t[x[t, b0 + b]]
        else:
            inp = _layer_output(XS_all, HS_all, k - 1, T, nb, H, dropout)
            np.dot(inp, W_ih.T, g2)
        for r in range(T * nb):
            for j in range(GH):
                if cell == GRU:
                    g2[r, j] += b_ih[j]  # b_hh stays inside the gates (r * (W_hn h + b_hn))
                else:
                    g2[r, j] += b_ih[j] + b_hh[j]
        # 2. the recurrence
        for b in range(nb):
            for j in range(H):
                hs[0, b, j] = h0[k, b0 + b, j]
                if cell == LSTM:
                    cs[0, b, j] = c0[k, b0 + b, j]
        if cell == LSTM:
            tcs = TC_all[k * T * nb * H : (k + 1) * T * nb * H].reshape((T, nb, H))
            _lstm_forward(gates, hs, cs, tcs, W_hh, hp)
        elif cell == GRU:
            _gru_forward(gates, hs, cs[1:], W_hh, b_hh, hp)
        else:
            _rnn_forward(gates, hs, W_hh, hp, relu)
        for b in range(nb):
            for j in range(H):
                hT[k, b0 + b, j] = hs[T, b, j]
                if cell == LSTM:
                    cT[k, b0 + b, j] = cs[T, b, j]
        # 3. dropout on the output fed upward (the recurrent copy in hs stays unmasked)
        if dropout:
            xs = XS_all[k * T * nb * H : (k + 1) * T * nb * H].reshape((T, nb, H))
            for t in range(T):
                for b in range(nb):
                    for j in range(H):
                        xs[t, b, j] = hs[t + 1, b, j] * masks[k, t, b0 + b, j]
    # 4. decoder and softmax cross-entropy; P keeps the probabilities for backward
    Wd, bd = _decoder_weights(theta, offs, L, V, H)
    top = _layer_output(XS_all, HS_all, L - 1, T, nb, H, dropout)
    P2 = P.reshape((T * nb, V))
    np.dot(top, Wd.T, P2)
    for t in range(T):
        for b in range(nb):
            row = P2[t * nb + b]
            m = -np.inf
            for v in range(V):
                row[v] += bd[v]
                m = max(m, row[v])
            zt = row[y[t, b0 + b]]
            s = 0.0
            for v in range(V):
                e = math.exp(row[v] - m)
                row[v] = e
                s += e
            nll[t, b0 + b] = m + math.log(s) - zt  # log-sum-exp minus the target's logit
            inv = 1.0 / s
            for v in range(V):
                row[v] *= inv


@njit(**JIT)
def _layer_output(XS_all, HS_all, k, T, nb, H, dropout):
    """(T*nb, H) view of layer k's output as seen by the layer above: masked copy or hs[1:]."""
    if dropout:
        return XS_all[k * T * nb * H : (k + 1) * T * nb * H].reshape((T * nb, H))
    base = k * (T + 1) * nb * H
    return HS_all[base + nb * H : base + (T + 1) * nb * H].reshape((T * nb, H))


@njit(**JIT)
def _chunk_backward(cell, L, H, V, theta, offs, x, y, b0, nb, B, masks, grad, dh0, dc0, ws):
    """Backward of _chunk_forward: gradient of mean(nll over all T*B positions) into `grad`.

    grad (P,) out: this chunk's share of every parameter gradient (written, not accumulated)
    dh0, dc0 (L, B, H) out: gradient of the initial state, rows b0 .. b0+nb-1
    """
    T = x.shape[0]
    GH = _n_gates(cell) * H
    relu = cell == RNN_RELU
    dropout = masks.shape[0] > 0
    G_all, HS_all, CS_all, TC_all, XS_all, P, dG_flat, dGh_flat, dH_flat, hp_flat, scr, w0g_flat = _carve(
        ws, cell, L, T, nb, H, V
    )
    scale = _cast(theta[0], 1.0 / (T * B))
    zero = _cast(theta[0], 0.0)
    # 1. d logits = (softmax - onehot(y)) / (T * B)
    P2 = P.reshape((T * nb, V))
    for t in range(T):
        for b in range(nb):
            r = t * nb + b
            P2[r, y[t, b0 + b]] -= 1
            for v in range(V):
                P2[r, v] *= scale
    Wd, bd = _decoder_weights(theta, offs, L, V, H)
    gWd, gbd = _decoder_weights(grad, offs, L, V, H)
    top = _layer_output(XS_all, HS_all, L - 1, T, nb, H, dropout)
    np.dot(P2.T, top, gWd)
    _colsum(P2, gbd)
    dH2 = dH_flat.reshape((T * nb, H))
    np.dot(P2, Wd, dH2)  # gradient at the top layer's (masked) output
    dG2 = dG_flat.reshape((T * nb, GH))
    dGh2 = dGh_flat.reshape((T * nb, GH))
    s0 = scr[0 : nb * H].reshape((nb, H))
    s1 = scr[nb * H : 2 * nb * H].reshape((nb, H))
    s2 = scr[2 * nb * H : 3 * nb * H].reshape((nb, H))
    for k in range(L - 1, -1, -1):
        In = V if k == 0 else H
        W_ih, W_hh, b_ih, b_hh = _layer_weights(theta, offs, k, GH, In, H)
        gW_ih, gW_hh, gb_ih, gb_hh = _layer_weights(grad, offs, k, GH, In, H)
        gates = G_all[k * T * nb * GH : (k + 1) * T * nb * GH].reshape((T, nb, GH))
        base = k * (T + 1) * nb * H
        hs = HS_all[base : base + (T + 1) * nb * H].reshape((T + 1, nb, H))
        hprev = HS_all[base : base + T * nb * H].reshape((T * nb, H))  # h_{t-1} for every t
        cs = CS_all[base : base + (T + 1) * nb * H].reshape((T + 1, nb, H))
        dH = dH_flat.reshape((T, nb, H))
        dG = dG_flat.reshape((T, nb, GH))
        # 1. through dropout: output = h * mask
        if dropout:
            for t in range(T):
                for b in range(nb):
                    for j in range(H):
                        dH[t, b, j] *= masks[k, t, b0 + b, j]
        # 2. backprop through time
        if cell == LSTM:
            tcs = TC_all[k * T * nb * H : (k + 1) * T * nb * H].reshape((T, nb, H))
            _lstm_backward(dG, s0, s1, dH, gates, cs, tcs, W_hh)
        elif cell == GRU:
            _gru_backward(dG, dGh2.reshape((T, nb, GH)), s0, dH, gates, hs, cs[1:], W_hh, s2)
        else:
            _rnn_backward(dG, s0, dH, gates, W_hh, relu)
        for b in range(nb):
            for j in range(H):
                dh0[k, b0 + b, j] = s0[b, j]
                if cell == LSTM:
                    dc0[k, b0 + b, j] = s1[b, j]
        # 3. weight gradients: one GEMM each over all T steps
        dGrec = dGh2 if cell == GRU else dG2
        np.dot(dGrec.T, hprev, gW_hh)
        _colsum(dGrec, gb_hh)
        _colsum(dG2, gb_ih)
        if k > 0:
            inp = _layer_output(XS_all, HS_all, k - 1, T, nb, H, dropout)
            np.dot(dG2.T, inp, gW_ih)
            np.dot(dG2, W_ih, dH2)  # gradient at the layer below's output
        else:
            # one-hot input: scatter-add rows of dG into rows of (W_ih)^T, then transpose once
            w0g = w0g_flat.reshape((V, GH))
            w0g[:] = zero
            for t in range(T):
                for b in range(nb):
                    w0g[x[t, b0 + b]] += dG2[t * nb + b]
            for g in range(GH):
                for v in range(V):
                    gW_ih[g, v] = w0g[v, g]


@njit(**JIT)
def _colsum(a, out):
    """out[j] = sum_i a[i, j] (written, not accumulated)."""
    out[:] = 0
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            out[j] += a[i, j]


# ----------------------------------------------------------------------------- whole batch
@njit(**JIT)
def _fill_w0t(w0t, theta, offs, GH, V):
    """w0t (V, GH) <- weight_ih_l0^T, so that the one-hot gather reads contiguous rows."""
    W = theta[offs[0, 0] : offs[0, 0] + GH * V].reshape((GH, V))
    for g in range(GH):
        for v in range(V):
            w0t[v, g] = W[g, v]


@njit(**JIT_PARALLEL)
def _forward_backward(cell, L, H, V, theta, offs, x, y, h0, c0, masks, hT, cT, nll, grad, dh0, dc0, w0t, ws, gws, bounds, backward):
    """Forward (and, if `backward`, backward) of a (T, B) batch, one chunk of streams per thread.

    bounds (nch+1,): chunk c holds streams bounds[c] .. bounds[c+1]-1
    ws (nch, n) per-chunk workspace; gws (nch, P) per-chunk gradients, summed into grad in order.
    """
    T, B = x.shape
    GH = _n_gates(cell) * H
    nch = bounds.shape[0] - 1
    _fill_w0t(w0t, theta, offs, GH, V)
    for c in prange(nch):
        b0 = bounds[c]
        nb = bounds[c + 1] - b0
        _chunk_forward(cell, L, H, V, theta, offs, w0t, x, y, b0, nb, h0, c0, masks, hT, cT, nll, ws[c])
        if backward:
            _chunk_backward(cell, L, H, V, theta, offs, x, y, b0, nb, B, masks, gws[c], dh0, dc0, ws[c])
    if backward:
        grad[:] = gws[0]
        for c in range(1, nch):
            grad += gws[c]


# ----------------------------------------------------------------------------- generation
@njit(**JIT)
def _step(cell, L, H, V, theta, offs, w0t, tok, h, c, logits, ws):
    """One time step for nb streams (sampling, priming): tokens tok (nb,), state h, c (L, nb, H)
    updated in place, logits (nb, V) out. Reuses the T=1 case of the layer kernels."""
    nb = tok.shape[0]
    GH = _n_gates(cell) * H
    relu = cell == RNN_RELU
    G, HS, CS, TC, _xs, _p, _dg, _dgh, _dh, hp_flat, _scr, _w0g = _carve(ws, cell, L, 1, nb, H, V)
    gates = G[: nb * GH].reshape((1, nb, GH))
    hs = HS[: 2 * nb * H].reshape((2, nb, H))
    cs = CS[: 2 * nb * H].reshape((2, nb, H))
    tcs = TC[: nb * H].reshape((1, nb, H))
    hp = hp_flat.reshape((nb, GH))
    g2 = gates[0]
    for k in range(L):
        In = V if k == 0 else H
        W_ih, W_hh, b_ih, b_hh = _layer_weights(theta, offs, k, GH, In, H)
        if k == 0:
            for b in range(nb):
                g2[b] = w0t[tok[b]]
        else:
            np.dot(hs[1], W_ih.T, g2)  # hs[1] still holds the output of layer k-1
        for b in range(nb):
            for j in range(GH):
                g2[b, j] += b_ih[j] if cell == GRU else b_ih[j] + b_hh[j]
        hs[0] = h[k]
        if cell == LSTM:
            cs[0] = c[k]
            _lstm_forward(gates, hs, cs, tcs, W_hh, hp)
            c[k] = cs[1]
        elif cell == GRU:
            _gru_forward(gates, hs, cs[1:], W_hh, b_hh, hp)
        else:
            _rnn_forward(gates, hs, W_hh, hp, relu)
        h[k] = hs[1]
    Wd, bd = _decoder_weights(theta, offs, L, V, H)
    np.dot(hs[1], Wd.T, logits)
    for b in range(nb):
        for v in range(V):
            logits[b, v] += bd[v]


@njit(**JIT)
def _draw(z, temp, top_k, top_p, banned, state, scratch, order):
    """Draw a token id from logits z (V,) in float64: temperature, top-k, top-p; never a banned id.

    temp == 0 is greedy (argmax). scratch (V,) float64 and order (V,) int64 are work buffers.
    """
    V = z.shape[0]
    if temp == 0.0:
        best = -1
        for v in range(V):
            if not banned[v] and (best < 0 or z[v] > z[best]):
                best = v
        return best
    m = -np.inf
    for v in range(V):
        if not banned[v]:
            m = max(m, z[v] / temp)
    if top_k <= 0 and top_p >= 1.0:
        # the common case: plain softmax with temperature, no sort
        s = 0.0
        for v in range(V):
            e = 0.0 if banned[v] else math.exp(z[v] / temp - m)
            scratch[v] = e
            s += e
        u = _uniform(state) * s
        acc = 0.0
        last = 0
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
    order[:] = np.argsort(-scratch, kind="mergesort")
    n = V
    for v in range(V):
        if banned[v]:
            n -= 1
    if top_k > 0:
        n = min(n, top_k)
    s = 0.0
    for i in range(n):
        e = math.exp(scratch[order[i]] / temp - m)
        scratch[order[i]] = e
        s += e
    if top_p < 1.0:
        acc = 0.0
        for i in range(n):
            acc += scratch[order[i]]
            if acc >= top_p * s * (1.0 - 1e-12):  # slack: an exact boundary must not lose to rounding
                n = i + 1
                s = acc
                break
    u = _uniform(state) * s
    acc = 0.0
    for i in range(n):
        acc += scratch[order[i]]
        if u < acc:
            return order[i]
    return order[n - 1]


@njit(**JIT)
def _generate(cell, L, H, V, theta, offs, w0t, tok, h, c, out, n_steps, temp, top_k, top_p, banned, end_id, done, state, ws):
    """Generate up to n_steps tokens for nb streams. tok (nb,) holds each stream's last token and is
    updated; h, c carry the state; out (n_steps, nb) receives the tokens (-1 after a stream is done);
    a stream is done after it draws end_id (pass -1 to never stop). Returns the steps taken."""
    nb = tok.shape[0]
    logits = np.empty((nb, V), dtype=theta.dtype)
    z = np.empty(V, dtype=np.float64)
    scratch = np.empty(V, dtype=np.float64)
    order = np.empty(V, dtype=np.int64)
    for s in range(n_steps):
        all_done = True
        for b in range(nb):
            if not done[b]:
                all_done = False
        if all_done:
            return s
        _step(cell, L, H, V, theta, offs, w0t, tok, h, c, logits, ws)
        for b in range(nb):
            if done[b]:
                out[s, b] = -1
                continue
            for v in range(V):
                z[v] = logits[b, v]
            t = _draw(z, temp, top_k, top_p, banned, state, scratch, order)
            out[s, b] = t
            tok[b] = t
            if t == end_id:
                done[b] = True
    return n_steps
