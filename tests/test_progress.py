"""progress.py: Reporter (a run's steps) and Tally (a count of work, eval's characters) on a
terminal and off one."""

import io

from charrnn import progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def line(n, rate):
    return f"scored {n:,} chars"


def test_tally_off_a_terminal_writes_a_line_only_after_its_interval(monkeypatch):
    out = io.StringIO()
    t = progress.Tally(False, "f.txt", "char", line, stream=out)
    t.add(10)
    t.close()
    assert out.getvalue() == "" and t.count == 10  # quick work: no line
    monkeypatch.setattr(progress.Tally, "LOG_EVERY_S", 0)
    t = progress.Tally(False, "f.txt", "char", line, stream=out)
    t.add(600)
    t.add(1000)
    t.close()
    assert out.getvalue() == "scored 600 chars\nscored 1,600 chars\n"


def test_tally_on_a_terminal_is_a_bar_and_quiet_is_silent(monkeypatch):
    term = Terminal()
    t = progress.Tally(False, "f.txt", "char", line, stream=term)
    assert t.bar is not None and t.bar.desc == "f.txt"
    t.add(5)
    t.close()
    assert t.bar is None and "scored" not in term.getvalue()
    monkeypatch.setattr(progress.Tally, "LOG_EVERY_S", 0)
    quiet = Terminal()
    t = progress.Tally(True, "f.txt", "char", line, stream=quiet)
    t.add(5)
    t.close()
    assert t.quiet and t.bar is None and quiet.getvalue() == ""


def test_reporter_off_a_terminal_writes_its_first_line_at_once():
    out = io.StringIO()
    r = progress.Reporter(False, 100, 0, stream=out)
    r.progress(1, {"loss": "1.0"})
    r.progress(2, {"loss": "0.9"})  # within LOG_EVERY_S of the first
    r.message("done")
    r.close()
    assert out.getvalue() == "step 1 loss=1.0\ndone\n"
