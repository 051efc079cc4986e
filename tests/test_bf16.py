"""The bf16 precision of training (charrnn/kernels/gemm16.py and the products of bptt.py): every
matrix product takes operands rounded to bfloat16 and sums in float32.

The reference is tests/reference.py run with reference.bfloat16_operand, which rounds both
operands of every product exactly as the kernels do and sums in float64: the kernels must agree
with it to float32 accumulation (while the float32 path, run on the same problem, does not), on
every cell, 1 and 2 layers, 1 and 2 threads, with and without dropout and weight drop, by both
backends this CPU has. Tests of the kernels skip, saying why, on a CPU without the instructions;
the tests of the reference's rounding run everywhere."""

import numpy as np
import pytest

from charrnn import threads
from charrnn.kernels import gemm16
from charrnn.model import param_shapes
from tests import reference as ref
from tests.common import CASE_IDS, CASES, grad_views, make, ref_params

BACKENDS = gemm16.backends()
needs_bf16 = pytest.mark.skipif(not BACKENDS, reason="this CPU has no bfloat16 products (AVX512_BF16 or AMX)")
backend_params = pytest.mark.parametrize("backend", BACKENDS or ["none"])

R16 = ref.bfloat16_operand


# ----------------------------------------------------------------------------- rounding (runs everywhere)
def test_reference_rounding_is_to_nearest_with_ties_to_even():
    one = np.float32(1.0)
    ulp = np.float32(2.0 ** -7)  # the spacing of bfloat16 values in [1, 2)
    cases = {
        one: 1.0,
        one + ulp / 4: 1.0,  # below half an ulp: down
        one + ulp * 3 / 4: 1.0 + 2 ** -7,  # above half: up
        one + ulp / 2: 1.0,  # a tie, 1.0's last bit is even: down
        one + ulp * 3 / 2: 1.0 + 2 * 2 ** -7,  # a tie, 1 + ulp is odd: up to the even neighbour
        np.float32(-3.0): -3.0,
        np.float32(np.inf): np.inf,
        np.float32(3.4e38): np.inf,  # past the largest bfloat16 value
    }
    for x, want in cases.items():
        assert R16(np.float32(x)) == want, x
    assert np.isnan(R16(np.float32(np.nan)))
    # a NaN whose set bits all lie in the low half must not round to infinity
    low_nan = np.array([0x7F800001], dtype=np.uint32).view(np.float32)
    assert np.isnan(R16(low_nan))[0]


def test_reference_rounding_agrees_with_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).standard_normal(100_000).astype(np.float32) * 10.0 ** np.arange(-20, 20, 0.0004,
                                                                                                  dtype=np.float32)
    want = torch.from_numpy(x).to(torch.bfloat16).to(torch.float64).numpy()
    np.testing.assert_array_equal(R16(x), want)


def test_reference_rounding_flushes_denormals_to_signed_zero():
    tiny = np.array([1e-39, -1e-39, 2.0 ** -126, -(2.0 ** -126)], dtype=np.float32)  # two denormals, two normals
    got = R16(tiny)
    assert got[0] == 0 and got[1] == 0 and np.signbit(got[1]) and not np.signbit(got[0])
    assert got[2] == 2.0 ** -126 and got[3] == -(2.0 ** -126)


@needs_bf16
@pytest.mark.parametrize("one_at_a_time", [False, True])
def test_kernel_conversions_equal_the_reference_rounding(one_at_a_time):
    """The vector conversion (VCVTNEPS2BF16) and the scalar one of the transposing packs round every
    float32 as the reference does: random values over the whole range, ties, denormals, NaN, inf."""
    rng = np.random.default_rng(7)
    bits = rng.integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32)
    ties = (rng.integers(0, 2**16, size=20_000, dtype=np.uint64).astype(np.uint32) << 16) | 0x8000
    special = np.array([0, 0x80000000, 0x00000001, 0x807FFFFF, 0x7F800000, 0xFF800000, 0x7F800001, 0x7FC00000,
                        0x7F7FFFFF, 0x3F808000, 0x3F818000], dtype=np.uint32)
    x = np.concatenate([bits, ties, special]).view(np.float32)
    got = gemm16.convert(x, one_at_a_time)
    want = R16(x).astype(np.float32).view(np.uint32) >> 16
    nan = np.isnan(x)
    np.testing.assert_array_equal(got[~nan], want[~nan].astype(np.uint16))
    assert np.all((got[nan] & 0x7F80) == 0x7F80) and np.all(got[nan] & 0x7F)  # NaN stays NaN


