"""The recurrent cells, one module each (lstm.py, gru.py, rnn.py), and the generic functions the
loops call on a cell whatever it is.

A cell is a small namedtuple (LSTM(G=4), GRU(G=3), RNN(G=1, relu)) whose *type* chooses the code:
each generic function below is overloaded on it, so a kernel compiled for an LSTM contains the
LSTM's code and nothing else, and the training, scoring and sampling loops share one definition
of each cell's arithmetic.

Adding a cell: a module beside lstm.py with its namedtuple (its G the gate count), SLOTS (the
buffers it uses beside gates and hs), FORGET_GATE, and the functions below (same names, same
parameters; common.py has the pieces several cells share), and one line in CELLS. Parameter
shapes, workspaces, training, scoring and sampling follow.

    fold_bias(cell, row, b_ih, b_hh)            row += the biases folded into the input products
    forward(cell, lay, t, s0, s1, u0, u1, hp, b_hh)
                                                one step of a block, given hp = h_{t-1} @ W_hh^T
    backward(cell, lay, grad, t, s0, s1, u0, u1, dh, dc, direct)
                                                gate gradients of a block at step t
    recurrent_grad(cell, grad)                  the gradient of W_hh h + b_hh (dG or dGh)
    carry(cell, dh, direct)                     dh += what reaches h_{t-1} other than through W_hh
    load_state(cell, lay, h, c, s0, s1)         the initial state into the buffers
    save_state(cell, lay, T, h, c, s0, s1)      the state after step T-1 out of them
    save_state_grad(cell, dh, dc, dh0, dc0, s0, s1, u0, u1)
                                                the gradient on the initial state
"""

from numba.extending import overload

from charrnn.kernels.cells import gru, lstm, rnn
from charrnn.kernels.jit import HELPER

CELLS = {"lstm": lstm, "gru": gru, "rnn": rnn}
_MODULES = {mod.__name__.rsplit(".", 1)[1].upper(): mod for mod in CELLS.values()}


def make(name: str, nonlinearity: str = "tanh"):
    """The cell value for a model's config: make("lstm"), make("rnn", "relu")."""
    if name == "rnn":
        return rnn.RNN(relu=nonlinearity == "relu")
    return getattr(CELLS[name], name.upper())()


def gates(name: str) -> int:
    """G, the gate blocks of a cell by name (4, 3, 1)."""
    return make(name).G


def uses(name: str, slot: str) -> bool:
    """Whether a cell uses a buffer beside its gates and hidden states: "cs", "tcs", "hn" (Layer's
    fields) or "dGh" (a recurrent-side gradient of its own). Workspaces allocate the others empty."""
    return slot in CELLS[name].SLOTS


def forget_gate(name: str):
    """The gate block an initial forget-gate bias goes to, or None for a cell without one."""
    return CELLS[name].FORGET_GATE


def _module(cell):
    """The module of a cell: from a value (Python) or from its Numba type (compiled code)."""
    cls = getattr(cell, "instance_class", type(cell))
    return _MODULES[cls.__name__]


def _generic(fn):
    """Overload fn (a stub whose body runs the cell's own function in Python) with the cell's
    function of the same name, chosen by the cell's type at compile time."""
    name = fn.__name__

    @overload(fn, jit_options=HELPER, strict=False)
    def _ov(*args):
        return getattr(_module(args[0]), name)

    return fn


@_generic
def fold_bias(cell, row, b_ih, b_hh):
    return _module(cell).fold_bias(cell, row, b_ih, b_hh)


@_generic
def forward(cell, lay, t, s0, s1, u0, u1, hp, b_hh):
    return _module(cell).forward(cell, lay, t, s0, s1, u0, u1, hp, b_hh)


@_generic
def backward(cell, lay, grad, t, s0, s1, u0, u1, dh, dc, direct):
    return _module(cell).backward(cell, lay, grad, t, s0, s1, u0, u1, dh, dc, direct)


@_generic
def recurrent_grad(cell, grad):
    return _module(cell).recurrent_grad(cell, grad)


@_generic
def carry(cell, dh, direct):
    return _module(cell).carry(cell, dh, direct)


@_generic
def load_state(cell, lay, h, c, s0, s1):
    return _module(cell).load_state(cell, lay, h, c, s0, s1)


@_generic
def save_state(cell, lay, T, h, c, s0, s1):
    return _module(cell).save_state(cell, lay, T, h, c, s0, s1)


@_generic
def save_state_grad(cell, dh, dc, dh0, dc0, s0, s1, u0, u1):
    return _module(cell).save_state_grad(cell, dh, dc, dh0, dc0, s0, s1, u0, u1)
