"""The OpenAI-compatible server, live: uvicorn on 127.0.0.1 (free port) over a tiny CPU checkpoint.

The checkpoint memorised one R1-style exchange (``serve_helpers``), so greedy chat completions of
``QUESTION`` are known exactly: ``reasoning_content`` REASONING, ``content`` ANSWER, finish "stop".
"""

import asyncio
import json
import re
import sys
import time
from types import SimpleNamespace

import httpx
import pytest
import torch

import nanoseek
from nanoseek.data.tokenizer import CHAT_TEMPLATE, NanoTokenizer, load_tokenizer
from nanoseek.infer import Engine
from nanoseek.infer.reasoning import ReasoningSplitter, prompt_opens_reasoning, split_reasoning
from nanoseek.infer.server import create_app
from serve_helpers import ANSWER, QUESTION, REASONING, live_server, tiny_checkpoint, wait_until

openai = pytest.importorskip("openai")

KEY = "test-key-123"
MODEL = "tiny-chat"
TIMEOUT = httpx.Timeout(60.0, connect=10.0)


pytestmark = pytest.mark.usefixtures("one_thread")


class FlakyEngine(Engine):
    """An engine whose steps can be slowed down or made to fail once (server robustness tests)."""

    delay = 0.0
    fail_next = False

    def step(self):
        if self.delay:
            time.sleep(self.delay)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("injected failure")
        return super().step()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def stack(ckpt, one_thread):
    """The main server: 8 slots, queue 64, API key required."""
    model = nanoseek.load(ckpt)
    tok = load_tokenizer(ckpt)
    engine = Engine(model, tok, max_slots=8)
    app = create_app(engine, tok, MODEL, api_key=KEY, max_queue=64)
    with live_server(app) as url:
        yield SimpleNamespace(url=url, engine=engine, tok=tok, app=app, model=model,
                              headers={"Authorization": f"Bearer {KEY}"})


@pytest.fixture(scope="module")
def small(stack):
    """A second server: 1 slot + queue 1, no key, a template that opens <think> itself, injectable faults."""
    tok = NanoTokenizer(stack.tok.backend, chat_template=CHAT_TEMPLATE.replace(
        "<|assistant|>{% endif %}", "<|assistant|><think>{% endif %}"))
    engine = FlakyEngine(stack.model, tok, max_slots=1)
    app = create_app(engine, tok, MODEL, max_queue=1)
    with live_server(app) as url:
        yield SimpleNamespace(url=url, engine=engine, tok=tok, app=app)


def client_for(stack):
    return openai.OpenAI(base_url=stack.url + "/v1", api_key=KEY, timeout=60, max_retries=0)


def http(stack, **kw):
    return httpx.Client(base_url=stack.url, headers=getattr(stack, "headers", {}), timeout=TIMEOUT, **kw)


def ask(question=QUESTION):
    return [{"role": "user", "content": question}]


def memorised_tokens(tok):
    return len(tok.encode(f"<think>{REASONING}</think>{ANSWER}<|eos|>"))


def assert_error(response, status, param=None, code=None, contains=()):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    for text in contains:
        assert text in err["message"], err
    return err


def sse_events(lines):
    """The JSON payloads of an SSE stream, and whether it ended with [DONE]."""
    payloads, done = [], False
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: "):]
        assert not done, "data after [DONE]"
        if data == "[DONE]":
            done = True
        else:
            payloads.append(json.loads(data))
    return payloads, done


# ------------------------------------------------------------------------------- reasoning splitter
FULL = "<think>\nI add two and two.\n</think>\n\nThe answer is 4."


def feed_all(parts, in_reasoning=False):
    splitter = ReasoningSplitter(in_reasoning)
    reasoning = content = ""
    for part in parts:
        r, c = splitter.feed(part)
        reasoning, content = reasoning + r, content + c
    r, c = splitter.finish()
    return reasoning + r, content + c