# ----------------------------------------------------------------------------- the products
@needs_bf16
@backend_params
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (5, 7, 3), (17, 33, 40), (64, 256, 96), (100, 65, 70), (130, 300, 33)])
@pytest.mark.parametrize("name", ["bt", "nn", "tn"])
def test_products_match_rounded_operands_summed_exactly(backend, name, M, K, N):
    rng = np.random.default_rng(M * 1000 + K)
    A = rng.standard_normal((K, M) if name == "tn" else (M, K)).astype(np.float32)
    B = rng.standard_normal((N, K) if name == "bt" else (K, N)).astype(np.float32)
    got = gemm16.op(name, A, B, backend)
    a = R16(A.T if name == "tn" else A)
    b = R16(B.T if name == "bt" else B)
    want = a @ b
    scale = np.abs(a) @ np.abs(b)  # float32 sums of K terms err by at most ~K eps of this
    assert np.all(np.abs(got - want) <= 1e-6 * K * scale + 1e-30), name
    # and not the float32 product: rounding the operands is visible at these sizes
    if K >= 33:
        assert np.max(np.abs(A.T if name == "tn" else A) @ np.abs(B.T if name == "bt" else B)) > 0
        exact32 = (A.T if name == "tn" else A).astype(np.float64) @ (B.T if name == "bt" else B).astype(np.float64)
        assert np.max(np.abs(got - exact32)) > 100 * np.max(np.abs(got - want))


@needs_bf16
@backend_params
def test_products_keep_nan_and_inf(backend):
    A = np.ones((3, 40), dtype=np.float32)
    B = np.ones((40, 5), dtype=np.float32)
    A[1, 7] = np.nan
    A[2, 3] = np.inf
    C = gemm16.op("nn", A, B, backend)
    assert np.all(np.isfinite(C[0])) and np.all(np.isnan(C[1])) and np.all(np.isposinf(C[2]))


@needs_bf16
@backend_params
def test_matmul_with_transposed_operands(backend):
    rng = np.random.default_rng(3)
    for ta in (False, True):
        for tb in (False, True):
            A = rng.standard_normal((50, 37)).astype(np.float32)
            B = rng.standard_normal((37, 29) if not tb else (29, 37)).astype(np.float32)
            A2 = A.T.copy() if ta else A
            got = gemm16.matmul(A2, B, ta, tb, backend=backend)
            want = R16(A) @ R16(B.T if tb else B)
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


# The kernels call the packing and product code by name (gemm16: "compiled once, called by name"); a
# kernel loaded from the disk cache finds that code only if workspace() compiled or loaded it first.
CACHED = """
import json, sys
import numpy as np
from charrnn.kernels import bptt, gemm16, jit
compiled = []
rng = np.random.default_rng(5)
A = rng.standard_normal((70, 45)).astype(np.float32)
B = rng.standard_normal((45, 33)).astype(np.float32)
with jit.compile_notice(lambda: compiled.append(True)):
    C = gemm16.op("nn", A, B, sys.argv[1])
ir = next(iter(gemm16._op_entry.overloads.values())).library.get_llvm_str() if compiled else ""
print(json.dumps({"C": C.tolist(), "compiled": bool(compiled), "ir": ir}))
"""


