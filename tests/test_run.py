"""The run record (charrnn/run.py): a checkpoint's meta record is the record's, both ways; older
records are migrated in one place; any record, bare or damaged, reads tolerantly for the card."""

import dataclasses
import os

import pytest

from charrnn import checkpoint
from charrnn.config import DEFAULTS, Fitted, TrainConfig
from charrnn.errors import CharrnnError
from charrnn.run import Recorded, Run
from tests.common import SMALL_TRAIN, run

SAVE_KEYS = {"format", "version", "charrnn_version", "cell", "nonlinearity", "layers", "hidden", "dropout", "vocab"}


@pytest.fixture(scope="module")
def last(corpus, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run") / "r")
    assert run(["train", corpus, "--out", out, "--steps", "6", "--dropout", "0.1", *SMALL_TRAIN]).exit_code == 0
    return checkpoint.load(os.path.join(out, "last.npz"), with_arrays=True)


def test_the_meta_record_is_the_run_record_both_ways(last):
    """Read back and written again, a run's record is the checkpoint's meta, key for key (but the
    model's own keys, which checkpoint.save writes)."""
    meta = last.meta
    rec = Run.from_meta(meta, last.vocab, last.model.cfg, "last.npz")
    again = rec.to_meta(meta["optimizer"], meta["data"]["stream_len"])
    assert again == {k: v for k, v in meta.items() if k not in SAVE_KEYS}
    assert rec.config == dataclasses.replace(TrainConfig.from_dict(meta["train"]))  # "train" is derived
    assert Run.from_wire(rec.to_wire()) == rec


def test_older_records_are_migrated(last):
    meta = dict(last.meta)
    combined = {k: v for k, v in meta["train"].items() if k not in ("max_vocab", "weight_drop", "dropout_mode",
                                                                     "average")}
    old = {k: v for k, v in meta.items() if k not in ("config", "fitted")}
    old["train"] = combined  # before the given and fitted values were kept apart, and before those options
    rec = Run.from_meta(old, last.vocab, last.model.cfg, "last.npz")
    assert rec.given.max_vocab is None  # every character was kept
    assert (rec.given.weight_drop, rec.given.dropout_mode, rec.given.average) == (0.0, "step", "off")
    assert rec.fitted == Fitted.from_effective(rec.given, pending=combined.get("dropout_fit", False))
    assert rec.config.hidden == meta["train"]["hidden"]


@pytest.mark.parametrize("drop", ["run", "corpus", "train"])
def test_a_record_without_training_state_cannot_resume(last, drop):
    meta = {k: v for k, v in last.meta.items() if k != drop and not (drop == "train" and k in ("config", "fitted"))}
    with pytest.raises(CharrnnError, match="cannot resume: checkpoint lacks training state"):
        Run.from_meta(meta, last.vocab, last.model.cfg, "last.npz")


def test_options_out_of_range_today_refuse_resume_in_one_line(last):
    meta = dict(last.meta, config=dict(last.meta["config"], lr=-1.0))
    with pytest.raises(CharrnnError, match="recorded options are out of range"):
        Run.from_meta(meta, last.vocab, last.model.cfg, "last.npz")


@pytest.mark.parametrize("meta", [None, {}, {"train": 3, "config": [], "run": "x", "corpus": None}])
def test_any_record_reads_tolerantly(meta):
    r = Recorded(meta)
    assert (r.given, r.fitted, r.combined, r.state, r.corpus, r.lineage) == ({}, {}, {}, {}, {}, {})
    assert r.docs is None and r.step is None and r.best_val is None


def test_recorded_reads_what_the_run_wrote(last):
    r = Recorded(last.meta)
    assert r.given == last.meta["config"] and r.combined == last.meta["train"] and r.separate
    assert r.step == 6 and r.docs is None and r.corpus["sha256"] == last.meta["corpus"]["sha256"]
    assert r.given["batch"] != DEFAULTS.batch  # the options as given, not the defaults