def test_splitter_every_two_cuts_agree_with_the_whole_text():
    want = ("I add two and two.", "The answer is 4.")
    assert split_reasoning(FULL) == want
    for i in range(len(FULL) + 1):  # every way to cut the text in three deltas, tags cut anywhere
        for j in range(i, len(FULL) + 1):
            assert feed_all([FULL[:i], FULL[i:j], FULL[j:]]) == want, (i, j)


def test_splitter_never_leaks_a_partial_tag():
    splitter = ReasoningSplitter()
    assert splitter.feed("<th") == ("", "")  # could still be <think>
    assert splitter.feed("ink>abc</th") == ("abc", "")  # "</th" held back
    assert splitter.feed("ink>x") == ("", "x")
    assert splitter.finish() == ("", "")


def test_splitter_rules():
    assert split_reasoning("no reasoning here") == (None, "no reasoning here")
    assert split_reasoning("  leading space kept") == (None, "  leading space kept")
    assert split_reasoning("answer <think>late tag</think> stays") == (None, "answer <think>late tag</think> stays")
    assert split_reasoning("<think>cut by max_tokens") == ("cut by max_tokens", "")
    assert split_reasoning("forced</think>answer", in_reasoning=True) == ("forced", "answer")
    assert split_reasoning("<th") == (None, "<th")
    assert split_reasoning("") == (None, "")
    assert prompt_opens_reasoning("<|assistant|><think>\n") and not prompt_opens_reasoning("<|assistant|>")


def test_splitter_on_a_token_stream(ckpt):
    tok = load_tokenizer(ckpt)
    ids = tok.encode(FULL)
    assert tok.token_id("<think>") in ids and tok.token_id("</think>") in ids
    deltas = [tok.decode([t]) for t in ids]  # one token per delta, as the engine streams them
    assert "".join(deltas) == FULL
    assert feed_all(deltas) == ("I add two and two.", "The answer is 4.")
    # and one character per delta, so that the tags arrive in pieces
    assert feed_all(list(FULL)) == ("I add two and two.", "The answer is 4.")


# ------------------------------------------------------------------------------- the openai client
def test_models(stack):
    client = client_for(stack)
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_completion_splits_reasoning(stack):
    client = client_for(stack)
    r = client.chat.completions.create(model=MODEL, messages=ask(), temperature=0, max_tokens=60)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == ANSWER
    assert choice.message.reasoning_content == REASONING
    assert choice.finish_reason == "stop"
    prompt = stack.tok.encode(stack.tok.apply_chat_template(ask(), add_generation_prompt=True))
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == memorised_tokens(stack.tok)  # the EOS that stopped it counts
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")


