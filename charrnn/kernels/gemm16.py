"""bfloat16 matrix products with float32 accumulation, for the bf16 precision of training.

    C (M, N) = op(A) (M, K) @ op(B) (K, N)

with every operand rounded to bfloat16 (round to nearest, ties to even: `bf16` below) and the
products summed in float32. Two backends, one data layout:

- AMX (Intel since Sapphire Rapids): TDPBF16PS multiplies a 16 x 32 tile of A by a 32 x 16 tile
  of B into a 16 x 16 float32 tile of C, about 1,000 flops a cycle against 64 for float32 FMAs.
  A process must ask the kernel for the tile state first (amx_permission, arch_prctl).
- AVX512_BF16 (AMD Zen 4, Intel since Cooper Lake): VDPBF16PS adds the products of 16 pairs of
  bfloat16 values to 16 float32 accumulators, twice the lanes of a float32 FMA.

Both read A as rows of bfloat16 (pairs of k are adjacent) and B packed in panels of NR = 32
columns, where panel row kp holds the pairs (B[2kp, j], B[2kp+1, j]) of its 32 columns (AMX's
"VNNI" layout). Every packed operand is padded with zeros to whole tiles: rows of A to 16, K to
32, columns of B to 32, so the micro-kernels have no edge cases; C is produced in a padded
scratch (Cs) and copied out.

llvmlite's IR builder has no bfloat type, so the micro-kernels are LLVM IR written as text below,
parsed once per process and linked into the code that calls them (_library). Packing and the
product are compiled once per process (or loaded from the disk cache) as functions with C
signatures, which the training kernels call by name instead of inlining them (see "compiled
once, called by name" below: it keeps a first bf16 run as quick to compile as a float32 one).
Which backend a kernel uses is chosen by the type of the workspace it is given (AMX or DOT
below, see charrnn/kernels/bptt.py's products), so a run compiles only the one it uses.
"""

import ctypes
import platform
from collections import namedtuple

import numpy as np
from llvmlite import binding as llb
from llvmlite import ir
from numba import carray, types
from numba.core import cgutils, errors
from numba.core.compiler_lock import global_compiler_lock
from numba.extending import intrinsic, overload

from charrnn.kernels.jit import HELPER, helper, kernel
from charrnn.kernels.mathf import _f32_bits

NR = 32  # columns of a packed panel of B (two AVX-512 registers, two AMX tiles)
KALIGN = 32  # K is padded to whole AMX tiles (32 bfloat16 values a tile row)
MALIGN = 16  # rows of A are padded to whole AMX tiles
MC = 256  # rows of A packed and multiplied at a time: each panel of B is read once per MC rows (a
# weight gradient of 2,048 positions at 2x256: 64 rows 7.9 ms, 256 rows 6.9 ms, benchmarks/results/bf16_throughput.txt)
DOT_MR = 8  # rows of the VDPBF16PS micro-kernel: 8 x 2 accumulators + 2 panel vectors

# The two workspace types: the same fields, a different product. Per thread (one row each):
#   ab  (n, MC * Kmax) uint16: a chunk of rows of A in bfloat16, padded
#   bp  (n, .) uint16: B packed in panels (the products' right-hand sides)
#   wp  (n, .) uint16: the recurrent weights packed for the time loop (kept across its steps)
#   cs  (n, MC * Nmax) float32: a chunk of C, padded
#   ft  (n, MC * KB) float32: a block of A^T in float32, on its way to ab (pack_a of A^T)
#   cfg (n, 64) uint8: the AMX tile configuration (unused by DOT)
AMX = namedtuple("AMX", ["ab", "bp", "wp", "cs", "ft", "cfg"])
DOT = namedtuple("DOT", ["ab", "bp", "wp", "cs", "ft", "cfg"])
KB = 256  # rows of A transposed at a time by pack_a (a 64 x 256 float32 block: 64 KiB)


@helper
def rup(n, m):
    return (n + m - 1) // m * m


# ----------------------------------------------------------------------------- the CPU
def _host_features():
    try:
        return llb.get_host_cpu_features()
    except Exception:  # noqa: BLE001 - any failure only means float32
        return {}


