"""docs/cli.md is the commands' own --help: it fails when an option or a help text changed and the
reference was not regenerated (`python docs/make_cli_reference.py`), and the reference says what
`charrnn CMD --help` prints on an 80-column terminal."""

import importlib.util
import os
import subprocess
import sys

from tests.common import ROOT

SCRIPT = os.path.join(ROOT, "docs", "make_cli_reference.py")


def _module():
    spec = importlib.util.spec_from_file_location("make_cli_reference", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_docs_cli_md_is_up_to_date():
    with open(os.path.join(ROOT, "docs", "cli.md"), encoding="utf-8") as f:
        committed = f.read()
    assert committed == _module().render(), (
        "docs/cli.md is out of date with the commands' --help: regenerate it with "
        "`python docs/make_cli_reference.py` and commit the result")


def test_the_reference_is_what_help_prints():
    text = _module().render()
    env = dict(os.environ, COLUMNS="80")
    for cmd in (["train"], ["sample"], ["eval"], ["info"], []):
        out = subprocess.run([sys.executable, "-m", "charrnn", *cmd, "--help"], capture_output=True, text=True,
                             env=env, cwd=ROOT, timeout=120).stdout
        assert "## " + " ".join(["charrnn", *cmd]) + "\n\n```text\n" + out.rstrip() + "\n```" in text, cmd


def test_check_mode_exits_1_when_out_of_date(tmp_path, monkeypatch):
    mod = _module()
    stale = tmp_path / "cli.md"
    stale.write_text("# old\n")
    monkeypatch.setattr(mod, "OUT", str(stale))
    assert mod.main(["x", "--check"]) == 1
    assert mod.main(["x"]) == 0 and mod.main(["x", "--check"]) == 0