def test_chat_stream_reassembles_with_usage(stack):
    client = client_for(stack)
    chunks = list(client.chat.completions.create(model=MODEL, messages=ask(), temperature=0, max_tokens=60,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    content = "".join(c.choices[0].delta.content or "" for c in with_choices)
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in with_choices)
    assert (reasoning, content) == (REASONING, ANSWER)
    # the reasoning comes entirely before the answer
    deltas = [c.choices[0].delta for c in with_choices]
    kinds = ["r" if getattr(d, "reasoning_content", None) else "c"
             for d in deltas if d.content or getattr(d, "reasoning_content", None)]
    assert kinds == sorted(kinds, reverse=True) and "r" in kinds and "c" in kinds
    finishes = [c.choices[0].finish_reason for c in with_choices if c.choices[0].finish_reason]
    assert finishes == ["stop"] and with_choices[-1].choices[0].finish_reason == "stop"
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == memorised_tokens(stack.tok)
    assert len({c.id for c in chunks}) == 1


def test_raw_stream_ends_with_done(stack):
    body = {"model": MODEL, "messages": ask(), "temperature": 0, "max_tokens": 60, "stream": True}
    with http(stack) as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        payloads, done = sse_events(list(r.iter_lines()))
    assert done and all(p["object"] == "chat.completion.chunk" for p in payloads)
    assert not any("usage" in p and p["usage"] for p in payloads)  # no usage chunk unless asked


def test_forced_reasoning_template(small):
    """A template ending in <think>: the reply starts inside the reasoning (DeepSeek-R1's template does this)."""
    client = openai.OpenAI(base_url=small.url + "/v1", api_key="unused", timeout=60, max_retries=0)
    r = client.chat.completions.create(model=MODEL, messages=ask(), temperature=0, max_tokens=60)
    assert (r.choices[0].message.reasoning_content, r.choices[0].message.content) == (REASONING, ANSWER)
    chunks = list(client.chat.completions.create(model=MODEL, messages=ask(), temperature=0, max_tokens=60,
                                                 stream=True))
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert (reasoning, content) == (REASONING, ANSWER)


def test_completions(stack):
    client = client_for(stack)
    kw = dict(model=MODEL, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    r = client.completions.create(prompt="hello world", logprobs=0, **kw)
    choice = r.choices[0]
    assert choice.finish_reason == "length" and r.usage.completion_tokens == 5
    assert r.usage.prompt_tokens == len(stack.tok.encode("hello world"))
    assert len(choice.logprobs.token_logprobs) == 5 and all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    assert "".join(choice.logprobs.tokens) == choice.text
    # the same prompt as token ids, and streamed
    ids = stack.tok.encode("hello world")
    assert client.completions.create(prompt=ids, **kw).choices[0].text == choice.text
    chunks = list(client.completions.create(prompt="hello world", stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_completions_batch_and_n(stack):
    client = client_for(stack)
    r = client.completions.create(model=MODEL, prompt=["hello", "the quick"], n=2, max_tokens=4, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in r.choices}
    assert by_index[0] == by_index[1] and by_index[2] == by_index[3]  # greedy: n copies agree
    assert r.usage.completion_tokens == 16


def test_chat_stop_string_and_n(stack):
    client = client_for(stack)
    r = client.chat.completions.create(model=MODEL, messages=ask(), temperature=0, max_tokens=60, stop=["plus"], n=2)
    assert len(r.choices) == 2
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        assert choice.message.reasoning_content.strip() == "two" and choice.message.content == ""


def test_chat_logprobs(stack):
    client = client_for(stack)
    r = client.chat.completions.create(model=MODEL, messages=ask(), temperature=0, max_tokens=60, logprobs=True)
    entries = r.choices[0].logprobs.content
    assert len(entries) == memorised_tokens(stack.tok) - 1  # the EOS that stopped it has no entry
    assert "".join(e.token for e in entries) == f"<think>{REASONING}</think>{ANSWER}"
    assert all(e.logprob <= 0 for e in entries)


# ------------------------------------------------------------------------------- concurrency
def test_32_concurrent_streams(stack):
    async def one(client, i):
        body = {"model": MODEL, "messages": ask(f"question number {i}"), "temperature": 1.0, "seed": i,
                "max_tokens": 8, "stream": True, "stream_options": {"include_usage": True}}
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = [line async for line in r.aiter_lines()]
        payloads, done = sse_events(lines)
        assert done
        finishes = [p["choices"][0]["finish_reason"] for p in payloads if p["choices"]]
        assert finishes[-1] in ("stop", "length")
        usage = payloads[-1]["usage"]
        assert 1 <= usage["completion_tokens"] <= 8
        return usage["completion_tokens"]

    async def main():
        limits = httpx.Limits(max_connections=40)
        async with httpx.AsyncClient(base_url=stack.url, headers=stack.headers, timeout=TIMEOUT, limits=limits) as c:
            return await asyncio.wait_for(asyncio.gather(*(one(c, i) for i in range(32))), timeout=120)

    tokens = asyncio.run(main())
    assert len(tokens) == 32
    assert wait_until(lambda: stack.app.state.server.in_flight == 0, timeout=5)


# ------------------------------------------------------------------------------- errors
def _chat(**fields):
    return {"model": MODEL, "messages": ask("hi"), **fields}


BAD_REQUESTS = [
    # (id, path, body (dict → JSON, str → raw), status, param, code, words in the message)
    ("invalid-json", "/v1/chat/completions", "{not json", 400, None, "invalid_json", ()),
    ("body-is-a-list", "/v1/chat/completions", "[1, 2]", 400, None, None, ()),
    ("empty-body", "/v1/chat/completions", "", 400, None, None, ()),
    ("unknown-model", "/v1/chat/completions", _chat(model="gpt-17"), 404, "model", "model_not_found", ("gpt-17",)),
    ("unknown-model-completions", "/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model", None, ()),
    ("negative-max-tokens", "/v1/chat/completions", _chat(max_tokens=-5), 400, "max_tokens", None, ("-5",)),
    ("zero-max-tokens", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens",
     None, ("0",)),
    ("huge-max-tokens", "/v1/chat/completions", _chat(max_tokens=10**9), 400, "max_tokens",
     "context_length_exceeded", ("256", "1000000000")),
    ("huge-max-completion-tokens", "/v1/chat/completions", _chat(max_completion_tokens=100000), 400,
     "max_completion_tokens", "context_length_exceeded", ("256",)),
    ("prompt-longer-than-context", "/v1/completions", {"model": MODEL, "prompt": [20] * 300}, 400, "prompt",
     "context_length_exceeded", ("256", "300")),
    ("messages-longer-than-context", "/v1/chat/completions", _chat(messages=ask("hello " * 300)), 400, "messages",
     "context_length_exceeded", ("256",)),
    ("temperature-string", "/v1/chat/completions", _chat(temperature="hot"), 400, "temperature", None, ()),
    ("max-tokens-string", "/v1/chat/completions", _chat(max_tokens="10"), 400, "max_tokens", None, ()),
    ("max-tokens-float", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2.5}, 400, "max_tokens",
     None, ()),
    ("messages-string", "/v1/chat/completions", _chat(messages="hi"), 400, "messages", None, ()),
    ("message-without-role", "/v1/chat/completions", _chat(messages=[{"content": "hi"}]), 400, "messages", None,
     ("role",)),
    ("prompt-object", "/v1/completions", {"model": MODEL, "prompt": {"a": 1}}, 400, "prompt", None, ()),
    ("stream-string", "/v1/chat/completions", _chat(stream="yes"), 400, "stream", None, ()),
    ("missing-messages", "/v1/chat/completions", {"model": MODEL}, 400, "messages", None, ()),
    ("empty-messages", "/v1/chat/completions", _chat(messages=[]), 400, "messages", None, ()),
    ("unknown-role", "/v1/chat/completions", _chat(messages=[{"role": "tool", "content": "x"}]), 400, "messages",
     None, ("tool",)),
    ("temperature-too-high", "/v1/chat/completions", _chat(temperature=7), 400, "temperature", None, ("7",)),
    ("top-p-zero", "/v1/chat/completions", _chat(top_p=0), 400, "top_p", None, ()),
    ("n-zero", "/v1/chat/completions", _chat(n=0), 400, "n", None, ()),
    ("n-huge", "/v1/chat/completions", _chat(n=1000), 400, "n", None, ()),
    ("token-outside-vocab", "/v1/completions", {"model": MODEL, "prompt": [5, 10**6]}, 400, "prompt", None,
     ("1000000",)),
    ("empty-prompt", "/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt", None, ()),
    ("penalty", "/v1/chat/completions", _chat(presence_penalty=1.0), 400, "presence_penalty", None, ()),
    ("top-logprobs", "/v1/chat/completions", _chat(logprobs=True, top_logprobs=5), 400, "top_logprobs", None, ()),
    ("unknown-path", "/v1/embeddings", {"model": MODEL, "input": "x"}, 404, None, None, ()),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_then_a_good_one(stack, case):
    _, path, body, status, param, code, words = case
    with http(stack) as c:
        if isinstance(body, str):
            r = c.post(path, content=body.encode(), headers={"Content-Type": "application/json"})
        else:
            r = c.post(path, json=body)
        assert_error(r, status, param, code, words)
        good = c.post("/v1/chat/completions", json=_chat(max_tokens=3))
        assert good.status_code == 200, good.text


@pytest.mark.parametrize("header", [None, "Bearer wrong-key", f"Basic {KEY}", "Bearer"])
def test_api_key_required(stack, header):
    headers = {} if header is None else {"Authorization": header}
    with httpx.Client(base_url=stack.url, timeout=TIMEOUT) as c:
        for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models")):
            r = c.request(method, path, headers=headers, json=_chat(max_tokens=3))
            assert_error(r, 401, code="invalid_api_key")
        # the page and health stay open (metrics need the key: test_server_hostile); a good key works afterwards
        assert c.get("/health").status_code == 200
        ok = c.post("/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, json=_chat(max_tokens=3))
        assert ok.status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=stack.url + "/v1", api_key="nope", timeout=30, max_retries=0).models.list()


def test_wrong_method_has_the_error_shape(stack):
    with http(stack) as c:
        assert_error(c.get("/v1/chat/completions"), 405)


def test_queue_full_gives_429(small):
    small.engine.delay = 0.01  # 1 slot + queue 1: two long requests fill the server
    body = {"model": MODEL, "messages": ask("hello"), "max_tokens": 200, "ignore_eos": True, "stream": True}
    try:
        with http(small) as c:
            with c.stream("POST", "/v1/chat/completions", json=body) as r1, \
                    c.stream("POST", "/v1/chat/completions", json=body) as r2:
                readers = []  # keep the line iterators alive: dropping one closes its connection
                for r in (r1, r2):
                    assert r.status_code == 200
                    readers.append(r.iter_lines())
                    next(readers[-1])  # the role chunk: the request is in flight
                assert small.app.state.server.in_flight == 2
                err = assert_error(c.post("/v1/chat/completions", json={**body, "stream": False}), 429,
                                   code="queue_full")
                assert err["type"] == "rate_limit_error"
                assert_error(c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}), 429)
            # both streams were dropped by the client: their slots are freed and the server answers again
            assert wait_until(lambda: small.app.state.server.in_flight == 0 and small.engine.num_running == 0
                              and small.engine.num_waiting == 0, timeout=10)
            ok = c.post("/v1/chat/completions", json={"messages": ask("hi"), "max_tokens": 3})
            assert ok.status_code == 200, ok.text
    finally:
        small.engine.delay = 0.0


def test_engine_failure_is_a_500_and_the_loop_survives(small):
    with http(small) as c:
        small.engine.fail_next = True
        err = assert_error(c.post("/v1/chat/completions", json={"messages": ask(), "max_tokens": 5}), 500)
        assert err["type"] == "server_error" and "injected failure" in err["message"]
        small.engine.fail_next = True
        with c.stream("POST", "/v1/chat/completions", json={"messages": ask(), "max_tokens": 5, "stream": True}) as r:
            payloads, done = sse_events(list(r.iter_lines()))
        assert done and "injected failure" in payloads[-1]["error"]["message"]
        ok = c.post("/v1/chat/completions", json={"messages": ask(), "max_tokens": 60, "temperature": 0})
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == ANSWER
        assert c.get("/health").json()["status"] == "ok"
        assert "nanoseek_engine_errors_total 2" in c.get("/metrics").text


# ------------------------------------------------------------------------------- disconnects
def _aborted(stack):
    return stack.app.state.server.metrics.aborted


def test_client_disconnect_mid_stream_frees_the_slot(stack):
    engine = stack.engine
    finished = engine.stats.requests_finished
    aborted = _aborted(stack)
    body = {"model": MODEL, "messages": ask("hello"), "max_tokens": 240, "ignore_eos": True, "stream": True}
    with http(stack) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            seen = 0
            for line in r.iter_lines():
                if line.startswith("data: ") and '"content"' in line:
                    seen += 1
                if seen >= 4:
                    break
            assert engine.num_running == 1
        # leaving the block closed the connection mid-stream
        assert wait_until(lambda: engine.num_running == 0 and engine.num_waiting == 0, timeout=5)
    assert engine.stats.requests_finished == finished  # aborted, not run to the end
    assert _aborted(stack) == aborted + 1
    assert wait_until(lambda: stack.app.state.server.in_flight == 0, timeout=5)


def test_client_disconnect_while_waiting_for_a_whole_answer(stack):
    engine = stack.engine
    finished = engine.stats.requests_finished
    body = {"model": MODEL, "messages": ask("hello"), "max_tokens": 240, "ignore_eos": True}
    with httpx.Client(base_url=stack.url, headers=stack.headers, timeout=httpx.Timeout(0.3, connect=5)) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/chat/completions", json=body)
    assert wait_until(lambda: engine.num_running == 0 and engine.num_waiting == 0, timeout=5)
    assert engine.stats.requests_finished == finished
    assert wait_until(lambda: stack.app.state.server.in_flight == 0, timeout=5)


# ------------------------------------------------------------------------------- health, metrics, page
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="[^"]*"'
_SAMPLE = re.compile(rf'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{{{_LABEL}(,{_LABEL})*\}})? [-+0-9.eEinfINFaN]+$')


def test_health_and_metrics(stack):
    with http(stack) as c:
        assert c.post("/v1/chat/completions", json=_chat(max_tokens=4)).status_code == 200
        health = c.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for line in text.splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or _SAMPLE.match(line), line
    values = {}
    for line in text.splitlines():
        if not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values['nanoseek_requests_total{endpoint="/v1/chat/completions",status="200"}'] >= 1
    assert values["nanoseek_prompt_tokens_total"] > 0 and values["nanoseek_generation_tokens_total"] > 0
    assert values["nanoseek_queue_depth"] == 0 and values["nanoseek_running_requests"] == 0
    for hist in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds"):
        count = values[f"nanoseek_{hist}_count"]
        assert count >= 1 and values[f'nanoseek_{hist}_bucket{{le="+Inf"}}'] == count
        buckets = [v for k, v in values.items() if k.startswith(f"nanoseek_{hist}_bucket")]
        assert buckets == sorted(buckets)  # cumulative
    assert "# TYPE nanoseek_time_to_first_token_seconds histogram" in text


def test_index_page(stack):
    with httpx.Client(base_url=stack.url, timeout=TIMEOUT) as c:  # no key needed for the page
        r = c.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    for needle in ("<textarea", 'id="send"', 'id="api-key"', "/v1/chat/completions", "reasoning_content", MODEL):
        assert needle in page


# ------------------------------------------------------------------------------- the load benchmark
def _load_benchmark():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py"
    spec = importlib.util.spec_from_file_location("serve_load", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


def test_serve_load_benchmark(stack, tmp_path, capsys):
    bench = _load_benchmark()
    out = tmp_path / "load.json"
    code = bench.main(["--url", stack.url, "--api-key", KEY, "--concurrency", "4", "--num-requests", "8",
                       "--max-tokens", "6", "--ignore-eos", "--max-duration", "120", "--json", str(out)])
    assert code == 0, capsys.readouterr()
    result = json.loads(out.read_text())
    assert result["completed"] == 8 and result["errors"] == 0
    assert result["total_output_tokens"] == 8 * 6
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        assert result[key]["mean"] > 0 and result[key]["median"] > 0 and result[key]["p99"] >= result[key]["median"]
    assert result["request_throughput"] > 0 and result["output_token_throughput"] > 0
    assert "Output token throughput" in capsys.readouterr().out
    # a bad key: every request is an error, and the exit code says so
    assert bench.main(["--url", stack.url, "--api-key", "bad", "--model", MODEL, "--num-requests", "2",
                       "--max-tokens", "2", "--json", "-"]) == 1
    assert json.loads(capsys.readouterr().out)["errors"] == 2
    # only loopback servers unless --allow-remote
    assert bench.main(["--url", "http://192.0.2.1:8000", "--num-requests", "1"]) == 2
    assert bench.main(["--url", "http://example.com:8000", "--num-requests", "1"]) == 2
    assert "--allow-remote" in capsys.readouterr().err
