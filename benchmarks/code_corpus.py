"""A corpus of Python source made from a package installed in this virtualenv: its .py files in
path order, each preceded by a line naming it, up to a size. The quality benchmarks use it as a
text nobody tuned the defaults on (numpy's source for a few MB, click's for a few hundred KB).

    python benchmarks/code_corpus.py numpy --max-bytes 3M > /tmp/numpy.txt
    python benchmarks/code_corpus.py click > /tmp/click.txt
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from charrnn.config import parse_size


def files_of(package: str) -> list[str]:
    root = os.path.dirname(importlib.import_module(package).__file__)
    found = []
    for d, dirs, names in os.walk(root):
        dirs.sort()
        found += [os.path.join(d, n) for n in sorted(names) if n.endswith(".py")]
    return found


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("package")
    ap.add_argument("--max-bytes", default=None, help="stop before this size (e.g. 3M)")
    args = ap.parse_args()
    limit = parse_size(args.max_bytes) if args.max_bytes else None
    root = os.path.dirname(os.path.dirname(importlib.import_module(args.package).__file__))
    out, size = [], 0
    for path in files_of(args.package):
        with open(path, encoding="utf-8", errors="replace") as f:
            piece = f"# ---- {os.path.relpath(path, root)}\n" + f.read()
        if limit is not None and size + len(piece.encode()) > limit:
            break
        out.append(piece)
        size += len(piece.encode())
    sys.stdout.write("".join(out))
    print(f"{len(out)} files, {size:,} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
