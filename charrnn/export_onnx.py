"""`charrnn export MODEL --format onnx`: the model as an ONNX step graph, built with ONNX's own
LSTM, GRU and RNN operators, so any ONNX runtime can sample from it one character at a time.

    inputs   token   int64    [batch]                 the token id just read
             h0      float32  [layers, batch, hidden]  the state before it (PyTorch's layout)
             c0      float32  [layers, batch, hidden]  LSTM only
    outputs  logits  float32  [batch, V]               the next token's logits, in the vocabulary's id order
             h1      float32  [layers, batch, hidden]  the state after it
             c1      float32  [layers, batch, hidden]  LSTM only

The vocabulary (tokens in id order, <START> <END> <UNK> first) and the cell are stored as the
model's metadata_props (`charrnn.vocab` as JSON, `charrnn.cell`, ...), so a runtime needs nothing
but the .onnx file.

Gate orders. Our checkpoints keep PyTorch's order: LSTM i, f, g, o; GRU r, z, n. ONNX wants LSTM
i, o, f, c and GRU z, r, h; the blocks of H rows are permuted here. PyTorch's GRU applies the
reset gate after the recurrent product (n = tanh(W_in x + b_in + r * (W_hn h + b_hn))), which is
ONNX's GRU with linear_before_reset=1. The RNN's nonlinearity (tanh or relu) is the operator's
activation. Layer 0 reads the one-hot vector of the token (OneHot), as DESIGN.md's model does.

Needs the optional extra `[export]` (the onnx package); nothing else in charrnn imports it.
"""

from __future__ import annotations

import json

import numpy as np

from charrnn import __version__
from charrnn.errors import CharrnnError

OPSET = 17  # onnxruntime 1.14 (2023) on runs it; Squeeze/Unsqueeze take axes as inputs from 13 on

# rows of PyTorch's gate blocks, in the order ONNX wants them
GATE_ORDER = {"lstm": (0, 3, 1, 2),  # i f g o -> i o f c
              "gru": (1, 0, 2),  # r z n -> z r h
              "rnn": (0,)}
OPS = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}


def _onnx():
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        raise CharrnnError("--format onnx needs the onnx package: pip install 'charrnn-cli[export]'") from None
    return onnx, TensorProto, helper, numpy_helper


def _reorder(w: np.ndarray, cell: str, H: int) -> np.ndarray:
    """PyTorch's gate blocks of H rows (G*H, ...) in ONNX's order."""
    return np.concatenate([w[g * H : (g + 1) * H] for g in GATE_ORDER[cell]], axis=0)


def build(model, vocab, meta: dict | None = None):
    """The onnx.ModelProto of the step graph for a charrnn Model and its Vocab."""
    from charrnn.run import Recorded

    onnx, TensorProto, helper, numpy_helper = _onnx()
    cfg = model.cfg
    cell, L, H, V = cfg.cell, cfg.layers, cfg.hidden, cfg.vocab_size
    lstm = cell == "lstm"
    inits, nodes = [], []

    def const(name, arr):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    const("onehot_depth", np.array(V, dtype=np.int64))
    const("onehot_values", np.array([0.0, 1.0], dtype=np.float32))
    const("axis0", np.array([0], dtype=np.int64))
    const("axis1", np.array([1], dtype=np.int64))
    # token (B,) -> one-hot (B, V) -> a sequence of one step (1, B, V)
    nodes.append(helper.make_node("OneHot", ["token", "onehot_depth", "onehot_values"], ["onehot"], axis=-1))
    nodes.append(helper.make_node("Unsqueeze", ["onehot", "axis0"], ["x_l0"]))
    hs, cs = [], []
    x = "x_l0"
    for k in range(L):
        p = {n: model.params[f"rnn.{n}_l{k}"].astype(np.float32) for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
        W = const(f"W_l{k}", _reorder(p["weight_ih"], cell, H)[None])  # (1, G*H, V|H)
        R = const(f"R_l{k}", _reorder(p["weight_hh"], cell, H)[None])  # (1, G*H, H)
        Bv = const(f"B_l{k}", np.concatenate([_reorder(p["bias_ih"], cell, H), _reorder(p["bias_hh"], cell, H)])[None])
        # this layer's slice of the state: (1, B, H)
        const(f"start_l{k}", np.array([k], dtype=np.int64))
        const(f"end_l{k}", np.array([k + 1], dtype=np.int64))
        nodes.append(helper.make_node("Slice", ["h0", f"start_l{k}", f"end_l{k}", "axis0"], [f"h0_l{k}"]))
        inputs = [x, W, R, Bv, "", f"h0_l{k}"]
        outputs = [f"y_l{k}", f"h1_l{k}"]
        attrs = {"hidden_size": H}
        if lstm:
            nodes.append(helper.make_node("Slice", ["c0", f"start_l{k}", f"end_l{k}", "axis0"], [f"c0_l{k}"]))
            inputs.append(f"c0_l{k}")
            outputs.append(f"c1_l{k}")
            cs.append(f"c1_l{k}")
        elif cell == "gru":
            attrs["linear_before_reset"] = 1
        else:
            attrs["activations"] = ["Relu" if cfg.nonlinearity == "relu" else "Tanh"]
        nodes.append(helper.make_node(OPS[cell], inputs, outputs, name=f"{OPS[cell].lower()}_l{k}", **attrs))
        hs.append(f"h1_l{k}")
        # Y (1, 1, B, H): one step, one direction -> the next layer's input (1, B, H)
        nodes.append(helper.make_node("Squeeze", [f"y_l{k}", "axis1"], [f"x_l{k + 1}"]))
        x = f"x_l{k + 1}"
    nodes.append(helper.make_node("Squeeze", [x, "axis0"], ["top"]))  # (B, H)
    const("decoder_weight", model.params["decoder.weight"].astype(np.float32))  # (V, H)
    const("decoder_bias", model.params["decoder.bias"].astype(np.float32))  # (V,)
    nodes.append(helper.make_node("Gemm", ["top", "decoder_weight", "decoder_bias"], ["logits"], transB=1))
    nodes.append(helper.make_node("Concat", hs, ["h1"], axis=0) if L > 1 else helper.make_node("Identity", hs, ["h1"]))
    if lstm:
        nodes.append(helper.make_node("Concat", cs, ["c1"], axis=0) if L > 1 else helper.make_node("Identity", cs, ["c1"]))

    state = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [L, "batch", H])  # noqa: E731
    ins = [helper.make_tensor_value_info("token", TensorProto.INT64, ["batch"]), state("h0")]
    outs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", V]), state("h1")]
    if lstm:
        ins.append(state("c0"))
        outs.append(state("c1"))
    graph = helper.make_graph(nodes, f"charrnn_{cell}_step", ins, outs, inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="charrnn",
                          producer_version=__version__)
    m.ir_version = min(m.ir_version, 8)  # IR 8 is what opset 17's runtimes read
    info = {"charrnn.vocab": json.dumps(list(vocab.tokens), ensure_ascii=False), "charrnn.cell": cell,
            "charrnn.nonlinearity": cfg.nonlinearity, "charrnn.layers": str(L), "charrnn.hidden": str(H),
            "charrnn.docs": json.dumps(Recorded(meta).docs)}
    helper.set_model_props(m, info)
    onnx.checker.check_model(m, full_check=True)
    return m


def to_bytes(model, vocab, meta: dict | None = None) -> bytes:
    return build(model, vocab, meta).SerializeToString()
