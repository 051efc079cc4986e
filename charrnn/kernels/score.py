"""Scoring one stream (eval, validation): -log p(y) at every position of a token sequence, from a
state carried in place.

One stream leaves nothing to share inside a time step but its small matrix-vector products, and
a barrier per step costs about as much as the step. So the layers run as a pipeline over chunks
of C steps: in superstep s, layer k processes chunk s - k, the layers are shared among the threads,
and the threads meet once per superstep. Each thread keeps its own layers' weights in its cache.
The arithmetic is the same as bptt.py's with one stream, position by position: the same input
rows, the same cell functions, the same decoder rows.
"""

from collections import namedtuple


from charrnn.kernels import cells, layout
from charrnn.kernels.bptt import F32, decoder_rows, fill_w0t_rows, input_rows
from charrnn.kernels.gemm import dense_wt
from charrnn.kernels.jit import kernel
from charrnn.kernels.layout import Layer, decoder_weights, layer_weights
from charrnn.kernels.sync import barrier

Pipe = namedtuple("Pipe", [
    "gates",  # (L, C, 1, G*H) each layer's gates for its current chunk
    "hs",     # (L, 2, C+1, 1, H) each layer's hidden states, double-buffered by chunk parity (the
              # layer above reads chunk j while this layer writes chunk j+1)
    "cs",     # (L, C+1, 1, H) LSTM cell states; (L, 0, 1, H) otherwise
    "tcs",    # (L, C, 1, H) LSTM tanh(c); (L, 0, 1, H) otherwise
    "hn",     # (L, C, 1, H) GRU W_hn h + b_hn; (L, 0, 1, H) otherwise
    "hp",     # (L, 1, G*H) recurrent products
    "probs",  # (C, V) the top layer's softmax
    "w0t",    # (V, G*H) weight_ih_l0 transposed
])


@kernel
def _score(p, n, cell, net, x2, y2, h, c, nll2, pipe, sync):
    """Thread p of n: its layers' part of scoring x2, y2 (N, 1) from state h, c (L, 1, H), carried
    in place to the final state; nll2 (N, 1) float64 out."""
    N = x2.shape[0]
    L, H = net.L, net.H
    G = cell.G
    GH = G * H
    C = pipe.gates.shape[1]
    nc = (N + C - 1) // C
    ep = 1
    if p == 0:
        fill_w0t_rows(pipe.w0t, layer_weights(net.theta, net, 0, G)[0], 0, net.V)
    ep = barrier(sync, p, n, ep)
    for s in range(nc + L - 1):
        for k in range(p, L, n):
            j = s - k
            if j < 0 or j >= nc:
                continue
            p0 = j * C
            Cj = min(C, N - p0)
            W_ih, W_hh, b_ih, b_hh = layer_weights(net.theta, net, k, G)
            hs = pipe.hs[k, j % 2]
            lay = Layer(pipe.gates[k][:Cj], hs, pipe.cs[k], pipe.tcs[k], pipe.hn[k])
            if k == 0:
                inp2 = hs[0][:0]
            else:
                inp2 = pipe.hs[k - 1, j % 2][1 : Cj + 1].reshape((Cj, H))  # chunk j of the layer below
            input_rows(F32(0), 0, cell, 0, Cj, lay.gates.reshape((Cj, GH)), x2[p0 : p0 + Cj], pipe.w0t, inp2, W_ih, b_ih, b_hh, 1)
            cells.load_state(cell, lay, h[k], c[k], 0, 1)  # the state after the previous chunk
            for t in range(Cj):
                dense_wt(hs[t], 0, 1, W_hh, pipe.hp[k])
                cells.forward(cell, lay, t, 0, 1, 0, H, pipe.hp[k], b_hh)
            cells.save_state(cell, lay, Cj, h[k], c[k], 0, 1)
            if k == L - 1:
                Wd, bd = decoder_weights(net.theta, net)
                decoder_rows(F32(0), 0, 0, Cj, hs[1 : Cj + 1].reshape((Cj, H)), Wd, bd, pipe.probs[:Cj], y2[p0 : p0 + Cj],
                             nll2[p0 : p0 + Cj], 1)
        ep = barrier(sync, p, n, ep)


def pipe(cell_name: str, G: int, L: int, H: int, V: int, C: int, dtype) -> Pipe:
    uses = lambda slot: cells.uses(cell_name, slot)  # noqa: E731
    e = layout.empty
    return Pipe(
        gates=e((L, C, 1, G * H), dtype), hs=e((L, 2, C + 1, 1, H), dtype),
        cs=e((L, C + 1 if uses("cs") else 0, 1, H), dtype), tcs=e((L, C if uses("tcs") else 0, 1, H), dtype),
        hn=e((L, C if uses("hn") else 0, 1, H), dtype), hp=e((L, 1, G * H), dtype), probs=e((C, V), dtype),
        w0t=e((V, G * H), dtype),
    )


def score(cell, net, x, y, h, c, nll, pipe_ws, team, sync):
    """nll (N,) <- -log p(y) of one stream (checked by the caller), state h, c (L, 1, H) in place,
    the layers shared by up to team.size threads."""
    N = x.shape[0]
    n = max(1, min(team.size, net.L))
    team.run(n, _score, n, cell, net, x.reshape((N, 1)), y.reshape((N, 1)), h, c, nll.reshape((N, 1)), pipe_ws, sync,
             sync=sync)
