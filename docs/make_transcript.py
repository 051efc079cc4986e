"""Record what the quick start prints: run README.md's quick-start charrnn commands on the shipped
corpus, in a scratch directory with an empty kernel cache (so the first-run compile shows, as a new
user sees it), and write their output, stdout and stderr as they interleave, to docs/transcript.md
and between README.md's `<!-- transcript -->` and `<!-- /transcript -->` markers.

    python docs/make_transcript.py                # run the commands (about two minutes), write both
    python docs/make_transcript.py --readme-only  # copy docs/transcript.md into README.md again

The commands are the ones after README.md's `<!-- main-command -->` marker (the part after the
install), so the transcript always shows the quick start as written. Timings, the samples and the
chosen sizes differ from machine to machine and run to run: the footer says where this one ran.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
README = os.path.join(ROOT, "README.md")
OUT = os.path.join(HERE, "transcript.md")
BEGIN, END = "<!-- transcript -->", "<!-- /transcript -->"
# after the quick start, two more everyday commands on the run it made (docs/transcript.md only)
EXTRA = [["charrnn", "eval", "corpora/arithmetic.txt"], ["charrnn", "info", "runs/arithmetic"]]


def quickstart() -> list[list[str]]:
    sys.path.insert(0, os.path.join(ROOT, ".ci"))
    from readme_command import command

    steps = []
    for part in command("main-command").split("&&"):
        args = shlex.split(part.strip())
        if args and args[0] == "charrnn":
            steps.append(args)
    return steps


def cpu() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = re.search(r"^model name\s*:\s*(.*)$", f.read(), re.M)
        name = model.group(1).strip() if model else platform.processor()
    except OSError:
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def record(steps: list[list[str]]) -> str:
    """Run each command in a scratch directory holding a link to corpora/; return the console text."""
    lines = []
    with tempfile.TemporaryDirectory(prefix="charrnn-transcript-") as work:
        os.symlink(os.path.join(ROOT, "corpora"), os.path.join(work, "corpora"))
        env = dict(os.environ, NUMBA_CACHE_DIR=os.path.join(work, "numba-cache"), PYTHONPATH=ROOT)
        for args in steps:
            res = subprocess.run([sys.executable, "-m", "charrnn", *args[1:]], cwd=work, env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900)
            if res.returncode != 0:
                raise SystemExit(f"{shlex.join(args)} exited {res.returncode}:\n{res.stdout}")
            lines.append("$ " + shlex.join(args))
            lines += [ln.rstrip() for ln in res.stdout.replace("\r", "\n").splitlines() if ln.strip()]
    return "\n".join(lines)


def block(console: str) -> str:
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    return (f"```console\n{console}\n```\n\n"
            f"<sub>Recorded by `docs/make_transcript.py` on {cpu()}, {when}, commit {commit()}.</sub>")


def splice(text: str, body: str) -> str:
    start, stop = text.find(BEGIN), text.find(END)
    if start < 0 or stop < start:
        raise SystemExit(f"README.md has no {BEGIN} ... {END} block")
    return text[:start + len(BEGIN)] + "\n" + body + "\n" + text[stop:]


def main(argv: list[str]) -> int:
    if argv[1:] != ["--readme-only"]:
        everyday = record(quickstart() + EXTRA)
        with open(OUT, "w", encoding="utf-8") as f:
            f.write("# A first session\n\nThe quick start of README.md as it ran, then `eval` and `info` on the "
                    "run it made. Written by `python docs/make_transcript.py`; not edited by hand.\n\n"
                    f"{BEGIN}\n{block(everyday)}\n{END}\n")
    with open(OUT, encoding="utf-8") as f:
        full = f.read()
    body = full[full.index(BEGIN) + len(BEGIN):full.index(END)].strip("\n")
    # the README shows the quick start only: the transcript up to the first extra command
    cut = body.find("\n$ " + shlex.join(EXTRA[0]))
    if cut >= 0:
        footer = body[body.rindex("\n\n<sub>"):]
        body = body[:cut] + "\n```" + footer
    with open(README, encoding="utf-8") as f:
        text = f.read()
    with open(README, "w", encoding="utf-8") as f:
        f.write(splice(text, body))
    print(f"wrote {os.path.relpath(OUT)} and README.md's transcript", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