@needs_bf16
@backend_params
def test_a_cached_kernel_finds_the_code_it_calls_by_name(backend, tmp_path):
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))

    def run():
        res = subprocess.run([sys.executable, "-c", CACHED, backend], env=env, capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout.strip().splitlines()[-1])

    first, again = run(), run()
    assert first["compiled"] and not again["compiled"]  # the second process loaded the kernel from the cache
    assert again["C"] == first["C"]
    # the kernel holds calls to the packing and the product, not their code: their micro-kernels and
    # conversions are linked into the entries alone (the kernel keeps AMX's tile configuration)
    assert f"@charrnn_bf16_product_{backend}" in first["ir"] and "@charrnn_bf16_pack" in first["ir"]
    assert not [f for f in ("@c16_amx16", "@c16_amx32", "@c16_dot8", "@c16_cvt") if f in first["ir"]]


# A model narrower than its vocabulary (V > G*H: an RNN or a small GRU here, an LSTM on a CJK-sized
# vocabulary) packs the decoder's weight gradient as (positions, V): a workspace sized for
# (positions, G*H) was written past its end, which glibc found when the process freed it.
NARROW = """
import gc, sys
import numpy as np
from charrnn import threads
from charrnn.model import Model, ModelConfig
threads.set_threads(1)
for cell in ("rnn", "gru"):
    m = Model(ModelConfig(cell=cell, layers=2, hidden=16, vocab_size=70)).init(1)
    x = np.random.default_rng(2).integers(0, 70, size=(9, 50)).astype(np.int32)
    h, c = m.zero_state(50)
    for _ in range(2):
        out = m.forward_backward(x, x, h, c, precision=sys.argv[1])
    assert np.isfinite(out["loss"])
    del m, out
    gc.collect()
print("ok")
"""


@needs_bf16
@backend_params
def test_a_vocabulary_wider_than_the_gates_stays_inside_the_workspace(backend):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", NARROW, backend], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


# ----------------------------------------------------------------------------- a training batch
def _bf16_reference(m, x, y, h, c, masks, weights=None):
    cell, nonlin, L = m.cfg.cell, m.cfg.nonlinearity, m.cfg.layers
    c0 = c.astype(np.float64) if cell == "lstm" else None
    rm = [masks[k].astype(np.float64) for k in range(L)] if masks is not None else None
    return ref.loss_and_grads(cell, weights or ref_params(m), x, y, h.astype(np.float64), c0, rm, nonlin, R16)


def _block_errors(m, grad, grads):
    """Per parameter block: ||g - ref|| / ||ref||."""
    got = grad_views(m, grad.astype(np.float64))
    return {n: float(np.linalg.norm(got[n] - grads[n]) / max(np.linalg.norm(grads[n]), 1e-30))
            for n in param_shapes(m.cfg)}


# ||g - ref|| / ||ref|| per block. Float32 sums of the same rounded operands: about 1e-7. An
# operand whose float32 value lies within float32 rounding of a bfloat16 tie can round the other
# way from the float64 reference's (a few operands in 10^5), which costs an ulp of bfloat16 on
# one term and, carried through the recurrence, reached 1.9e-4 on one block (weight drop, LSTM);
# the float32 path is 2.9e-3 to 2e-1 away from the same reference.
GRAD_TOL = 5e-4


