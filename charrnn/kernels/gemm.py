"""The packed-weight matrix product of the recurrent loops: C (+)= A @ B for B packed in panels.

The recurrent product inside the time loop multiplies a few dozen rows (streams) by a weight matrix
that stays the same for the whole batch. BLAS re-packs that matrix into its own panel layout on
every call, every step; at 2x512 a thread's share is 2 MiB, which is the L2 cache, so the
re-packing cost about a third of each product (measured: OpenBLAS 65-97 GFLOP/s per core on
50x512x1024, this kernel 110-130 in the same runs). So the weights are packed once per batch into
panels of NR columns (pack_fwd, pack_bwd) and multiplied by a register-tiled micro-kernel written
in LLVM IR (_tile): MR rows x NR columns of accumulators live in vector registers through the k
loop, with one broadcast of A and NV vector loads of the panel per k. Numba's own loops cannot keep
a 2-D accumulator tile in registers, hence the intrinsic.

A panel row is PANEL_BYTES long, and every packed buffer this package allocates starts on a
64-byte boundary (charrnn/kernels/layout.py), so the panel loads never straddle a cache line.
"""

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from charrnn.kernels.jit import helper, kernel
from charrnn.kernels.mathf import cast, rows


def _host_has_avx512():
    try:
        from llvmlite import binding

        return bool(binding.get_host_cpu_features().get("avx512f", False))
    except Exception:  # pragma: no cover - any failure only costs speed
        return False


_VEC_BYTES = 64 if _host_has_avx512() else 32  # one vector register: zmm (32 of them) or ymm (16)
# Rows per tile at most: MR*NV accumulators + NV loads + a broadcast fit in the vector registers.
# The M rows of a product are cut into as few tiles as that allows, of heights as even as possible
# (17 = 9 + 8, not 8 + 8 + 1: a 1-row tile waits on its two accumulators' latency; measured
# 17 x 256 @ 256 x 3072, one thread: 199-205 us against 222-226 for tiles of at most 8)
MR = 12 if _VEC_BYTES == 64 else 6
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
        for m in range(1, MR + 1):  # one loop per row count, so a short last tile does no wasted work
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


@helper
def panel_cols(a):
    """NR, the columns of one packed panel, for a's float type."""
    return PANEL_BYTES // a.itemsize


