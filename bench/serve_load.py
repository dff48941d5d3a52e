"""A bounded load generator for `codellama-rt serve` (issue 18's serving bars), on asyncio + httpx.

    python bench/serve_load.py [--scenarios concurrency,prefix,load] [--url http://127.0.0.1:PORT]
                               [--max-batch-size 8] [--out FILE]

Scenarios (each bounded in request count and time):
- concurrency: `--requests` distinct greedy completions (`--max-tokens` each) sent one after another, then
  all at once; wall times, the ratio sequential / concurrent (bar: >= 2x on CPU with the default model,
  >= 5x on a GPU at 7B), and whether each concurrent text equals its sequential one. (The concurrent
  requests reuse the cached K/V of the sequential ones' short prompts: metrics_* in the JSON show how much.)
- prefix: streamed requests over a ~`--prefix-tokens` synthetic Python file plus a short tail. Cold: a file
  never seen (it differs from its first line on, so nothing is reusable); warm: the same file as an earlier
  request, another tail. Time to the first SSE chunk with text (TTFT) medians, cold / warm (bar: >= 3x), and
  the deltas of /metrics' prefix_reused_tokens and prefilled_tokens.
- load: closed-loop streaming clients at each of `--load-levels` concurrencies, each level until
  `--load-requests` requests were sent or `--load-seconds` passed: requests/s, generated tokens/s, TTFT
  p50/p99, per-token latency p50 (per request: (last chunk - first chunk) / (tokens - 1)).

Without --url it starts its own server (127.0.0.1, --port 0; killed at exit, also on error); --url must be
a loopback address. The JSON document goes to stdout or --out; a short table to stderr.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import re
import signal
import statistics
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

START_TIMEOUT = 180.0  # seconds for an own server to load its model and listen
BARS = {"concurrency_ratio": 2.0, "prefix_ttft_ratio": 3.0}  # CPU, default model (GPU at 7B: concurrency 5x)
PROMPTS = ["def fibonacci(n):", "class LinkedList:", "import os\n\ndef list_files(path):",
           "def quicksort(items):", "# Parse a CSV file\ndef read_csv(path):", "def is_prime(n):",
           "class Stack:\n    def __init__(self):", "def binary_search(items, target):",
           "def merge_sort(values):", "from collections import Counter\n\ndef word_counts(text):",
           "def flatten(nested):", "class Matrix:\n    def __init__(self, rows):"]
METRICS = ("requests", "prompt_tokens", "prefilled_tokens", "prefix_reused_tokens", "generated_tokens",
           "decode_steps")


def check_loopback(url: str) -> str:
    """`url` without a trailing slash; a SystemExit unless it is http(s) on a loopback host."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if parts.scheme not in ("http", "https") or not loopback:
        raise SystemExit(f"--url {url!r}: only a server on this machine is load-tested (http://127.0.0.1:PORT, "
                         "http://[::1]:PORT or http://localhost:PORT)")
    return url.rstrip("/")


# ---- requests ---------------------------------------------------------------------------------------

async def complete(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> dict:
    """A greedy non-streamed completion: text, completion_tokens, cached_tokens, seconds."""
    t0 = time.perf_counter()
    r = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    seconds = time.perf_counter() - t0
    body = _json(r)
    usage = body["usage"]
    return {"text": body["choices"][0]["text"], "completion_tokens": usage["completion_tokens"],
            "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens"), "seconds": seconds}


async def stream(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> dict:
    """A greedy streamed completion: text, completion_tokens (the usage chunk), ttft (to the first chunk with
    text), tpot ((last text chunk - first) / (tokens - 1), None under 2 tokens), seconds."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    text, tokens = [], None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            _json(r)
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"the stream failed: {chunk['error']}")
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                if choice.get("text"):
                    last = time.perf_counter()
                    first = first if first is not None else last
                    text.append(choice["text"])
    seconds = time.perf_counter() - t0
    tpot = (last - first) / (tokens - 1) if first is not None and tokens and tokens > 1 else None
    return {"text": "".join(text), "completion_tokens": tokens or 0, "seconds": seconds,
            "ttft": None if first is None else first - t0, "tpot": tpot}


def _json(r: httpx.Response) -> dict:
    if r.status_code != 200:
        raise RuntimeError(f"HTTP {r.status_code} from {r.request.url}: {r.text[:500]}")
    return r.json()


async def prompt_tokens(client: httpx.AsyncClient, prompt: str) -> int:
    """The server's token count of `prompt` (max_tokens 0: nothing runs, no cache slot is touched)."""
    r = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 0})
    return _json(r)["usage"]["prompt_tokens"]


