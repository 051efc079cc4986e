"""Slow, obvious, plain-numpy (float64) reference implementation of the charrnn
model: forward pass and manual backpropagation-through-time.

Written for clarity, not speed. The fast kernels are tested against this file;
this file is itself tested by central finite differences (tests/test_reference.py).

Model (PyTorch conventions, same parameter names, shapes and gate orders):

    layer k, time t:   x_t = one-hot(token) (k == 0)  or  masked output of layer k-1
    LSTM:  a = W_ih x + b_ih + W_hh h + b_hh ;  i, f, g, o = split(a)   (that order)
           i, f, o = sigmoid ; g = tanh ;  c' = f*c + i*g ;  h' = o * tanh(c')
    GRU:   gi = W_ih x + b_ih ; gh = W_hh h + b_hh ;  gates r, z, n (that order)
           r = sigmoid(gi_r + gh_r) ; z = sigmoid(gi_z + gh_z)
           n = tanh(gi_n + r * gh_n) ;  h' = (1 - z) * n + z * h
    RNN:   h' = act(W_ih x + b_ih + W_hh h + b_hh),  act = tanh or relu

    Dropout: output of layer k (fed upward / to the decoder) is multiplied by
    masks[k][t]; the recurrent h carried to step t+1 of the same layer is NOT.
    Decoder: logits = W_d top + b_d ; loss = mean softmax cross-entropy over T*B.
"""

from collections import OrderedDict

import numpy as np

GATES = {"lstm": 4, "gru": 3, "rnn": 1}


# ----------------------------------------------------------------------------
# parameters
# ----------------------------------------------------------------------------

def param_shapes(cell, V, H, L):
    """Ordered dict name -> shape, PyTorch names, in PyTorch order."""
    G = GATES[cell]
    shapes = OrderedDict()
    for k in range(L):
        in_dim = V if k == 0 else H
        shapes["rnn.weight_ih_l%d" % k] = (G * H, in_dim)
        shapes["rnn.weight_hh_l%d" % k] = (G * H, H)
        shapes["rnn.bias_ih_l%d" % k] = (G * H,)
        shapes["rnn.bias_hh_l%d" % k] = (G * H,)
    shapes["decoder.weight"] = (V, H)
    shapes["decoder.bias"] = (V,)
    return shapes


def init_params(cell, V, H, L, rng):
    """PyTorch-style init: every parameter ~ uniform(-1/sqrt(H), 1/sqrt(H))."""
    bound = 1.0 / np.sqrt(H)
    params = OrderedDict()
    for name, shape in param_shapes(cell, V, H, L).items():
        params[name] = rng.uniform(-bound, bound, size=shape).astype(np.float64)
    return params


def _num_layers(params):
    L = 0
    while "rnn.weight_ih_l%d" % L in params:
        L += 1
    return L


# ----------------------------------------------------------------------------
# elementwise helpers
# ----------------------------------------------------------------------------

def sigmoid(a):
    # numerically stable logistic function
    out = np.empty_like(a)
    pos = a >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-a[pos]))
    e = np.exp(a[~pos])
    out[~pos] = e / (1.0 + e)
    return out


def log_softmax(z):
    # stable: subtract the max along the last axis
    m = np.max(z, axis=-1, keepdims=True)
    s = z - m
    return s - np.log(np.sum(np.exp(s), axis=-1, keepdims=True))


# ----------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------

def _exact(a):
    return a


