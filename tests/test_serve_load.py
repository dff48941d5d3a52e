"""bench/serve_load.py, the load generator for `codellama-rt serve`: its command line refuses a server that is
not on this machine, its helpers, and one tiny run of every scenario against a server it starts (the JSON has
every field with sane values, greedy texts match, and the server is gone afterwards). Speed is never asserted
here (see bench/README.md)."""
from __future__ import annotations

import json

import pytest

from tool_modules import load_bench

pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")


@pytest.fixture(scope="module")
def sl():
    return load_bench("serve_load")


@pytest.mark.parametrize("url", ["http://example.com:8000", "http://10.0.0.1:8000", "http://0.0.0.0:8000",
                                 "ftp://127.0.0.1:8000", "127.0.0.1:8000"])
def test_refuses_a_server_elsewhere(sl, url):
    with pytest.raises(SystemExit, match="only a server on this machine"):
        sl.parse(["--url", url])


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/", "http://localhost:1", "http://[::1]:8000",
                                 "http://127.0.0.2:9"])
def test_accepts_loopback(sl, url):
    assert sl.parse(["--url", url]).url == url.rstrip("/")


def test_bad_options(sl):
    for argv in (["--load-levels", "0"], ["--scenarios", "nope"], ["--requests", "0"]):
        with pytest.raises(SystemExit):
            sl.parse(argv)


def test_helpers(sl):
    assert sl.pct([], 50) is None
    assert sl.pct([3.0, 1.0, 2.0], 50) == 2.0
    assert sl.pct([1.0, 2.0], 99) == pytest.approx(1.99)
    assert sl.python_file(1, 3) == sl.python_file(1, 3)
    a, b = sl.python_file(1, 3).splitlines(), sl.python_file(2, 3).splitlines()
    assert a[0] != b[0]  # nothing of one seed's file is a reusable prefix of another's
    assert sl.delta({"x": 5.0, "y": None}, {"x": 2.0, "y": 1.0}) == {"x": 3.0, "y": None}


@pytest.mark.slow
def test_tiny_run_of_every_scenario(sl, tmp_path):
    httpx = pytest.importorskip("httpx")
    out = tmp_path / "serve_load.json"
    doc = sl.main(["--max-batch-size", "4", "--requests", "2", "--max-tokens", "4", "--prefix-tokens", "80",
                   "--prefix-samples", "1", "--prefix-max-tokens", "2", "--load-levels", "2", "--load-requests", "2",
                   "--load-seconds", "30", "--load-max-tokens", "4", "--timeout", "60", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(doc))
    meta = doc["meta"]
    assert meta["server"]["started_here"] and meta["git_commit"] and meta["options"]["requests"] == 2
    c = doc["concurrency"]
    assert c["requests"] == 2 and c["texts_matched"] == 2 and c["mismatches"] == []
    assert c["sequential_s"] > 0 and c["concurrent_s"] > 0 and c["ratio"] > 0
    assert 0 < c["tokens_sequential"] <= 8 and c["tokens_concurrent"] == c["tokens_sequential"]
    assert c["metrics_concurrent"]["requests"] == 2
    p = doc["prefix"]
    assert p["prefix_tokens"] >= 80 and len(p["ttft_cold_s"]) == len(p["ttft_warm_s"]) == 1
    assert p["ttft_cold_median_s"] > 0 and p["ttft_warm_median_s"] > 0 and p["ratio"] > 0
    assert p["prefix_reused_tokens_warm"] >= p["prefix_tokens"] - 2  # the warm request reused the shared file
    assert p["metrics_cold"]["prefix_reused_tokens"] < p["prefix_tokens"] / 2
    [level] = doc["load"]
    assert level["clients"] == 2 and level["requests"] == 2 and level["wall_s"] > 0
    assert 0 < level["tokens"] <= 8 and level["requests_per_s"] > 0 and level["tokens_per_s"] > 0
    assert 0 < level["ttft_p50_s"] <= level["ttft_p99_s"]
    assert level["metrics"]["generated_tokens"] == level["tokens"]
    assert set(doc["bars"]) == {"concurrency_ratio", "prefix_ttft_ratio"}
    with pytest.raises(httpx.TransportError):  # the server it started is gone
        httpx.get(meta["server"]["url"] + "/health", timeout=5, trust_env=False)