async def metrics(client: httpx.AsyncClient) -> dict:
    """The engine counters of GET /metrics (names without codellama_rt_ and _total)."""
    text = (await client.get("/metrics")).text
    out = {}
    for name in METRICS:
        m = re.search(rf"^codellama_rt_{name}_total (\S+)$", text, re.M)
        out[name] = float(m.group(1)) if m else None
    return out


def delta(after: dict, before: dict) -> dict:
    return {k: None if after[k] is None or before[k] is None else after[k] - before[k] for k in after}


def pct(values: list, q: float):
    """The q-th percentile (0..100, linear between ranks) of `values`; None when empty."""
    v = sorted(x for x in values if x is not None)
    if not v:
        return None
    k = (len(v) - 1) * q / 100
    lo = int(k)
    return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (k - lo)


# ---- scenarios ------------------------------------------------------------------------------------

async def concurrency(client: httpx.AsyncClient, n: int, max_tokens: int) -> dict:
    prompts = [PROMPTS[i % len(PROMPTS)] + ("" if i < len(PROMPTS) else f"  # {i}") for i in range(n)]
    await complete(client, "def warm_up():", max_tokens)  # the first request allocates the cache
    m0 = await metrics(client)
    t0 = time.perf_counter()
    seq = [await complete(client, p, max_tokens) for p in prompts]
    t1 = time.perf_counter()
    m1 = await metrics(client)
    conc = await asyncio.gather(*(complete(client, p, max_tokens) for p in prompts))
    t2 = time.perf_counter()
    m2 = await metrics(client)
    mismatches = [i for i, (a, b) in enumerate(zip(seq, conc)) if a["text"] != b["text"]]
    seq_s, conc_s = t1 - t0, t2 - t1
    return {"requests": n, "max_tokens": max_tokens, "sequential_s": seq_s, "concurrent_s": conc_s,
            "ratio": seq_s / conc_s, "tokens_sequential": sum(r["completion_tokens"] for r in seq),
            "tokens_concurrent": sum(r["completion_tokens"] for r in conc), "texts_matched": n - len(mismatches),
            "mismatches": [{"index": i, "prompt": prompts[i], "sequential": seq[i]["text"],
                            "concurrent": conc[i]["text"]} for i in mismatches],
            "metrics_sequential": delta(m1, m0), "metrics_concurrent": delta(m2, m1)}


def python_file(seed: int, functions: int) -> str:
    """A deterministic synthetic Python module; files of different seeds differ from their first line on."""
    lines = [f'"""Helpers of module m{seed}: arithmetic on small integers, generated for benchmarks."""', ""]
    for k in range(functions):
        a, b = (seed * 31 + k * 7) % 97, (seed * 17 + k * 13) % 89
        lines += [f"def m{seed}_helper_{k}(x, y):", f'    """Combine x and y with the constants {a} and {b}."""',
                  f"    total = x * {a} + y * {b}", f"    if total % {b + 2} == 0:", f"        return total // {b + 2}",
                  "    return total - x", ""]
    return "\n".join(lines) + "\n"


async def sized_file(client: httpx.AsyncClient, seed: int, target: int) -> tuple[str, int]:
    """(python_file(seed, n), its token count) with n chosen so the count is about `target` (at least)."""
    probe = 8
    per = await prompt_tokens(client, python_file(seed, probe)) / probe
    n = max(1, math.ceil(target / per))
    text = python_file(seed, n)
    return text, await prompt_tokens(client, text)