def _amx_permission() -> bool:
    """Ask Linux for the AMX tile state (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)):
    without it the first tile instruction kills the process. Granted to the whole process."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(158, 0x1023, 18) == 0  # SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XTILEDATA
    except Exception:  # noqa: BLE001 - no tile state: the AVX512_BF16 backend or float32
        return False


_FEATURES = _host_features()
HAS_DOT = bool(_FEATURES.get("avx512bf16", False)) and bool(_FEATURES.get("avx512f", False))
_HAS_AMX_CPU = bool(_FEATURES.get("amx-tile", False)) and bool(_FEATURES.get("amx-bf16", False))
_amx_ok = None


def backends() -> tuple:
    """The bfloat16 backends this CPU (and kernel) can run, fastest first: ("amx", "dot"), ("dot",)
    or ()."""
    global _amx_ok
    if _amx_ok is None:
        _amx_ok = _HAS_AMX_CPU and HAS_DOT and _amx_permission()  # its conversions are AVX512_BF16's
    return (("amx",) if _amx_ok else ()) + (("dot",) if HAS_DOT else ())


# ----------------------------------------------------------------------------- the micro-kernels (LLVM IR text)
def _dot_ir():
    """@c16_dot8: Cs[r, 0:32] = sum_kp A[r, kp pair] . B[kp, 0:32 pairs] for r < 8, KP pairs of k.
    a: rows of bfloat16 pairs (lda in pairs), w: one panel, c: float32 rows (ldc in floats)."""
    m, L = DOT_MR, []
    L.append('define void @c16_dot8(ptr %a, i64 %lda, ptr %w, ptr %c, i64 %ldc, i64 %KP) #0 {')
    L.append("entry:")
    L.append("  br label %loop")
    L.append("loop:")
    L.append("  %k = phi i64 [0, %entry], [%k1, %loop]")
    for r in range(m):
        for h in range(2):
            L.append(f"  %acc{r}_{h} = phi <16 x float> [zeroinitializer, %entry], [%n{r}_{h}, %loop]")
    L.append("  %wo = mul i64 %k, 64")
    for h in range(2):
        L.append(f"  %wo{h} = add i64 %wo, {h * 32}")
        L.append(f"  %wp{h} = getelementptr i16, ptr %w, i64 %wo{h}")
        L.append(f"  %wv{h} = load <32 x bfloat>, ptr %wp{h}, align 4")
    for r in range(m):
        L.append(f"  %ao{r} = mul i64 %lda, {r}")
        L.append(f"  %ak{r} = add i64 %ao{r}, %k")
        L.append(f"  %ap{r} = getelementptr i32, ptr %a, i64 %ak{r}")
        L.append(f"  %as{r} = load i32, ptr %ap{r}, align 4")
        L.append(f"  %av{r}i = insertelement <16 x i32> poison, i32 %as{r}, i64 0")
        L.append(f"  %av{r}s = shufflevector <16 x i32> %av{r}i, <16 x i32> poison, <16 x i32> zeroinitializer")
        L.append(f"  %av{r} = bitcast <16 x i32> %av{r}s to <32 x bfloat>")
        for h in range(2):
            L.append(f"  %n{r}_{h} = call <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512("
                     f"<16 x float> %acc{r}_{h}, <32 x bfloat> %av{r}, <32 x bfloat> %wv{h})")
    L.append("  %k1 = add i64 %k, 1")
    L.append("  %more = icmp slt i64 %k1, %KP")
    L.append("  br i1 %more, label %loop, label %end")
    L.append("end:")
    for r in range(m):
        L.append(f"  %co{r} = mul i64 %ldc, {r}")
        for h in range(2):
            L.append(f"  %cq{r}_{h} = add i64 %co{r}, {h * 16}")
            L.append(f"  %cp{r}_{h} = getelementptr float, ptr %c, i64 %cq{r}_{h}")
            L.append(f"  store <16 x float> %n{r}_{h}, ptr %cp{r}_{h}, align 4")
    L.append("  ret void")
    L.append("}")
    return "\n".join([
        "declare <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float>, <32 x bfloat>, <32 x bfloat>)",
        *L,
        'attributes #0 = { nounwind "target-features"="+avx512f,+avx512bw,+avx512vl,+avx512bf16" }',
    ])


def _amx_ir():
    """@c16_amx_cfg(cfg): load the tile configuration (every tile 16 rows of 64 bytes).
    @c16_amx_rel(): release the tile state.
    @c16_amx{16,32}: Cs[0:rows, 0:32] = A[0:rows, 0:32*K32] @ one panel, rows 16 or 32.
    a: bfloat16 rows, lda bytes; w: the panel (128 bytes a pair row); c: float32, ldc bytes.
    Tiles: 0-3 C (rows 0-15 / 16-31 x columns 0-15 / 16-31), 4-5 A, 6-7 B."""
    out = [
        "declare void @llvm.x86.ldtilecfg(ptr)",
        "declare void @llvm.x86.tilerelease()",
        "declare void @llvm.x86.tilezero(i8)",
        "declare void @llvm.x86.tileloadd64(i8, ptr, i64)",
        "declare void @llvm.x86.tilestored64(i8, ptr, i64)",
        "declare void @llvm.x86.tdpbf16ps(i8, i8, i8)",
        "define void @c16_amx_cfg(ptr %cfg) #0 {",
        "  call void @llvm.x86.ldtilecfg(ptr %cfg)",
        "  ret void",
        "}",
        "define void @c16_amx_rel() #0 {",
        "  call void @llvm.x86.tilerelease()",
        "  ret void",
        "}",
    ]
    for rows in (16, 32):
        mt = rows // 16
        L = [f"define void @c16_amx{rows}(ptr %a, i64 %lda, ptr %w, ptr %c, i64 %ldc, i64 %K32) #0 {{",
             "entry:"]
        for t in range(2 * mt):
            L.append(f"  call void @llvm.x86.tilezero(i8 {t})")
        L += ["  %a16 = mul i64 %lda, 16", "  %c16 = mul i64 %ldc, 16", "  br label %loop", "loop:",
              "  %k = phi i64 [0, %entry], [%k1, %loop]",
              "  %ao = mul i64 %k, 64",
              "  %ap0 = getelementptr i8, ptr %a, i64 %ao",
              "  %bo = mul i64 %k, 2048",
              "  %bp0 = getelementptr i8, ptr %w, i64 %bo",
              "  %bp1 = getelementptr i8, ptr %bp0, i64 64",
              "  call void @llvm.x86.tileloadd64(i8 4, ptr %ap0, i64 %lda)"]
        if mt == 2:
            L += ["  %ap1 = getelementptr i8, ptr %ap0, i64 %a16",
                  "  call void @llvm.x86.tileloadd64(i8 5, ptr %ap1, i64 %lda)"]
        L += ["  call void @llvm.x86.tileloadd64(i8 6, ptr %bp0, i64 128)",
              "  call void @llvm.x86.tileloadd64(i8 7, ptr %bp1, i64 128)",
              "  call void @llvm.x86.tdpbf16ps(i8 0, i8 4, i8 6)",
              "  call void @llvm.x86.tdpbf16ps(i8 1, i8 4, i8 7)"]
        if mt == 2:
            L += ["  call void @llvm.x86.tdpbf16ps(i8 2, i8 5, i8 6)",
                  "  call void @llvm.x86.tdpbf16ps(i8 3, i8 5, i8 7)"]
        L += ["  %k1 = add i64 %k, 1",
              "  %more = icmp slt i64 %k1, %K32",
              "  br i1 %more, label %loop, label %end",
              "end:",
              "  call void @llvm.x86.tilestored64(i8 0, ptr %c, i64 %ldc)",
              "  %d1 = getelementptr i8, ptr %c, i64 64",
              "  call void @llvm.x86.tilestored64(i8 1, ptr %d1, i64 %ldc)"]
        if mt == 2:
            L += ["  %d2 = getelementptr i8, ptr %c, i64 %c16",
                  "  call void @llvm.x86.tilestored64(i8 2, ptr %d2, i64 %ldc)",
                  "  %d3 = getelementptr i8, ptr %d2, i64 64",
                  "  call void @llvm.x86.tilestored64(i8 3, ptr %d3, i64 %ldc)"]
        L += ["  ret void", "}"]
        out += L
    out.append('attributes #0 = { nounwind "target-features"="+amx-tile,+amx-bf16" }')
    return "\n".join(out)


def _cvt_ir():
    """@c16_cvt(src, dst, n): dst[i] = bfloat16(src[i]) for i < n (VCVTNEPS2BF16: to nearest, ties
    to even; denormals flush to zero). @c16_cvt_pairs_panels(r0, r1, dst, n, pstride): dst[2j],
    dst[2j+1] = bfloat16(r0[j]), bfloat16(r1[j]) for j < n, the pairs of columns j of panel j // 32
    going to dst + (j // 32) * pstride + (j % 32) * 2 (two rows of B into their row of every panel)."""
    lanes = ", ".join(f"i64 {i}" for i in range(16))
    il = ", ".join(f"i32 {j}" for i in range(16) for j in (i, i + 16))
    return f"""
declare <16 x bfloat> @llvm.x86.avx512bf16.cvtneps2bf16.512(<16 x float>)
declare <16 x float> @llvm.masked.load.v16f32.p0(ptr, i32, <16 x i1>, <16 x float>)
declare void @llvm.masked.store.v16bf16.p0(<16 x bfloat>, ptr, i32, <16 x i1>)
declare void @llvm.masked.store.v32bf16.p0(<32 x bfloat>, ptr, i32, <32 x i1>)

define void @c16_cvt(ptr %src, ptr %dst, i64 %n) #0 {{
entry:
  br label %loop
loop:
  %i = phi i64 [0, %entry], [%i1, %body]
  %more = icmp slt i64 %i, %n
  br i1 %more, label %body, label %done
body:
  %rem = sub i64 %n, %i
  %rv = insertelement <16 x i64> poison, i64 %rem, i64 0
  %rs = shufflevector <16 x i64> %rv, <16 x i64> poison, <16 x i32> zeroinitializer
  %mask = icmp slt <16 x i64> <{lanes}>, %rs
  %sp = getelementptr float, ptr %src, i64 %i
  %v = call <16 x float> @llvm.masked.load.v16f32.p0(ptr %sp, i32 4, <16 x i1> %mask, <16 x float> zeroinitializer)
  %b = call <16 x bfloat> @llvm.x86.avx512bf16.cvtneps2bf16.512(<16 x float> %v)
  %dp = getelementptr i16, ptr %dst, i64 %i
  call void @llvm.masked.store.v16bf16.p0(<16 x bfloat> %b, ptr %dp, i32 2, <16 x i1> %mask)
  %i1 = add i64 %i, 16
  br label %loop
done:
  ret void
}}

define void @c16_cvt_pairs_panels(ptr %r0, ptr %r1, ptr %dst, i64 %n, i64 %pstride) #0 {{
entry:
  br label %loop
loop:
  %i = phi i64 [0, %entry], [%i1, %body]
  %more = icmp slt i64 %i, %n
  br i1 %more, label %body, label %done
body:
  %rem = sub i64 %n, %i
  %rv = insertelement <16 x i64> poison, i64 %rem, i64 0
  %rs = shufflevector <16 x i64> %rv, <16 x i64> poison, <16 x i32> zeroinitializer
  %mask = icmp slt <16 x i64> <{lanes}>, %rs
  %p0 = getelementptr float, ptr %r0, i64 %i
  %p1 = getelementptr float, ptr %r1, i64 %i
  %v0 = call <16 x float> @llvm.masked.load.v16f32.p0(ptr %p0, i32 4, <16 x i1> %mask, <16 x float> zeroinitializer)
  %v1 = call <16 x float> @llvm.masked.load.v16f32.p0(ptr %p1, i32 4, <16 x i1> %mask, <16 x float> zeroinitializer)
  %b0 = call <16 x bfloat> @llvm.x86.avx512bf16.cvtneps2bf16.512(<16 x float> %v0)
  %b1 = call <16 x bfloat> @llvm.x86.avx512bf16.cvtneps2bf16.512(<16 x float> %v1)
  %w = shufflevector <16 x bfloat> %b0, <16 x bfloat> %b1, <32 x i32> <{il}>
  %m2 = shufflevector <16 x i1> %mask, <16 x i1> %mask, <32 x i32> <{il}>
  %panel = udiv i64 %i, 32
  %within = urem i64 %i, 32
  %po = mul i64 %panel, %pstride
  %wo = mul i64 %within, 2
  %o = add i64 %po, %wo
  %dp = getelementptr i16, ptr %dst, i64 %o
  call void @llvm.masked.store.v32bf16.p0(<32 x bfloat> %w, ptr %dp, i32 2, <32 x i1> %m2)
  %i1 = add i64 %i, 16
  br label %loop
done:
  ret void
}}
attributes #0 = {{ nounwind "target-features"="+avx512f,+avx512bw,+avx512vl,+avx512bf16" }}
"""


_TEXT = {"dot": _dot_ir, "amx": _amx_ir, "cvt": _cvt_ir}
_libraries = {}


def _library(context, name):
    """The code library holding backend `name`'s micro-kernels, made once per code generator."""
    key = (id(context.codegen()), name)
    lib = _libraries.get(key)
    if lib is None:
        lib = context.codegen().create_library("charrnn_bf16_" + name)
        mod = llb.parse_assembly(_TEXT[name]())
        mod.verify()
        lib.add_llvm_module(mod)
        lib.finalize()
        _libraries[key] = lib
    return lib


_I8P = ir.IntType(8).as_pointer()
_I64 = ir.IntType(64)


def _addr(context, builder, ty, val, off):
    """The address of element `off` of array `val`, as an i8*."""
    arr = context.make_array(ty)(context, builder, val)
    return builder.bitcast(builder.gep(arr.data, [off]), _I8P)


def _call(context, builder, lib, fname, argtys, argvals):
    context.active_code_library.add_linking_library(_library(context, lib))
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), argtys), fname)
    builder.call(fn, argvals)
    return context.get_dummy_value()


