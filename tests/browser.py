"""Headless Chromium for the tests of the pages (charrnn viz, charrnn export --format html),
driven through its command line alone: --dump-dom for the DOM after the page's scripts ran,
--screenshot for a picture, --enable-logging=stderr for the console. No new Python dependency.

`.ci/run` installs Debian's `chromium`; where none is found the tests that need it skip, saying why."""

import os
import re
import shutil
import subprocess
import tempfile

import pytest

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-extensions", "--hide-scrollbars",
         "--enable-logging=stderr", "--v=0"]


def chromium() -> str:
    """The browser's path, or skip the test."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no chromium on PATH (Debian: apt-get install chromium; .ci/run installs it)")


def _run(args, timeout=120):
    with tempfile.TemporaryDirectory(prefix="charrnn-chromium-") as profile:
        res = subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                             text=True, timeout=timeout)
    return res


def console_errors(stderr: str) -> list[str]:
    """The page's console messages at error level, and uncaught exceptions."""
    out = []
    for line in stderr.splitlines():
        if "CONSOLE" in line and (":ERROR:CONSOLE" in line or "Uncaught" in line or "Refused to" in line):
            out.append(line)
    return out


def dump_dom(url: str, budget_ms: int = 10000, size=(1200, 900)) -> tuple[str, list[str]]:
    """(the DOM as HTML after load and `budget_ms` of virtual time, the console errors). With
    budget_ms 0 the DOM is taken at the load event in real time (for timings)."""
    budget = [f"--virtual-time-budget={budget_ms}"] if budget_ms else []
    res = _run([f"--window-size={size[0]},{size[1]}", *budget, "--dump-dom", url])
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout, console_errors(res.stderr)


def screenshot(url: str, path: str, size=(1000, 700), budget_ms: int = 5000) -> list[str]:
    """Write a PNG of the page at `path`; returns the console errors."""
    res = _run([f"--window-size={size[0]},{size[1]}", f"--virtual-time-budget={budget_ms}",
                f"--screenshot={os.path.abspath(path)}", url])
    assert res.returncode == 0 and os.path.exists(path), res.stderr[-2000:]
    return console_errors(res.stderr)


def distinct_colours(png_path: str) -> int:
    """How many different colours the screenshot holds (a blank page: one)."""
    import numpy as np
    from matplotlib import image

    img = image.imread(png_path)
    flat = (img[..., :3].reshape(-1, 3) * 255).round().astype(np.uint8)
    return len(np.unique(flat.view([("r", "u1"), ("g", "u1"), ("b", "u1")])))


def file_url(path, query: str = "") -> str:
    url = "file://" + os.path.abspath(path)
    return url + ("?" + query if query else "")


def element_text(dom: str, element_id: str) -> str:
    """The text of the element with this id in a dumped DOM (entities decoded)."""
    import html

    m = re.search(r'<(\w+)[^>]*\sid="' + re.escape(element_id) + r'"[^>]*>(.*?)</\1>', dom, re.S)
    assert m, f"no element with id {element_id!r}"
    return html.unescape(re.sub(r"<[^>]+>", "", m.group(2)))
