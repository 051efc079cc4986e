"""Print the shell command that follows a `<!-- NAME -->` marker in README.md (the first fenced
code block after it). .ci/run and tests/test_readme.py use this, so CI runs exactly what the
README tells users to run."""

import pathlib
import re
import sys


def command(name: str, readme: str | None = None) -> str:
    text = readme if readme is not None else (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    m = re.search(r"<!-- " + re.escape(name) + r" -->\s*```sh\n(.*?)\n```", text, re.S)
    if not m:
        raise SystemExit(f"README.md has no '<!-- {name} -->' code block")
    lines = [ln for ln in m.group(1).splitlines() if ln.strip()]
    if len(lines) != 1:
        raise SystemExit(f"the '{name}' block must hold exactly one command line")
    return lines[0]


if __name__ == "__main__":
    print(command(sys.argv[1]))
