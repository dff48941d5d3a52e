"""The loading progress bar (tqdm): silent by default for small loads and non-terminals, complete when enabled."""
import io

from codellama_rt.progress import Progress


def test_progress_bar_reaches_100_percent_when_enabled():
    out = io.StringIO()
    bar = Progress(3 * 2**20, "loading x", enabled=True, stream=out)
    for _ in range(3):
        bar.update(2**20)
    bar.close()
    text = out.getvalue()
    last = text.rstrip("\n").split("\r")[-1]  # the final redraw of the line
    assert last.startswith("loading x: 100%") and "3.00M/3.00M" in last  # bytes in binary units
    assert text.endswith("\n") and text.count("\n") == 1
    bar.close()  # a second close writes nothing more
    assert out.getvalue() == text


def test_progress_bar_silent_for_small_loads_and_non_terminals():
    out = io.StringIO()
    bar = Progress(10 * 2**30, "loading y", stream=out)  # a StringIO is not a terminal
    bar.update(10 * 2**30)
    bar.close()
    assert out.getvalue() == ""


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_default_shows_only_large_loads_on_a_terminal():
    small, large = _Terminal(), _Terminal()
    for out, total in ((small, 2**20), (large, 2**30)):
        bar = Progress(total, "loading z", stream=out)
        bar.update(total)
        bar.close()
    assert small.getvalue() == "" and "loading z: 100%" in large.getvalue()


def test_progress_false_writes_nothing_even_on_a_terminal():
    out = _Terminal()
    bar = Progress(2**31, "loading w", enabled=False, stream=out)
    bar.update(2**31)
    bar.close()
    assert out.getvalue() == ""
