#!/usr/bin/env bash
# Remake the screenshots of docs/inspect-and-export.md with headless Chromium (Debian's chromium),
# from a model and a text of your choice:  bash docs/images/make_screenshots.sh MODEL TEXT
# The committed ones: a 2x128 LSTM trained for 5 minutes on 214 KB of Python's standard library
# (textwrap, shlex, string, fnmatch, glob, shutil, argparse), shown the first 6,000 characters
# of calendar.py, which it never saw.
set -euo pipefail
model=$1 text=$2
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
shot() {  # shot URL PNG WIDTH HEIGHT
    chromium --headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking \
        --disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$tmp/profile" \
        --virtual-time-budget=10000 --window-size="$3,$4" --screenshot="$2" "$1" 2>/dev/null
}
charrnn viz "$text" --model "$model" -o "$tmp/viz.html" -q
charrnn export "$model" --format html -o "$tmp/sampler.html" -q
unit=$(python3 - "$tmp/viz.html" <<'PY'
import json, re, sys
page = open(sys.argv[1], encoding="utf-8").read()
data = json.loads(re.search(r'id="data">(.*?)</script>', page, re.S).group(1))
layer, index, *_ = data["ranked"][0]
print(f"{layer}:{index}")
PY
)
shot "file://$tmp/viz.html?pos=212" "$here/viz-surprisal.png" 860 620
shot "file://$tmp/viz.html?unit=$unit&pos=212" "$here/viz-unit.png" 860 620
shot "file://$tmp/sampler.html?prime=def%20&temp=0.6&seed=3&length=400&autorun=1" "$here/sampler.png" 860 620
ls -l "$here"/*.png
