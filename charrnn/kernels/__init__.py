"""The compiled core: Numba code only, split by concern. No I/O, no Click, no policy.

    jit.py      decorator options and the package-wide cache key (read it first)
    mathf.py    tanh, sigmoid, casts, row views
    gemm.py     the packed-weight matrix product of the recurrent loops (an LLVM-IR micro-kernel)
    gemm16.py   bfloat16 products with float32 sums (AMX tiles or VDPBF16PS; LLVM IR as text)
    sync.py     atomics and the spin barrier the threads of one kernel meet at
    rng.py      the counter-based generator and the dropout masks
    cells/      one module per cell (lstm.py, gru.py, rnn.py): gates, forward and backward blocks,
                bias fold, state slots; cells/__init__.py dispatches on the cell's type
    layout.py   the named groups of arrays kernels take (Net, Batch, Acts, Scratch, Plan) and
                their allocation, 64-byte aligned
    bptt.py     training: forward and backprop-through-time of a batch, the thread plan
    score.py    scoring one stream: the layers as a pipeline over chunks
    sample.py   single steps (Model.step), drawing a token, the generation loop
    search.py   beam search in one call (the layers on packed weights, top-K, back-pointers), and
                steps of several streams on packed weights (Model.packed_steps)
    optim.py    clipping and the Adam, RMSprop and SGD updates over flat buffers
    wdrop.py    weight drop: the masked copy of the weights a batch runs with, the gradient's mask

Conventions (fixed across the project): T time steps, B streams, H hidden, V vocabulary, L layers,
G gates (4 LSTM, 3 GRU, 1 RNN). Equations and gate order are PyTorch's (see cells/). Parameters
live in one flat buffer theta with named views (layout.Net, charrnn/model.py's FlatParams).

Entry kernels (jit.kernel) are called from Python by the checked wrappers of each module and by
charrnn/model.py; helpers (jit.helper) only from compiled code. A parallel kernel is run by
charrnn/threads.py's ThreadTeam: every thread runs it once, start to end, for its share.
"""
