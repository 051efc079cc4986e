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

Speed structure: input products of all T steps as one GEMM per layer, only h @ W_hh^T inside the
time loop (over W_hh packed once per batch, through our own register-tiled kernel: _mm_packed),
fused gate loops, weight gradients as one GEMM over all T*B positions after the loop.
Threads share the time loop by blocks of units (large H) or of streams (small H); see
_forward_backward. Per-thread gradients are summed in a fixed order afterwards, so a fixed thread
count gives identical results. Scoring one stream pipelines the layers instead (_score_pipe).
"""

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

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


@overload(_tanh, inline="always", jit_options=dict(fastmath=set(JIT["fastmath"]), error_model="numpy"))
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


@overload(_sigmoid, inline="always", jit_options=dict(fastmath=set(JIT["fastmath"]), error_model="numpy"))
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


@overload(_cast, inline="always")
def _cast_ov(x, v):
    if isinstance(x, types.Float) and x.bitwidth == 32:
        return lambda x, v: np.float32(v)
    return lambda x, v: np.float64(v)


# ----------------------------------------------------------------------------- packed-weight GEMM
# The recurrent product inside the time loop multiplies a few dozen rows (streams) by a weight
# matrix that stays the same for the whole batch. BLAS re-packs that matrix into its own panel
# layout on every call, every step; at 2x512 a thread's share is 2 MiB, which is the L2 cache,
# so the re-packing cost about a third of each product (measured: OpenBLAS 65-97 GFLOP/s per
# core on 50x512x1024, this kernel 110-130 in the same runs). So the weights are packed once per
# batch into panels of NR columns (_pack_fwd, _pack_bwd) and multiplied by a register-tiled
# micro-kernel written in LLVM IR (_tile): MR rows x NR columns of accumulators live in vector
# registers through the k loop, with one broadcast of A and NV vector loads of the panel per k.
# Numba's own loops cannot keep a 2-D accumulator tile in registers, hence the intrinsic.
def _host_has_avx512():
    try:
        from llvmlite import binding

        return bool(binding.get_host_cpu_features().get("avx512f", False))
    except Exception:  # pragma: no cover - any failure only costs speed
        return False


_VEC_BYTES = 64 if _host_has_avx512() else 32  # one vector register: zmm (32 of them) or ymm (16)
_MR = 8 if _VEC_BYTES == 64 else 6  # rows per tile: MR*NV accumulators + NV loads + a broadcast fit
_NV = 2  # vectors per tile row: NR = NV * lanes columns
PANEL_BYTES = _NV * _VEC_BYTES  # one panel row; NR = PANEL_BYTES // itemsize
_KC = 256  # k block: a 256 x NR block of a panel (32 KiB in float32) stays in L1 across row tiles


@intrinsic
def _tile(typingctx, a, a0, lda, w, w0, c, c0, ldc, K, rows, cols, accum):
    """C[c0 + r*ldc + j] (+)= sum_k A[a0 + r*lda + k] * Wp[w0 + k*NR + j] for r < rows <= MR,
    j < cols <= NR, k < K (K >= 1): one tile of C from one packed panel. `accum` adds to C instead
    of overwriting it. a, w, c: arrays of one float type, indexed flat from their first element."""
    sig = types.void(a, a0, lda, w, w0, c, c0, ldc, K, rows, cols, accum)

    def codegen(context, builder, sig, args):
        a_v, a0_v, lda_v, w_v, w0_v, c_v, c0_v, ldc_v, K_v, rows_v, cols_v, acc_v = args
        i32, i64 = ir.IntType(32), ir.IntType(64)
        fty = context.get_value_type(sig.args[0].dtype)
        VL = _VEC_BYTES // context.get_abi_sizeof(fty)
        vty = ir.VectorType(fty, VL)
        suffix = "v%d%s" % (VL, "f32" if isinstance(fty, ir.FloatType) else "f64")
        mty = ir.VectorType(ir.IntType(1), VL)
        # fmuladd: one fused multiply-add where the CPU has the instruction, a multiply and an add
        # where it has not (llvm.fma would then call libm's fma for every lane)
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty] * 3), "llvm.fmuladd." + suffix)
        mload = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vty, [vty.as_pointer(), i32, mty, vty]), "llvm.masked.load.%s.p0" % suffix)
        mstore = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [vty, vty.as_pointer(), i32, mty]), "llvm.masked.store.%s.p0" % suffix)

        def base(i, off):
            return builder.gep(context.make_array(sig.args[i])(context, builder, args[i]).data, [off])

        def splat(x, ty):
            undef = ir.Constant(ir.VectorType(ty, VL), ir.Undefined)
            v = builder.insert_element(undef, x, ir.Constant(i32, 0))
            return builder.shuffle_vector(v, undef, ir.Constant(ir.VectorType(i32, VL), [0] * VL))

        ap, wp, cp = base(0, a0_v), base(3, w0_v), base(5, c0_v)
        lanes = ir.Constant(ir.VectorType(i64, VL), list(range(VL)))
        masks = [builder.icmp_signed("<", lanes, splat(builder.sub(cols_v, ir.Constant(i64, h * VL)), i64)) for h in range(_NV)]
        zero = ir.Constant(vty, None)
        done = builder.append_basic_block("tile.done")
        sw = builder.switch(rows_v, done)
        for m in range(1, _MR + 1):  # one loop per row count, so a short last tile does no wasted work
            entry = builder.append_basic_block("tile.rows%d" % m)
            sw.add_case(ir.Constant(i64, m), entry)
            builder.position_at_end(entry)
            arow = [builder.gep(ap, [builder.mul(ir.Constant(i64, r), lda_v)]) for r in range(m)]
            cvec = [[builder.bitcast(builder.gep(builder.gep(cp, [builder.mul(ir.Constant(i64, r), ldc_v)]),
                                                 [ir.Constant(i64, h * VL)]), vty.as_pointer())
                     for h in range(_NV)] for r in range(m)]
            init = []
            for r in range(m):
                for h in range(_NV):
                    old = builder.call(mload, [cvec[r][h], ir.Constant(i32, 4), builder.and_(masks[h], splat(acc_v, ir.IntType(1))), zero])
                    init.append(old)
            pre = builder.block
            loop = builder.append_basic_block("tile.loop%d" % m)
            builder.branch(loop)
            builder.position_at_end(loop)
            k = builder.phi(i64)
            k.add_incoming(ir.Constant(i64, 0), pre)
            accs = []
            for v in init:
                phi = builder.phi(vty)
                phi.add_incoming(v, pre)
                accs.append(phi)
            wk = builder.gep(wp, [builder.mul(k, ir.Constant(i64, _NV * VL))])
            wx = [builder.load(builder.bitcast(builder.gep(wk, [ir.Constant(i64, h * VL)]), vty.as_pointer()), align=4)
                  for h in range(_NV)]
            new = []
            for r in range(m):
                s = splat(builder.load(builder.gep(arow[r], [k]), align=4), fty)
                for h in range(_NV):
                    new.append(builder.call(fma, [s, wx[h], accs[_NV * r + h]]))
            k1 = builder.add(k, ir.Constant(i64, 1))
            k.add_incoming(k1, loop)
            for phi, v in zip(accs, new):
                phi.add_incoming(v, loop)
            end = builder.append_basic_block("tile.end%d" % m)
            builder.cbranch(builder.icmp_signed("<", k1, K_v), loop, end)
            builder.position_at_end(end)
            for r in range(m):
                for h in range(_NV):
                    builder.call(mstore, [new[_NV * r + h], cvec[r][h], ir.Constant(i32, 4), masks[h]])
            builder.branch(done)
        builder.position_at_end(done)
        return context.get_dummy_value()

    return sig, codegen


@njit(**JIT)
def _panel_cols(a):
    """NR, the columns of one packed panel, for a's float type."""
    return PANEL_BYTES // a.itemsize