@intrinsic
def _dot8(typingctx, a, a0, lda, w, w0, c, c0, ldc, KP):
    """8 rows x one panel by VDPBF16PS; a (uint16) from element a0 with lda uint16 a row, w (uint16)
    from w0, c (float32) from c0 with ldc floats a row, KP pairs of k."""
    sig = types.void(a, a0, lda, w, w0, c, c0, ldc, KP)

    def codegen(context, builder, sig, args):
        two = ir.Constant(_I64, 2)
        argv = [_addr(context, builder, sig.args[0], args[0], args[1]), builder.sdiv(args[2], two),
                _addr(context, builder, sig.args[3], args[3], args[4]),
                _addr(context, builder, sig.args[5], args[5], args[6]), args[7], args[8]]
        return _call(context, builder, "dot", "c16_dot8", [_I8P, _I64, _I8P, _I8P, _I64, _I64], argv)

    return sig, codegen


@intrinsic
def _amx_block(typingctx, a, a0, lda, w, w0, c, c0, ldc, K32, rows):
    """`rows` (16 or 32) rows x one panel by AMX; strides in elements as for _dot8, K32 tiles of k."""
    sig = types.void(a, a0, lda, w, w0, c, c0, ldc, K32, rows)

    def codegen(context, builder, sig, args):
        argv = [_addr(context, builder, sig.args[0], args[0], args[1]), builder.mul(args[2], ir.Constant(_I64, 2)),
                _addr(context, builder, sig.args[3], args[3], args[4]),
                _addr(context, builder, sig.args[5], args[5], args[6]), builder.mul(args[7], ir.Constant(_I64, 4)),
                args[8]]
        context.active_code_library.add_linking_library(_library(context, "amx"))
        fnty = ir.FunctionType(ir.VoidType(), [_I8P, _I64, _I8P, _I8P, _I64, _I64])
        f16 = cgutils.get_or_insert_function(builder.module, fnty, "c16_amx16")
        f32 = cgutils.get_or_insert_function(builder.module, fnty, "c16_amx32")
        is32 = builder.icmp_signed("==", args[9], ir.Constant(_I64, 32))
        with builder.if_else(is32) as (then, other):
            with then:
                builder.call(f32, argv)
            with other:
                builder.call(f16, argv)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _cvt(typingctx, src, s0, dst, d0, n):
    """dst[d0 + i] = bfloat16 bits of src[s0 + i] for i < n (c16_cvt)."""
    sig = types.void(src, s0, dst, d0, n)

    def codegen(context, builder, sig, args):
        return _call(context, builder, "cvt", "c16_cvt", [_I8P, _I8P, _I64],
                     [_addr(context, builder, sig.args[0], args[0], args[1]),
                      _addr(context, builder, sig.args[2], args[2], args[3]), args[4]])

    return sig, codegen


