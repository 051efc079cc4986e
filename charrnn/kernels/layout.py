"""The named groups of arrays the kernels take, with their shapes, and the code that allocates
them. Kernels never unpack a tuple by position: they read net.theta, acts.hs, scr.hp ...

Names from the maths (fixed across the project): T time steps, B streams, H hidden, V vocabulary,
L layers, G gates (4 LSTM, 3 GRU, 1 RNN), P parameters, n threads. A field a cell does not use
(an LSTM's hn, a GRU's cs) is an empty array of the right rank, never a region borrowed for
something else.

Every array allocated here starts on a 64-byte boundary, and every per-thread row too, so the
packed weight panels of gemm.py never straddle a cache line and no two threads write one line.
"""

import functools
import mmap
from collections import namedtuple

import numpy as np

from charrnn.kernels import cells, gemm
from charrnn.kernels.jit import helper
from charrnn.kernels.sync import sync_words

ALIGN = 64  # bytes: one cache line, one AVX-512 register
HUGE_PAGE = 1 << 21  # bytes: x86-64's transparent huge page
# Packed weights (empty(huge=True)) from this size on go on huge pages (huge_zeros); smaller ones
# would waste most of a 2 MiB page. Measured on the 2-core Xeon, interleaved rounds against the same
# code without (benchmarks/results/beam_throughput.txt, train_throughput.txt).
HUGE_FROM = 1 << 20

Net = namedtuple("Net", [
    "theta",  # (P,) every parameter, flat; the views come from offs
    "offs",   # (L+1, 4) int64: row k < L the starts of weight_ih, weight_hh, bias_ih, bias_hh of
              # layer k; row L of decoder.weight, decoder.bias
    "L", "H", "V",
])

Batch = namedtuple("Batch", [
    "T",           # time steps
    "x", "y",      # (T*B,) int32 inputs and targets, by part (see Acts)
    "h0", "c0",    # (L, B, H) the initial state (c0: LSTM only; zeros otherwise)
    "masks",       # (L, T, B, H) dropout masks on every layer's output, or (0, 1, 1, 1): none
    "hT", "cT",    # (L, B, H) out: the final state
    "nll",         # (T*B,) float64 out: -log p(y) at every position, by part
    "grad",        # (P,) out: gradient of mean(nll), theta's layout; (1,) without backward
    "dh0", "dc0",  # (L, B, H) out: gradient of mean(nll) on the initial state
])

# Acts holds every position of a batch by part: the streams are cut into parts (plan.sb: one
# part per thread when the threads split the streams, one part of all streams when they split the
# units), and a part of nb streams keeps its positions together, time-major: position (t, b) of
# the part starting at stream s0 is row t*nb + b - s0 of the T*nb rows starting at row T*s0. So a
# thread that owns a part reads and writes only its own memory from the first layer to the last
# gradient, and its rows for one step, or for all steps, are contiguous. With one part this is
# the plain (T, B) layout.
Acts = namedtuple("Acts", [
    "gates",  # (L, T*B*G*H) input products + folded biases, then the activated gates (saved)
    "hs",     # (L, (T+1)*B*H) hidden states, (T+1, nb, H) a part; step 0 the initial state
    "cs",     # (L, (T+1)*B*H) LSTM cell states; (L, 0) for other cells
    "tcs",    # (L, T*B*H) LSTM tanh(c); (L, 0) otherwise
    "hn",     # (L, T*B*H) GRU W_hn h + b_hn; (L, 0) otherwise
    "xs",     # (L, T*B*H) each layer's output after dropout; (L, 0) without dropout
    "probs",  # (T*B*V,) softmax probabilities, then the gradient of the logits
    "dG",     # (T*B*G*H,) gradient of the gate pre-activations, input side, current layer
    "dGh",    # (T*B*G*H,) GRU: gradient of the recurrent side W_hh h + b_hh; (0,) otherwise
    "dH",     # (T*B*H,) gradient arriving at the current layer's output
    "w0t",    # (V, G*H) weight_ih_l0 transposed: the one-hot gather reads contiguous rows
])

Layer = namedtuple("Layer", [  # one layer's views of a part of Acts
    "gates",  # (T, nb, G*H)
    "hs",     # (T+1, nb, H)
    "cs",     # (T+1, nb, H) or (0, nb, H)
    "tcs",    # (T, nb, H) or (0, nb, H)
    "hn",     # (T, nb, H) or (0, nb, H)
])