def forward(cell, params, x, y, h0, c0=None, masks=None, nonlinearity="tanh", operand=_exact):
    """Returns (loss: float, logits: (T,B,V), hT: (L,B,H), cT: (L,B,H) or None, cache).

    `operand` is applied to both operands of every dense matrix product (the one-hot input
    of layer 0 is a selection, not a product): bfloat16_operand gives the bf16 precision's
    arithmetic, rounded operands and exact sums."""
    if cell not in GATES:
        raise ValueError("unknown cell %r" % cell)
    if cell == "rnn" and nonlinearity not in ("tanh", "relu"):
        raise ValueError("unknown nonlinearity %r" % nonlinearity)
    x = np.asarray(x)
    y = np.asarray(y)
    T, B = x.shape
    L = _num_layers(params)
    W_d = params["decoder.weight"]
    b_d = params["decoder.bias"]
    V, H = W_d.shape
    h0 = np.asarray(h0, dtype=np.float64)
    assert h0.shape == (L, B, H)
    if cell == "lstm":
        assert c0 is not None
        c0 = np.asarray(c0, dtype=np.float64)
        assert c0.shape == (L, B, H)
    if masks is not None:
        assert len(masks) == L
        masks = [np.asarray(m, dtype=np.float64) for m in masks]
        for m in masks:
            assert m.shape == (T, B, H)

    # Layer-0 input: the real one-hot matrix (T, B, V).
    layer_input = np.eye(V)[x]

    hT = np.zeros((L, B, H))
    cT = np.zeros((L, B, H)) if cell == "lstm" else None
    layer_caches = []

    R = operand
    for k in range(L):
        W_ih = params["rnn.weight_ih_l%d" % k]
        W_hh = params["rnn.weight_hh_l%d" % k]
        b_ih = params["rnn.bias_ih_l%d" % k]
        b_hh = params["rnn.bias_hh_l%d" % k]
        Rx = _exact if k == 0 else R   # layer 0's one-hot input selects columns of W_ih

        h = h0[k].copy()
        c = c0[k].copy() if cell == "lstm" else None
        outs = np.zeros((T, B, H))   # unmasked outputs h_t of this layer
        steps = []

        for t in range(T):
            xt = layer_input[t]      # (B, in_dim)
            h_prev = h
            if cell == "lstm":
                c_prev = c
                a = Rx(xt) @ Rx(W_ih).T + b_ih + R(h_prev) @ R(W_hh).T + b_hh   # (B, 4H)
                i = sigmoid(a[:, 0 * H:1 * H])
                f = sigmoid(a[:, 1 * H:2 * H])
                g = np.tanh(a[:, 2 * H:3 * H])
                o = sigmoid(a[:, 3 * H:4 * H])
                c = f * c_prev + i * g
                tanh_c = np.tanh(c)
                h = o * tanh_c
                steps.append(dict(x=xt, h_prev=h_prev, c_prev=c_prev,
                                  i=i, f=f, g=g, o=o, c=c, tanh_c=tanh_c))
            elif cell == "gru":
                gi = Rx(xt) @ Rx(W_ih).T + b_ih          # (B, 3H) input part
                gh = R(h_prev) @ R(W_hh).T + b_hh        # (B, 3H) hidden part
                r = sigmoid(gi[:, 0 * H:1 * H] + gh[:, 0 * H:1 * H])
                z = sigmoid(gi[:, 1 * H:2 * H] + gh[:, 1 * H:2 * H])
                gh_n = gh[:, 2 * H:3 * H]        # W_hn h + b_hn
                n = np.tanh(gi[:, 2 * H:3 * H] + r * gh_n)
                h = (1.0 - z) * n + z * h_prev
                steps.append(dict(x=xt, h_prev=h_prev, r=r, z=z, n=n, gh_n=gh_n))
            else:  # rnn
                a = Rx(xt) @ Rx(W_ih).T + b_ih + R(h_prev) @ R(W_hh).T + b_hh   # (B, H)
                if nonlinearity == "tanh":
                    h = np.tanh(a)
                else:
                    h = np.maximum(a, 0.0)
                steps.append(dict(x=xt, h_prev=h_prev, a=a, h=h))
            outs[t] = h

        hT[k] = h
        if cell == "lstm":
            cT[k] = c

        # Dropout on the output fed upward (not on the recurrent path).
        layer_output = outs * masks[k] if masks is not None else outs
        layer_caches.append(dict(steps=steps, input_dim=layer_input.shape[2]))
        layer_input = layer_output

    top = layer_input                         # (T, B, H)
    logits = R(top) @ R(W_d).T + b_d          # (T, B, V)
    logp = log_softmax(logits)
    tt, bb = np.meshgrid(np.arange(T), np.arange(B), indexing="ij")
    loss = -np.mean(logp[tt, bb, y])

    cache = dict(cell=cell, nonlinearity=nonlinearity, params=params,
                 T=T, B=B, L=L, V=V, H=H, y=y, masks=masks, top=top,
                 logp=logp, layers=layer_caches, operand=operand)
    return float(loss), logits, hT, cT, cache


# ----------------------------------------------------------------------------
# backward (manual BPTT)
# ----------------------------------------------------------------------------