@njit(**JIT)
def _packed_size(K, N):
    """Elements a (K, N) matrix takes packed, in either float type (float32 panels are the widest)."""
    nr = PANEL_BYTES // 4
    return ((N + nr - 1) // nr) * nr * K


@njit(**JIT)
def _mm_packed(A, Wp, C, K):
    """C (M, N) <- A (M, >=K)[:, :K] @ B for B (K, N) packed in panels (_pack_fwd, _pack_bwd).
    A and C are C-contiguous; C's columns are N."""
    M, N = C.shape
    lda, nr = A.shape[1], _panel_cols(Wp)
    for jp in range((N + nr - 1) // nr):
        cols = min(nr, N - jp * nr)
        for k0 in range(0, K, _KC):
            kk = min(_KC, K - k0)
            for i in range(0, M, _MR):
                _tile(A, i * lda + k0, lda, Wp, (jp * K + k0) * nr, C, i * N + jp * nr, N, kk, min(_MR, M - i), cols, k0 > 0)


@njit(**JIT)
def _pack_fwd(W_hh, G, H, u0, u1, Wp):
    """Pack B = Wf^T (H, G*Hp), where column g*Hp + u is row g*H + u0 + u of W_hh (the block's rows,
    gate-major): panel p holds B[k, p*NR + j] at Wp[(p*H + k)*NR + j], zero beyond the last column."""
    Hp = u1 - u0
    N, nr = G * Hp, _panel_cols(Wp)
    zero = _cast(Wp[0], 0.0)
    for n0 in range(0, N, nr):
        panel = Wp[(n0 // nr) * H * nr : (n0 // nr + 1) * H * nr]
        for j in range(nr):
            n = n0 + j
            if n < N:
                src = W_hh[(n // Hp) * H + u0 + n % Hp]
                for k in range(H):
                    panel[k * nr + j] = src[k]
            else:
                for k in range(H):
                    panel[k * nr + j] = zero


@njit(**JIT)
def _pack_bwd(W_hh, u0, u1, Wp):
    """Pack B = W_hh[:, u0:u1] (G*H, Hp) in panels, as _pack_fwd does."""
    K, N, nr = W_hh.shape[0], u1 - u0, _panel_cols(Wp)
    zero = _cast(Wp[0], 0.0)
    for n0 in range(0, N, nr):
        panel = Wp[(n0 // nr) * K * nr : (n0 // nr + 1) * K * nr]
        w = min(nr, N - n0)
        for k in range(K):
            src, dst = W_hh[k, u0 + n0 : u0 + n0 + w], panel[k * nr : (k + 1) * nr]
            for j in range(w):
                dst[j] = src[j]
            for j in range(w, nr):
                dst[j] = zero


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


# ----------------------------------------------------------------------------- one step, one block of units
# Threads split a layer's hidden units into blocks [u0, u1); each thread sees all B streams, so its
# recurrent product keeps all B rows (a matrix product is markedly faster with more rows) and packs
# only its share of W_hh. The forward of a block needs the rows of W_hh for its units (Wf: (G*Hp, H),
# gate-major), the backward its columns (Wb: (G*H, Hp)); with several streams both are packed in
# panels for _mm_packed, with one they stay matrices (W_hh itself for a block of all units).
#
# Every inner loop runs j over range(n) from 0 on 1-D row views: an index like `H + j` or a loop
# from a non-zero start makes Numba emit negative-index wraparound checks, which stop LLVM from
# vectorising the loop (measured: 21 ns per LSTM unit instead of 3).
@njit(**JIT)
def _rec_fwd(h_prev, s0, s1, Wf, Wp, hp):
    """hp (s1-s0, n) <- h_prev[s0:s1] @ Wf^T for Wf (n, H), or with Wf^T packed in Wp (when Wp is
    not empty). A single stream uses a matrix-vector product, which needs no packing."""
    if Wp.shape[0] > 0:
        _mm_packed(_sub(h_prev, s0, s1), Wp, _sub(hp, 0, s1 - s0), h_prev.shape[1])
    elif s1 - s0 == 1:
        np.dot(Wf, h_prev[s0], hp[0])
    else:
        np.dot(_sub(h_prev, s0, s1), Wf.T, hp)


@njit(**JIT)
def _lstm_fwd_block(t, s0, s1, u0, u1, gates, hs, cs, tcs, Wf, Wp, hp):
    """Step t of an LSTM layer for streams s0..s1-1 and units u0..u1-1.

    gates (T, B, 4H)  in: x W_ih^T + b_ih + b_hh;  out: activated i, f, g, o (saved for backward)
    hs, cs (T+1, B, H) [0] the initial state; [t+1] written for the block
    tcs   (T, B, H)   tanh(c_t), written for the block
    Wf (4Hp, H) the block's rows of W_hh, gate-major;  hp (s1-s0, 4Hp) scratch
    """
    H = hs.shape[2]
    Hp = u1 - u0
    _rec_fwd(hs[t], s0, s1, Wf, Wp, hp)  # the only product inside the time loop
    for b in range(s0, s1):
        row, p = gates[t, b], hp[b - s0]
        gi, gf, gg, go = row[u0:u1], row[H + u0 : H + u1], row[2 * H + u0 : 2 * H + u1], row[3 * H + u0 : 3 * H + u1]
        pi, pf, pg, po = p[:Hp], p[Hp : 2 * Hp], p[2 * Hp : 3 * Hp], p[3 * Hp : 4 * Hp]
        c_prev, c_t, h_t, tc_t = cs[t, b, u0:u1], cs[t + 1, b, u0:u1], hs[t + 1, b, u0:u1], tcs[t, b, u0:u1]
        for j in range(Hp):
            i = _sigmoid(gi[j] + pi[j])
            f = _sigmoid(gf[j] + pf[j])
            g = _tanh(gg[j] + pg[j])
            o = _sigmoid(go[j] + po[j])
            c = f * c_prev[j] + i * g
            tc = _tanh(c)
            gi[j] = i
            gf[j] = f
            gg[j] = g
            go[j] = o
            c_t[j] = c
            tc_t[j] = tc
            h_t[j] = o * tc


@njit(**JIT)
def _lstm_bwd_block(t, s0, s1, u0, u1, dG, dH, gates, cs, tcs, dhn, dcn):
    """Gate gradients of an LSTM layer at step t for streams s0..s1-1 and units u0..u1-1.

    dhn, dcn (s1-s0, Hp) in: gradient on h_t, c_t from step t+1; out: dcn <- gradient on c_{t-1}
    dH (T, B, H) in: gradient arriving at h_t from above;  dG (T, B, 4H) out, for the block
    """
    H = cs.shape[2]
    Hp = u1 - u0
    one = _cast(gates[0, 0, 0], 1.0)
    for b in range(s0, s1):
        row, d = gates[t, b], dG[t, b]
        gi, gf, gg, go = row[u0:u1], row[H + u0 : H + u1], row[2 * H + u0 : 2 * H + u1], row[3 * H + u0 : 3 * H + u1]
        di, df, dg, do = d[u0:u1], d[H + u0 : H + u1], d[2 * H + u0 : 2 * H + u1], d[3 * H + u0 : 3 * H + u1]
        c_prev, tc_t, dH_t, dh_n, dc_n = cs[t, b, u0:u1], tcs[t, b, u0:u1], dH[t, b, u0:u1], dhn[b - s0], dcn[b - s0]
        for j in range(Hp):
            i = gi[j]
            f = gf[j]
            g = gg[j]
            o = go[j]
            tc = tc_t[j]
            dh = dH_t[j] + dh_n[j]
            dc = dc_n[j] + dh * o * (one - tc * tc)
            di[j] = dc * g * i * (one - i)
            df[j] = dc * c_prev[j] * f * (one - f)
            dg[j] = dc * i * (one - g * g)
            do[j] = dh * tc * o * (one - o)
            dc_n[j] = dc * f


@njit(**JIT)
def _gru_fwd_block(t, s0, s1, u0, u1, gates, hs, hn, Wf, Wp, b_hh, hp):
    """Step t of a GRU layer for units u0..u1-1.

    gates (T, B, 3H) in: x W_ih^T + b_ih;  out: activated r, z, n (saved)
    hs (T+1, B, H);  hn (T, B, H) out: W_hn h_{t-1} + b_hn (saved: the n gradient needs it)
    Wf (3Hp, H);  hp (B, 3Hp) scratch
    """
    H = hs.shape[2]
    Hp = u1 - u0
    one = _cast(gates[0, 0, 0], 1.0)
    br, bz, bn = b_hh[u0:u1], b_hh[H + u0 : H + u1], b_hh[2 * H + u0 : 2 * H + u1]
    _rec_fwd(hs[t], s0, s1, Wf, Wp, hp)
    for b in range(s0, s1):
        row, p = gates[t, b], hp[b - s0]
        gr, gz, gn = row[u0:u1], row[H + u0 : H + u1], row[2 * H + u0 : 2 * H + u1]
        pr, pz, pn = p[:Hp], p[Hp : 2 * Hp], p[2 * Hp : 3 * Hp]
        h_prev, h_t, hn_t = hs[t, b, u0:u1], hs[t + 1, b, u0:u1], hn[t, b, u0:u1]
        for j in range(Hp):
            r = _sigmoid(gr[j] + pr[j] + br[j])
            z = _sigmoid(gz[j] + pz[j] + bz[j])
            hnj = pn[j] + bn[j]
            n = _tanh(gn[j] + r * hnj)
            gr[j] = r
            gz[j] = z
            gn[j] = n
            hn_t[j] = hnj
            h_t[j] = (one - z) * n + z * h_prev[j]


@njit(**JIT)
def _gru_bwd_block(t, s0, s1, u0, u1, dG, dGh, dH, gates, hs, hn, dhn, direct):
    """Gate gradients of a GRU layer at step t for units u0..u1-1.

    dG  (T, B, 3H) out: gradient of x W_ih^T + b_ih (r, z, n pre-activations)
    dGh (T, B, 3H) out: gradient of W_hh h + b_hh (differs from dG in the n part: times r)
    dhn (B, Hp) in: gradient on h_t from step t+1;  direct (B, Hp) out: its share on h_{t-1} via z
    """
    H = hs.shape[2]
    Hp = u1 - u0
    one = _cast(gates[0, 0, 0], 1.0)
    for b in range(s0, s1):
        row, d, e = gates[t, b], dG[t, b], dGh[t, b]
        gr, gz, gn = row[u0:u1], row[H + u0 : H + u1], row[2 * H + u0 : 2 * H + u1]
        dr, dz, dn = d[u0:u1], d[H + u0 : H + u1], d[2 * H + u0 : 2 * H + u1]
        er, ez, en = e[u0:u1], e[H + u0 : H + u1], e[2 * H + u0 : 2 * H + u1]
        h_prev, hn_t, dH_t, dh_n, dd = hs[t, b, u0:u1], hn[t, b, u0:u1], dH[t, b, u0:u1], dhn[b - s0], direct[b - s0]
        for j in range(Hp):
            r = gr[j]
            z = gz[j]
            n = gn[j]
            dh = dH_t[j] + dh_n[j]
            dn_pre = dh * (one - z) * (one - n * n)
            dr_pre = dn_pre * hn_t[j] * r * (one - r)
            dz_pre = dh * (h_prev[j] - n) * z * (one - z)
            dr[j] = dr_pre
            dz[j] = dz_pre
            dn[j] = dn_pre
            er[j] = dr_pre
            ez[j] = dz_pre
            en[j] = dn_pre * r
            dd[j] = dh * z  # the direct path h' = ... + z * h


@njit(**JIT)
def _rnn_fwd_block(t, s0, s1, u0, u1, gates, hs, Wf, Wp, hp, relu):
    """Step t of an Elman RNN layer for units u0..u1-1. gates (T, B, H) in: x W_ih^T + b_ih + b_hh;
    out: h_t (saved). Wf (Hp, H); hp (B, Hp) scratch."""
    Hp = u1 - u0
    zero = _cast(gates[0, 0, 0], 0.0)
    _rec_fwd(hs[t], s0, s1, Wf, Wp, hp)
    for b in range(s0, s1):
        g, p, h_t = gates[t, b, u0:u1], hp[b - s0], hs[t + 1, b, u0:u1]
        for j in range(Hp):
            a = g[j] + p[j]
            h = max(a, zero) if relu else _tanh(a)
            g[j] = h
            h_t[j] = h


@njit(**JIT)
def _rnn_bwd_block(t, s0, s1, u0, u1, dG, dH, gates, dhn, relu):
    Hp = u1 - u0
    one = _cast(gates[0, 0, 0], 1.0)
    zero = _cast(gates[0, 0, 0], 0.0)
    for b in range(s0, s1):
        g, d, dH_t, dh_n = gates[t, b, u0:u1], dG[t, b, u0:u1], dH[t, b, u0:u1], dhn[b - s0]
        for j in range(Hp):
            h = g[j]
            dh = dH_t[j] + dh_n[j]
            if relu:
                d[j] = dh if h > zero else zero
            else:
                d[j] = dh * (one - h * h)


@njit(**JIT)
def _fwd_block(cell, t, s0, s1, u0, u1, gates, hs, cs, tcs, Wf, Wp, b_hh, hp):
    """Dispatch one step of one block to the cell's kernel (cs holds hn for GRU)."""
    if cell == LSTM:
        _lstm_fwd_block(t, s0, s1, u0, u1, gates, hs, cs, tcs, Wf, Wp, hp)
    elif cell == GRU:
        _gru_fwd_block(t, s0, s1, u0, u1, gates, hs, cs[1:], Wf, Wp, b_hh, hp)
    else:
        _rnn_fwd_block(t, s0, s1, u0, u1, gates, hs, Wf, Wp, hp, cell == RNN_RELU)


@njit(**JIT)
def _bwd_block(cell, t, s0, s1, u0, u1, dG, dGh, dH, gates, hs, cs, tcs, dhn, dcn, direct):
    if cell == LSTM:
        _lstm_bwd_block(t, s0, s1, u0, u1, dG, dH, gates, cs, tcs, dhn, dcn)
    elif cell == GRU:
        _gru_bwd_block(t, s0, s1, u0, u1, dG, dGh, dH, gates, hs, cs[1:], dhn, direct)
    else:
        _rnn_bwd_block(t, s0, s1, u0, u1, dG, dH, gates, dhn, cell == RNN_RELU)


@njit(**JIT)
def _rec_bwd_block(cell, dGrec_t, s0, s1, Wb, Wp, dhn, direct):
    """dhn (s1-s0, Hp) <- gradient on h_{t-1} for the block: dGrec_t[s0:s1] (., GH) @ Wb (GH, Hp),
    with Wb packed in Wp when Wp is not empty, plus the GRU's direct path."""
    if Wp.shape[0] > 0:
        _mm_packed(_sub(dGrec_t, s0, s1), Wp, _sub(dhn, 0, s1 - s0), dGrec_t.shape[1])
    elif s1 - s0 == 1:
        np.dot(dGrec_t[s0], Wb, dhn[0])  # one stream: a matrix-vector product, no packing
    else:
        np.dot(_sub(dGrec_t, s0, s1), Wb, dhn)
    if cell == GRU:
        dhn += direct


@njit(**JIT)
def _pack_block(W_hh, G, H, u0, u1, Wf, Wb):
    """Wf (G*Hp, H) <- rows g*H + u of W_hh for u in [u0, u1) (gate-major); Wb (G*H, Hp) <- its columns."""
    Hp = u1 - u0
    for g in range(G):
        for u in range(Hp):
            dst, src = Wf[g * Hp + u], W_hh[g * H + u0 + u]
            for j in range(H):
                dst[j] = src[j]
    for r in range(G * H):
        dst, src = Wb[r], W_hh[r, u0:u1]
        for u in range(Hp):
            dst[u] = src[u]


# ----------------------------------------------------------------------------- workspace layout
@njit(**JIT)
def _n_gates(cell):
    return 4 if cell == LSTM else (3 if cell == GRU else 1)


@njit(**JIT)
def _ws_sizes(cell, L, T, B, H, V):
    """Sizes of the shared workspace's regions (see _carve), in elements."""
    GH = _n_gates(cell) * H
    sizes = np.empty(9, dtype=np.int64)
    sizes[0] = L * T * B * GH  # gates, per layer (T, B, GH)
    sizes[1] = L * (T + 1) * B * H  # hs, per layer (T+1, B, H)
    sizes[2] = L * (T + 1) * B * H  # cs (LSTM) / hn (GRU, from index 1)
    sizes[3] = L * T * B * H  # tanh(c) (LSTM)
    sizes[4] = L * T * B * H  # masked outputs (dropout)
    sizes[5] = T * B * V  # probabilities, then d logits
    sizes[6] = T * B * GH  # dG
    sizes[7] = T * B * GH  # dGh (GRU)
    sizes[8] = T * B * H  # gradient arriving at the current layer's outputs
    return sizes


@njit(**JIT)
def _ws_size(cell, L, T, B, H, V):
    return _ws_sizes(cell, L, T, B, H, V).sum()


@njit(**JIT)
def _carve(ws, cell, L, T, B, H, V):
    sizes = _ws_sizes(cell, L, T, B, H, V)
    s = np.zeros(10, dtype=np.int64)
    for i in range(9):
        s[i + 1] = s[i] + sizes[i]
    return (ws[s[0] : s[1]], ws[s[1] : s[2]], ws[s[2] : s[3]], ws[s[3] : s[4]], ws[s[4] : s[5]],
            ws[s[5] : s[6]], ws[s[6] : s[7]], ws[s[7] : s[8]], ws[s[8] : s[9]])


@njit(**JIT)
def _pws_size(cell, B, H, Hp, V):
    """Size of one thread's private workspace for blocks of at most Hp units (see _pcarve)."""
    G = _n_gates(cell)
    return _packed_size(H, G * Hp) + _packed_size(G * H, Hp) + B * G * Hp + 3 * B * Hp + V * G * H


@njit(**JIT)
def _pcarve(pw, cell, B, H, Hp, V):
    """One thread's views: wf, wb (flat: the block's rows and columns of W_hh, as matrices or packed,
    see _block_views), hp (B, G*Hp), dhn, dcn, direct (B, Hp), w0g (V, G*H)."""
    G = _n_gates(cell)
    o = 0
    nf, nb = _packed_size(H, G * Hp), _packed_size(G * H, Hp)
    Wf = pw[o : o + nf]
    o += nf
    Wb = pw[o : o + nb]
    o += nb
    hp = pw[o : o + B * G * Hp].reshape((B, G * Hp))
    o += B * G * Hp
    dhn = pw[o : o + B * Hp].reshape((B, Hp))
    o += B * Hp
    dcn = pw[o : o + B * Hp].reshape((B, Hp))
    o += B * Hp
    direct = pw[o : o + B * Hp].reshape((B, Hp))
    o += B * Hp
    w0g = pw[o : o + V * G * H].reshape((V, G * H))
    return Wf, Wb, hp, dhn, dcn, direct, w0g


@njit(**JIT)
def _block_views(pw, cell, B, H, u0, u1, V, W_hh):
    """A thread's views for units u0..u1-1 of B streams: Wf, Wb, Wfp, Wbp, hp, dhn, dcn, direct, w0g.

    Its recurrent products take the block's rows of W_hh (forward) and columns (backward) either
    packed in panels, Wfp and Wbp, for several streams, or as the matrices Wf (G*Hp, H) and
    Wb (G*H, Hp) for one stream (matrix-vector products); the other pair is a placeholder. A block
    of all units uses W_hh itself as its matrices. _block_pack fills them.
    """
    G, Hp = _n_gates(cell), u1 - u0
    Wf, Wb, hp, dhn, dcn, direct, w0g = _pcarve(pw, cell, B, H, Hp, V)
    if B > 1:
        return W_hh, W_hh, Wf, Wb, hp, dhn, dcn, direct, w0g
    if Hp == H:
        return W_hh, W_hh, Wf[:0], Wb[:0], hp, dhn, dcn, direct, w0g
    return (Wf[: G * Hp * H].reshape((G * Hp, H)), Wb[: G * H * Hp].reshape((G * H, Hp)), Wf[:0], Wb[:0],
            hp, dhn, dcn, direct, w0g)


@njit(**JIT)
def _block_pack(pw, cell, B, H, u0, u1, V, W_hh, backward):
    """Fill the weight views of _block_views from W_hh: for the forward pass, or the backward."""
    G = _n_gates(cell)
    Wf, Wb, Wfp, Wbp, hp, dhn, dcn, direct, w0g = _block_views(pw, cell, B, H, u0, u1, V, W_hh)
    if B > 1:
        if backward:
            _pack_bwd(W_hh, u0, u1, Wbp)
        else:
            _pack_fwd(W_hh, G, H, u0, u1, Wfp)
    elif u1 - u0 < H:
        _pack_block(W_hh, G, H, u0, u1, Wf, Wb)


@njit(**JIT)
def _layer_out_flat(XS_all, HS_all, k, T, B, H, dropout):
    """Flat (T*B*H) view of layer k's output as seen by the layer above: masked copy or hs[1:]."""
    if dropout:
        return XS_all[k * T * B * H : (k + 1) * T * B * H]
    base = k * (T + 1) * B * H
    return HS_all[base + B * H : base + (T + 1) * B * H]


# ----------------------------------------------------------------------------- row-block pieces
@njit(**JIT)
def _input_rows(cell, r0, r1, g2, x, w0t, inp2, W_ih, b_ih, b_hh, B):
    """Rows r0..r1-1 (position t*B + b) of the input products of a layer, plus the biases that can
    be folded in. inp2 is None-like (0 rows) for layer 0, which gathers rows of w0t instead."""
    GH = g2.shape[1]
    if inp2.shape[0] == 0:
        for r in range(r0, r1):
            dst, src = g2[r], w0t[x[r // B, r % B]]
            for j in range(GH):
                dst[j] = src[j]
    else:
        np.dot(_sub(inp2, r0, r1), W_ih.T, _sub(g2, r0, r1))
    for r in range(r0, r1):
        row = g2[r]
        for j in range(GH):
            # GRU: b_hh stays inside the gates (r * (W_hn h + b_hn))
            row[j] += b_ih[j] if cell == GRU else b_ih[j] + b_hh[j]


@njit(**JIT)
def _sub(a2, r0, r1):
    """Rows r0..r1-1 of a C-contiguous 2-D array as a C-contiguous view."""
    n = a2.shape[1]
    return a2.reshape(a2.shape[0] * n)[r0 * n : r1 * n].reshape((r1 - r0, n))


@njit(**JIT)
def _mask_rows(r0, r1, xs2, h2, m2):
    """xs = h * mask for rows r0..r1-1 (dropout on a layer's output)."""
    H = xs2.shape[1]
    for r in range(r0, r1):
        dst, src, m = xs2[r], h2[r], m2[r]
        for j in range(H):
            dst[j] = src[j] * m[j]


@njit(**JIT)
def _scale_rows(r0, r1, d2, m2):
    H = d2.shape[1]
    for r in range(r0, r1):
        d, m = d2[r], m2[r]
        for j in range(H):
            d[j] *= m[j]


@njit(**JIT)
def _decoder_rows(r0, r1, top2, Wd, bd, P2, y, nll, B):
    """Logits, softmax and -log p(y) for rows r0..r1-1; P2 keeps the probabilities for backward."""
    V = P2.shape[1]
    np.dot(_sub(top2, r0, r1), Wd.T, _sub(P2, r0, r1))
    for r in range(r0, r1):
        row = P2[r]
        m = -np.inf
        for v in range(V):
            row[v] += bd[v]
            m = max(m, row[v])
        zt = row[y[r // B, r % B]]
        s = 0.0
        for v in range(V):
            e = math.exp(row[v] - m)
            row[v] = e
            s += e
        nll[r // B, r % B] = m + math.log(s) - zt  # log-sum-exp minus the target's logit
        inv = 1.0 / s
        for v in range(V):
            row[v] *= inv


@njit(**JIT)
def _decoder_bwd_rows(r0, r1, top2, Wd, P2, y, scale, gWd, gbd, dH2, B):
    """d logits = (softmax - onehot(y)) * scale in place, this block's decoder gradients (written),
    and the gradient at the top layer's output for rows r0..r1-1."""
    V = P2.shape[1]
    for r in range(r0, r1):
        row = P2[r]
        row[y[r // B, r % B]] -= 1
        for v in range(V):
            row[v] *= scale
    dl = _sub(P2, r0, r1)
    np.dot(dl.T, _sub(top2, r0, r1), gWd)
    _colsum(dl, gbd)
    np.dot(dl, Wd, _sub(dH2, r0, r1))


@njit(**JIT)
def _layer_grad_rows(cell, r0, r1, dG2, dGrec2, hprev2, inp2, x, B, W_ih, gW_ih, gW_hh, gb_ih, gb_hh, dH2, w0g):
    """This block's share (rows r0..r1-1) of a layer's weight gradients (written, not accumulated),
    and for layers above 0 the gradient at the layer below's output (into dH2 rows)."""
    zero = _cast(W_ih[0, 0], 0.0)
    dG = _sub(dG2, r0, r1)
    dGr = _sub(dGrec2, r0, r1)
    np.dot(dGr.T, _sub(hprev2, r0, r1), gW_hh)
    _colsum(dGr, gb_hh)
    _colsum(dG, gb_ih)
    if inp2.shape[0] > 0:
        np.dot(dG.T, _sub(inp2, r0, r1), gW_ih)
        np.dot(dG, W_ih, _sub(dH2, r0, r1))
    else:
        # one-hot input: scatter-add rows of dG into rows of (W_ih)^T, then transpose once
        GH, V = gW_ih.shape
        w0g[:] = zero
        for r in range(r0, r1):
            dst, src = w0g[x[r // B, r % B]], dG2[r]
            for j in range(GH):
                dst[j] += src[j]
        for g in range(GH):
            for v in range(V):
                gW_ih[g, v] = w0g[v, g]


@njit(**JIT)
def _colsum(a, out):
    """out[j] = sum_i a[i, j] (written, not accumulated)."""
    out[:] = 0
    for i in range(a.shape[0]):
        row = a[i]
        for j in range(a.shape[1]):
            out[j] += row[j]


@njit(**JIT)
def _fill_w0t(w0t, theta, offs, GH, V):
    """w0t (V, GH) <- weight_ih_l0^T, so that the one-hot gather reads contiguous rows."""
    W = theta[offs[0, 0] : offs[0, 0] + GH * V].reshape((GH, V))
    for g in range(GH):
        for v in range(V):
            w0t[v, g] = W[g, v]


@njit(**JIT)
def _thread_block(B, H, p, ub, sb, by_units):
    """Thread p's block as (streams, u0, u1): a block of units of all streams (by_units), or all
    units of a block of streams."""
    if by_units:
        return B, ub[p], ub[p + 1]
    return sb[p + 1] - sb[p], 0, H


@njit(**JIT)
def _thread_views(pw, cell, B, H, V, p, ub, sb, by_units, W_hh):
    """Thread p's views (see _block_views, _thread_block)."""
    nb, u0, u1 = _thread_block(B, H, p, ub, sb, by_units)
    return _block_views(pw, cell, nb, H, u0, u1, V, W_hh)


@njit(**JIT)
def _thread_pack(pw, cell, B, H, V, p, ub, sb, by_units, W_hh, backward):
    """Thread p's _block_pack, for the block _thread_views gives it."""
    nb, u0, u1 = _thread_block(B, H, p, ub, sb, by_units)
    _block_pack(pw, cell, nb, H, u0, u1, V, W_hh, backward)


# ----------------------------------------------------------------------------- whole batch
@njit(**JIT_PARALLEL)
def _forward_backward(cell, L, H, V, theta, offs, x, y, h0, c0, masks, hT, cT, nll, grad, dh0, dc0, w0t,
                      ws, pws, gws, ub, sb, rb, by_units, backward):
    """Forward (and, if `backward`, backward) of a (T, B) batch of token ids from state (h0, c0).

    x, y (T, B) inputs and targets; masks (L, T, B, H) dropout masks or (0, ...) for none
    hT, cT (L, B, H) out: final state;  nll (T, B) out: -log p(y) at every position
    grad (P,) out: gradient of mean(nll);  dh0, dc0 (L, B, H) out: gradient of the initial state
    ws shared workspace; pws (nthr, n) per-thread scratch; gws (nthr, P) per-thread gradient shares

    Threads share the time loops either by blocks of units (by_units: ub (nthr+1,) bounds over H,
    one parallel region per time step, all B streams per product: best for large H) or by blocks of
    streams (sb (nthr+1,) bounds over B, one region for all T steps: best for small H, where a
    region per step would cost more than it saves). Everything else is split by rows of the T*B
    positions (rb). Per-thread gradient shares are summed in a fixed order, so a fixed thread count
    gives identical results.
    """
    T, B = x.shape
    G = _n_gates(cell)
    GH = G * H
    nthr = rb.shape[0] - 1
    single = nthr == 1
    dropout = masks.shape[0] > 0
    G_all, HS_all, CS_all, TC_all, XS_all, Pf, dGf, dGhf, dHf = _carve(ws, cell, L, T, B, H, V)
    P2 = Pf.reshape((T * B, V))
    dG = dGf.reshape((T, B, GH))
    dGh = dGhf.reshape((T, B, GH))
    dH = dHf.reshape((T, B, H))
    empty = np.zeros((0, H), dtype=theta.dtype)
    _fill_w0t(w0t, theta, offs, GH, V)
    for k in range(L):
        In = V if k == 0 else H
        W_ih, W_hh, b_ih, b_hh = _layer_weights(theta, offs, k, GH, In, H)
        gates = G_all[k * T * B * GH : (k + 1) * T * B * GH].reshape((T, B, GH))
        hs = HS_all[k * (T + 1) * B * H : (k + 1) * (T + 1) * B * H].reshape((T + 1, B, H))
        cs = CS_all[k * (T + 1) * B * H : (k + 1) * (T + 1) * B * H].reshape((T + 1, B, H))
        tcs = TC_all[k * T * B * H : (k + 1) * T * B * H].reshape((T, B, H))
        inp2 = empty if k == 0 else _layer_out_flat(XS_all, HS_all, k - 1, T, B, H, dropout).reshape((T * B, H))
        # 1. input products of all T steps at once; each thread packs its share of W_hh
        for p in prange(nthr):
            _input_rows(cell, rb[p], rb[p + 1], gates.reshape((T * B, GH)), x, w0t, inp2, W_ih, b_ih, b_hh, B)
            _thread_pack(pws[p], cell, B, H, V, p, ub, sb, by_units, W_hh, False)
        hs[0] = h0[k]
        if cell == LSTM:
            cs[0] = c0[k]
        # 2. the recurrence
        if single:  # no parallel region per step when there is one thread (single-stream scoring)
            Wf, Wb, Wfp, Wbp, hp, dhn, dcn, direct, w0g = _thread_views(pws[0], cell, B, H, V, 0, ub, sb, by_units, W_hh)
            for t in range(T):
                _fwd_block(cell, t, 0, B, 0, H, gates, hs, cs, tcs, Wf, Wfp, b_hh, hp)
        elif by_units:
            for t in range(T):
                for p in prange(nthr):
                    Wf, Wb, Wfp, Wbp, hp, dhn, dcn, direct, w0g = _thread_views(pws[p], cell, B, H, V, p, ub, sb, True, W_hh)
                    _fwd_block(cell, t, 0, B, ub[p], ub[p + 1], gates, hs, cs, tcs, Wf, Wfp, b_hh, hp)
        else:
            for p in prange(nthr):
                Wf, Wb, Wfp, Wbp, hp, dhn, dcn, direct, w0g = _thread_views(pws[p], cell, B, H, V, p, ub, sb, False, W_hh)
                for t in range(T):
                    _fwd_block(cell, t, sb[p], sb[p + 1], 0, H, gates, hs, cs, tcs, Wf, Wfp, b_hh, hp)
        hT[k] = hs[T]
        if cell == LSTM:
            cT[k] = cs[T]
        # 3. dropout on the output fed upward (the recurrent copy in hs stays unmasked)
        if dropout:
            xs2 = XS_all[k * T * B * H : (k + 1) * T * B * H].reshape((T * B, H))
            h2 = _layer_out_flat(XS_all, HS_all, k, T, B, H, False).reshape((T * B, H))
            m2 = masks[k].reshape((T * B, H))
            for p in prange(nthr):
                _mask_rows(rb[p], rb[p + 1], xs2, h2, m2)
    # 4. decoder and softmax cross-entropy
    Wd, bd = _decoder_weights(theta, offs, L, V, H)
    top2 = _layer_out_flat(XS_all, HS_all, L - 1, T, B, H, dropout).reshape((T * B, H))
    for p in prange(nthr):
        _decoder_rows(rb[p], rb[p + 1], top2, Wd, bd, P2, y, nll, B)
    if not backward:
        return
    scale = 1.0 / (T * B)
    dH2 = dH.reshape((T * B, H))
    for p in prange(nthr):
        gWd, gbd = _decoder_weights(gws[p], offs, L, V, H)
        _decoder_bwd_rows(rb[p], rb[p + 1], top2, Wd, P2, y, scale, gWd, gbd, dH2, B)
    for k in range(L - 1, -1, -1):
        In = V if k == 0 else H
        W_ih, W_hh, b_ih, b_hh = _layer_weights(theta, offs, k, GH, In, H)
        gates = G_all[k * T * B * GH : (k + 1) * T * B * GH].reshape((T, B, GH))
        hs = HS_all[k * (T + 1) * B * H : (k + 1) * (T + 1) * B * H].reshape((T + 1, B, H))
        cs = CS_all[k * (T + 1) * B * H : (k + 1) * (T + 1) * B * H].reshape((T + 1, B, H))
        tcs = TC_all[k * T * B * H : (k + 1) * T * B * H].reshape((T, B, H))
        dGrec = dGh if cell == GRU else dG
        # 1. through dropout: output = h * mask; and each thread packs its share of this layer's W_hh
        #    again (the forward's packing of later layers has overwritten it)
        m2 = masks[k].reshape((T * B, H)) if dropout else dH2
        for p in prange(nthr):
            if dropout:
                _scale_rows(rb[p], rb[p + 1], dH2, m2)
            _thread_pack(pws[p], cell, B, H, V, p, ub, sb, by_units, W_hh, True)
        # 2. backprop through time
        if single:
            Wf, Wb, Wfp, Wbp, hp, dhn, dcn, direct, w0g = _thread_views(pws[0], cell, B, H, V, 0, ub, sb, by_units, W_hh)
            dhn[:] = 0
            dcn[:] = 0
            for t in range(T - 1, -1, -1):
                _bwd_block(cell, t, 0, B, 0, H, dG, dGh, dH, gates, hs, cs, tcs, dhn, dcn, direct)
                _rec_bwd_block(cell, dGrec[t], 0, B, Wb, Wbp, dhn, direct)
            for b in range(B):
                dh0[k, b] = dhn[b]
                if cell == LSTM:
                    dc0[k, b] = dcn[b]
        elif by_units:
            # step t-1's gate gradients for a block of units need only dGrec[t] @ W_hh for those
            # units, which the same thread computes: one region per step
            for p in prange(nthr):
                Wf, Wb, Wfp, Wbp, hp, dhn, dcn, direct, w0g = _thread_views(pws[p], cell, B, H, V, p, ub, sb, True, W_hh)
                dhn[:] = 0
                dcn[:] = 0
                _bwd_block(cell, T - 1, 0, B, ub[p], ub[p + 1], dG, dGh, dH, gates, hs, cs, tcs, dhn, dcn, direct)
            for t in range(T - 1, 0, -1):
                for p in prange(nthr):
                    Wf, Wb, Wfp, Wbp, hp, dhn, dcn, direct, w0g = _thread_views(pws[p], cell, B, H, V, p, ub, sb, True, W_hh)
                    _rec_bwd_block(cell, dGrec[t], 0, B, Wb, Wbp, dhn, direct)
                    _bwd_block(cell, t - 1, 0, B, ub[p], ub[p + 1], dG, dGh, dH, gates, hs, cs, tcs, dhn, dcn, direct)
            for p in prange(nthr):
                Wf, Wb, Wfp, Wbp, hp, dhn, dcn, direct, w0g = _thread_views(pws[p], cell, B, H, V, p, ub, sb, True, W_hh)
                _rec_bwd_block(cell, dGrec[0], 0, B, Wb, Wbp, dhn, direct)
                for b in range(B):
                    dh0[k, b, ub[p] : ub[p + 1]] = dhn[b]
                    if cell == LSTM:
                        dc0[k, b, ub[p] : ub[p + 1]] = dcn[b]
        else:
            for p in prange(nthr):
                s0, s1 = sb[p], sb[p + 1]
                Wf, Wb, Wfp, Wbp, hp, dhn, dcn, direct, w0g = _thread_views(pws[p], cell, B, H, V, p, ub, sb, False, W_hh)
                dhn[:] = 0
                dcn[:] = 0
                for t in range(T - 1, -1, -1):
                    _bwd_block(cell, t, s0, s1, 0, H, dG, dGh, dH, gates, hs, cs, tcs, dhn, dcn, direct)
                    _rec_bwd_block(cell, dGrec[t], s0, s1, Wb, Wbp, dhn, direct)
                for b in range(s0, s1):
                    dh0[k, b] = dhn[b - s0]
                    if cell == LSTM:
                        dc0[k, b] = dcn[b - s0]
        # 3. weight gradients (one GEMM each over this thread's rows) and the gradient below
        hprev2 = HS_all[k * (T + 1) * B * H : k * (T + 1) * B * H + T * B * H].reshape((T * B, H))
        inp2 = empty if k == 0 else _layer_out_flat(XS_all, HS_all, k - 1, T, B, H, dropout).reshape((T * B, H))
        for p in prange(nthr):
            gW_ih, gW_hh, gb_ih, gb_hh = _layer_weights(gws[p], offs, k, GH, In, H)
            Wf, Wb, Wfp, Wbp, hp, dhn, dcn, direct, w0g = _thread_views(pws[p], cell, B, H, V, p, ub, sb, by_units, W_hh)
            _layer_grad_rows(cell, rb[p], rb[p + 1], dG.reshape((T * B, GH)), dGrec.reshape((T * B, GH)), hprev2, inp2,
                             x, B, W_ih, gW_ih, gW_hh, gb_ih, gb_hh, dH2, w0g)
    grad[:] = gws[0]
    for p in range(1, nthr):
        grad += gws[p]


# ----------------------------------------------------------------------------- scoring pipeline
@njit(**JIT)
def _pipe_size(cell, H, V, C):
    """One layer's workspace for _score_pipe: gates (C, GH), hs and cs double-buffered (2, C+1, H),
    tanh(c) (C, H), hp (GH,), probabilities (C, V)."""
    GH = _n_gates(cell) * H
    return C * GH + 4 * (C + 1) * H + C * H + GH + C * V


@njit(**JIT)
def _pipe_task(cell, L, H, V, theta, offs, w0t, x2, y2, nll2, h, c, k, j, C, N, wk, wbelow):
    """Layer k's part of chunk j (positions j*C ..) in _score_pipe: input products, recurrence,
    and for the top layer the decoder and -log p(y). wk, wbelow: this layer's and the layer
    below's workspace (the layer below finished chunk j in the previous superstep)."""
    GH = _n_gates(cell) * H
    In = V if k == 0 else H
    p0 = j * C
    Cj = min(C, N - p0)
    W_ih, W_hh, b_ih, b_hh = _layer_weights(theta, offs, k, GH, In, H)
    o = 0
    gates = wk[o : o + Cj * GH].reshape((Cj, 1, GH))
    o += C * GH
    hs2 = wk[o : o + 2 * (C + 1) * H].reshape((2, C + 1, 1, H))
    o += 2 * (C + 1) * H
    cs2 = wk[o : o + 2 * (C + 1) * H].reshape((2, C + 1, 1, H))
    o += 2 * (C + 1) * H
    tcs = wk[o : o + Cj * H].reshape((Cj, 1, H))
    o += C * H
    hp = wk[o : o + GH].reshape((1, GH))
    o += GH
    P2 = wk[o : o + Cj * V].reshape((Cj, V))
    cur, prev = j % 2, (j + 1) % 2
    if k == 0:
        inp2 = np.zeros((0, H), dtype=theta.dtype)
    else:
        below = wbelow[C * GH : C * GH + 2 * (C + 1) * H].reshape((2, C + 1, H))
        inp2 = _sub(below[cur], 1, Cj + 1)
    xs = x2[p0 : p0 + Cj]
    _input_rows(cell, 0, Cj, gates.reshape((Cj, GH)), xs, w0t, inp2, W_ih, b_ih, b_hh, 1)
    hs, cs = hs2[cur], cs2[cur]
    if j == 0:
        hs[0, 0] = h[k, 0]
        cs[0, 0] = c[k, 0]
    else:
        hs[0] = hs2[prev, C]
        cs[0] = cs2[prev, C]
    for t in range(Cj):
        _fwd_block(cell, t, 0, 1, 0, H, gates, hs, cs, tcs, W_hh, theta[:0], b_hh, hp)
    if p0 + Cj == N:  # the last chunk: hand the state back
        h[k, 0] = hs[Cj, 0]
        if cell == LSTM:
            c[k, 0] = cs[Cj, 0]
    if k == L - 1:
        Wd, bd = _decoder_weights(theta, offs, L, V, H)
        _decoder_rows(0, Cj, _sub(hs.reshape((C + 1, H)), 1, Cj + 1), Wd, bd, P2, y2[p0 : p0 + Cj],
                      nll2[p0 : p0 + Cj], 1)


@njit(**JIT_PARALLEL)
def _score_pipe(cell, L, H, V, theta, offs, w0t, x, y, h, c, nll, C):
    """Forward of one stream (scoring): tokens x, targets y (N,), state h, c (L, 1, H) carried in
    place, nll (N,) out: -log p(y) at every position.

    One stream leaves nothing to share inside a time step but its small matrix-vector products, and
    a parallel region per step costs about as much as the step. So the layers run as a pipeline over
    chunks of C steps instead: in superstep s, layer k processes chunk s - k, and the layers are the
    parallel tasks (one region per chunk). Each thread keeps its own layer's weights in its cache.
    The arithmetic is the same as _forward_backward with one stream, position by position.
    """
    N = x.shape[0]
    nc = (N + C - 1) // C
    _fill_w0t(w0t, theta, offs, _n_gates(cell) * H, V)
    ws = np.zeros((L, _pipe_size(cell, H, V, C)), dtype=theta.dtype)
    x2 = x.reshape((N, 1))
    y2 = y.reshape((N, 1))
    nll2 = nll.reshape((N, 1))
    for s in range(nc + L - 1):
        for k in prange(L):
            j = s - k
            if j >= 0 and j < nc:
                _pipe_task(cell, L, H, V, theta, offs, w0t, x2, y2, nll2, h, c, k, j, C, N, ws[k],
                           ws[k - 1] if k > 0 else ws[k])


# ----------------------------------------------------------------------------- generation
@njit(**JIT)
def _step_views(ws, cell, nb, H, V):
    """Views of a T=1 workspace for single steps: gates (1, nb, GH), hs, cs (2, nb, H), tcs (1, nb, H),
    hp (nb, GH). Made once per generation call, so the step itself allocates nothing."""
    GH = _n_gates(cell) * H
    G_all, HS_all, CS_all, TC_all, _xs, _p, dGf, _dgh, _dh = _carve(ws, cell, 1, 1, nb, H, V)
    return (G_all.reshape((1, nb, GH)), HS_all.reshape((2, nb, H)), CS_all.reshape((2, nb, H)),
            TC_all.reshape((1, nb, H)), dGf.reshape((nb, GH)))


@njit(**JIT)
def _step(cell, L, H, V, theta, offs, w0t, tok, h, c, logits, gates, hs, cs, tcs, hp):
    """One time step for nb streams (sampling, priming): tokens tok (nb,), state h, c (L, nb, H)
    updated in place, logits (nb, V) out. Reuses the layer kernels with T=1 and one block."""
    nb = tok.shape[0]
    GH = _n_gates(cell) * H
    g2 = gates[0]
    for k in range(L):
        In = V if k == 0 else H
        W_ih, W_hh, b_ih, b_hh = _layer_weights(theta, offs, k, GH, In, H)
        if k == 0:
            for b in range(nb):
                dst, src = g2[b], w0t[tok[b]]
                for j in range(GH):
                    dst[j] = src[j]
        else:
            _rec_fwd(hs[1], 0, nb, W_ih, theta[:0], g2)  # hs[1] still holds the output of layer k-1
        for b in range(nb):
            row = g2[b]
            for j in range(GH):
                row[j] += b_ih[j] if cell == GRU else b_ih[j] + b_hh[j]
        hs[0] = h[k]
        if cell == LSTM:
            cs[0] = c[k]
        _fwd_block(cell, 0, 0, nb, 0, H, gates, hs, cs, tcs, W_hh, theta[:0], b_hh, hp)
        if cell == LSTM:
            c[k] = cs[1]
        h[k] = hs[1]
    Wd, bd = _decoder_weights(theta, offs, L, V, H)
    _rec_fwd(hs[1], 0, nb, Wd, theta[:0], logits)
    for b in range(nb):
        row = logits[b]
        for v in range(V):
            row[v] += bd[v]


@njit(**JIT)
def _feed(cell, L, H, V, theta, offs, w0t, tokens, h, c, logits, ws):
    """Feed a token sequence (N,) to every stream of the state in lock step (priming); logits of
    the last step in `logits` (nb, V)."""
    nb = h.shape[1]
    gates, hs, cs, tcs, hp = _step_views(ws, cell, nb, H, V)
    tok = np.empty(nb, dtype=np.int32)
    for i in range(tokens.shape[0]):
        tok[:] = tokens[i]
        _step(cell, L, H, V, theta, offs, w0t, tok, h, c, logits, gates, hs, cs, tcs, hp)


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
def _draw_step(s, logits, out, tok, done, temp, top_k, top_p, banned, end_id, state, z, scratch, order):
    """Draw the next token of every unfinished stream from its logits; record it in out[s]."""
    nb, V = logits.shape
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


@njit(**JIT)
def _all_done(done):
    for b in range(done.shape[0]):
        if not done[b]:
            return False
    return True


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
    gates, hs, cs, tcs, hp = _step_views(ws, cell, nb, H, V)
    for s in range(n_steps):
        if _all_done(done):
            return s
        _step(cell, L, H, V, theta, offs, w0t, tok, h, c, logits, gates, hs, cs, tcs, hp)
        _draw_step(s, logits, out, tok, done, temp, top_k, top_p, banned, end_id, state, z, scratch, order)
    return n_steps


# ----------------------------------------------------------------------------- generation, threads
# One step of a few streams is memory-bound on the weights (a 2x512 LSTM reads 12 MB per character).
# Threads split each layer's units as in training, each keeping its own packed rows of W_ih and W_hh
# (packed once per call, not per step) in its own cache.
@njit(**JIT)
def _gen_pws_size(cell, L, nb, H, Hp):
    G = _n_gates(cell)
    return L * G * Hp * H + (L - 1) * G * Hp * H + 2 * nb * G * Hp


@njit(**JIT)
def _gen_views(pw, cell, L, nb, H, Hp, k):
    """Thread views for layer k: Wf (G*Hp, H), Wi (G*Hp, H) (layers above 0), hp, gp (nb, G*Hp)."""
    G = _n_gates(cell)
    n = G * Hp * H
    Wf = pw[k * n : (k + 1) * n].reshape((G * Hp, H))
    o = L * n + max(k - 1, 0) * n
    Wi = pw[o : o + n].reshape((G * Hp, H))
    o = L * n + (L - 1) * n
    hp = pw[o : o + nb * G * Hp].reshape((nb, G * Hp))
    gp = pw[o + nb * G * Hp : o + 2 * nb * G * Hp].reshape((nb, G * Hp))
    return Wf, Wi, hp, gp


# ----------------------------------------------------------------------------- generation, spinning threads
# One stream of a 2x128 model takes ~20 us per character, and a parallel region per layer costs
# several microseconds, which ate what splitting the units saved (measured: one region per layer
# per step gave 1.0x the serial loop at 2x128, spinning threads 1.56x). So the threads stay in one
# region for the whole call and meet at spin barriers (~0.4 us): per step, one barrier after each
# layer and one after the draw. Atomics come from LLVM through these intrinsics.
@intrinsic
def _atomic_load(typingctx, arr, idx):
    sig = arr.dtype(arr, idx)

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, [args[1]])
        return builder.load_atomic(ptr, ordering="acquire", align=8)

    return sig, codegen


@intrinsic
def _atomic_store(typingctx, arr, idx, val):
    sig = types.void(arr, idx, arr.dtype)

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, [args[1]])
        builder.store_atomic(args[2], ptr, ordering="release", align=8)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _atomic_cas(typingctx, arr, idx, expected, new):
    """arr[idx] = new if arr[idx] == expected, atomically; returns whether it did."""
    sig = types.boolean(arr, idx, arr.dtype, arr.dtype)

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, [args[1]])
        res = builder.cmpxchg(ptr, args[2], args[3], "acq_rel", "acquire")
        return builder.extract_value(res, 1)

    return sig, codegen


@intrinsic
def _sched_yield(typingctx):
    """Give the core away for a moment (libc's sched_yield) while waiting for another thread."""
    sig = types.void()

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []), "sched_yield")
        builder.call(fn, [])
        return context.get_dummy_value()

    return sig, codegen


SPINS_BEFORE_YIELD = 2000
JOIN_PATIENCE = 20000  # yields thread 0 waits for a helper thread to show up before going alone
_SLOT = 8  # int64 words per sync slot: one cache line each
PENDING, JOINED, ABANDONED, GO_PARALLEL, GO_SERIAL = 0, 1, 2, 1, 2


@njit(**JIT)
def _wait_while(sync, i, below):
    """Spin until sync[i] >= below, yielding the core after a while."""
    n = 0
    while _atomic_load(sync, i) < below:
        n += 1
        if n > SPINS_BEFORE_YIELD:
            _sched_yield()


@njit(**JIT)
def _barrier(sync, p, nthr, epoch):
    """All nthr threads reach this point (the epoch-th barrier) before any goes on. Thread p's
    epoch slot is sync[(1 + nthr + p) * _SLOT]; each thread writes only its own slot."""
    _atomic_store(sync, (1 + nthr + p) * _SLOT, epoch)
    for q in range(nthr):
        if q != p:
            _wait_while(sync, (1 + nthr + q) * _SLOT, epoch)


@njit(**JIT)
def _patient_wait(sync, i, value):
    """Spin (then yield) while sync[i] == value, for a bounded time; whether it changed."""
    n = 0
    while _atomic_load(sync, i) == value:
        n += 1
        if n > SPINS_BEFORE_YIELD + JOIN_PATIENCE:
            return False
        if n > SPINS_BEFORE_YIELD:
            _sched_yield()
    return True


@njit(**JIT)
def _join(sync, p, nthr):
    """Whether thread p takes part in a parallel run. A thread pool may run the region's tasks one
    after another, in any order (TBB can; so does a pool with one thread), so no thread waits for
    another without a bound: each claim and each decision is one compare-and-swap.
    Thread 0 waits a while for each helper to claim its slot (PENDING -> JOINED) and otherwise
    abandons the slot (PENDING -> ABANDONED); then it decides GO_PARALLEL or GO_SERIAL in sync[0]
    (0 -> decision). A joined helper waits a while for that decision and otherwise decides
    GO_SERIAL itself and leaves; thread 0 then finds the decision taken and runs alone."""
    if p > 0:
        if not _atomic_cas(sync, p * _SLOT, PENDING, JOINED):
            return False  # thread 0 gave up on this slot
        if not _patient_wait(sync, 0, 0):
            if _atomic_cas(sync, 0, 0, GO_SERIAL):
                return False
        return _atomic_load(sync, 0) == GO_PARALLEL
    alone = False
    for q in range(1, nthr):
        _patient_wait(sync, q * _SLOT, PENDING)
        if _atomic_cas(sync, q * _SLOT, PENDING, ABANDONED):
            alone = True
    if not _atomic_cas(sync, 0, 0, GO_SERIAL if alone else GO_PARALLEL):
        return False  # a helper that waited too long has decided GO_SERIAL
    return not alone


@njit(**JIT)
def _gen_thread(p, cell, L, H, V, theta, offs, w0t, tok, h, c, out, n_steps, temp, top_k, top_p, banned,
                end_id, done, state, pw, ub, hs2, cs2, gates, tcs, sync, logits, z, scratch, order, taken):
    """Thread p's part of _generate_spin: its units of every layer; thread 0 also decodes and draws."""
    nb = tok.shape[0]
    G = _n_gates(cell)
    GH = G * H
    nthr = ub.shape[0] - 1
    u0, u1 = ub[p], ub[p + 1]
    Hp = u1 - u0
    STOP = (1 + 2 * nthr) * _SLOT
    for k in range(L):  # pack this thread's rows of the recurrent and input weights, once
        In = V if k == 0 else H
        W_ih, W_hh, b_ih, b_hh = _layer_weights(theta, offs, k, GH, In, H)
        Wf, Wi, hp, gp = _gen_views(pw, cell, L, nb, H, Hp, k)
        for g in range(G):
            for u in range(Hp):
                dst, src = Wf[g * Hp + u], W_hh[g * H + u0 + u]
                for j in range(H):
                    dst[j] = src[j]
                if k > 0:
                    dst, src = Wi[g * Hp + u], W_ih[g * H + u0 + u]
                    for j in range(H):
                        dst[j] = src[j]
    Wd, bd = _decoder_weights(theta, offs, L, V, H)
    epoch = 1
    if p == 0:
        _atomic_store(sync, STOP, 1 if _all_done(done) else 0)
    _barrier(sync, p, nthr, epoch)
    s = 0
    while s < n_steps and _atomic_load(sync, STOP) == 0:
        for k in range(L):
            In = V if k == 0 else H
            W_ih, W_hh, b_ih, b_hh = _layer_weights(theta, offs, k, GH, In, H)
            Wf, Wi, hp, gp = _gen_views(pw, cell, L, nb, H, Hp, k)
            if k > 0:
                _rec_fwd(hs2[k - 1, 1], 0, nb, Wi, theta[:0], gp)  # this block's input products
            for b in range(nb):
                row = gates[0, b]
                for g in range(G):
                    dst = row[g * H + u0 : g * H + u1]
                    bi, bh = b_ih[g * H + u0 : g * H + u1], b_hh[g * H + u0 : g * H + u1]
                    if k == 0:
                        src = w0t[tok[b], g * H + u0 : g * H + u1]
                    else:
                        src = gp[b, g * Hp : (g + 1) * Hp]
                    for j in range(Hp):
                        dst[j] = src[j] + (bi[j] if cell == GRU else bi[j] + bh[j])
            _fwd_block(cell, 0, 0, nb, u0, u1, gates, hs2[k], cs2[k], tcs, Wf, theta[:0], b_hh, hp)
            epoch += 1
            _barrier(sync, p, nthr, epoch)  # layer k's new state is complete
            for b in range(nb):  # own units: the new state becomes the previous one of the next step
                hs2[k, 0, b, u0:u1] = hs2[k, 1, b, u0:u1]
                if cell == LSTM:
                    cs2[k, 0, b, u0:u1] = cs2[k, 1, b, u0:u1]
        if p == 0:
            _rec_fwd(hs2[L - 1, 1], 0, nb, Wd, theta[:0], logits)
            for b in range(nb):
                row = logits[b]
                for v in range(V):
                    row[v] += bd[v]
            _draw_step(s, logits, out, tok, done, temp, top_k, top_p, banned, end_id, state, z, scratch, order)
            if _all_done(done):
                _atomic_store(sync, STOP, 1)
        s += 1
        epoch += 1
        _barrier(sync, p, nthr, epoch)  # the drawn tokens and the stop flag are visible
    if p == 0:
        taken[0] = s


@njit(**JIT_PARALLEL)
def _generate_spin(cell, L, H, V, theta, offs, w0t, tok, h, c, out, n_steps, temp, top_k, top_p, banned, end_id,
                   done, state, pws, ub, hs2, cs2, gates, tcs, sync, ws):
    """_generate with threads splitting every layer's units (ub (nthr+1,) bounds over H) inside one
    parallel region, meeting at spin barriers. Same tokens as _generate up to the rounding of the
    split products. hs2, cs2 (L, 2, nb, H), gates (1, nb, G*H), tcs (1, nb, H) work buffers; pws
    (nthr, n) per-thread; sync ((2 + 2*nthr) * 8,) int64; ws the serial kernel's workspace, for the
    fallback when the pool will not run the threads side by side. Returns the steps taken."""
    nb = tok.shape[0]
    nthr = ub.shape[0] - 1
    logits = np.empty((nb, V), dtype=theta.dtype)
    z = np.empty(V, dtype=np.float64)
    scratch = np.empty(V, dtype=np.float64)
    order = np.empty(V, dtype=np.int64)
    taken = np.zeros(1, dtype=np.int64)
    sync[:] = 0
    for k in range(L):
        hs2[k, 0] = h[k]
        if cell == LSTM:
            cs2[k, 0] = c[k]
    parallel = np.zeros(1, dtype=np.int64)
    for p in prange(nthr):
        if _join(sync, p, nthr):
            if p == 0:
                parallel[0] = 1
            _gen_thread(p, cell, L, H, V, theta, offs, w0t, tok, h, c, out, n_steps, temp, top_k, top_p, banned,
                        end_id, done, state, pws[p], ub, hs2, cs2, gates, tcs, sync, logits, z, scratch, order, taken)
    if parallel[0] == 0:
        return _generate(cell, L, H, V, theta, offs, w0t, tok, h, c, out, n_steps, temp, top_k, top_p, banned,
                         end_id, done, state, ws)
    for k in range(L):
        h[k] = hs2[k, 0]
        if cell == LSTM:
            c[k] = cs2[k, 0]
    return taken[0]
