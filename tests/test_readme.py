"""The README's commands keep working: CI runs exactly its test command, and the quick-start
command really trains on a shipped corpus and samples from the result."""

import os
import shlex
import subprocess
import sys

import pytest

from tests.common import ROOT_PATH as ROOT

sys.path.insert(0, str(ROOT / ".ci"))
from readme_command import command


def test_ci_runs_the_readme_test_command():
    cmd = command("test-command")
    assert "pip install" in cmd and "[test]" in cmd and "pytest" in cmd
    ci = (ROOT / ".ci" / "run").read_text()
    assert "readme_command.py test-command" in ci
    assert "set -euo pipefail" in ci


def test_the_readme_test_command_runs_the_linter_before_the_tests():
    cmd = command("test-command")
    assert "ruff check ." in cmd and cmd.index("ruff check .") < cmd.index("pytest")


def test_marker_parser_rejects_missing_and_multiline_blocks():
    with pytest.raises(SystemExit):
        command("main-command", readme="no markers here")
    with pytest.raises(SystemExit):
        command("x", readme="<!-- x -->\n```sh\na\nb\n```\n")
    assert command("x", readme="<!-- x -->\n```sh\necho hi\n```\n") == "echo hi"


def _charrnn_steps(cmd):
    """The charrnn invocations of a README command line, split into argument lists."""
    steps = []
    for part in cmd.split("&&"):
        args = shlex.split(part.strip())
        if args and args[0] == "charrnn":
            steps.append(args[1:])
    return steps


def test_the_readme_transcript_shows_the_quickstart_commands():
    """The transcript is docs/make_transcript.py's record of the quick start: regenerate it with
    `python docs/make_transcript.py` when the quick-start command changes."""
    readme = (ROOT / "README.md").read_text()
    begin, end = readme.index("<!-- transcript -->"), readme.index("<!-- /transcript -->")
    shown = [shlex.split(line[2:])[1:] for line in readme[begin:end].splitlines() if line.startswith("$ charrnn ")]
    assert shown == _charrnn_steps(command("main-command")), "run `python docs/make_transcript.py`"


@pytest.mark.slow
def test_quickstart_command_trains_and_samples(tmp_path):
    """Run the quick start's charrnn commands as written (the install part is what CI itself does)."""
    steps = _charrnn_steps(command("main-command"))
    assert [s[0] for s in steps] == ["train", "sample"]
    os.symlink(ROOT / "corpora", tmp_path / "corpora")
    env = dict(os.environ)
    outputs = []
    for args in steps:
        res = subprocess.run([sys.executable, "-m", "charrnn", *args], cwd=tmp_path, capture_output=True, text=True,
                             env=env, timeout=600)
        assert res.returncode == 0, res.stderr
        outputs.append(res)
    samples = outputs[1].stdout.splitlines()
    assert len(samples) == 10
    # the samples are arithmetic lines (the model's alphabet), and some are well-formed equations
    # (a minute of training gives about half; the sampler's seed is random, so ask for a few)
    import json
    import re

    assert all(re.fullmatch(r"[0-9+*=-]*", s) for s in samples), samples  # empty: <END> drawn first
    wellformed = [s for s in samples if re.fullmatch(r"\d{1,3}[-+*]\d{1,3}=\d{1,5}", s)]
    assert len(wellformed) >= 2, samples
    # and the model really learned: far below the 2.83 nats/char of guessing among its 17 tokens
    run = tmp_path / "runs" / "arithmetic"
    assert (run / "best.npz").exists()
    best = min(json.loads(line)["val_loss"] for line in open(run / "metrics.jsonl"))
    assert best < 1.8, best