@intrinsic
def _cvt_pairs_panels(typingctx, r0, o0, r1, o1, dst, d0, n, pstride):
    """Columns j < n of the rows r0[o0:], r1[o1:] as bfloat16 pairs into the row of their panel
    that starts at dst[d0], panels pstride elements apart (c16_cvt_pairs_panels)."""
    sig = types.void(r0, o0, r1, o1, dst, d0, n, pstride)

    def codegen(context, builder, sig, args):
        return _call(context, builder, "cvt", "c16_cvt_pairs_panels", [_I8P, _I8P, _I8P, _I64, _I64],
                     [_addr(context, builder, sig.args[0], args[0], args[1]),
                      _addr(context, builder, sig.args[2], args[2], args[3]),
                      _addr(context, builder, sig.args[4], args[4], args[5]), args[6], args[7]])

    return sig, codegen


@intrinsic
def _amx_config(typingctx, cfg):
    """Load the tile configuration in cfg (64 bytes, made by amx_tile_config)."""
    sig = types.void(cfg)

    def codegen(context, builder, sig, args):
        return _call(context, builder, "amx", "c16_amx_cfg", [_I8P],
                     [_addr(context, builder, sig.args[0], args[0], ir.Constant(_I64, 0))])

    return sig, codegen


@intrinsic
def _amx_release(typingctx):
    sig = types.void()

    def codegen(context, builder, sig, args):
        return _call(context, builder, "amx", "c16_amx_rel", [], [])

    return sig, codegen


def amx_tile_config() -> np.ndarray:
    """The 64-byte tile configuration: palette 1, every tile 16 rows of 64 bytes."""
    cfg = np.zeros(64, dtype=np.uint8)
    cfg[0] = 1
    cfg[16:32].view(np.uint16)[:8] = 64
    cfg[48:56] = 16
    return cfg


# ----------------------------------------------------------------------------- rounding and packing
@helper
def bf16(x):
    """The bits of the bfloat16 nearest to float32 x, ties to even, a denormal x flushed to a zero
    of its sign, a NaN kept a NaN: what VCVTNEPS2BF16 (_cvt) gives, one value at a time."""
    u = np.int64(_f32_bits(x)) & 0xFFFFFFFF
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    if (u & 0x7FFFFFFF) > 0x7F800000:
        r = (u >> 16) | 0x40
    elif (u & 0x7F800000) == 0:
        r = (u >> 16) & 0x8000
    return np.uint16(r)


