"""The model: configuration, the flat parameter buffer with named views, and the Python-facing
forward/backward, step and generation calls that check their inputs and then call the kernels.

Not here: training policy (train.py), file formats (checkpoint.py), sampling strategy options
(generate.py). The maths lives in charrnn/kernels/core.py.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass

import numpy as np

from charrnn import threads

CELLS = ("lstm", "gru", "rnn")
NONLINEARITIES = ("tanh", "relu")
GATES = {"lstm": 4, "gru": 3, "rnn": 1}


@dataclass(frozen=True)
class ModelConfig:
    cell: str = "lstm"  # lstm | gru | rnn
    layers: int = 2  # L, stacked recurrent layers
    hidden: int = 256  # H, units per layer
    vocab_size: int = 0  # V, tokens including <START>, <END>, <UNK>
    nonlinearity: str = "tanh"  # rnn only: tanh | relu
    dropout: float = 0.0  # on every layer's output (training only), never on the recurrent path

    def __post_init__(self):
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}")
        if self.nonlinearity not in NONLINEARITIES:
            raise ValueError(f"nonlinearity must be one of {NONLINEARITIES}")
        if self.layers < 1 or self.hidden < 1 or self.vocab_size < 4:
            raise ValueError("layers and hidden must be >= 1 and the vocabulary must hold a character")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")

    @property
    def cell_id(self) -> int:
        from charrnn.kernels import core

        if self.cell == "lstm":
            return core.LSTM
        if self.cell == "gru":
            return core.GRU
        return core.RNN_RELU if self.nonlinearity == "relu" else core.RNN_TANH

    @property
    def G(self) -> int:
        return GATES[self.cell]

    def to_dict(self) -> dict:
        return asdict(self)


def param_shapes(cfg: ModelConfig) -> "OrderedDict[str, tuple]":
    """Checkpoint names and shapes, PyTorch's: (G*H, V|H), (G*H, H), (G*H,), (G*H,) per layer, then decoder."""
    GH, H, V = cfg.G * cfg.hidden, cfg.hidden, cfg.vocab_size
    shapes = OrderedDict()
    for k in range(cfg.layers):
        shapes[f"rnn.weight_ih_l{k}"] = (GH, V if k == 0 else H)
        shapes[f"rnn.weight_hh_l{k}"] = (GH, H)
        shapes[f"rnn.bias_ih_l{k}"] = (GH,)
        shapes[f"rnn.bias_hh_l{k}"] = (GH,)
    shapes["decoder.weight"] = (V, H)
    shapes["decoder.bias"] = (V,)
    return shapes


class FlatParams:
    """One contiguous buffer with a named view per parameter (so clipping and optimizers are one loop)."""

    def __init__(self, cfg: ModelConfig, dtype=np.float32, data=None):
        self.shapes = param_shapes(cfg)
        self.offsets = OrderedDict()
        o = 0
        for name, shape in self.shapes.items():
            self.offsets[name] = o
            o += int(np.prod(shape))
        self.size = o
        if data is None:
            data = np.zeros(o, dtype=dtype)
        if data.shape != (o,) or not data.flags.c_contiguous:
            raise ValueError(f"flat buffer must be contiguous of shape ({o},)")
        self.data = data
        self.views = OrderedDict(
            (name, data[self.offsets[name] : self.offsets[name] + int(np.prod(s))].reshape(s))
            for name, s in self.shapes.items()
        )
        # (L+1, 4) table of view starts for the kernels (row L: decoder weight, decoder bias)
        L = cfg.layers
        offs = np.zeros((L + 1, 4), dtype=np.int64)
        for k in range(L):
            for i, part in enumerate(("weight_ih", "weight_hh", "bias_ih", "bias_hh")):
                offs[k, i] = self.offsets[f"rnn.{part}_l{k}"]
        offs[L, 0] = self.offsets["decoder.weight"]
        offs[L, 1] = self.offsets["decoder.bias"]
        self.table = offs

    def __getitem__(self, name):
        return self.views[name]

    def items(self):
        return self.views.items()


