"""charrnn train --precision (charrnn/precision.py): which arithmetic a run's products use, what it
says, what its checkpoint records, exact resume in bf16, and a bf16-trained checkpoint scored the
same by charrnn eval and by torch.nn modules loaded from it."""

import math
import os

import numpy as np
import pytest

from charrnn import precision
from charrnn.kernels import gemm16
from tests.common import meta_of, params_of, run
from tests.common import SMALL_TRAIN as SMALL

needs_bf16 = pytest.mark.skipif(not gemm16.backends(), reason="this CPU has no bfloat16 products (AVX512_BF16 or AMX)")


def _train(corpus, out, *extra, steps=12):
    res = run(["train", corpus, "--out", out, "--steps", str(steps), *SMALL, *extra])
    assert res.exit_code == 0, res.output
    return res


def test_choose_follows_the_cpu(monkeypatch):
    monkeypatch.setattr(gemm16, "backends", lambda: ("amx", "dot"))
    assert precision.choose("auto", 256) == ("bf16", None)
    assert precision.choose("auto", None) == ("bf16", None)
    assert precision.choose("auto", precision.AUTO_MIN_HIDDEN - 1) == ("fp32", None)  # too small to gain
    assert precision.choose("bf16", 16) == ("bf16", None)  # asked for: given
    assert precision.choose("fp32", 512) == ("fp32", None)
    assert precision.speedup("bf16") == precision.AMX_SPEEDUP > 1  # what a time budget is sized for
    assert precision.speedup("fp32") == 1.0
    monkeypatch.setattr(gemm16, "backends", lambda: ("dot",))
    assert precision.choose("auto", 256) == ("measure", None)
    assert precision.choose("bf16", 256) == ("bf16", None)
    assert precision.speedup("bf16") == precision.speedup("measure") == 1.0  # not measured: sized as float32
    monkeypatch.setattr(gemm16, "backends", lambda: ())
    assert precision.choose("auto", 256) == ("fp32", None)
    p, line = precision.choose("bf16", 256)
    assert p == "fp32" and "no bfloat16 products" in line
    with pytest.raises(ValueError):
        precision.choose("fp16")