@helper
def pack_a(A, trans, m0, m1, K, Ab, ft):
    """Ab (Mp, Kp) row-major bfloat16 <- rows m0..m1-1 of op(A) (., K), Mp = m1 - m0 rounded up to
    MALIGN and Kp = K rounded up to KALIGN, zeros in the padding. op(A) = A, or A^T (A (K, .)):
    then A is transposed KB rows at a time into the float32 buffer ft (16 x 16 tiles, so both
    sides stay in L1) and converted from there row by row."""
    Kp = rup(K, KALIGN)
    M = m1 - m0
    Mp = rup(M, MALIGN)
    z = np.uint16(0)
    if not trans:
        for i in range(M):
            _cvt(A[m0 + i], 0, Ab, i * Kp, K)
    else:
        for k0 in range(0, K, KB):
            kb = min(KB, K - k0)
            for kk0 in range(0, kb, 16):
                for ii0 in range(0, M, 16):
                    for kk in range(kk0, min(kk0 + 16, kb)):
                        src = A[k0 + kk]
                        for ii in range(ii0, min(ii0 + 16, M)):
                            ft[ii * KB + kk] = src[m0 + ii]
            for i in range(M):
                _cvt(ft, i * KB, Ab, i * Kp + k0, kb)
    for i in range(M):
        dst = Ab[i * Kp : (i + 1) * Kp]
        for k in range(K, Kp):
            dst[k] = z
    for i in range(M * Kp, Mp * Kp):
        Ab[i] = z