def backward(cell, params, cache, nonlinearity="tanh"):
    """Returns (grads: dict like params, dh0: (L,B,H), dc0: (L,B,H) or None):
    the gradient of the mean loss computed by forward()."""
    assert cache["cell"] == cell
    T, B, L, V, H = cache["T"], cache["B"], cache["L"], cache["V"], cache["H"]
    masks = cache["masks"]
    grads = OrderedDict((name, np.zeros_like(p, dtype=np.float64))
                        for name, p in params.items())

    # ---- decoder + loss ----------------------------------------------------
    # loss = -(1/(T*B)) sum_{t,b} logp[t,b,y[t,b]]
    # d loss / d logits[t,b,:] = (softmax(logits[t,b]) - onehot(y[t,b])) / (T*B)
    probs = np.exp(cache["logp"])
    dlogits = probs - np.eye(V)[cache["y"]]
    dlogits /= (T * B)

    R = cache["operand"]
    W_d = params["decoder.weight"]
    top = cache["top"]
    for t in range(T):
        # logits[t] = top[t] @ W_d^T + b_d
        grads["decoder.weight"] += R(dlogits[t]).T @ R(top[t])
        grads["decoder.bias"] += dlogits[t].sum(axis=0)
    dtop = R(dlogits) @ R(W_d)                # (T, B, H) gradient w.r.t. top

    dh0 = np.zeros((L, B, H))
    dc0 = np.zeros((L, B, H)) if cell == "lstm" else None

    # gradient w.r.t. the (masked) output of the current layer
    d_layer_output = dtop
    for k in reversed(range(L)):
        W_ih = params["rnn.weight_ih_l%d" % k]
        W_hh = params["rnn.weight_hh_l%d" % k]
        dW_ih = grads["rnn.weight_ih_l%d" % k]
        dW_hh = grads["rnn.weight_hh_l%d" % k]
        db_ih = grads["rnn.bias_ih_l%d" % k]
        db_hh = grads["rnn.bias_hh_l%d" % k]
        steps = cache["layers"][k]["steps"]
        Rx = _exact if k == 0 else R          # layer 0: a one-hot input, a scatter of rows

        # through dropout: layer_output = outs * mask  =>  d outs = d out * mask
        d_outs = d_layer_output * masks[k] if masks is not None else d_layer_output
        d_input = np.zeros((T, B, cache["layers"][k]["input_dim"]))

        dh_next = np.zeros((B, H))            # grad flowing into h_t from step t+1
        dc_next = np.zeros((B, H))            # (LSTM) grad flowing into c_t from t+1

        for t in reversed(range(T)):
            s = steps[t]
            # total gradient on h_t: from above (output) + from the next time step
            dh = d_outs[t] + dh_next

            if cell == "lstm":
                i, f, g, o = s["i"], s["f"], s["g"], s["o"]
                tanh_c, c_prev = s["tanh_c"], s["c_prev"]
                # h = o * tanh(c)
                do = dh * tanh_c
                dc = dc_next + dh * o * (1.0 - tanh_c ** 2)
                # c = f * c_prev + i * g
                df = dc * c_prev
                di = dc * g
                dg = dc * i
                dc_prev = dc * f
                # through the gate nonlinearities (pre-activations a)
                da_i = di * i * (1.0 - i)
                da_f = df * f * (1.0 - f)
                da_g = dg * (1.0 - g ** 2)
                da_o = do * o * (1.0 - o)
                da = np.concatenate([da_i, da_f, da_g, da_o], axis=1)   # (B, 4H)
                # a = x W_ih^T + b_ih + h_prev W_hh^T + b_hh
                dW_ih += Rx(da).T @ Rx(s["x"])
                dW_hh += R(da).T @ R(s["h_prev"])
                db_ih += da.sum(axis=0)
                db_hh += da.sum(axis=0)
                d_input[t] = R(da) @ R(W_ih)
                dh_next = R(da) @ R(W_hh)
                dc_next = dc_prev

            elif cell == "gru":
                r, z, n, gh_n, h_prev = s["r"], s["z"], s["n"], s["gh_n"], s["h_prev"]
                # h = (1 - z) * n + z * h_prev
                dn = dh * (1.0 - z)
                dz = dh * (h_prev - n)
                dh_prev = dh * z
                # n = tanh(n_pre),  n_pre = gi_n + r * gh_n
                dn_pre = dn * (1.0 - n ** 2)
                dr = dn_pre * gh_n
                dgh_n = dn_pre * r            # grad on W_hn h + b_hn (note: * r)
                # r = sigmoid(gi_r + gh_r), z = sigmoid(gi_z + gh_z)
                dr_pre = dr * r * (1.0 - r)
                dz_pre = dz * z * (1.0 - z)
                # gradients on gi = x W_ih^T + b_ih and gh = h_prev W_hh^T + b_hh
                dgi = np.concatenate([dr_pre, dz_pre, dn_pre], axis=1)   # (B, 3H)
                dgh = np.concatenate([dr_pre, dz_pre, dgh_n], axis=1)    # (B, 3H)
                dW_ih += Rx(dgi).T @ Rx(s["x"])
                db_ih += dgi.sum(axis=0)
                dW_hh += R(dgh).T @ R(h_prev)
                db_hh += dgh.sum(axis=0)
                d_input[t] = R(dgi) @ R(W_ih)
                dh_next = dh_prev + R(dgh) @ R(W_hh)

            else:  # rnn
                if nonlinearity == "tanh":
                    # h = tanh(a): dh/da = 1 - h^2
                    da = dh * (1.0 - s["h"] ** 2)
                else:
                    # h = relu(a): dh/da = 1 if a > 0 else 0
                    da = dh * (s["a"] > 0.0)
                dW_ih += Rx(da).T @ Rx(s["x"])
                dW_hh += R(da).T @ R(s["h_prev"])
                db_ih += da.sum(axis=0)
                db_hh += da.sum(axis=0)
                d_input[t] = R(da) @ R(W_ih)
                dh_next = R(da) @ R(W_hh)

        dh0[k] = dh_next
        if cell == "lstm":
            dc0[k] = dc_next
        # gradient w.r.t. this layer's input = gradient w.r.t. the (masked)
        # output of the layer below (for k == 0 it is w.r.t. the one-hot; unused)
        d_layer_output = d_input

    return grads, dh0, dc0