LayerGrad = namedtuple("LayerGrad", [  # the current layer's gradients, a part's views
    "dG",   # (T, nb, G*H)
    "dGh",  # (T, nb, G*H) or (0, nb, G*H)
    "dH",   # (T, nb, H)
])

Scratch = namedtuple("Scratch", [  # one row per thread
    "wfp",     # (n, .) the thread's rows of W_hh, transposed and packed in panels (several streams)
    "wbp",     # (n, .) its columns of W_hh, packed (backward)
    "wf",      # (n, .) its rows of W_hh as a (G*Hp, H) matrix (one stream: matrix-vector products)
    "wb",      # (n, .) its columns as a (G*H, Hp) matrix
    "hp",      # (n, .) the recurrent products of its block, (streams, G*Hp)
    "dh",      # (n, .) gradient on h_{t} of its block, carried backwards in time, (streams, Hp)
    "dc",      # (n, .) LSTM: the same for c
    "direct",  # (n, .) GRU: the direct path h_t -> h_{t-1}
    "w0g",     # (n, V*G*H) layer 0's input-weight gradient, transposed, before the transpose
    "gws",     # (n, P) each thread's share of the gradient, summed in a fixed order at the end
])

Plan = namedtuple("Plan", [
    "n",         # threads
    "by_units",  # True: threads split every step's units (all streams each); False: the streams
    "ub",        # (n+1,) unit bounds (by_units), else [0, H]
    "sb",        # (n+1,) stream bounds (not by_units), else [0, B]
    "rb",        # (n+1,) bounds over the T*B positions, for everything outside the time loop
    "sync",      # the threads' sync array (sync.py)
])


def empty(shape, dtype, huge: bool = False) -> np.ndarray:
    """A zeroed C-contiguous array whose data starts on an ALIGN-byte boundary. `huge`: for arrays
    every step reads whole (packed weights), on 2 MiB pages where the system gives them and the
    array has HUGE_FROM bytes or more (huge_zeros)."""
    dtype = np.dtype(dtype)
    shape = (shape,) if np.isscalar(shape) else tuple(int(s) for s in shape)
    n = int(np.prod(shape, dtype=np.int64))
    nbytes = n * dtype.itemsize
    raw = huge_zeros(nbytes) if huge and nbytes >= HUGE_FROM else None
    if raw is None:
        raw = np.zeros(nbytes + ALIGN, dtype=np.uint8)
        off = (-raw.ctypes.data) % ALIGN
        raw = raw[off : off + nbytes]
    return raw.view(dtype).reshape(shape)


def huge_zeros(nbytes: int) -> np.ndarray | None:
    """nbytes zeroed bytes starting on a 2 MiB boundary of a private anonymous mapping advised for
    transparent huge pages (Linux's madvise(MADV_HUGEPAGE), which is what the usual "madvise"
    setting of /sys/kernel/mm/transparent_hugepage/enabled waits for); None where the platform
    has no such mapping. The packed weights of a thread's block (1-1.5 MiB at 256 units) are read
    whole at every step: on 4 KiB pages, where they fall in the core's L2 depends on which
    physical pages they got, and some processes ran measurably slower than others. The memory
    stays mapped while any view of it lives (the array holds the mmap)."""
    if not (hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "MAP_ANONYMOUS")):
        return None
    try:
        mm = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (OSError, ValueError):
        return None
    raw = np.frombuffer(mm, dtype=np.uint8)
    off = (-raw.ctypes.data) % HUGE_PAGE
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mm.madvise(mmap.MADV_HUGEPAGE, off, len(mm) - off)
        except (OSError, ValueError):
            pass  # an advice refused leaves ordinary pages: the same numbers, perhaps slower
    return raw[off : off + nbytes]  # anonymous memory comes zeroed