@helper
def _zero_padding(Bp, K, Kp, N, Np):
    """Zero what pack_b leaves unwritten of (K, N) packed as (Kp, Np): the pairs past row K of every
    panel, the columns past N of the last panel (and the odd row K's partner, if K is odd)."""
    z = np.uint16(0)
    for jp in range(Np // NR):
        panel = Bp[jp * Kp * NR : (jp + 1) * Kp * NR]
        for i in range((K // 2) * 2 * NR, Kp * NR):
            panel[i] = z
    if N < Np:
        jp = Np // NR - 1
        w = N - jp * NR
        panel = Bp[jp * Kp * NR : (jp + 1) * Kp * NR]
        for kp in range(Kp // 2):
            row = panel[kp * 2 * NR : (kp + 1) * 2 * NR]
            for j in range(2 * w, 2 * NR):
                row[j] = z


@helper
def _scatter_pairs(src, K, tmp, Bp, n, Kp):
    """Column n of a packed B from src (K,), one row of B^T: converted into tmp (pairs of k are
    adjacent there already), then one 32-bit pair at a time into its panel rows."""
    _cvt(src, 0, tmp, 0, K)
    if K % 2:
        tmp[K] = np.uint16(0)
    t32 = tmp[: K + K % 2].view(np.uint32)
    b32 = Bp.view(np.uint32)
    base = ((n // NR) * Kp * NR) // 2 + n % NR
    for kp in range(t32.shape[0]):
        b32[base + kp * NR] = t32[kp]


@helper
def _pack_cols(B, n0, n1, Bp):
    """Bp <- columns n0..n1-1 of B (K, .) in panels of NR columns of bfloat16 pairs, K rounded up to
    KALIGN and the columns to NR with zeros: element (k, n) at
    Bp[(n // NR) * Kp * NR + (k // 2) * 2 * NR + (n % NR) * 2 + k % 2]."""
    K = B.shape[0]
    Kp = rup(K, KALIGN)
    N = n1 - n0
    Np = rup(N, NR)
    _zero_padding(Bp, K, Kp, N, Np)
    # two rows of B make one row of pairs of every panel: one call a pair of rows (each panel row
    # takes 32 of its columns)
    for kp in range(K // 2):
        _cvt_pairs_panels(B[2 * kp], n0, B[2 * kp + 1], n0, Bp, kp * 2 * NR, N, Kp * NR)
    for jp in range(Np // NR):
        c0 = n0 + jp * NR
        w = min(NR, n1 - c0)
        if K % 2:
            r0 = B[K - 1, c0 : c0 + w]
            dst = Bp[jp * Kp * NR + (K // 2) * 2 * NR : jp * Kp * NR + (K // 2) * 2 * NR + 2 * w]
            for j in range(w):
                dst[2 * j] = bf16(r0[j])


@helper
def _pack_rows(W, G, H, u0, u1, Bp, tmp):
    """Bp <- B (K, G*Hp) packed as _pack_cols packs, Hp = u1 - u0, where column g*Hp + u of B is row
    g*H + u0 + u of W (., K): with G = 1 the columns u0..u1-1 of W^T, and with W = W_hh (G*H, H)
    a block of units' rows of every gate, gate-major (bptt.pack_fwd's B)."""
    K = W.shape[1]
    Hp = u1 - u0
    N = G * Hp
    Kp = rup(K, KALIGN)
    Np = rup(N, NR)
    _zero_padding(Bp, K, Kp, N, Np)
    for n in range(N):
        _scatter_pairs(W[(n // Hp) * H + u0 + n % Hp], K, tmp, Bp, n, Kp)


# ----------------------------------------------------------------------------- the product
@helper
def _mm_dot(kind, ab, Mp, Kp, N, Cs, bp):
    """Cs (Mp, Np) <- ab (Mp, Kp) @ bp (Kp, Np) by VDPBF16PS, DOT_MR rows at a time."""
    Np = rup(N, NR)
    for jp in range(Np // NR):
        for i in range(0, Mp, DOT_MR):
            _dot8(ab, i * Kp, Kp, bp, jp * Kp * NR, Cs, i * Np + jp * NR, Np, Kp // 2)


@helper
def _mm_amx(kind, ab, Mp, Kp, N, Cs, bp):
    """Cs (Mp, Np) <- ab (Mp, Kp) @ bp (Kp, Np) by AMX tiles, 32 rows at a time (16 for the last
    16); between tiles_on and tiles_off."""
    Np = rup(N, NR)
    for jp in range(Np // NR):
        for i in range(0, Mp, 32):
            _amx_block(ab, i * Kp, Kp, bp, jp * Kp * NR, Cs, i * Np + jp * NR, Np, Kp // KALIGN, min(32, Mp - i))


@helper
def _product(kind, ab, ft, cs, A, trans_a, bp, K, N, C, trans_c):
    """C (M, N) <- op(A) (M, K) @ B, B packed in bp (_pack_cols / _pack_rows), in chunks of MC rows
    of A: each chunk rounded and packed into ab, multiplied into cs (by AMX tiles or VDPBF16PS as
    `kind` says: _mm), copied out. op(A) = A, or A^T (A (K, M)). With trans_c the result goes to C^T
    instead (C (N, M))."""
    M = C.shape[1] if trans_c else C.shape[0]
    Kp = rup(K, KALIGN)
    Np = rup(N, NR)
    if K == 0:  # an empty sum (a thread with no rows of a weight gradient)
        for i in range(C.shape[0]):
            C[i, :] = 0
        return
    for m0 in range(0, M, MC):
        m1 = min(M, m0 + MC)
        pack_a(A, trans_a, m0, m1, K, ab, ft)
        Mp = rup(m1 - m0, MALIGN)
        _mm(kind, ab, Mp, Kp, N, cs, bp)
        if trans_c:  # in 16 x 16 tiles: the chunk's rows are read, C's rows written, a cache line at a time
            for i0 in range(0, m1 - m0, 16):
                i1 = min(m1 - m0, i0 + 16)
                for j0 in range(0, N, 16):
                    for j in range(j0, min(N, j0 + 16)):
                        dst = C[j]
                        for i in range(i0, i1):
                            dst[m0 + i] = cs[i * Np + j]
        else:
            for i in range(m1 - m0):
                dst, src = C[m0 + i], cs[i * Np : i * Np + N]
                for j in range(N):
                    dst[j] = src[j]


def _mm(kind, ab, Mp, Kp, N, Cs, bp):  # pragma: no cover - chosen by kind's type
    pass


@overload(_mm, jit_options=HELPER)
def _mm_ov(kind, ab, Mp, Kp, N, Cs, bp):
    return _mm_amx if _type_name(kind).startswith("AMX") else _mm_dot


def _type_name(t):
    return getattr(t, "instance_class", type(t)).__name__


# ----------------------------------------------------------------------------- compiled once, called by name
# Packing and the product are most of the bfloat16 code. As helpers inlined into the kernels, they
# were optimised and turned into machine code once for every level of the call tree that held them
# (Numba compiles each helper to machine code and links its IR into every caller, which does the
# same again: product, mm_bt, input_rows, ..., _forward_backward), which made a first bf16 run
# about 5 s slower to compile than a float32 one. So they are kernels of their own with C
# signatures, compiled (or loaded from the disk cache) once per process, before the first kernel
# that calls them (link(), from workspace()); LLVM's JIT finds them by the names below
# (llvmlite's add_symbol, as Numba's own C helpers), and the kernels call them by name
# (_pack_call, _product_call). The arithmetic is the same code, only called instead of inlined.
AMXKernel = namedtuple("AMXKernel", ["unused"])  # _product's `kind`: which micro-kernel (_mm)
DOTKernel = namedtuple("DOTKernel", ["unused"])
_F32P, _U16P, _I = types.CPointer(types.float32), types.CPointer(types.uint16), types.int64


@kernel
def _pack_entry(b, K0, K1, trans, n0, n1, G, H, bp, nbp, tmp, ntmp):
    """B (K0, K1) packed into bp (nbp,): its columns n0..n1-1 (_pack_cols), or, with trans, the
    columns of B^T as _pack_rows maps them (tmp (ntmp,): its scratch)."""
    B = carray(b, (K0, K1))
    if trans:
        _pack_rows(B, G, H, n0, n1, carray(bp, nbp), carray(tmp, ntmp))
    else:
        _pack_cols(B, n0, n1, carray(bp, nbp))


@kernel
def _product_amx_entry(a, am, an, trans_a, bp, nbp, K, N, c, cm, cn, trans_c, ab, nab, ft, nft, cs, ncs):
    """_product by AMX tiles: A (am, an), C (cm, cn), the thread's ab (nab,), ft (nft,), cs (ncs,)."""
    _product(AMXKernel(0), carray(ab, nab), carray(ft, nft), carray(cs, ncs), carray(a, (am, an)), trans_a != 0,
             carray(bp, nbp), K, N, carray(c, (cm, cn)), trans_c != 0)


@kernel
def _product_dot_entry(a, am, an, trans_a, bp, nbp, K, N, c, cm, cn, trans_c, ab, nab, ft, nft, cs, ncs):
    """_product by VDPBF16PS, arguments as _product_amx_entry's."""
    _product(DOTKernel(0), carray(ab, nab), carray(ft, nft), carray(cs, ncs), carray(a, (am, an)), trans_a != 0,
             carray(bp, nbp), K, N, carray(c, (cm, cn)), trans_c != 0)


_PRODUCT_SIG = types.void(_F32P, _I, _I, _I, _U16P, _I, _I, _I, _F32P, _I, _I, _I, _U16P, _I, _F32P, _I, _F32P, _I)
_ENTRIES = {  # symbol: (kernel, signature)
    "charrnn_bf16_pack": (_pack_entry, types.void(_F32P, _I, _I, _I, _I, _I, _I, _I, _U16P, _I, _U16P, _I)),
    "charrnn_bf16_product_amx": (_product_amx_entry, _PRODUCT_SIG),
    "charrnn_bf16_product_dot": (_product_dot_entry, _PRODUCT_SIG),
}
_linked = set()


def link(symbol):
    """Compile (or load from the cache) the entry behind `symbol` and make it known to LLVM's JIT
    under that name: before any kernel that calls it is compiled or loaded (a cached kernel whose
    symbol is missing would stop the process)."""
    with global_compiler_lock:  # the lock every compile holds: no second thread links meanwhile
        if symbol in _linked:
            return
        disp, sig = _ENTRIES[symbol]
        disp.compile(sig)
        cres = disp.overloads[sig.args]
        llb.add_symbol(symbol, cres.library.get_pointer_to_function(cres.fndesc.llvm_cfunc_wrapper_name))
        _linked.add(symbol)


def _symbol_of(kind):
    return "charrnn_bf16_product_amx" if _type_name(kind).startswith("AMX") else "charrnn_bf16_product_dot"


def _ptr_and_shape(context, builder, ty, val):
    arr = context.make_array(ty)(context, builder, val)
    return [builder.bitcast(arr.data, _I8P)] + list(cgutils.unpack_tuple(builder, arr.shape, ty.ndim))


def _check_arrays(*pairs):
    for ty, (dtype, ndim) in pairs:
        if not (isinstance(ty, types.Array) and ty.dtype == dtype and ty.ndim == ndim and ty.layout == "C"):
            raise errors.TypingError(f"expected a C-contiguous {ndim}-d {dtype} array, not {ty}")


def _call_by_name(builder, symbol, args):
    fnty = ir.FunctionType(ir.VoidType(), [a.type for a in args])
    builder.call(cgutils.get_or_insert_function(builder.module, fnty, symbol), args)


def _i64(builder, val):
    return builder.zext(val, _I64) if val.type != _I64 else val


@intrinsic
def _pack_call(typingctx, B, trans, n0, n1, G, H, Bp, tmp):
    """_pack_entry, by name."""
    _check_arrays((B, (types.float32, 2)), (Bp, (types.uint16, 1)), (tmp, (types.uint16, 1)))
    link("charrnn_bf16_pack")
    sig = types.void(B, trans, n0, n1, G, H, Bp, tmp)

    def codegen(context, builder, sig, args):
        b, K0, K1 = _ptr_and_shape(context, builder, sig.args[0], args[0])
        ints = [_i64(builder, context.cast(builder, v, t, types.int64)) for v, t in zip(args[1:6], sig.args[1:6])]
        _call_by_name(builder, "charrnn_bf16_pack", [b, K0, K1, *ints,
                                                     *_ptr_and_shape(context, builder, sig.args[6], args[6]),
                                                     *_ptr_and_shape(context, builder, sig.args[7], args[7])])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _product_call(typingctx, kind, ab, ft, cs, A, trans_a, bp, K, N, C, trans_c):
    """_product_amx_entry or _product_dot_entry (by kind's type), by name."""
    _check_arrays((ab, (types.uint16, 1)), (ft, (types.float32, 1)), (cs, (types.float32, 1)),
                  (A, (types.float32, 2)), (bp, (types.uint16, 1)), (C, (types.float32, 2)))
    symbol = _symbol_of(kind)
    link(symbol)
    sig = types.void(kind, ab, ft, cs, A, trans_a, bp, K, N, C, trans_c)

    def codegen(context, builder, sig, args):
        def arr(i):
            return _ptr_and_shape(context, builder, sig.args[i], args[i])

        def i64(i):
            return context.cast(builder, args[i], sig.args[i], types.int64)

        _call_by_name(builder, symbol, [*arr(4), i64(5), *arr(6), i64(7), i64(8), *arr(9), i64(10),
                                        *arr(1), *arr(2), *arr(3)])
        return context.get_dummy_value()

    return sig, codegen


@helper
def pack_b(B, trans, n0, n1, Bp, tmp):
    """Bp <- columns n0..n1-1 of op(B) (K, .) packed in panels (_pack_cols). op(B) = B, or B^T
    (B (., K)); tmp: scratch for the transposed case."""
    _pack_call(B, trans, n0, n1, 1, 0, Bp, tmp)


@helper
def pack_b_gates(W, G, H, u0, u1, Bp, tmp):
    """Bp <- B = Wf^T (H, G*Hp) packed as pack_b does, where column g*Hp + u of B is row
    g*H + u0 + u of W (G*H, H): a block of units' rows of W_hh, gate-major (bptt.pack_fwd's B)."""
    _pack_call(W, True, u0, u1, G, H, Bp, tmp)


@helper
def product(ws, p, A, trans_a, bp, K, N, C, trans_c):
    """C (M, N) <- op(A) (M, K) @ B, B packed in bp (pack_b / pack_b_gates), in the thread's buffers
    of the workspace ws, whose type chooses the micro-kernel (_product)."""
    _product_call(ws, ws.ab[p], ws.ft[p], ws.cs[p], A, trans_a, bp, K, N, C, trans_c)


def tiles_on(ws, p):  # pragma: no cover - chosen by the workspace's type
    """Load the thread's tile configuration (AMX; nothing otherwise): once per kernel call, before
    its first product. The tile state is the thread's own."""


def tiles_off(ws):  # pragma: no cover
    """Release the tile state (AMX; nothing otherwise), at the end of the kernel call."""


def _amx_on(ws, p):
    _amx_config(ws.cfg[p])


def _amx_off(ws):
    _amx_release()


def _nothing_on(ws, p):
    pass


def _nothing_off(ws):
    pass


@overload(tiles_on, jit_options=HELPER, strict=False)
def _tiles_on_ov(ws, p):
    return _amx_on if _type_name(ws) == "AMX" else _nothing_on


@overload(tiles_off, jit_options=HELPER, strict=False)
def _tiles_off_ov(ws):
    return _amx_off if _type_name(ws) == "AMX" else _nothing_off


@helper
def mm_bt(ws, p, A, W, C):
    """C (M, N) <- A (M, K) @ W^T for W (N, K), in bfloat16 products."""
    bp = ws.bp[p]
    pack_b(W, True, 0, W.shape[0], bp, ws.ab[p])
    product(ws, p, A, False, bp, W.shape[1], W.shape[0], C, False)


@helper
def mm_nn(ws, p, A, W, C):
    """C (M, N) <- A (M, K) @ W for W (K, N), in bfloat16 products."""
    bp = ws.bp[p]
    pack_b(W, False, 0, W.shape[1], bp, ws.ab[p])
    product(ws, p, A, False, bp, W.shape[0], W.shape[1], C, False)


@helper
def mm_tn(ws, p, A, B, C):
    """C (M, N) <- A^T @ B for A (K, M), B (K, N), in bfloat16 products (a weight gradient: K the
    positions of a batch)."""
    bp = ws.bp[p]
    K, M, N = A.shape[0], A.shape[1], B.shape[1]
    swap = N < M  # C^T = B^T @ A: the smaller operand is the one transposed
    left, right = (B, A) if swap else (A, B)
    pack_b(right, False, 0, right.shape[1], bp, ws.ab[p])
    product(ws, p, left, True, bp, K, right.shape[1], C, swap)


# ----------------------------------------------------------------------------- sizes and entry points
def sizes(M_max: int, K_max: int, N_max: int, KN_max: int) -> tuple:
    """(ab, bp, cs) elements of a thread's workspace for products with at most these sizes (M the
    rows multiplied at a time, up to MC; KN_max the largest K x N of a packed B)."""
    return (MC * rup(K_max, KALIGN), int(KN_max), MC * rup(N_max, NR))


def packed_b_size(K: int, N: int) -> int:
    return rup(K, KALIGN) * rup(N, NR)


def workspace(backend: str, n: int, K_max: int, N_max: int, KN_max: int, wp_size: int = 0):
    """A workspace of `backend` ("amx" or "dot") for n threads (see AMX / DOT)."""
    from charrnn.kernels.layout import per_thread

    if backend not in backends():  # also what asks Linux for the tile state: without it AMX faults
        raise RuntimeError(f"this CPU cannot run bfloat16 products by {backend!r}")
    ab, bp, cs = sizes(MC, K_max, N_max, KN_max)
    cls = AMX if backend == "amx" else DOT
    link("charrnn_bf16_pack")  # the compiled code its kernels call by name
    link("charrnn_bf16_product_" + backend)
    cfg = per_thread(n, 64, np.uint8)
    cfg[:] = amx_tile_config()
    return cls(ab=per_thread(n, ab, np.uint16), bp=per_thread(n, bp, np.uint16),
               wp=per_thread(n, max(1, wp_size), np.uint16, huge=True), cs=per_thread(n, cs, np.float32),
               ft=per_thread(n, MC * KB, np.float32), cfg=cfg)


@kernel
def _matmul_entry(ws, A, ta, B, tb, C):
    tiles_on(ws, 0)
    _matmul_body(ws, A, ta, B, tb, C)
    tiles_off(ws)


@helper
def _matmul_body(ws, A, ta, B, tb, C):
    bp = ws.bp[0]
    K = A.shape[0] if ta else A.shape[1]
    N = C.shape[1]
    if tb:
        pack_b(B, True, 0, B.shape[0], bp, ws.ab[0])
    else:
        pack_b(B, False, 0, B.shape[1], bp, ws.ab[0])
    product(ws, 0, A, ta, bp, K, N, C, False)


def matmul(A, B, trans_a=False, trans_b=False, backend=None):
    """op(A) @ op(B) in bfloat16 products with float32 accumulation (tests, benchmarks): A and B
    C-contiguous float32, op(X) = X or X^T."""
    A = np.ascontiguousarray(A, dtype=np.float32)
    B = np.ascontiguousarray(B, dtype=np.float32)
    M, K = (A.shape[1], A.shape[0]) if trans_a else A.shape
    K2, N = (B.shape[1], B.shape[0]) if trans_b else B.shape
    if K != K2:
        raise ValueError("shapes do not agree")
    have = backends()
    backend = backend or (have[0] if have else None)
    if backend not in have:
        raise RuntimeError(f"this CPU cannot run bfloat16 products by {backend!r}")
    ws = workspace(backend, 1, K, N, packed_b_size(K, N))
    C = np.zeros((M, N), dtype=np.float32)
    _matmul_entry(ws, A, trans_a, B, trans_b, C)
    return C


@kernel
def _op_entry(ws, op, A, B, C):
    tiles_on(ws, 0)
    if op == 0:
        mm_bt(ws, 0, A, B, C)
    elif op == 1:
        mm_nn(ws, 0, A, B, C)
    else:
        mm_tn(ws, 0, A, B, C)
    tiles_off(ws)


OPS = {"bt": 0, "nn": 1, "tn": 2}


def op(name: str, A, B, backend: str):
    """The training loop's three products as the kernels call them (tests): "bt" A @ B^T, "nn"
    A @ B, "tn" A^T @ B, for C-contiguous float32 A and B."""
    A = np.ascontiguousarray(A, dtype=np.float32)
    B = np.ascontiguousarray(B, dtype=np.float32)
    M = A.shape[1] if name == "tn" else A.shape[0]
    K = A.shape[0] if name == "tn" else A.shape[1]
    N = B.shape[0] if name == "bt" else B.shape[1]
    if backend not in backends():
        raise RuntimeError(f"this CPU cannot run bfloat16 products by {backend!r}")
    ws = workspace(backend, 1, max(K, M, N), max(M, N), packed_b_size(K, max(M, N)))
    C = np.full((M, N), np.nan, dtype=np.float32)
    _op_entry(ws, OPS[name], A, B, C)
    return C


@kernel
def _convert_entry(src, dst, one_at_a_time):
    if one_at_a_time:
        for i in range(src.shape[0]):
            dst[i] = bf16(src[i])
    else:
        _cvt(src, 0, dst, 0, src.shape[0])


def convert(x, one_at_a_time: bool = False) -> np.ndarray:
    """The bfloat16 bits (uint16) of float32 x (1-D) as the packing routines round it: the vector
    conversion, or the scalar `bf16` of the transposing packs (tests: the two must agree)."""
    if not HAS_DOT:
        raise RuntimeError("this CPU has no AVX512_BF16 conversion")
    x = np.ascontiguousarray(x, dtype=np.float32).ravel()
    out = np.zeros(x.shape[0], dtype=np.uint16)
    _convert_entry(x, out, one_at_a_time)
    return out
