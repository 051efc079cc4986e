"""Weight drop (DropConnect on the recurrent weights, as in AWD-LSTM): the weights a training
batch runs with are theta with every layer's weight_hh multiplied by a mask (rng.weight_masks),
and the gradient of the raw weight_hh is the gradient of the dropped one times the same mask.

The dropped weights are a full copy of theta made before the batch, so the forward pass and
backprop-through-time pack them exactly as they pack theta: the recurrent products keep their
speed, and nothing in bptt.py knows about weight drop.
"""

from charrnn.kernels.jit import kernel
from charrnn.kernels.mathf import copy


@kernel
def _drop(dst, theta, offs, masks):
    """dst (P,) <- theta with each layer k's weight_hh (starting at offs[k, 1], masks[k].size
    elements) multiplied by masks[k] element by element."""
    copy(dst, theta)  # a loop: an array assignment compiles Numba's shape-mismatch error path (1.3 s)
    L = masks.shape[0]
    for k in range(L):
        m = masks[k].ravel()
        o = offs[k, 1]
        for i in range(m.size):
            dst[o + i] = theta[o + i] * m[i]


@kernel
def _mask_grad(grad, offs, masks):
    """grad (P,): each layer's weight_hh gradient, taken with respect to the dropped weights,
    multiplied by its mask: the gradient with respect to the raw weights."""
    L = masks.shape[0]
    for k in range(L):
        m = masks[k].ravel()
        o = offs[k, 1]
        for i in range(m.size):
            grad[o + i] *= m[i]
