"""Scalar maths and small array helpers shared by every kernel.

- tanh, sigmoid: in float32 a rational approximation of tanh (max abs error ~3e-7, below float32
  resolution near 1) that LLVM vectorises; libm's tanh/exp are scalar calls and cost 5-20 ns
  each. In float64 (gradient checks) the exact libm functions. NaN propagates through both.
- exp: in float32 Cody-Waite range reduction and a degree-7 polynomial, with the power of two
  added to the exponent bits (relative error <= 1.4 ulp; 0 below -87.3 instead of denormals;
  inf above 88.7; NaN stays NaN); LLVM vectorises it. The softmax over a V-wide row spends most
  of its time here: 12.4 ns per element with libm's expf, 2.8 with this (benchmarks/vocab_speed.py).
- cast(x, v): the constant v in the float type of x, so float32 loops stay float32 (Numba would
  otherwise promote every float32 op float64 to float64 and stop vectorising).
- rows, colsum, copy: row views and loops written the way LLVM vectorises them.

Every inner loop in the kernels runs j over range(n) from 0 on 1-D row views: an index like
`H + j`, or a loop from a non-zero start, makes Numba emit negative-index wraparound checks, which
stop LLVM from vectorising the loop (measured: 21 ns per LSTM unit instead of 3).
"""

import math

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from charrnn.kernels.jit import HELPER, helper

_TANH_CLAMP = 7.90531110763549805


def tanh(x):  # pragma: no cover - replaced by the overload below inside compiled code
    return math.tanh(x)


def sigmoid(x):  # pragma: no cover
    return 1.0 / (1.0 + math.exp(-x))


def cast(x, v):  # pragma: no cover - `v` as the float type of `x`
    return v


@overload(tanh, inline="always", jit_options=HELPER)
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


@overload(sigmoid, inline="always", jit_options=HELPER)
def _sigmoid_ov(x):
    if isinstance(x, types.Float) and x.bitwidth == 32:
        half = np.float32(0.5)

        def impl(x):
            # sigma(x) = (1 + tanh(x/2)) / 2: one vectorisable rational function, no exp
            return half + half * tanh(half * x)

        return impl

    def impl64(x):
        return 1.0 / (1.0 + math.exp(-x))

    return impl64


def exp(x):  # pragma: no cover
    return math.exp(x)


_LOG2E = 1.4426950408889634
_LN2_HI = 0.693359375  # ln 2 = _LN2_HI + _LN2_LO, the high part with few bits so n * _LN2_HI is exact
_LN2_LO = -2.12194440e-4
_EXP_MIN = -87.33654  # below: the result would be denormal; flushed to 0 (a softmax cannot tell)
_EXP_MAX = 88.72283  # above: inf, as expf


@overload(exp, inline="always", jit_options=HELPER)
def _exp_ov(x):
    if isinstance(x, types.Float) and x.bitwidth == 32:
        lo, hi = np.float32(_EXP_MIN), np.float32(_EXP_MAX)
        log2e, c1, c2 = np.float32(_LOG2E), np.float32(_LN2_HI), np.float32(_LN2_LO)
        zero, one, half, inf = np.float32(0.0), np.float32(1.0), np.float32(0.5), np.float32(np.inf)

        def impl(x):
            xc = min(max(x, lo), hi)
            n = np.floor(xc * log2e + half)  # exp(x) = 2^n exp(r), |r| <= ln2 / 2
            r = xc - n * c1
            r = r - n * c2
            p = np.float32(1.9875691500e-4)
            p = p * r + np.float32(1.3981999507e-3)
            p = p * r + np.float32(8.3334519073e-3)
            p = p * r + np.float32(4.1665795894e-2)
            p = p * r + np.float32(1.6666665459e-1)
            p = p * r + np.float32(5.0000001201e-1)
            p = p * r * r + r + one  # exp(r), in [0.7, 1.42]
            # times 2^n: n added to the exponent field (|n| <= 127 after the clamp, so no overflow of it)
            y = scale2(p, np.int32(n))
            y = zero if x < lo else y
            y = inf if x > hi else y
            return x if x != x else y  # NaN in, NaN out

        return impl

    def impl64(x):
        return math.exp(x)

    return impl64


@intrinsic
def _f32_bits(typingctx, x):
    """The bits of a float32 as an int32 (a bit cast, as C's memcpy)."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def _bits_f32(typingctx, i):
    """The float32 with these bits."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


def scale2(p, n):  # pragma: no cover - p * 2**n for float32 p in [0.5, 2) and -127 < n < 128
    return p * 2.0 ** n


@overload(scale2, inline="always", jit_options=HELPER)
def _scale2_ov(p, n):
    def impl(p, n):
        return _bits_f32(_f32_bits(p) + (n << np.int32(23)))

    return impl


@overload(cast, inline="always")
def _cast_ov(x, v):
    if isinstance(x, types.Float) and x.bitwidth == 32:
        return lambda x, v: np.float32(v)
    return lambda x, v: np.float64(v)


@helper
def rows(a2, r0, r1):
    """Rows r0..r1-1 of a C-contiguous 2-D array, as a C-contiguous view."""
    n = a2.shape[1]
    return a2.reshape(a2.shape[0] * n)[r0 * n : r1 * n].reshape((r1 - r0, n))


@helper
def colsum(a, out):
    """out (n,) <- sum over the rows of a (m, n) (written, not accumulated)."""
    out[:] = 0
    for i in range(a.shape[0]):
        row = a[i]
        for j in range(a.shape[1]):
            out[j] += row[j]


@helper
def copy(dst, src):
    """dst[j] = src[j] for 1-D arrays of one length (a loop: an array assignment would compile
    Numba's shape-mismatch error path, string formatting and all, into every kernel)."""
    for j in range(dst.shape[0]):
        dst[j] = src[j]


@helper
def copy_rows(dst2, src2, r0, r1):
    """dst2[r] = src2[r] for rows r0..r1-1 of two arrays of the same width."""
    n = dst2.shape[1]
    for r in range(r0, r1):
        d, s = dst2[r], src2[r]
        for j in range(n):
            d[j] = s[j]