def core_is_compiled(kernel: str = "_forward_backward") -> bool:
    """Whether Numba's on-disk cache already holds `kernel` (the first run on a machine compiles the
    core, which takes a minute; callers say so on stderr instead of appearing to hang)."""
    import glob
    import os

    from charrnn.kernels import core

    here = os.path.join(os.path.dirname(core.__file__), "__pycache__", f"core.{kernel}-*.nbi")
    elsewhere = os.path.join(os.environ.get("NUMBA_CACHE_DIR", "") or "/nonexistent", "**", f"core.{kernel}-*.nbi")
    return bool(glob.glob(here) or glob.glob(elsewhere, recursive=True))


def _bounds(n: int, parts: int, align: int = 1) -> np.ndarray:
    """Split range(n) into `parts` contiguous blocks, each (but the last) a multiple of `align`."""
    parts = max(1, min(parts, n))
    size = -(-n // parts)
    size = -(-size // align) * align
    edges = [min(i * size, n) for i in range(parts)] + [n]
    # drop empty blocks that alignment may create at the end
    out = [edges[0]]
    for e in edges[1:]:
        if e > out[-1]:
            out.append(e)
    return np.array(out, dtype=np.int64)


class Model:
    """A character-level recurrent network with its parameters and the work buffers of its kernels."""

    def __init__(self, cfg: ModelConfig, dtype=np.float32, theta=None):
        self.cfg = cfg
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError("dtype must be float32 or float64")
        self.params = FlatParams(cfg, self.dtype, theta)
        self._ws_key = None
        self._grad = None
        self._w0t = np.zeros((cfg.vocab_size, cfg.G * cfg.hidden), dtype=self.dtype)

    # ------------------------------------------------------------------ parameters
    @property
    def theta(self) -> np.ndarray:
        return self.params.data

    @property
    def n_params(self) -> int:
        return self.params.size

    def init(self, seed: int, forget_bias: float = 0.0) -> "Model":
        """PyTorch's initialisation: every parameter uniform in +-1/sqrt(H); optionally the LSTM
        forget-gate biases (bias_ih's f part) set to `forget_bias`."""
        rng = np.random.Generator(np.random.PCG64(seed))
        bound = 1.0 / np.sqrt(self.cfg.hidden)
        self.params.data[:] = rng.uniform(-bound, bound, size=self.params.size)
        if forget_bias and self.cfg.cell == "lstm":
            H = self.cfg.hidden
            for k in range(self.cfg.layers):
                self.params[f"rnn.bias_ih_l{k}"][H : 2 * H] = forget_bias
                self.params[f"rnn.bias_hh_l{k}"][H : 2 * H] = 0.0
        return self

    def zero_state(self, B: int):
        L, H = self.cfg.layers, self.cfg.hidden
        h = np.zeros((L, B, H), dtype=self.dtype)
        c = np.zeros((L, B, H), dtype=self.dtype)  # used by LSTM only; kept for one layout
        return h, c

    # ------------------------------------------------------------------ work buffers
    # Threads share a time loop by blocks of hidden units from this size on (one parallel region
    # per step, all streams in each product), and by blocks of streams below it (one region for all
    # steps). Measured with benchmarks/train_throughput.py: see the closing note of the core issue.
    UNITS_SPLIT_MIN_H = 128
    MIN_UNITS_PER_THREAD = 32

    def plan(self, T: int, B: int):
        """How threads share a (T, B) batch: (by_units, unit bounds, stream bounds, row bounds)."""
        H = self.cfg.hidden
        n = max(1, min(threads.get_threads(), T * B))
        by_units = H >= self.UNITS_SPLIT_MIN_H or B == 1
        if by_units:
            n = min(n, max(1, H // self.MIN_UNITS_PER_THREAD))
            if B * H < 256 and self.MIN_UNITS_PER_THREAD >= 32:  # a region per step would cost more than the step
                n = 1
            ub = _bounds(H, n, align=16 if H >= 16 * n else 1)
            n = len(ub) - 1
            sb = np.array([0, B], dtype=np.int64)
        else:
            sb = _bounds(B, n)
            n = len(sb) - 1
            ub = np.array([0, H], dtype=np.int64)
        return by_units, ub, sb, _bounds(T * B, n)

    def _workspace(self, T: int, B: int, backward: bool):
        from charrnn.kernels import core

        key = (T, B, threads.get_threads(), backward)
        if self._ws_key != key:
            cfg = self.cfg
            by_units, ub, sb, rb = self.plan(T, B)
            n = len(rb) - 1
            if by_units:
                per = core._pws_size(cfg.cell_id, B, cfg.hidden, int(np.max(np.diff(ub))), cfg.vocab_size)
            else:
                per = core._pws_size(cfg.cell_id, int(np.max(np.diff(sb))), cfg.hidden, cfg.hidden, cfg.vocab_size)
            self._ws = np.zeros(int(core._ws_size(cfg.cell_id, cfg.layers, T, B, cfg.hidden, cfg.vocab_size)), dtype=self.dtype)
            self._pws = np.zeros((n, int(per)), dtype=self.dtype)
            self._gws = np.zeros((n if backward else 1, self.params.size if backward else 1), dtype=self.dtype)
            if backward and self._grad is None:
                self._grad = np.zeros(self.params.size, dtype=self.dtype)
            self._plan = (by_units, ub, sb, rb)
            self._ws_key = key
        return self._ws, self._pws, self._gws, self._plan

    # ------------------------------------------------------------------ forward / backward
    def _check_batch(self, x, y, h, c, masks):
        cfg = self.cfg
        if x.ndim != 2 or x.dtype != np.int32 or not x.flags.c_contiguous:
            raise ValueError("x must be a contiguous int32 (T, B) array")
        if y.shape != x.shape or y.dtype != np.int32 or not y.flags.c_contiguous:
            raise ValueError("y must be a contiguous int32 array shaped like x")
        T, B = x.shape
        if T < 1 or B < 1:
            raise ValueError("a batch needs T >= 1 and B >= 1")
        V = cfg.vocab_size
        for a in (x, y):
            if a.min() < 0 or a.max() >= V:
                raise ValueError(f"token ids must be in [0, {V})")
        shape = (cfg.layers, B, cfg.hidden)
        for s in (h, c):
            if s.shape != shape or s.dtype != self.dtype or not s.flags.c_contiguous:
                raise ValueError(f"state must be contiguous {self.dtype} arrays of shape {shape}")
        if masks is not None:
            if masks.shape != (cfg.layers, T, B, cfg.hidden) or masks.dtype != self.dtype or not masks.flags.c_contiguous:
                raise ValueError("masks must be a contiguous (L, T, B, H) array of the model's dtype")

    def forward_backward(self, x, y, h, c, masks=None, backward=True):
        """Loss of a (T, B) batch from state (h, c), and, if `backward`, its gradients.

        Returns a dict: loss (mean NLL over T*B), nll (T, B) float64, h and c (final state, new
        arrays), and with backward: grad (flat, same layout as theta; valid until the next call),
        dh0 and dc0 (gradient of the initial state).
        """
        from charrnn.kernels import core

        self._check_batch(x, y, h, c, masks)
        cfg = self.cfg
        T, B = x.shape
        ws, pws, gws, (by_units, ub, sb, rb) = self._workspace(T, B, backward)
        hT, cT = self.zero_state(B)
        dh0, dc0 = self.zero_state(B)
        nll = np.zeros((T, B), dtype=np.float64)
        # the gradient buffer is reused from call to call (a fresh 20 MB array per step costs page faults)
        grad = self._grad if backward else np.zeros(1, dtype=self.dtype)
        if masks is None:
            masks = np.zeros((0, 1, 1, 1), dtype=self.dtype)
        core._forward_backward(
            cfg.cell_id, cfg.layers, cfg.hidden, cfg.vocab_size, self.theta, self.params.table,
            x, y, h, c, masks, hT, cT, nll, grad, dh0, dc0, self._w0t, ws, pws, gws, ub, sb, rb, by_units, backward,
        )
        out = {"loss": float(nll.mean()), "nll": nll, "h": hT, "c": cT}
        if backward:
            out.update(grad=grad, dh0=dh0, dc0=dc0)
        return out

    # Scoring one stream (eval, validation) runs the layers as a pipeline over chunks of this many
    # steps when there are threads and layers to share (kernels.core._score_pipe), up to this hidden
    # size; above it each step is big enough to split by units. Measured on 2x128 / 2x256 / 2x384 /
    # 2x512 LSTMs, 2 threads: the pipeline 2.1x / 1.35x / 0.78x / 0.86x the speed of the split by
    # units; chunks of 64, 128 and 256 steps within noise of each other.
    PIPE_CHUNK = 256
    PIPE_MAX_H = 256

    def score(self, x, y, h, c):
        """-log p(y) (N,) float64 for one stream of token ids x, targets y (N,) from state (h, c)
        (L, 1, H), which are updated in place to the final state. Same numbers as forward_backward
        with B = 1, computed the fastest way for the model's size and the thread count."""
        from charrnn.kernels import core

        cfg = self.cfg
        x = np.ascontiguousarray(x, dtype=np.int32)
        y = np.ascontiguousarray(y, dtype=np.int32)
        N = x.shape[0]
        self._check_batch(x.reshape(N, 1), y.reshape(N, 1), h, c, None)
        if cfg.layers >= 2 and threads.get_threads() >= 2 and cfg.hidden <= self.PIPE_MAX_H:
            nll = np.zeros(N, dtype=np.float64)
            core._score_pipe(cfg.cell_id, cfg.layers, cfg.hidden, cfg.vocab_size, self.theta, self.params.table,
                             self._w0t, x, y, h, c, nll, self.PIPE_CHUNK)
            return nll
        nll = np.empty(N, dtype=np.float64)
        T = 512
        for p in range(0, N, T):
            q = min(p + T, N)
            out = self.forward_backward(x[p:q].reshape(-1, 1), y[p:q].reshape(-1, 1), h, c, backward=False)
            nll[p:q] = out["nll"][:, 0]
            h[...] = out["h"]
            c[...] = out["c"]
        return nll

    def warm_up(self):
        """Compile (or load from Numba's cache) the training kernels on a tiny batch, so that the
        first real step, and a --minutes budget, do not include compilation."""
        x = np.zeros((2, 2), dtype=np.int32)
        h, c = self.zero_state(2)
        masks = self.dropout_masks(2, 2, 0, 0) if self.cfg.dropout > 0 else None
        self.forward_backward(x, x, h, c, masks=masks)
        self._ws_key = None  # the real batches get their own buffers

    def dropout_masks(self, T: int, B: int, seed: int, step: int, out=None):
        """Inverted-dropout masks (L, T, B, H) for a training step, decided by (seed, step) alone."""
        from charrnn.kernels import core

        cfg = self.cfg
        shape = (cfg.layers, T, B, cfg.hidden)
        if out is None or out.shape != shape:
            out = np.empty(shape, dtype=self.dtype)
        core._dropout_masks(out, np.uint64(seed), np.uint64(step), float(cfg.dropout))
        return out

    # ------------------------------------------------------------------ single steps and sampling
    def _step_workspace(self, nb: int):
        from charrnn.kernels import core

        cfg = self.cfg
        key = ("step", nb)
        if getattr(self, "_step_key", None) != key:
            n = int(core._ws_size(cfg.cell_id, cfg.layers, 1, nb, cfg.hidden, cfg.vocab_size))
            self._step_ws = np.zeros(n, dtype=self.dtype)
            core._fill_w0t(self._w0t, self.theta, self.params.table, cfg.G * cfg.hidden, cfg.vocab_size)
            self._step_key = key
        return self._step_ws

    def refresh(self):
        """Call after changing theta in place between single steps (the transposed layer-0 copy)."""
        self._step_key = None

    def feed(self, tokens, h, c):
        """Feed a sequence of token ids (N,) to nb=state-width streams in lock step; returns logits of
        the last step (nb, V). Used to warm the state up with a prime text."""
        from charrnn.kernels import core

        cfg = self.cfg
        nb = h.shape[1]
        ws = self._step_workspace(nb)
        logits = np.zeros((nb, cfg.vocab_size), dtype=self.dtype)
        core._feed(cfg.cell_id, cfg.layers, cfg.hidden, cfg.vocab_size, self.theta, self.params.table,
                   self._w0t, np.ascontiguousarray(tokens, dtype=np.int32), h, c, logits, ws)
        return logits

    # Sampling uses threads (splitting each layer's units) from this hidden size on; below it one
    # step is too small to pay for the barriers (benchmarks/sample_throughput.py).
    GEN_THREADS_MIN_H = 128

    def _gen_threads(self) -> int:
        """Threads the generation loop uses: 1 (the serial kernel) or n >= 2 (_generate_spin)."""
        n = min(threads.get_threads(), self.cfg.hidden // 64)
        return n if n >= 2 and self.cfg.hidden >= self.GEN_THREADS_MIN_H else 1

    def generation_kernel(self) -> str:
        """The compiled kernel `generate` runs with the current thread count (for the compile notice)."""
        return "_generate_spin" if self._gen_threads() >= 2 else "_generate"

    def generate(self, tok, h, c, out, temp, top_k, top_p, banned, end_id, done, rng_state):
        """Run the compiled generation loop for out.shape[0] steps; see kernels.core._generate (one
        thread) and _generate_spin (threads splitting each layer's units)."""
        from charrnn.kernels import core

        cfg = self.cfg
        nb = tok.shape[0]
        ws = self._step_workspace(nb)
        args = (float(temp), int(top_k), float(top_p), banned, int(end_id), done, rng_state)
        n = self._gen_threads()
        if n < 2:
            return int(core._generate(cfg.cell_id, cfg.layers, cfg.hidden, cfg.vocab_size, self.theta, self.params.table,
                                      self._w0t, tok, h, c, out, out.shape[0], *args, ws))
        key = ("gen", nb, n)
        if getattr(self, "_gen_key", None) != key:
            ub = _bounds(cfg.hidden, n, align=16)
            hp_max = int(np.max(np.diff(ub)))
            L, H = cfg.layers, cfg.hidden
            self._gen = dict(
                ub=ub,
                pws=np.zeros((len(ub) - 1, int(core._gen_pws_size(cfg.cell_id, L, nb, H, hp_max))), dtype=self.dtype),
                hs2=np.zeros((L, 2, nb, H), dtype=self.dtype), cs2=np.zeros((L, 2, nb, H), dtype=self.dtype),
                gates=np.zeros((1, nb, cfg.G * H), dtype=self.dtype), tcs=np.zeros((1, nb, H), dtype=self.dtype),
                sync=np.zeros((2 + 2 * (len(ub) - 1)) * 8, dtype=np.int64),
            )
            self._gen_key = key
        g = self._gen
        return int(core._generate_spin(cfg.cell_id, cfg.layers, cfg.hidden, cfg.vocab_size, self.theta,
                                       self.params.table, self._w0t, tok, h, c, out, out.shape[0], *args, g["pws"],
                                       g["ub"], g["hs2"], g["cs2"], g["gates"], g["tcs"], g["sync"], ws))