def bfloat16_operand(a):
    """a rounded to bfloat16 (the nearest value with an 8-bit significand, ties to even) through
    float32, as the bf16 precision rounds the operands of its products (the CPU's conversion,
    which also flushes float32 denormals to zero); returned as float64."""
    u = np.asarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    r = np.where((u & 0x7FFFFFFF) > 0x7F800000, (u >> 16) | 0x40, r)  # a NaN stays a NaN
    r = np.where((u & 0x7F800000) == 0, (u >> 16) & 0x8000, r)  # a denormal (or zero) becomes 0
    return (r.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def loss_and_grads(cell, params, x, y, h0, c0=None, masks=None, nonlinearity="tanh", operand=_exact):
    """forward then backward; returns (loss, logits, hT, cT, grads, dh0, dc0)."""
    loss, logits, hT, cT, cache = forward(cell, params, x, y, h0, c0, masks, nonlinearity, operand)
    grads, dh0, dc0 = backward(cell, params, cache, nonlinearity)
    return loss, logits, hT, cT, grads, dh0, dc0


def relu_preactivations(cache):
    """All RNN pre-activations a (list of arrays); for kink checks in tests."""
    return [s["a"] for layer in cache["layers"] for s in layer["steps"] if "a" in s]


# ----------------------------------------------------------------------------
# sampling: the distribution one draw follows
# ----------------------------------------------------------------------------

def draw_probs(z, temp=1.0, top_k=0, top_p=1.0, banned=None):
    """The probability of each id (V,) in one draw from logits z (V,), as the sampler defines it:
    banned ids get 0; temp == 0 is the argmax (the first of ties); else softmax(z / temp) over the
    allowed ids, cut to the top_k largest logits (ties in id order; 0: off), then to the smallest
    prefix, by decreasing logit, whose mass reaches top_p (within a relative 1e-12), renormalised.
    The softmax subtracts the largest allowed logit before dividing by temp, which is exact
    algebra and keeps every positive temp, however small or large, finite: a tiny temp tends to
    uniform over the tied maxima, a huge one to uniform over the allowed ids."""
    z = np.asarray(z, dtype=np.float64)
    V = z.shape[0]
    allowed = np.ones(V, dtype=bool) if banned is None else ~np.asarray(banned, dtype=bool)
    ids = np.flatnonzero(allowed)
    order = ids[np.argsort(-z[ids], kind="stable")]  # allowed ids by decreasing logit
    p = np.zeros(V)
    if temp == 0.0:
        p[order[0]] = 1.0
        return p
    if top_k > 0:
        order = order[:top_k]
    with np.errstate(over="ignore", under="ignore"):
        w = np.exp((z[order] - z[order[0]]) / temp)  # the first weight is exp(0) = 1
    if top_p < 1.0:
        cum = np.cumsum(w)
        n = int(np.argmax(cum >= top_p * cum[-1] * (1.0 - 1e-12))) + 1
        order, w = order[:n], w[:n]
    p[order] = w / w.sum()
    return p
