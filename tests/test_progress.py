"""The loading progress bar: silent by default for small loads, complete when enabled."""
import io

from codellama_rt.progress import Progress


def test_progress_bar_reaches_100_percent_when_enabled():
    out = io.StringIO()
    bar = Progress(3 * 2**20, "loading x", enabled=True, stream=out)
    for _ in range(3):
        bar.update(2**20)
    bar.close()
    text = out.getvalue()
    assert "loading x" in text and "100.0%" in text and text.endswith("\n")


def test_progress_bar_silent_for_small_loads_and_non_terminals():
    out = io.StringIO()
    bar = Progress(10 * 2**30, "loading y", stream=out)  # a StringIO is not a terminal
    bar.update(10 * 2**30)
    bar.close()
    assert out.getvalue() == ""
