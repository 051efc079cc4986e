"""The README's commands keep working: CI runs exactly its test command, and the quick-start
command really trains on a shipped corpus and samples from the result."""

import os
import pathlib
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / ".ci"))
from readme_command import command  # noqa: E402


def test_ci_runs_the_readme_test_command():
    cmd = command("test-command")
    assert "pip install" in cmd and "[test]" in cmd and "pytest" in cmd
    ci = (ROOT / ".ci" / "run").read_text()
    assert "readme_command.py test-command" in ci
    assert "set -euo pipefail" in ci


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
    # a minute of training on arithmetic gives mostly well-formed equations
    import re

    wellformed = [s for s in samples if re.fullmatch(r"\d{1,3}[-+*]\d{1,3}=\d{1,5}", s)]
    assert len(wellformed) >= 5, samples
    assert (tmp_path / "runs" / "arithmetic" / "best.npz").exists()