def per_thread(n: int, length: int, dtype, huge: bool = False) -> np.ndarray:
    """(n, length') zeroed, each row starting on an ALIGN-byte boundary (length' >= length); `huge`
    as for empty."""
    step = ALIGN // np.dtype(dtype).itemsize
    return empty((n, max(1, -(-int(length) // step) * step)), dtype, huge)


def net(theta, offs, L, H, V) -> Net:
    return Net(theta, offs, int(L), int(H), int(V))


def acts(cell_name: str, G: int, L, T, B, H, V, dropout: bool, dtype) -> Acts:
    """The shared workspace of a (T, B) batch (flat, by part: see Acts)."""
    GH = G * H

    def slot(name, size):  # an unused slot is empty, never a region borrowed for something else
        return size if cells.uses(cell_name, name) else 0

    return Acts(
        gates=empty((L, T * B * GH), dtype), hs=empty((L, (T + 1) * B * H), dtype),
        cs=empty((L, slot("cs", (T + 1) * B * H)), dtype), tcs=empty((L, slot("tcs", T * B * H)), dtype),
        hn=empty((L, slot("hn", T * B * H)), dtype), xs=empty((L, T * B * H if dropout else 0), dtype),
        probs=empty(T * B * V, dtype), dG=empty(T * B * GH, dtype), dGh=empty(slot("dGh", T * B * GH), dtype),
        dH=empty(T * B * H, dtype), w0t=empty((V, GH), dtype),
    )


def scratch(plan: Plan, G: int, B: int, H: int, V: int, P: int, backward: bool, dtype) -> Scratch:
    """Each thread's scratch for its largest block under `plan`."""
    n = plan.n
    if plan.by_units:
        nb, Hp = B, int(np.max(np.diff(plan.ub)))
    else:
        nb, Hp = int(np.max(np.diff(plan.sb))), H
    packed, matrices = nb > 1, nb == 1 and Hp < H
    return Scratch(
        wfp=per_thread(n, gemm.packed_size(H, G * Hp) if packed else 0, dtype, huge=True),
        wbp=per_thread(n, gemm.packed_size(G * H, Hp) if packed else 0, dtype, huge=True),
        wf=per_thread(n, G * Hp * H if matrices else 0, dtype, huge=True),
        wb=per_thread(n, G * H * Hp if matrices else 0, dtype, huge=True),
        hp=per_thread(n, nb * G * Hp, dtype),
        dh=per_thread(n, nb * Hp, dtype), dc=per_thread(n, nb * Hp, dtype), direct=per_thread(n, nb * Hp, dtype),
        w0g=per_thread(n, V * G * H if backward else 0, dtype),
        gws=per_thread(n, P if backward else 0, dtype),
    )


def new_sync(n: int) -> np.ndarray:
    return empty(sync_words(n), np.int64)


# ----------------------------------------------------------------------------- views (compiled)
@helper
def layer_weights(flat, net, k, G):
    """Views (W_ih (G*H, V or H), W_hh (G*H, H), b_ih (G*H,), b_hh (G*H,)) of layer k in a flat
    buffer of theta's layout (theta itself, or a gradient)."""
    H = net.H
    GH, In = G * H, net.V if k == 0 else net.H
    o = net.offs[k]
    return (flat[o[0] : o[0] + GH * In].reshape((GH, In)), flat[o[1] : o[1] + GH * H].reshape((GH, H)),
            flat[o[2] : o[2] + GH], flat[o[3] : o[3] + GH])


@helper
def decoder_weights(flat, net):
    """Views (decoder.weight (V, H), decoder.bias (V,)) in a flat buffer of theta's layout."""
    o = net.offs[net.L]
    return flat[o[0] : o[0] + net.V * net.H].reshape((net.V, net.H)), flat[o[1] : o[1] + net.V]


@helper
def part_of(flat, steps, s0, s1, width):
    """The part of streams s0..s1-1 of a flat by-part array of `steps` steps, as (steps, nb, width);
    an empty array (a slot the cell does not use) gives (0, nb, width)."""
    nb = s1 - s0
    if flat.shape[0] == 0:
        return flat.reshape((0, nb, width))
    return flat[steps * s0 * width : steps * s1 * width].reshape((steps, nb, width))


@helper
def layer(acts, k, T, s0, s1, G):
    """Layer k's views of the part of streams s0..s1-1."""
    H = acts.w0t.shape[1] // G
    return Layer(part_of(acts.gates[k], T, s0, s1, G * H), part_of(acts.hs[k], T + 1, s0, s1, H),
                 part_of(acts.cs[k], T + 1, s0, s1, H), part_of(acts.tcs[k], T, s0, s1, H),
                 part_of(acts.hn[k], T, s0, s1, H))


@helper
def thread_rows(scr_field, p, r, c):
    """Thread p's row of a Scratch field as a C-contiguous (r, c) matrix."""
    return scr_field[p][: r * c].reshape((r, c))


@functools.lru_cache(maxsize=1)
def l2_bytes() -> int:
    """One core's L2 cache in bytes, from Linux's sysfs (read once); 1 MiB where it cannot be read."""
    import glob

    for d in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
        try:
            with open(d + "/level") as f:
                if f.read().strip() != "2":
                    continue
            with open(d + "/size") as f:
                text = f.read().strip().upper()
            return int(text.rstrip("KM")) * {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
        except (OSError, ValueError):
            break
    return 1 << 20