def test_a_cpu_without_bf16_trains_in_float32_and_says_so(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(gemm16, "backends", lambda: ())
    out = str(tmp_path / "r")
    res = run(["train", corpus, "--out", out, "--steps", "3", *[a for a in SMALL if a != "-q"], "--precision", "bf16"])
    assert res.exit_code == 0, res.output
    assert "no bfloat16 products (AVX512_BF16 or AMX); training in float32" in res.output
    assert meta_of(os.path.join(out, "last.npz"))["fitted"]["precision"] == "fp32"


def test_bad_precision_is_a_usage_error(corpus, tmp_path):
    res = run(["train", corpus, "--out", str(tmp_path / "r"), "--precision", "fp16", *SMALL])
    assert res.exit_code == 2
    assert not os.path.exists(tmp_path / "r")


@needs_bf16
def test_bf16_run_says_so_records_it_and_differs_from_float32(corpus, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    res = run(["train", corpus, "--out", a, "--steps", "12", *[x for x in SMALL if x != "-q"], "--precision", "bf16"])
    assert res.exit_code == 0, res.output
    first = res.output.splitlines()[0]
    assert first.startswith("charrnn: ") and "bf16 products (" in first
    _train(corpus, b, "--precision", "fp32")
    assert meta_of(os.path.join(a, "last.npz"))["fitted"]["precision"] == "bf16"
    assert meta_of(os.path.join(a, "last.npz"))["config"]["precision"] == "bf16"
    assert meta_of(os.path.join(b, "last.npz"))["fitted"]["precision"] == "fp32"
    assert "products     bf16: bfloat16 operands" in run(["info", a]).stdout  # the model card says so
    assert "products" not in run(["info", b]).stdout
    pa, pb = params_of(os.path.join(a, "last.npz")), params_of(os.path.join(b, "last.npz"))
    assert all(pa[k].dtype == np.float32 for k in pa)  # checkpoints stay float32
    assert any(not np.array_equal(pa[k], pb[k]) for k in pa)  # the products really were rounded
    # and close: 12 updates apart only by rounding
    assert max(float(np.max(np.abs(pa[k] - pb[k]))) for k in pa) < 1e-2


@needs_bf16
def test_bf16_resumed_run_equals_uninterrupted_run(corpus, tmp_path):
    opts = ["--precision", "bf16", "--dropout", "0.2", "--eval-every", "7", "--seq-warmup", "10", "--weight-drop", "0.2"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _train(corpus, a, *opts, steps=20)
    _train(corpus, b, *opts, steps=9)
    res = run(["train", "--resume", b, "--steps", "20", "-q"])
    assert res.exit_code == 0, res.output
    pa, pb = params_of(os.path.join(a, "last.npz")), params_of(os.path.join(b, "last.npz"))
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
    assert meta_of(os.path.join(b, "last.npz"))["fitted"]["precision"] == "bf16"


@needs_bf16
def test_auto_measures_where_only_dot_products_are_there(corpus, tmp_path, monkeypatch):
    """On a CPU with AVX512_BF16 but no AMX, auto times both precisions on the first batch and says
    which it keeps; simulated here by hiding AMX."""
    monkeypatch.setattr(gemm16, "backends", lambda: ("dot",))
    out = str(tmp_path / "r")
    res = run(["train", corpus, "--out", out, "--steps", "4", *[x for x in SMALL if x != "-q"], "--precision", "auto",
               "--hidden", str(precision.AUTO_MIN_HIDDEN)])  # the last --hidden counts: a size auto considers
    assert res.exit_code == 0, res.output
    header = next(line for line in res.output.splitlines() if line.startswith("charrnn: "))
    assert "precision measured next" in header
    chosen = meta_of(os.path.join(out, "last.npz"))["fitted"]["precision"]
    assert chosen in ("fp32", "bf16")
    assert f"charrnn: {precision.describe(chosen)} (measured faster on the first batch)" in res.output


@needs_bf16
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_a_bf16_checkpoint_scores_the_same_in_torch(corpus, tmp_path, cell):
    """Nothing downstream can tell a bf16-trained model: torch.nn modules loaded from its checkpoint
    give charrnn eval's score."""
    torch = pytest.importorskip("torch")
    out = str(tmp_path / "r")
    _train(corpus, out, "--precision", "bf16", "--cell", cell, steps=15)
    text = open(corpus, encoding="utf-8").read()[:3000]
    res = run(["eval", "-", "--model", out, "--json"], input=text)
    assert res.exit_code == 0, res.output
    import json

    want = json.loads(res.stdout.strip().splitlines()[-1])["nats_per_char"]
    meta = meta_of(os.path.join(out, "best.npz"))
    p = params_of(os.path.join(out, "best.npz"))
    vocab = meta["vocab"]
    V, H, L = len(vocab), meta["hidden"], meta["layers"]
    rnn = (torch.nn.LSTM if cell == "lstm" else torch.nn.GRU)(V, H, L).double()
    dec = torch.nn.Linear(H, V).double()
    with torch.no_grad():
        for name, prm in rnn.named_parameters():
            prm.copy_(torch.from_numpy(p["rnn." + name].astype(np.float64)))
        dec.weight.copy_(torch.from_numpy(p["decoder.weight"].astype(np.float64)))
        dec.bias.copy_(torch.from_numpy(p["decoder.bias"].astype(np.float64)))
        ids = [0] + [vocab.index(ch) if ch in vocab else 2 for ch in text]  # <START> c1 ... cN (<UNK> = 2)
        x = torch.nn.functional.one_hot(torch.tensor(ids[:-1]), V).double().unsqueeze(1)
        out_, _ = rnn(x)
        logp = torch.log_softmax(dec(out_[:, 0]), dim=-1)
        got = -float(logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean())
    assert math.isclose(got, want, rel_tol=0, abs_tol=1e-5), (got, want)
