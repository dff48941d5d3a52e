"""`codellama-rt serve` as a real subprocess on 127.0.0.1 (the embedded default model), driven by the
official openai client and httpx: its greedy text equals the library's, streams concatenate to the
same text, errors come back in OpenAI's shape (and the server goes on serving), /metrics counts what
happened, and a client that goes away cancels its request."""
from __future__ import annotations

import contextlib
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import codellama_rt
from codellama_rt.bench.serve_process import ServeProcess

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

NAME = "tiny-code"
KEY = "sekrit-key"
START_TIMEOUT = 180  # seconds for a server to load the model and listen
PROMPT = "def fibonacci(n):"


def served(*args: str) -> ServeProcess:
    """A `codellama-rt serve` subprocess on 127.0.0.1 serving NAME, ready (its URL in `.url`)."""
    s = ServeProcess(["--served-model-name", NAME, *args])
    s.wait_ready(START_TIMEOUT)
    return s


@pytest.fixture(scope="module")
def server():
    s = served("--max-batch-size", "8")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def small():
    """Two slots, one queue place, an API key."""
    s = served("--max-batch-size", "2", "--max-queue", "1", "--api-key", KEY)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def model():
    return codellama_rt.load()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def metrics(http, headers=None) -> dict:
    """The /metrics samples without labels, name -> value."""
    r = http.get("/metrics", headers=headers)
    assert r.status_code == 200
    out = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def sse_events(response) -> list:
    """The `data:` payloads of an SSE response (JSON decoded; '[DONE]' kept as the string)."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


# ---- equality with the library ------------------------------------------------------------

def test_empty_prompt_completes_from_bos_as_generate_does(client, model):
    r = client.completions.create(model=NAME, prompt="", max_tokens=8, temperature=0)
    assert r.choices[0].text == model.generate("", max_new_tokens=8).text and r.usage.prompt_tokens == 1


def test_greedy_completion_equals_generate(client, model):
    r = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=24, temperature=0)
    expected = model.generate(PROMPT, max_new_tokens=24)
    assert r.choices[0].text == expected.text
    assert r.choices[0].finish_reason == ("length" if expected.finish_reason == "length" else "stop")
    prompt_tokens = len(model.tokenizer.encode(PROMPT))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt_tokens, len(expected.token_ids))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_token_id_prompt_and_echo(client, model):
    ids = model.tokenizer.encode(PROMPT)
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=8, temperature=0, echo=True)
    assert r.choices[0].text == model.tokenizer.decode(ids) + model.generate(ids, max_new_tokens=8).text


def test_suffix_equals_infill(client, model):
    prefix, suffix = "def add(a, b):\n    ", "\n    return c\n"
    r = client.completions.create(model=NAME, prompt=prefix, suffix=suffix, max_tokens=24, temperature=0)
    assert r.choices[0].text == model.infill(prefix, suffix, max_new_tokens=24).text


def test_stream_concatenates_to_the_text(client):
    kw = dict(model=NAME, prompt=PROMPT, max_tokens=24, temperature=0)
    whole = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 24


def test_chat_equals_library_and_streams(client, model):
    messages = [{"role": "system", "content": "Answer with code."}, {"role": "user", "content": "Sort a list."}]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0)
    text = r.choices[0].message.content
    assert r.choices[0].message.role == "assistant"
    assert text == model.chat(messages, max_new_tokens=20).text
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text


def test_infill_endpoint_equals_library(http, model):
    prefix, suffix = "def area(r):\n    ", "\n    return a\n"
    expected = model.infill(prefix, suffix, max_new_tokens=20)
    r = http.post("/infill", json={"input_prefix": prefix, "input_suffix": suffix, "n_predict": 20,
                                   "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["content"] == expected.text and body["stop"] is True
    assert body["tokens_predicted"] == len(expected.token_ids)
    assert body["tokens_evaluated"] == len(model.tokenizer.encode_infill(prefix, suffix))
    with http.stream("POST", "/infill", json={"input_prefix": prefix, "input_suffix": suffix, "n_predict": 20,
                                              "temperature": 0, "stream": True}) as s:
        events = sse_events(s)
    assert all(e["stop"] is False for e in events[:-1]) and events[-1]["stop"] is True
    assert "".join(e["content"] for e in events) == expected.text


def test_infill_extra_context_and_prompt(http, model):
    extra = [{"filename": "util.py", "text": "def helper():\n    return 1\n"}]
    r = http.post("/infill", json={"input_prefix": "x = ", "prompt": "help", "input_suffix": "\n",
                                   "input_extra": extra, "n_predict": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    prefix = "# util.py\ndef helper():\n    return 1\nx = help"
    assert r.json()["content"] == model.infill(prefix, "\n", max_new_tokens=8).text


@pytest.mark.slow
def test_concurrent_greedy_requests_equal_sequential(client, model):
    prompts = [f"def f{i}(x):\n    return x + {i}" for i in range(8)]
    expected = [model.generate(p, max_new_tokens=16).text for p in prompts]

    def one(p):
        return client.completions.create(model=NAME, prompt=p, max_tokens=16, temperature=0).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, prompts, timeout=300))
    assert got == expected


def test_n_choices_with_seed(client):
    kw = dict(model=NAME, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=7)
    r = client.completions.create(n=3, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    # choice i samples with seed + i
    assert r.choices[1].text == client.completions.create(**{**kw, "seed": 8}).choices[0].text
    # past the last 64-bit seed it wraps around to 0
    r = client.completions.create(n=2, **{**kw, "seed": 2 ** 64 - 1})
    assert r.choices[1].text == client.completions.create(**{**kw, "seed": 0}).choices[0].text


# ---- logprobs -----------------------------------------------------------------------------

def test_completion_logprobs_greedy_consistent(client):
    r = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=3)
    c = r.choices[0]
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 12
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert token in top and top[token] == value
        assert value == max(top.values()) and value <= 0
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    if not any(t.startswith("bytes:") for t in lp.tokens):
        assert "".join(lp.tokens) == c.text


def test_streamed_text_offsets_equal_the_plain_ones_when_a_stop_string_holds_text_back(client):
    """A stop string whose start matches the end of the text holds those characters back from a chunk; the
    streamed offsets are still those of the whole text (they were counted from the characters sent)."""
    kw = dict(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=1)
    plain = client.completions.create(**kw).choices[0]
    cut = plain.logprobs.text_offset[6]  # the text before token 6: its last two characters start the stop string
    stop = plain.text[cut - 2:cut] + "\x07"  # (never generated: a partial match only)
    want = client.completions.create(**kw, stop=[stop]).choices[0].logprobs.text_offset
    got = []
    for chunk in client.completions.create(**kw, stop=[stop], stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            got += chunk.choices[0].logprobs.text_offset
    assert got == want == plain.logprobs.text_offset


def test_text_offsets_of_byte_pieces_point_at_their_character(model):
    """The pieces of a character spelled in bytes all sit where the character starts (a partial UTF-8
    sequence is no character yet): offsets never go back."""
    from codellama_rt.server.logprobs import text_offsets

    ids = model.tokenizer.encode("s = '\U0001F600\u00e9'", add_bos=False)  # ' s', ' =', " '", 4 + 2 bytes, "'"
    assert len(ids) == 10 and text_offsets(model.tokenizer, ids, 3) == [3, 5, 7, 9, 9, 9, 9, 10, 10, 11]


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob


# ---- errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 2}, "top_p"),
    ({"prompt": "x", "max_tokens": 5000}, "max_tokens"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "logprobs": 6}, "logprobs"),
    ({"prompt": []}, "prompt"),
    ({"prompt": "a = 1\n" * 400}, "prompt"),
    ({"prompt": "x", "stop": 3}, "stop"),
    ({"prompt": "x", "stream": True, "stream_options": "yes"}, "stream_options"),
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ({"prompt": "x", "model": "gpt-4"}, "model"),
    ({"prompt": "x", "speculate": "ngram"}, "speculate"),
    ({"prompt": "x", "speculate": "draft"}, "speculate"),  # this server has no draft model
    ({"prompt": "x", "speculate": "lookup", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"prompt": "x", "stream_options": {"include_usage": "yes"}}, "stream_options"),
    ({"prompt": "x", "logit_bias": {"1": 100}}, "logit_bias"),
    ({"prompt": "x", "model": 123}, "model"),
])
def test_bad_completion_request_is_400(http, body, param):
    r = http.post("/v1/completions", json=body)
    assert r.status_code == (404 if body.get("model") == "gpt-4" else 400), r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"


def test_bad_chat_and_infill_requests_are_400(http):
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                "max_tokens": 4000})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = http.post("/infill", json={"input_prefix": "x", "n_predict": 5000})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n_predict"


@pytest.mark.parametrize("extra, param", [
    ({"messages": [{"role": ["user"], "content": "x"}]}, "messages"),
    ({"messages": [{"role": {"a": 1}, "content": "x"}]}, "messages"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"logit_bias": {"1": 100}}, "logit_bias"),
    ({"max_tokens": -1, "max_completion_tokens": 2}, "max_tokens"),
])
def test_chat_fields_it_cannot_honour_are_400(http, extra, param):
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1, **extra}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    neutral = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1, "tool_choice": "none",
               "response_format": {"type": "text"}, "logit_bias": {}, "functions": []}
    assert http.post("/v1/chat/completions", json=neutral).status_code == 200


def test_infill_names_its_own_fields(http):
    r = http.post("/infill", json={"input_prefix": "x", "n_predict": 1, "repeat_penalty": "a"})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "repeat_penalty" and "repeat_penalty=" in error["message"]


def test_a_refused_stream_leaves_nothing_running(http):
    """Every check comes before a request is submitted: a 400 leaves no generation behind."""
    before = metrics(http)["codellama_rt_requests_total"]
    for body in ({"stream_options": "x"}, {"stream_options": {"include_usage": 1}}):
        r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 600, "stream": True, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                    "max_tokens": 600, "stream": True, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"
    after = metrics(http)
    assert after["codellama_rt_requests_total"] == before and after["codellama_rt_requests_running"] == 0


def test_deeply_nested_json_is_400(http):
    deep = '{"prompt": "x", "junk": ' + "[" * 5000 + "]" * 5000 + "}"
    r = http.post("/v1/completions", content=deep.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_malformed_json_unknown_route_and_large_body(http, client):
    r = http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = http.get("/v1/nothing")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = http.post("/v1/completions", content=b'{"prompt": "' + b"x" * (5 << 20) + b'"}')
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    # still serving
    assert client.completions.create(model=NAME, prompt="x", max_tokens=2, temperature=0).choices[0].text is not None


def test_models_and_health(client, http):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    r = http.get("/v1/models/gpt-4")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert http.get("/health").json() == {"status": "ok"}
    assert http.head("/health").status_code == 200


def test_api_key(small):
    with httpx.Client(base_url=small.url, timeout=60) as h:
        assert h.get("/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = h.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert h.get("/metrics").status_code == 401
    bad = openai.OpenAI(base_url=small.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=NAME, prompt="x", max_tokens=1)
    good = openai.OpenAI(base_url=small.url + "/v1", api_key=KEY, max_retries=0)
    assert good.completions.create(model=NAME, prompt="x", max_tokens=2, temperature=0).usage.completion_tokens == 2


# ---- metrics and cancellation ---------------------------------------------------------------

def test_metrics_count_prefix_reuse(http, client):
    before = metrics(http)
    shared = "import os\nimport sys\n\n\ndef main(argv):\n    parser = make_parser()\n"
    for tail in ("    args = parser.parse", "    return run("):
        client.completions.create(model=NAME, prompt=shared + tail, max_tokens=4, temperature=0)
    after = metrics(http)
    for name in ("requests_total", "rejected_total", "failed_total", "cancelled_total", "prompt_tokens_total",
                 "generated_tokens_total", "prefix_reused_tokens_total", "requests_waiting", "requests_running",
                 "time_to_first_token_seconds_count", "time_per_output_token_seconds_count"):
        assert f"codellama_rt_{name}" in after
    assert after["codellama_rt_requests_total"] - before["codellama_rt_requests_total"] == 2
    assert after["codellama_rt_prefix_reused_tokens_total"] > before["codellama_rt_prefix_reused_tokens_total"]
    assert after["codellama_rt_generated_tokens_total"] - before["codellama_rt_generated_tokens_total"] == 8


def test_speculative_request_equals_plain_and_is_counted(http, client, model):
    """`speculate` (an extension field, sent through the client's extra_body): the same text as the library's
    plain greedy generation; /metrics counts the verify passes and the proposed and accepted ids."""
    prompt = "for i in range(10):\n    print(i)\nfor i in range(10):\n"
    before = metrics(http)
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=32, temperature=0,
                                  extra_body={"speculate": "lookup", "num_speculative_tokens": 4})
    assert r.choices[0].text == model.generate(prompt, max_new_tokens=32).text
    after = metrics(http)
    passes = after["codellama_rt_verify_steps_total"] - before["codellama_rt_verify_steps_total"]
    proposed = after["codellama_rt_speculative_proposed_tokens_total"] - \
        before["codellama_rt_speculative_proposed_tokens_total"]
    accepted = after["codellama_rt_speculative_accepted_tokens_total"] - \
        before["codellama_rt_speculative_accepted_tokens_total"]
    assert passes >= 1 and 0 <= accepted <= proposed <= 4 * passes


def test_usage_reports_cached_prompt_tokens_once_per_prompt(http, client, model):
    """A prompt sharing a long prefix with the one before reports the reused tokens in
    usage.prompt_tokens_details.cached_tokens, streamed or not, counted once however many choices (n)."""
    shared = "def load_settings(path):\n    with open(path) as f:\n        data = json.load(f)\n"
    client.completions.create(model=NAME, prompt=shared + "    return data", max_tokens=2, temperature=0)
    r = client.completions.create(model=NAME, prompt=shared + "    if not data:", max_tokens=2, temperature=0)
    cached = r.usage.prompt_tokens_details.cached_tokens
    assert 20 < cached < r.usage.prompt_tokens
    r = client.completions.create(model=NAME, prompt=shared + "    for key in", max_tokens=2, temperature=0.8,
                                  n=3, seed=1)
    assert 20 < r.usage.prompt_tokens_details.cached_tokens < r.usage.prompt_tokens
    body = {"model": NAME, "prompt": shared + "    keys = ", "max_tokens": 2, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/completions", json=body) as resp:
        [final] = [e for e in sse_events(resp) if isinstance(e, dict) and e.get("usage")]
    assert 20 < final["usage"]["prompt_tokens_details"]["cached_tokens"] < final["usage"]["prompt_tokens"]
    chat = [{"role": "user", "content": "Write a function that adds two numbers."}]
    client.chat.completions.create(model=NAME, messages=chat, max_tokens=2, temperature=0)
    body = {"model": NAME, "messages": chat, "max_tokens": 2, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        [final] = [e for e in sse_events(resp) if isinstance(e, dict) and e.get("usage")]
    assert final["usage"]["prompt_tokens_details"]["cached_tokens"] == final["usage"]["prompt_tokens"] - 1


def _wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


@pytest.mark.slow
def test_abandoned_streams_are_cancelled_and_free_their_slots(small):
    auth = {"Authorization": f"Bearer {KEY}"}
    long = {"prompt": PROMPT, "max_tokens": 900, "temperature": 0, "stream": True}
    with httpx.Client(base_url=small.url, timeout=60, headers=auth) as h:
        cancelled = metrics(h)["codellama_rt_cancelled_total"]
        for _ in range(2):  # two slots: each stream abandoned after its first token
            with h.stream("POST", "/v1/completions", json=long) as s:
                assert s.status_code == 200
                next(line for line in s.iter_lines() if line.startswith("data: "))
        assert _wait_for(lambda: metrics(h)["codellama_rt_cancelled_total"] >= cancelled + 2)
        started = time.monotonic()
        r = h.post("/v1/completions", json={"prompt": "x", "max_tokens": 16, "temperature": 0})
        elapsed = time.monotonic() - started
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16
    assert elapsed < 10  # 2 x 900 tokens would take far longer on any machine this runs on


@pytest.mark.slow
def test_full_queue_is_429(small):
    auth = {"Authorization": f"Bearer {KEY}"}
    long = {"prompt": PROMPT, "max_tokens": 900, "temperature": 0, "stream": True}
    with httpx.Client(base_url=small.url, timeout=60, headers=auth) as h:
        # idle: 2 free slots and 1 queue place take 3 choices at once (free slots are no queue)
        r = h.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "n": 3, "seed": 1})
        assert r.status_code == 200 and len(r.json()["choices"]) == 3
        with contextlib.ExitStack() as streams:
            for running, waiting in ((1, 0), (2, 0), (2, 1)):  # fill both slots, then the queue's one place
                s = streams.enter_context(h.stream("POST", "/v1/completions", json=long))
                assert s.status_code == 200
                assert _wait_for(lambda: (metrics(h)["codellama_rt_requests_running"],
                                          metrics(h)["codellama_rt_requests_waiting"]) == (running, waiting))
            r = h.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
            assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        assert _wait_for(lambda: metrics(h)["codellama_rt_requests_running"] == 0)
        assert metrics(h)["codellama_rt_rejected_total"] >= 1
        assert h.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_more_choices_than_slots_and_queue_is_400_not_429(small):
    """2 slots + 1 queue place: 4 choices at once could never be admitted, so no retry would help."""
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=small.url, timeout=60, headers=auth) as h:
        r = h.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "n": 4})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n" and "at most 3" in r.text
        r = h.post("/v1/completions", json={"prompt": ["x"] * 4, "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_a_client_gone_while_sending_its_body_is_quiet(small):
    import socket

    host, port = small.url.removeprefix("http://").rsplit(":", 1)
    for _ in range(4):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 1000\r\n\r\n{\"prompt\"")
    time.sleep(1.0)  # (the server notices each disconnect on its own)
    with httpx.Client(base_url=small.url, timeout=60) as h:
        assert h.get("/health").status_code == 200
    assert "internal error" not in small.stderr and "Traceback" not in small.stderr


@pytest.mark.slow
def test_abandoned_plain_request_is_cancelled(small):
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=small.url, timeout=60, headers=auth) as h:
        cancelled = metrics(h)["codellama_rt_cancelled_total"]
        # gives up (closing the connection) long before 900 tokens (~0.45 s here with the native CPU decode step)
        with pytest.raises(httpx.ReadTimeout):
            h.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 900, "temperature": 0},
                   timeout=httpx.Timeout(10.0, read=0.15))
        assert _wait_for(lambda: metrics(h)["codellama_rt_cancelled_total"] >= cancelled + 1)
        assert _wait_for(lambda: metrics(h)["codellama_rt_requests_running"] == 0)
    assert "internal error" not in small.stderr and "Traceback" not in small.stderr  # a quiet 499


# ---- failures inside the server (in-process app) --------------------------------------------

@pytest.fixture
def app_client(model):
    from fastapi.testclient import TestClient

    from codellama_rt.server.app import create_app

    with TestClient(create_app(model, served_model_name=NAME), raise_server_exceptions=False) as c:
        yield c
    # the engine's loop thread idle again before the next test (or the interpreter's exit)
    assert _wait_for(lambda: not model.engine.driver.alive(), timeout=30)


def test_unexpected_error_is_500_and_the_app_goes_on(app_client, model, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    with monkeypatch.context() as m:
        m.setattr(model.engine, "submit_many", broken)
        r = app_client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "server_error" and "boom" in r.json()["error"]["message"]
    assert app_client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_failure_mid_stream_sends_an_error_event_and_ends(app_client, model, monkeypatch):
    submit_many = model.engine.submit_many

    def failing_after_one_event(prompts, params, stop_tokens, *, logprobs, sinks):
        def failing(sink):
            seen = []

            def sink2(event):
                seen.append(event)
                if len(seen) == 1:
                    sink(event)
                elif len(seen) == 2:
                    sink(FloatingPointError("logits are not finite"))
            return sink2

        return submit_many(prompts, params, stop_tokens, logprobs=logprobs, sinks=[failing(s) for s in sinks])

    monkeypatch.setattr(model.engine, "submit_many", failing_after_one_event)
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True}
    with app_client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        events = sse_events(r)
    assert "choices" in events[0]
    assert events[-1]["error"]["type"] == "server_error" and "not finite" in events[-1]["error"]["message"]
    assert "[DONE]" not in events