@helper
def packed_size(K, N):
    """Elements a (K, N) matrix takes packed, in either float type (float32 panels are the widest)."""
    nr = PANEL_BYTES // 4
    return ((N + nr - 1) // nr) * nr * K


@helper
def mm_packed(A, Wp, C, K):
    """C (M, N) <- A (M, >=K)[:, :K] @ B for B (K, N) packed in panels (pack_fwd, pack_bwd).
    A and C are C-contiguous; C's columns are N. Every element sums over k in order, whatever the
    tiles, so the rows' split changes no number."""
    M, N = C.shape
    if M == 0:
        return
    lda, nr = A.shape[1], panel_cols(Wp)
    nt = (M + MR - 1) // MR  # row tiles
    base, extra = M // nt, M % nt  # their heights: base + 1 for the first `extra`, base for the rest
    for jp in range((N + nr - 1) // nr):
        cols = min(nr, N - jp * nr)
        for k0 in range(0, K, _KC):
            kk = min(_KC, K - k0)
            i = 0
            for t in range(nt):
                m = base + (1 if t < extra else 0)
                _tile(A, i * lda + k0, lda, Wp, (jp * K + k0) * nr, C, i * N + jp * nr, N, kk, m, cols, k0 > 0)
                i += m


@helper
def pack_fwd(W, G, H, u0, u1, Wp):
    """Pack B = Wf^T (H, G*Hp), where column g*Hp + u is row g*H + u0 + u of W (G*H, H) (the block's
    rows, gate-major): panel p holds B[k, p*NR + j] at Wp[(p*H + k)*NR + j], zero past the last column."""
    Hp = u1 - u0
    N, nr = G * Hp, panel_cols(Wp)
    zero = cast(Wp[0], 0.0)
    for n0 in range(0, N, nr):
        panel = Wp[(n0 // nr) * H * nr : (n0 // nr + 1) * H * nr]
        for j in range(nr):
            n = n0 + j
            if n < N:
                src = W[(n // Hp) * H + u0 + n % Hp]
                for k in range(H):
                    panel[k * nr + j] = src[k]
            else:
                for k in range(H):
                    panel[k * nr + j] = zero


@helper
def pack_bwd(W, u0, u1, Wp):
    """Pack B = W[:, u0:u1] (K, Hp) in panels, as pack_fwd does."""
    K, N, nr = W.shape[0], u1 - u0, panel_cols(Wp)
    zero = cast(Wp[0], 0.0)
    for n0 in range(0, N, nr):
        panel = Wp[(n0 // nr) * K * nr : (n0 // nr + 1) * K * nr]
        w = min(nr, N - n0)
        for k in range(K):
            src, dst = W[k, u0 + n0 : u0 + n0 + w], panel[k * nr : (k + 1) * nr]
            for j in range(w):
                dst[j] = src[j]
            for j in range(w, nr):
                dst[j] = zero


@helper
def pack_rows(W, G, H, u0, u1, Wf):
    """Wf (G*Hp, H) <- rows g*H + u of W (G*H, H) for u in [u0, u1), gate-major (a matrix, not panels)."""
    Hp = u1 - u0
    for g in range(G):
        for u in range(Hp):
            dst, src = Wf[g * Hp + u], W[g * H + u0 + u]
            for j in range(H):
                dst[j] = src[j]


@helper
def pack_cols(W, u0, u1, Wb):
    """Wb (K, Hp) <- W[:, u0:u1] (a matrix, not panels)."""
    for r in range(W.shape[0]):
        dst, src = Wb[r], W[r, u0:u1]
        for u in range(u1 - u0):
            dst[u] = src[u]


@helper
def times_wt(A, s0, s1, W, Wp, C):
    """C (s1-s0, n) <- A[s0:s1] (., K) @ W^T for W (n, K), through W^T's packed panels Wp when Wp
    is not empty (the training loop's recurrent product), else dense_wt."""
    if Wp.shape[0] > 0:
        mm_packed(rows(A, s0, s1), Wp, rows(C, 0, s1 - s0), A.shape[1])
    else:
        dense_wt(A, s0, s1, W, C)


@helper
def dense_wt(A, s0, s1, W, C):
    """C (s1-s0, n) <- A[s0:s1] (., K) @ W^T for W (n, K) by BLAS: a matrix-vector product for one
    row. The loops of single steps (scoring, sampling) call this, not times_wt, so that they do
    not compile the packed micro-kernel they never use."""
    if s1 - s0 == 1:
        np.dot(W, A[s0], C[0])
    else:
        np.dot(rows(A, s0, s1), W.T, C)


@helper
def times_w(A, s0, s1, W, Wp, C):
    """C (s1-s0, n) <- A[s0:s1] (., K) @ W for W (K, n), through W's packed panels Wp when Wp is
    not empty."""
    if Wp.shape[0] > 0:
        mm_packed(rows(A, s0, s1), Wp, rows(C, 0, s1 - s0), A.shape[1])
    elif s1 - s0 == 1:
        np.dot(A[s0], W, C[0])
    else:
        np.dot(rows(A, s0, s1), W, C)


# ----------------------------------------------------------------------------- entry points (tests, benchmarks)
@kernel
def _pack_fwd_entry(W, G, H, u0, u1, Wp):
    pack_fwd(W, G, H, u0, u1, Wp)


@kernel
def _pack_bwd_entry(W, u0, u1, Wp):
    pack_bwd(W, u0, u1, Wp)


@kernel
def _mm_packed_entry(A, Wp, C, K):
    mm_packed(A, Wp, C, K)


def pack_forward(W, G: int, H: int, u0: int, u1: int, Wp) -> None:
    """Wp <- rows [u0, u1) of each of W's G gate blocks, transposed and packed (see pack_fwd)."""
    _check_pack(W, Wp, packed_size(H, G * (u1 - u0)))
    _pack_fwd_entry(W, G, H, u0, u1, Wp)


def pack_backward(W, u0: int, u1: int, Wp) -> None:
    """Wp <- columns [u0, u1) of W, packed (see pack_bwd)."""
    _check_pack(W, Wp, packed_size(W.shape[0], u1 - u0))
    _pack_bwd_entry(W, u0, u1, Wp)


def matmul_packed(A, Wp, C, K: int) -> None:
    """C (M, N) <- A[:, :K] @ B for B (K, N) packed by pack_forward or pack_backward."""
    for name, a in (("A", A), ("C", C)):
        if a.ndim != 2 or not a.flags.c_contiguous or a.dtype != Wp.dtype:
            raise ValueError(f"{name} must be a C-contiguous 2-D array of the packed weights' dtype")
    if A.shape[0] != C.shape[0] or A.shape[1] < K or Wp.shape[0] < packed_size(K, C.shape[1]):
        raise ValueError("shapes do not agree")
    _mm_packed_entry(A, Wp, C, K)


def _check_pack(W, Wp, need):
    if W.ndim != 2 or not W.flags.c_contiguous or Wp.ndim != 1 or Wp.dtype != W.dtype or Wp.shape[0] < need:
        raise ValueError(f"pack: W must be C-contiguous 2-D and Wp 1-D of its dtype with at least {need} elements")