async def prefix(client: httpx.AsyncClient, tokens: int, samples: int, max_tokens: int) -> dict:
    tails = [f"def m_tail_{j}(values):\n    " for j in range(samples + 1)]
    shared, shared_tokens = await sized_file(client, 0, tokens)
    models = (await client.get("/v1/models")).json()["data"]
    context = models[0].get("max_model_len") if models else None
    need = shared_tokens + 16 + max_tokens
    if context is not None and need > context:
        raise SystemExit(f"the prefix scenario needs {need} tokens of context; the server has {context} (lower "
                         "--prefix-tokens, or start the server with a larger --max-seq-len)")
    warm_up, _ = await sized_file(client, 10_000, tokens)
    await stream(client, warm_up + tails[0], max_tokens)  # grows the KV cache to a long prompt's size
    cold_files = [(await sized_file(client, 1 + i, tokens))[0] for i in range(samples)]
    m0 = await metrics(client)
    cold = [await stream(client, f + tails[0], max_tokens) for f in cold_files]
    m1 = await metrics(client)
    await stream(client, shared + tails[0], max_tokens)  # the shared file's first (cold) request
    m2 = await metrics(client)
    warm = [await stream(client, shared + tails[1 + j], max_tokens) for j in range(samples)]
    m3 = await metrics(client)
    cold_ttft = statistics.median(r["ttft"] for r in cold)
    warm_ttft = statistics.median(r["ttft"] for r in warm)
    return {"prefix_tokens": shared_tokens, "samples": samples, "max_tokens": max_tokens,
            "ttft_cold_s": [r["ttft"] for r in cold], "ttft_warm_s": [r["ttft"] for r in warm],
            "ttft_cold_median_s": cold_ttft, "ttft_warm_median_s": warm_ttft, "ratio": cold_ttft / warm_ttft,
            "metrics_cold": delta(m1, m0), "metrics_warm": delta(m3, m2),
            "prefix_reused_tokens_warm": delta(m3, m2)["prefix_reused_tokens"]}


async def load_level(client: httpx.AsyncClient, clients: int, requests: int, seconds: float,
                     max_tokens: int) -> dict:
    """`clients` closed-loop streaming clients until `requests` were sent or `seconds` passed."""
    results, sent = [], 0
    t0 = time.perf_counter()
    deadline = t0 + seconds

    async def worker() -> None:
        nonlocal sent
        while sent < requests and time.perf_counter() < deadline:
            i = sent
            sent += 1
            results.append(await stream(client, f"# request {i}\n{PROMPTS[i % len(PROMPTS)]}", max_tokens))

    m0 = await metrics(client)
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - t0
    m1 = await metrics(client)
    tokens = sum(r["completion_tokens"] for r in results)
    ttft = [r["ttft"] for r in results]
    return {"clients": clients, "requests": len(results), "wall_s": wall, "requests_per_s": len(results) / wall,
            "tokens": tokens, "tokens_per_s": tokens / wall, "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "tpot_p50_s": pct([r["tpot"] for r in results], 50), "metrics": delta(m1, m0)}


async def run(url: str, a) -> dict:
    timeout = httpx.Timeout(a.timeout, connect=10.0)
    limits = httpx.Limits(max_connections=max(64, max(a.load_levels) + 8), max_keepalive_connections=64)
    out = {}
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits, trust_env=False) as client:
        models = (await client.get("/v1/models")).json()["data"]
        out["server_model"] = models[0] if models else None
        if "concurrency" in a.scenarios:
            out["concurrency"] = await concurrency(client, a.requests, a.max_tokens)
        if "prefix" in a.scenarios:
            out["prefix"] = await prefix(client, a.prefix_tokens, a.prefix_samples, a.prefix_max_tokens)
        if "load" in a.scenarios:
            out["load"] = [await load_level(client, c, a.load_requests, a.load_seconds, a.load_max_tokens)
                           for c in a.load_levels]
        out["metrics_end"] = await metrics(client)
    return out


# ---- command line -----------------------------------------------------------------------------------

def _levels(text: str) -> list:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers >= 1")
    return levels


