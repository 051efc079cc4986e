"""Compiled optimizer kernels over flat 1-D buffers: sum of squares, scaling, clipping by value, and
the Adam, RMSprop and SGD updates.

Numba only: no I/O, no allocation, no checks. The Python layer (charrnn/optim.py) checks dtypes,
shapes and contiguity and then calls these `_` kernels, which trust their inputs. Parameters `theta`,
gradients `g` and moments share one length and one dtype (float32 in real use, float64 in tests);
each update is one loop over the buffer.

Each update can also move an average of the weights, in the same pass (`avg`, empty when there is
none): avg += rate * (theta_new - avg), the exponential or Polyak average that train.py validates.

Update rules are PyTorch's (torch.optim, single-tensor path), with step count t starting at 1:
    Adam     g += wd*theta (if wd != 0); m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2
             theta -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)
    RMSprop  sq = alpha sq + (1-alpha) g^2; theta -= lr g / (sqrt(sq) + eps)
    SGD      buf = g (t == 1) else momentum buf + g; theta -= lr buf      (momentum 0: theta -= lr g)
"""

import math

import numpy as np
from numba import types
from numba.extending import overload

from charrnn.kernels.jit import HELPER, kernel


def _like(a, v):  # pragma: no cover - `v` as the element type of array `a` (overload below)
    return v


@overload(_like, jit_options=HELPER)
def _like_ov(a, v):
    # Scalars arrive as float64; casting them once to the buffer's type keeps the float32 loops in
    # float32 (Numba would otherwise promote every float32 op float64 to float64 and stop vectorising).
    if isinstance(a, types.Array) and a.dtype == types.float32:
        return lambda a, v: np.float32(v)
    return lambda a, v: np.float64(v)


@kernel
def _sumsq(g):
    """Sum of g[i]^2 over the flat buffer g (n,), accumulated in float64. NaN/Inf propagate."""
    s = 0.0
    for i in range(g.size):
        x = np.float64(g[i])
        s += x * x
    return s


@kernel
def _scale(g, s):
    """g (n,) *= s, in place."""
    c = _like(g, s)
    for i in range(g.size):
        g[i] *= c


@kernel
def _clip_value(g, c):
    """Clamp each element of g (n,) to [-c, c] in place. NaN stays NaN (as torch.clamp_)."""
    hi = _like(g, c)
    lo = -hi
    for i in range(g.size):
        x = g[i]
        # written as two comparisons so a NaN fails both and is kept
        if x > hi:
            g[i] = hi
        elif x < lo:
            g[i] = lo


@kernel
def _adam(theta, g, m, v, lr, beta1, beta2, eps, weight_decay, t, avg, rate):
    """One Adam step on theta (n,) with gradient g (n,) and moments m, v (n,), all updated in place,
    and the average avg (n,) (or (0,): none) moved `rate` of the way to the new theta.

    g is not modified (weight decay is added to a local copy of each element). t >= 1 is the step
    count including this step.
    """
    # bias corrections in float64: 1 - beta2^t is tiny early on and float32 would lose its digits
    step = _like(theta, lr / (1.0 - beta1**t))
    bc2 = _like(theta, math.sqrt(1.0 - beta2**t))
    b1 = _like(theta, beta1)
    b2 = _like(theta, beta2)
    a1 = _like(theta, 1.0 - beta1)
    a2 = _like(theta, 1.0 - beta2)
    e = _like(theta, eps)
    wd = _like(theta, weight_decay)
    r = _like(theta, rate)
    averaging = avg.size > 0
    if weight_decay != 0.0:
        for i in range(theta.size):
            gi = g[i] + wd * theta[i]  # L2 penalty folded into the gradient, as PyTorch does
            mi = b1 * m[i] + a1 * gi
            vi = b2 * v[i] + a2 * gi * gi
            m[i] = mi
            v[i] = vi
            x = theta[i] - step * mi / (math.sqrt(vi) / bc2 + e)
            theta[i] = x
            if averaging:
                avg[i] += r * (x - avg[i])
    else:
        # separate loop so wd*theta (NaN for an infinite theta) never enters when wd is 0
        for i in range(theta.size):
            gi = g[i]
            mi = b1 * m[i] + a1 * gi
            vi = b2 * v[i] + a2 * gi * gi
            m[i] = mi
            v[i] = vi
            x = theta[i] - step * mi / (math.sqrt(vi) / bc2 + e)
            theta[i] = x
            if averaging:
                avg[i] += r * (x - avg[i])


@kernel
def _rmsprop(theta, g, sq, lr, alpha, eps, avg, rate):
    """One RMSprop step (no momentum, not centred) on theta (n,), g (n,), running mean square sq (n,);
    the average avg (n,) (or (0,)) moved `rate` of the way to the new theta."""
    a = _like(theta, alpha)
    a1 = _like(theta, 1.0 - alpha)
    r = _like(theta, lr)
    e = _like(theta, eps)
    ra = _like(theta, rate)
    averaging = avg.size > 0
    for i in range(theta.size):
        gi = g[i]
        s = a * sq[i] + a1 * gi * gi
        sq[i] = s
        x = theta[i] - r * gi / (math.sqrt(s) + e)
        theta[i] = x
        if averaging:
            avg[i] += ra * (x - avg[i])


@kernel
def _sgd(theta, g, buf, lr, momentum, t, avg, rate):
    """One SGD step on theta (n,) with gradient g (n,); momentum buffer buf (n,), unused (may be
    empty) when momentum == 0. t >= 1 is the step count including this step. The average avg (n,)
    (or (0,)) is moved `rate` of the way to the new theta."""
    r = _like(theta, lr)
    mu = _like(theta, momentum)
    ra = _like(theta, rate)
    averaging = avg.size > 0
    for i in range(theta.size):
        if momentum == 0.0:
            d = g[i]
        elif t == 1:
            d = g[i]  # PyTorch starts the buffer as a copy of the first gradient (no dampening)
            buf[i] = d
        else:
            d = mu * buf[i] + g[i]
            buf[i] = d
        x = theta[i] - r * d
        theta[i] = x
        if averaging:
            avg[i] += ra * (x - avg[i])