@needs_bf16
@backend_params
@pytest.mark.parametrize("cell,nonlin", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("L", [1, 2])
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("nthreads", [1, 2])
def test_batch_matches_the_bf16_reference(backend, cell, nonlin, L, dropout, nthreads, restore_threads):
    threads.set_threads(nthreads)
    m, x, y, h, c = make(cell, nonlin, L, V=11, H=40, T=7, B=9, dtype=np.float32, dropout=0.3 if dropout else 0.0)
    T, B = x.shape
    masks = m.dropout_masks(T, B, seed=5, step=3) if dropout else None
    out = m.forward_backward(x, y, h, c, masks=masks, precision=backend)
    loss, logits, hT, cT, grads, dh0, dc0 = _bf16_reference(m, x, y, h, c, masks)
    assert abs(out["loss"] - loss) < 1e-6
    np.testing.assert_allclose(out["h"], hT, rtol=0, atol=1e-6)
    np.testing.assert_allclose(out["dh0"], dh0, rtol=0, atol=1e-6)
    if cell == "lstm":
        np.testing.assert_allclose(out["c"], cT, rtol=0, atol=1e-6)
    errors = _block_errors(m, out["grad"], grads)
    f32 = m.forward_backward(x, y, h, c, masks=masks)
    assert max(errors.values()) < GRAD_TOL, errors
    # the float32 path is measurably further away: the comparison sees the rounding
    assert max(_block_errors(m, f32["grad"], grads).values()) > 4 * GRAD_TOL


@needs_bf16
@backend_params
@pytest.mark.parametrize("cell,nonlin", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("nthreads", [1, 2])
def test_weight_drop_matches_the_bf16_reference_on_the_dropped_weights(backend, cell, nonlin, nthreads,
                                                                       restore_threads):
    threads.set_threads(nthreads)
    m, x, y, h, c = make(cell, nonlin, 2, V=11, H=40, T=7, B=9, dtype=np.float32, dropout=0.3)
    T, B = x.shape
    masks = m.dropout_masks(T, B, seed=5, step=3)
    wm = m.weight_masks(seed=5, step=3, p=0.4)
    out = m.forward_backward(x, y, h, c, masks=masks, weight_masks=wm, precision=backend)
    dropped = ref_params(m)
    for k in range(2):
        dropped[f"rnn.weight_hh_l{k}"] = (m.params[f"rnn.weight_hh_l{k}"] * wm[k]).astype(np.float64)
    loss, _, hT, _, grads, _, _ = _bf16_reference(m, x, y, h, c, masks, dropped)
    for k in range(2):
        grads[f"rnn.weight_hh_l{k}"] = grads[f"rnn.weight_hh_l{k}"] * wm[k]
    assert abs(out["loss"] - loss) < 1e-5  # a flipped tie (see GRAD_TOL) moves the loss by ~1e-6
    np.testing.assert_allclose(out["h"], hT, rtol=0, atol=1e-4)  # ... and states by up to ~1e-5
    assert max(_block_errors(m, out["grad"], grads).values()) < GRAD_TOL


@needs_bf16
@backend_params
@pytest.mark.parametrize("cell,nonlin,bound", [("lstm", "tanh", 0.02), ("gru", "tanh", 0.02), ("rnn", "tanh", 0.02),
                                               ("rnn", "relu", 0.1)])
def test_gradient_against_float32_per_parameter_block(backend, cell, nonlin, bound, restore_threads):
    """How far bfloat16 products move each gradient block from the float32 path's, at a size like
    a real step's: ||g_bf16 - g_fp32|| / ||g_fp32|| per block, printed and bounded (8 bits of
    significand: a few 1e-3; ReLU moves more, a unit at its kink flips)."""
    threads.set_threads(2)
    m, x, y, h, c = make(cell, nonlin, 2, V=60, H=96, T=32, B=16, dtype=np.float32, dropout=0.1)
    T, B = x.shape
    masks = m.dropout_masks(T, B, seed=1, step=1)
    g32 = grad_views(m, m.forward_backward(x, y, h, c, masks=masks)["grad"].astype(np.float64))
    g16 = grad_views(m, m.forward_backward(x, y, h, c, masks=masks, precision=backend)["grad"].astype(np.float64))
    rel = {n: float(np.linalg.norm(g16[n] - g32[n]) / np.linalg.norm(g32[n])) for n in param_shapes(m.cfg)}
    print(f"\n{backend} {cell}/{nonlin}: " + ", ".join(f"{n} {e:.1e}" for n, e in rel.items()))
    assert max(rel.values()) < bound, rel
    assert min(rel.values()) > 0  # the products really were rounded


def test_float32_model_only_and_a_clear_error_without_the_instructions(monkeypatch):
    m, x, y, h, c = make("lstm", "tanh", 1, dtype=np.float64)
    with pytest.raises(ValueError, match="float32"):
        m.forward_backward(x, y, h, c, precision="bf16")
    m, x, y, h, c = make("lstm", "tanh", 1, dtype=np.float32)
    monkeypatch.setattr(gemm16, "backends", lambda: ())
    with pytest.raises(ValueError, match="no bfloat16 products"):
        m.forward_backward(x, y, h, c, precision="bf16")
