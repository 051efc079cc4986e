"""The model: its configuration, the flat parameter buffer with named views, the recurrent state
of a set of streams, and the calls that run it (a batch forward/backward, scoring a stream, one
step, priming, the sampling loop), each checking its inputs before handing them to the kernels.

Not here: training policy (train.py, budget.py), file formats (checkpoint.py), sampling strategies
(generate.py), and anything about how the kernels lay out their work (charrnn/kernels/).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass

import numpy as np

from charrnn import threads
from charrnn.config import NONLINEARITIES
from charrnn.kernels import bptt, cells, gemm16, layout, rng, sample, score, search, wdrop

CELLS = tuple(cells.CELLS)  # config.CELLS names them for the command line (tests/test_config.py)


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
    def G(self) -> int:
        return cells.gates(self.cell)

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


def approx_params(cell: str, layers: int, hidden: int, V: int = 100) -> int:
    """The parameter count of a model with a vocabulary of about V (sizing rules use it before the
    vocabulary is known)."""
    return sum(int(np.prod(s)) for s in param_shapes(ModelConfig(cell, layers, hidden, V)).values())


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
            data = layout.empty(o, dtype)
        if data.shape != (o,) or not data.flags.c_contiguous:
            raise ValueError(f"flat buffer must be contiguous of shape ({o},)")
        self.data = data
        self.views = OrderedDict(
            (name, data[self.offsets[name] : self.offsets[name] + int(np.prod(s))].reshape(s))
            for name, s in self.shapes.items()
        )
        # (L+1, 4) table of view starts for the kernels (layout.Net; row L: decoder weight, decoder bias)
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


class State:
    """The recurrent state of nb streams: h and c (L, nb, H) (c is used by LSTMs only; other cells
    keep it at zero, for one layout). Model.step and Model.feed update it in place."""

    def __init__(self, h: np.ndarray, c: np.ndarray):
        if h.shape != c.shape or h.ndim != 3 or h.dtype != c.dtype:
            raise ValueError("h and c must be (L, nb, H) arrays of one dtype")
        self.h = np.ascontiguousarray(h)
        self.c = np.ascontiguousarray(c)

    @property
    def streams(self) -> int:
        return self.h.shape[1]

    def take(self, indices) -> "State":
        """A new state whose stream i is stream indices[i] of this one (reorder, repeat or drop
        streams: beam search keeps the parents of the surviving hypotheses)."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.ndim != 1 or (idx.size and (idx.min() < 0 or idx.max() >= self.streams)):
            raise ValueError(f"stream indices must be a 1-D array of values in [0, {self.streams})")
        return State(self.h[:, idx], self.c[:, idx])

    def copy(self) -> "State":
        return State(self.h.copy(), self.c.copy())


