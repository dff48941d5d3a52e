"""bench/engine_load.py, the in-process serving bench: its options, and one tiny run of both scenarios on
the random-weight `tiny` model (every field present and sane, the warm requests reused the shared prefix,
every request ran its full length). Speed is never asserted here (see bench/README.md)."""
from __future__ import annotations

import json

import pytest

from tool_modules import load_bench


@pytest.fixture(scope="module")
def el():
    return load_bench("engine_load")


def test_bad_options(el):
    for argv in (["--requests", "0"], ["--samples", "0"], ["--max-tokens", "-1"]):
        with pytest.raises(SystemExit):
            el.parse(argv)
    with pytest.raises(SystemExit, match="expected default or one of"):
        el.main(["--model", "nope"])


def test_bars_are_the_issues(el):
    assert el.bars(True) == {"concurrency_ratio": 5.0, "prefix_ttft_ratio": 3.0}
    assert el.bars(False)["concurrency_ratio"] == 2.0


def test_tiny_run(el, tmp_path):
    out = tmp_path / "engine_load.json"
    doc = el.main(["--model", "tiny", "--requests", "3", "--max-tokens", "5", "--prompt-tokens", "6",
                   "--prefix-tokens", "40", "--samples", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(doc))
    c, p = doc["concurrency"], doc["prefix"]
    assert c["requests"] == 3 and c["tokens_sequential"] == c["tokens_concurrent"] == 15
    assert c["sequential_s"] > 0 and c["concurrent_s"] > 0 and c["ratio"] > 0
    assert len(p["ttft_cold_s"]) == len(p["ttft_warm_s"]) == 2 and 0 < p["ttft_warm_median_s"]
    assert p["prefix_reused_tokens"] == 2 * 40  # each warm request reused the whole shared prefix
    assert set(doc["bars"]) == {"concurrency_ratio", "prefix_ttft_ratio"}
    assert doc["meta"]["model"] == "tiny (random weights)" and doc["meta"]["cuda_graphs"] is False