def _scenarios(text: str) -> list:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in names if x not in ("concurrency", "prefix", "load")]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: expected some of concurrency,prefix,load")
    return names


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenarios", type=_scenarios, default=["concurrency", "prefix", "load"])
    p.add_argument("--url", default=None, help="a running server (loopback only); default: start one")
    p.add_argument("--max-batch-size", type=int, default=8, help="the own server's --max-batch-size (default 8)")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="a further flag for the own server, e.g. --server-arg=--max-seq-len=2048 (repeatable)")
    p.add_argument("--requests", type=int, default=8, help="concurrency: distinct requests (default 8)")
    p.add_argument("--max-tokens", type=int, default=64, help="concurrency: max_tokens (default 64)")
    p.add_argument("--prefix-tokens", type=int, default=800, help="prefix: shared prefix length, at least "
                   "(whole synthetic functions; default 800)")
    p.add_argument("--prefix-samples", type=int, default=3, help="prefix: cold and warm samples each (default 3)")
    p.add_argument("--prefix-max-tokens", type=int, default=4, help="prefix: max_tokens (default 4)")
    p.add_argument("--load-levels", type=_levels, default=[1, 4, 16], help="load: client counts (default 1,4,16)")
    p.add_argument("--load-requests", type=int, default=40, help="load: most requests per level (default 40)")
    p.add_argument("--load-seconds", type=float, default=10.0, help="load: most seconds per level (default 10)")
    p.add_argument("--load-max-tokens", type=int, default=32, help="load: max_tokens (default 32)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default 300)")
    p.add_argument("--out", type=Path, default=None, help="write the JSON here (default: stdout)")
    a = p.parse_args(argv)
    for name in ("requests", "max_tokens", "prefix_tokens", "prefix_samples", "prefix_max_tokens",
                 "load_requests", "load_max_tokens", "max_batch_size"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.url is not None:
        a.url = check_loopback(a.url)
    return a


def table(doc: dict) -> str:
    rows = []
    if c := doc.get("concurrency"):
        rows.append(f"concurrency: {c['requests']} x {c['max_tokens']} tokens: sequential {c['sequential_s']:.2f} s, "
                    f"concurrent {c['concurrent_s']:.2f} s, ratio {c['ratio']:.2f}x (bar {BARS['concurrency_ratio']}x)"
                    f", texts matched {c['texts_matched']}/{c['requests']}")
    if p := doc.get("prefix"):
        rows.append(f"prefix: {p['prefix_tokens']} tokens: TTFT cold {p['ttft_cold_median_s'] * 1e3:.1f} ms, warm "
                    f"{p['ttft_warm_median_s'] * 1e3:.1f} ms, ratio {p['ratio']:.2f}x (bar {BARS['prefix_ttft_ratio']}"
                    f"x), prefix_reused_tokens +{p['prefix_reused_tokens_warm']:.0f} over {p['samples']} warm")
    if levels := doc.get("load"):
        rows.append("load: clients  requests  req/s   tok/s   TTFT p50  TTFT p99  tok-lat p50")
        for r in levels:
            ms = [f"{x * 1e3:7.1f} ms" if x is not None else "      n/a" for x in
                  (r["ttft_p50_s"], r["ttft_p99_s"], r["tpot_p50_s"])]
            rows.append(f"      {r['clients']:7d}  {r['requests']:8d}  {r['requests_per_s']:5.2f}  "
                        f"{r['tokens_per_s']:6.1f}  {ms[0]}  {ms[1]}  {ms[2]}")
    return "\n".join(rows)


def main(argv=None) -> dict:
    a = parse(argv)
    from codellama_rt.bench.common import emit_json, environment, loadavg
    from codellama_rt.bench.serve_process import ServeProcess

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # exit through the finally that kills the server
    meta = {**environment(), "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}}
    if a.url is not None:
        meta["server"] = {"url": a.url, "started_here": False}
        doc = asyncio.run(run(a.url, a))
    else:
        args = ["--max-batch-size", str(a.max_batch_size), *a.server_arg]
        with ServeProcess(args) as server:
            url = server.wait_ready(START_TIMEOUT)
            meta["server"] = {"url": url, "started_here": True, "args": args}
            doc = asyncio.run(run(url, a))
    meta["loadavg_end"] = loadavg()
    bars = {}
    if "concurrency" in doc:
        bars["concurrency_ratio"] = {"value": doc["concurrency"]["ratio"], "bar": BARS["concurrency_ratio"],
                                     "met": doc["concurrency"]["ratio"] >= BARS["concurrency_ratio"]}
    if "prefix" in doc:
        bars["prefix_ttft_ratio"] = {"value": doc["prefix"]["ratio"], "bar": BARS["prefix_ttft_ratio"],
                                     "met": doc["prefix"]["ratio"] >= BARS["prefix_ttft_ratio"]}
    doc = {"meta": meta, "bars": bars, **doc}
    emit_json(doc, a.out)
    print(table(doc), file=sys.stderr)
    return doc


if __name__ == "__main__":
    main()