class Model:
    """A character-level recurrent network: its parameters, and the work buffers of its kernels
    (made on first use for each shape, reused after; they never hold a copy of the weights from
    one call to the next, so changing theta in place between calls is always seen: a beam search
    packs the weights anew at its start. The one copy that lives longer is asked for by name:
    packed_steps(), which sees a change only when repacked)."""

    # Scoring one stream (eval, validation) runs the layers as a pipeline over chunks of this many
    # steps, up to this hidden size (with one thread or one layer, the same kernel runs the layers
    # in turn); above it each step is big enough to split by units, by the batch kernel. Measured
    # on 2x128 / 2x256 / 2x384 / 2x512 LSTMs, 2 threads: the pipeline 2.1x / 1.35x / 0.78x / 0.86x
    # the speed of the split by units; chunks of 64, 128 and 256 steps within noise of each other.
    PIPE_CHUNK = 256
    PIPE_MAX_H = 256
    # Sampling uses threads (splitting each layer's units) from this hidden size on, with at least
    # 64 units per thread; below it one step is too small to pay for the barriers
    # (benchmarks/sample_throughput.py).
    GEN_THREADS_MIN_H = 128
    # A beam search runs this many positions per compiled call, so that Ctrl-C is seen between
    # calls (a 2x256 LSTM: 30-100 ms at K = 4 to 16); the buffers carry the search across calls.
    SEARCH_CHUNK = 256
    # With more than one thread, a beam search splits either the units or the streams between them
    # (search.split_streams decides); "units" or "streams" here forces one (tests, benchmarks).
    SEARCH_SPLIT = None

    def __init__(self, cfg: ModelConfig, dtype=np.float32, theta=None):
        self.cfg = cfg
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError("dtype must be float32 or float64")
        self.params = FlatParams(cfg, self.dtype, theta)
        self.cell = cells.make(cfg.cell, cfg.nonlinearity)
        self._net = layout.net(self.params.data, self.params.table, cfg.layers, cfg.hidden, cfg.vocab_size)
        self._ws = {}  # precision -> bptt.Workspace of the last batch shape run in it
        self._pipe = None
        self._steps = {}  # streams -> sample.Step buffers
        self._gen = None
        self._search = None  # ((width, threads, backend), Packed, Work, sync, prec) of the last beam search
        self._dropped = None  # (buffer, Net over it): the weights of a batch run with weight drop
        self.precision = "fp32"  # the products of train.train_step's batches: fp32 | bf16 (charrnn/precision.py)

    # ------------------------------------------------------------------ parameters
    @property
    def theta(self) -> np.ndarray:
        return self.params.data

    @property
    def n_params(self) -> int:
        return self.params.size

    def init(self, seed: int, forget_bias: float = 0.0) -> "Model":
        """PyTorch's initialisation: every parameter uniform in +-1/sqrt(H); optionally, for a cell
        with a forget gate (the LSTM), its biases (bias_ih's f block) set to `forget_bias`."""
        gen = np.random.Generator(np.random.PCG64(seed))
        bound = 1.0 / np.sqrt(self.cfg.hidden)
        self.params.data[:] = gen.uniform(-bound, bound, size=self.params.size)
        f = cells.forget_gate(self.cfg.cell)
        if forget_bias and f is not None:
            H = self.cfg.hidden
            for k in range(self.cfg.layers):
                self.params[f"rnn.bias_ih_l{k}"][f * H : (f + 1) * H] = forget_bias
                self.params[f"rnn.bias_hh_l{k}"][f * H : (f + 1) * H] = 0.0
        return self

    # ------------------------------------------------------------------ state
    def zero_state(self, B: int):
        """(h, c), each (L, B, H) zeros (c is used by LSTMs only; kept for one layout)."""
        shape = (self.cfg.layers, B, self.cfg.hidden)
        return np.zeros(shape, dtype=self.dtype), np.zeros(shape, dtype=self.dtype)

    def new_state(self, streams: int) -> State:
        """The zero state of `streams` streams, for step and feed."""
        return State(*self.zero_state(streams))

    # ------------------------------------------------------------------ forward / backward
    def _check_state(self, h, c, B):
        shape = (self.cfg.layers, B, self.cfg.hidden)
        for s in (h, c):
            if not isinstance(s, np.ndarray) or s.shape != shape or s.dtype != self.dtype or not s.flags.c_contiguous:
                raise ValueError(f"state must be contiguous {self.dtype} arrays of shape {shape}")

    def _check_tokens(self, a, name):
        if a.size and (a.min() < 0 or a.max() >= self.cfg.vocab_size):
            raise ValueError(f"{name}: token ids must be in [0, {self.cfg.vocab_size})")

    def _check_batch(self, x, y, h, c, masks):
        cfg = self.cfg
        if x.ndim != 2 or x.dtype != np.int32 or not x.flags.c_contiguous:
            raise ValueError("x must be a contiguous int32 (T, B) array")
        if y.shape != x.shape or y.dtype != np.int32 or not y.flags.c_contiguous:
            raise ValueError("y must be a contiguous int32 array shaped like x")
        T, B = x.shape
        if T < 1 or B < 1:
            raise ValueError("a batch needs T >= 1 and B >= 1")
        self._check_tokens(x, "x")
        self._check_tokens(y, "y")
        self._check_state(h, c, B)
        if masks is not None:
            if masks.shape != (cfg.layers, T, B, cfg.hidden) or masks.dtype != self.dtype or not masks.flags.c_contiguous:
                raise ValueError("masks must be a contiguous (L, T, B, H) array of the model's dtype")

    def forward_backward(self, x, y, h, c, masks=None, backward=True, weight_masks=None, precision="fp32"):
        """Loss of a (T, B) batch from state (h, c), and, if `backward`, its gradients.

        `precision`: "fp32", or "bf16" for bfloat16 products with float32 sums (float32 models on
        CPUs that have them: precision.py), or a bfloat16 backend by name ("amx", "dot").

        `masks`: dropout on each layer's output (dropout_masks); `weight_masks`: weight drop on
        each layer's weight_hh (weight_masks): the batch runs with weight_hh * mask, and the
        gradient is taken with respect to theta, the raw weights.

        Returns a dict: loss (mean NLL over T*B), nll (T, B) float64, h and c (final state, new
        arrays), and with backward: grad (flat, same layout as theta; valid until the next call),
        dh0 and dc0 (gradient of the initial state).
        """
        self._check_batch(x, y, h, c, masks)
        net = self._net
        if weight_masks is not None:
            cfg = self.cfg
            shape = (cfg.layers, cfg.G * cfg.hidden, cfg.hidden)
            if (not isinstance(weight_masks, np.ndarray) or weight_masks.shape != shape
                    or weight_masks.dtype != self.dtype or not weight_masks.flags.c_contiguous):
                raise ValueError(f"weight masks must be a contiguous {shape} array of the model's dtype")
            if self._dropped is None:
                buf = layout.empty(self.params.size, self.dtype)
                self._dropped = (buf, self._net._replace(theta=buf))
            wdrop._drop(self._dropped[0], self.theta, self.params.table, weight_masks)
            net = self._dropped[1]
        backend = self._backend(precision)
        bt, self._ws[backend] = bptt.forward_backward(self.cell, self.cfg.cell, net, x, y, h, c, masks, backward,
                                                      threads.team(), self._ws.get(backend), backend)
        if backward and weight_masks is not None:
            wdrop._mask_grad(bt.grad, self.params.table, weight_masks)
        out = {"loss": float(bt.nll.mean()), "nll": bt.nll, "h": bt.hT, "c": bt.cT}
        if backward:
            out.update(grad=bt.grad, dh0=bt.dh0, dc0=bt.dc0)
        return out

    def _backend(self, precision: str) -> str:
        """The kernels' name for a precision: "fp32", "amx" or "dot"."""
        if precision == "fp32":
            return "fp32"
        if self.dtype != np.float32:
            raise ValueError("bfloat16 products need a float32 model")
        have = gemm16.backends()
        backend = (have[0] if have else None) if precision == "bf16" else precision
        if backend not in have:
            raise ValueError(f"this CPU has no bfloat16 products ({precision!r})")
        return backend

    def score(self, x, y, h, c):
        """-log p(y) (N,) float64 for one stream of token ids x, targets y (N,) from state (h, c)
        (L, 1, H), which are updated in place to the final state. Same numbers as forward_backward
        with B = 1, computed the fastest way for the model's size and the thread count."""
        cfg = self.cfg
        x = np.ascontiguousarray(x, dtype=np.int32)
        y = np.ascontiguousarray(y, dtype=np.int32)
        N = x.shape[0]
        self._check_batch(x.reshape(N, 1), y.reshape(N, 1), h, c, None)
        nll = np.zeros(N, dtype=np.float64)
        if cfg.hidden <= self.PIPE_MAX_H:  # one thread, or one layer: the same kernel on one thread
            key = (self.PIPE_CHUNK, threads.get_threads())
            if self._pipe is None or self._pipe[0] != key:
                C = self.PIPE_CHUNK
                self._pipe = (key, score.pipe(cfg.cell, cfg.G, cfg.layers, cfg.hidden, cfg.vocab_size, C, self.dtype),
                              layout.new_sync(threads.get_threads()))
            score.score(self.cell, self._net, x, y, h, c, nll, self._pipe[1], threads.team(), self._pipe[2])
            return nll
        T = 512
        for p in range(0, N, T):
            q = min(p + T, N)
            out = self.forward_backward(x[p:q].reshape(-1, 1), y[p:q].reshape(-1, 1), h, c, backward=False)
            nll[p:q] = out["nll"][:, 0]
            h[...] = out["h"]
            c[...] = out["c"]
        return nll

    def warm_up(self, dropout: bool | None = None, weight_drop: bool = False, precision: str = "fp32"):
        """Compile (or load from the cache) the training kernels on a tiny batch, so that the first
        real step, and a --minutes budget, do not include compilation."""
        x = np.zeros((2, 2), dtype=np.int32)
        h, c = self.zero_state(2)
        use = self.cfg.dropout > 0 if dropout is None else dropout
        masks = self.dropout_masks(2, 2, 0, 0, p=0.5) if use else None
        wmasks = self.weight_masks(0, 0, 0.5) if weight_drop else None
        self.forward_backward(x, x, h, c, masks=masks, weight_masks=wmasks, precision=precision)
        self._ws = {}  # the real batches get their own buffers

    def dropout_masks(self, T: int, B: int, seed: int, step: int, out=None, p: float | None = None,
                      B_all: int | None = None, b0: int = 0, locked: bool = False):
        """Inverted-dropout masks (L, T, B, H) for a training step, decided by (seed, step) alone;
        p, the rate, defaults to the config's. With B_all: the masks of streams b0 .. b0+B-1 of a
        batch of B_all streams, exactly those columns of that batch's masks (data-parallel workers).
        `locked`: the same mask at every time step of a stream (variational, or locked, dropout)."""
        cfg = self.cfg
        shape = (cfg.layers, T, B, cfg.hidden)
        if out is None or out.shape != shape:
            out = layout.empty(shape, self.dtype)
        return rng.dropout_masks(out, seed, step, float(cfg.dropout if p is None else p), threads.team(), B_all, b0,
                                 locked)

    def weight_masks(self, seed: int, step: int, p: float, out=None):
        """Weight-drop masks (L, G*H, H) of a training step, one per layer's weight_hh, for the
        whole batch: decided by (seed, step) alone, the same in every data-parallel worker."""
        cfg = self.cfg
        shape = (cfg.layers, cfg.G * cfg.hidden, cfg.hidden)
        if out is None or out.shape != shape:
            out = layout.empty(shape, self.dtype)
        return rng.weight_masks(out, seed, step, float(p), threads.team())

    # ------------------------------------------------------------------ single steps and sampling
    def _step_buffers(self, nb: int) -> sample.Step:
        st = self._steps.get(nb)
        if st is None:
            cfg = self.cfg
            st = self._steps[nb] = sample.step_buffers(cfg.cell, cfg.G, nb, cfg.hidden, cfg.vocab_size, self.dtype)
        return st

    def step(self, tokens, state: State) -> np.ndarray:
        """One time step: tokens (nb,), one per stream of `state`, which is updated in place.
        Returns the logits (nb, V), a new array."""
        tok = np.ascontiguousarray(tokens, dtype=np.int32)
        if tok.ndim != 1 or tok.shape[0] != state.streams:
            raise ValueError(f"tokens must be one id per stream ({state.streams})")
        self._check_tokens(tok, "tokens")
        self._check_state(state.h, state.c, state.streams)
        st = self._step_buffers(tok.shape[0])
        sample._step(self.cell, self._net, tok, state.h, state.c, st)
        return st.logits.copy()

    def feed(self, tokens, h, c):
        """Feed a sequence of token ids (N,) to every stream of the state (h, c) (L, nb, H) in lock
        step, updating it in place; returns the logits of the last step (nb, V). Used to warm the
        state up with a prime text."""
        tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        nb = h.shape[1] if h.ndim == 3 else 0
        self._check_tokens(tokens, "tokens")
        self._check_state(h, c, nb)
        st = self._step_buffers(nb)
        sample._feed(self.cell, self._net, tokens, h, c, st, np.empty(nb, dtype=np.int32))
        return st.logits.copy()

    def packed_steps(self, blocks: int | None = None, precision: str = "fp32") -> "PackedSteps":
        """Steps of several streams on a copy of the weights packed now for the packed micro-kernel
        (kernels/gemm.py), instead of Model.step's BLAS product, which repacks them on every call.
        The copy is the weights at this call: after changing theta, call its repack(). `blocks`:
        the blocks of units the panels are cut into (default: as a beam search's threads).
        `precision`: "fp32", or "bf16" (or a backend, "amx" or "dot") for bfloat16 products with
        float32 sums, as in run_search."""
        return PackedSteps(self, self.generation_threads() if blocks is None else blocks, precision)

    def run_search(self, sr: search.Search, h, c, end_id: int, precision: str = "fp32") -> None:
        """Run a whole beam search (kernels/search.py, for beam.py) over the record `sr`
        (search.search_buffers) from the state h, c (L, 1, H) of one stream, the prime's; sr holds
        the results. A beam of one runs the sampler's own single-stream step; a wider one packs
        the weights once, at the start of this call, and runs on the generation threads. The
        positions go SEARCH_CHUNK at a time, so an interrupt is seen between chunks.
        `precision` "bf16" (or a backend, "amx" or "dot") runs a wider beam's products on bfloat16
        operands with float32 sums (a float32 model on a CPU that has them: ValueError otherwise);
        a beam of one is the float32 sampler's greedy decoding whatever it says."""
        cfg = self.cfg
        self._check_state(h, c, 1)
        K, N = sr.top_v.shape[0], sr.parent.shape[0]
        chunks = [(t0, min(t0 + self.SEARCH_CHUNK, N)) for t0 in range(0, N, self.SEARCH_CHUNK)]
        if K == 1:
            st = self._step_buffers(1)
            for t0, t1 in chunks:
                search._search_one(self.cell, self._net, sr, st, h, c, int(end_id), t0, t1)
                if sr.info[search.I_DONE]:
                    return
            return
        n = self.generation_threads()
        backend = self._backend(precision)
        streams = n >= 2 and (self.SEARCH_SPLIT == "streams" if self.SEARCH_SPLIT is not None
                              else search.split_streams(self._panel_bytes(backend), K + 1))
        if self._search is None or self._search[0] != (K, n, backend, streams):
            ub = [0, cfg.hidden] if streams else bptt.bounds(cfg.hidden, n, align=16)
            args = (cfg.G, cfg.layers, cfg.hidden, cfg.vocab_size, ub)
            pk = search.packed_buffers(cfg.cell, *args, self.dtype, backend, n=n)
            self._search = ((K, n, backend, streams), pk,
                            search.work_buffers(cfg.cell, cfg.G, cfg.layers, K + 1, cfg.hidden, cfg.vocab_size, ub,
                                                self.dtype, n=n),
                            layout.new_sync(n), search.products_buffers(backend, pk, *args[:-1]))
        _, pk, wk, sync, prec = self._search
        for t0, t1 in chunks:  # the weights are packed at t0 = 0 only: one search, one copy
            search.search_threads(prec, self.cell, self._net, pk, wk, sr, h, c, end_id, t0, t1, threads.team(), sync,
                                  streams)
            if sr.info[search.I_DONE]:
                return

    def _panel_bytes(self, backend: str) -> int:
        """search.panel_bytes for this model: what each thread of a streams split reads a position."""
        return search.panel_bytes(backend, self.cfg.G, self.cfg.layers, self.cfg.hidden, self.dtype.itemsize)

    def generation_threads(self) -> int:
        """Threads the generation loop uses: 1 (the serial kernel) or n >= 2."""
        n = min(threads.get_threads(), self.cfg.hidden // 64)
        return n if n >= 2 and self.cfg.hidden >= self.GEN_THREADS_MIN_H else 1

    def generate(self, tok, h, c, out, temp, top_k, top_p, banned, end_id, done, rng_state):
        """Generate out.shape[0] steps for nb streams: tok (nb,) each stream's last token (updated),
        state h, c (updated), out (n, nb) the tokens drawn (-1 once a stream is done), done (nb,)
        bool (a stream is done after drawing end_id; -1: never). Returns the steps taken."""
        cfg = self.cfg
        nb = tok.shape[0]
        self._check_state(h, c, nb)
        st = self._step_buffers(nb)
        dr = sample.draw_options(cfg.vocab_size, temp, top_k, top_p, banned, end_id, rng_state)
        n = self.generation_threads()
        if n < 2:
            return int(sample._generate(self.cell, self._net, tok, h, c, out, done, dr, st))
        key = (nb, n)
        if self._gen is None or self._gen[0] != key:
            ub = bptt.bounds(cfg.hidden, n, align=16)
            self._gen = (key, sample.gen_buffers(cfg.cell, cfg.G, cfg.layers, nb, cfg.hidden, ub, self.dtype),
                         layout.new_sync(len(ub) - 1))
        return sample.generate_threads(self.cell, self._net, tok, h, c, out, done, dr, st, self._gen[1],
                                       threads.team(), self._gen[2])


class PackedSteps:
    """Model.step for several streams on packed weights (Model.packed_steps): the weights are
    copied into panels when this is made and when repack() is called, never behind the caller's
    back, so a change to theta in between is not seen until repack(). The numbers agree with
    Model.step's to float32 rounding (the products sum in another order); in bf16, with a step
    whose products round their operands to bfloat16 (tests/reference.py's bfloat16_operand)."""

    def __init__(self, model: Model, blocks: int = 1, precision: str = "fp32"):
        cfg = model.cfg
        self.model = model
        backend = model._backend(precision)
        ub = bptt.bounds(cfg.hidden, max(1, int(blocks)), align=16)
        args = (cfg.G, cfg.layers, cfg.hidden, cfg.vocab_size, ub)
        self.packed = search.packed_buffers(cfg.cell, *args, model.dtype, backend)
        self.prec = search.products_buffers(backend, self.packed, *args[:-1])
        self._work = {}  # streams -> search.Work
        self.repack()

    def repack(self) -> "PackedSteps":
        """Pack the model's weights as they are now."""
        search._pack(self.prec, self.model.cell, self.model._net, self.packed)
        return self

    def step(self, tokens, state: State) -> np.ndarray:
        """As Model.step: tokens (nb,), one per stream of `state` (updated in place); returns the
        logits (nb, V), a new array."""
        m, cfg = self.model, self.model.cfg
        tok = np.ascontiguousarray(tokens, dtype=np.int32)
        if tok.ndim != 1 or tok.shape[0] != state.streams:
            raise ValueError(f"tokens must be one id per stream ({state.streams})")
        m._check_tokens(tok, "tokens")
        m._check_state(state.h, state.c, state.streams)
        nb = tok.shape[0]
        wk = self._work.get(nb)
        if wk is None:
            wk = self._work[nb] = search.work_buffers(cfg.cell, cfg.G, cfg.layers, nb, cfg.hidden, cfg.vocab_size,
                                                      self.packed.ub, m.dtype)
        search._packed_step(self.prec, m.cell, m._net, self.packed, wk, tok, state.h, state.c)
        return wk.logits.copy()

    def __enter__(self) -> "PackedSteps":
        return self

    def __exit__(self, *exc) -> None:
        self._work.clear()
