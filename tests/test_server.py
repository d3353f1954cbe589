"""``kvsqueeze serve``: the official ``openai`` client against a server this test starts on loopback.

The model is a tiny random llama (2 layers, head dim 32), so the whole file runs in seconds. Responses,
streamed or not, alone or decoded together in one batch, must be token-identical to ``kvsqueeze.generate``
with the same method (greedy); bad input gets a 4xx in the OpenAI error schema and the server keeps serving.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

import kvsqueeze  # noqa: E402
from kvsqueeze.cache import SqueezeCache  # noqa: E402
from kvsqueeze.methods import get_method  # noqa: E402
from kvsqueeze.models.tiny import tiny_model, tiny_tokenizer  # noqa: E402
from kvsqueeze.server import EngineConfig, HTTPLimits, build_app  # noqa: E402
from kvsqueeze.server.engine.admission import parse_bytes  # noqa: E402
from kvsqueeze.server.engine.batch import BatchedCache  # noqa: E402
from kvsqueeze.server.engine.request import GenerationRequest, RequestHandle  # noqa: E402
from kvsqueeze.server.engine.sampling import SamplingParams  # noqa: E402
from kvsqueeze.server.engine.scheduler import Engine, QueueFull  # noqa: E402

NAME = "tiny-llama"
KEY = "test-key"
PROMPT = "Tell me about key-value caches and why they grow with every token of the prompt."
# (method, budget, params) the equivalence tests run; windows small enough for the tiny prompts
METHODS = [
    ("full", 1.0, {}),
    ("snapkv", 0.5, {"window": 8}),
    ("h2o", 0.4, {}),
    ("adakv", 0.5, {"window": 8}),
    ("kivi", 1.0, {"residual": 32}),
    ("kvzip", 0.5, {}),
]


def _http(url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    """A raw request with the standard library (bodies the official client would not send)."""
    req = urllib.request.Request(
        url, data=body, headers=headers or {}, method="POST" if body is not None else "GET"
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _model():
    return tiny_model("llama", num_hidden_layers=2, head_dim=32, seed=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """A uvicorn server in a thread, on a free loopback port."""

    def __init__(self, app) -> None:
        self.port = _free_port()
        self.app = app
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def server():
    app = build_app(
        _model(),
        tiny_tokenizer(chat=True),
        model_name=NAME,
        engine=EngineConfig(kv_memory=parse_bytes("256MiB")),
        limits=HTTPLimits(api_key=KEY, max_request_bytes=64 * 1024),
        method="snapkv",
        budget=0.5,
        params={"window": 8},
        context_method="kvzip",
        max_tokens_limit=512,
    )
    srv = _Server(app)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference():
    """``kvsqueeze.generate`` on an identical model (its own instance: the server's is busy in its thread)."""
    model, tok = _model(), tiny_tokenizer(chat=True)

    def run(prompt: str, method: str, budget, params: dict, n: int, chat: bool = True):
        out = kvsqueeze.generate(model, tok, prompt, method, budget, max_new_tokens=n, chat=chat, **params)
        return out.token_ids[0].tolist(), out.text

    return run


def _extra(method: str, budget, params: dict, **more) -> dict:
    return {
        "kvsqueeze": {"method": method, "budget": budget, "params": params, "return_token_ids": True, **more}
    }


def _chat(client, prompt: str, method, budget, params, n: int, model: str = NAME, **kw):
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=n,
        temperature=0,
        extra_body=_extra(method, budget, params),
        **kw,
    )


def _stream_chat(client, prompt: str, method, budget, params, n: int):
    """Concatenated text, token ids, finish reason and usage of a streamed chat completion."""
    stream = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=n,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=_extra(method, budget, params),
    )
    text, ids, finish, usage = [], [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        extra = chunk.model_extra.get("kvsqueeze") or {}
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            if choice.finish_reason:
                finish = choice.finish_reason
            else:
                ids.extend(extra.get("token_ids", []))
    return "".join(text), ids, finish, usage


@pytest.mark.parametrize("method,budget,params", METHODS, ids=[m[0] for m in METHODS])
def test_chat_streaming_and_not_match_generate(client, reference, method, budget, params):
    ids, text = reference(PROMPT, method, budget, params, 24)
    reply = _chat(client, PROMPT, method, budget, params, 24)
    assert reply.model_extra["kvsqueeze"]["token_ids"] == ids
    assert reply.choices[0].message.content == text
    usage = reply.usage.model_extra
    assert usage["kv_cache_bytes"] > 0 and usage["kv_cache_full_bytes"] > 0
    if method in ("snapkv", "adakv", "kivi"):
        assert usage["kv_cache_bytes"] < usage["kv_cache_full_bytes"]
    streamed, stream_ids, finish, stream_usage = _stream_chat(client, PROMPT, method, budget, params, 24)
    assert stream_ids == ids
    assert streamed == text
    assert finish in ("stop", "length")
    assert stream_usage.completion_tokens == len(ids)


def test_completion_matches_generate(client, reference):
    ids, text = reference(PROMPT, "snapkv", 0.5, {"window": 8}, 20, chat=False)
    reply = client.completions.create(
        model=NAME,
        prompt=PROMPT,
        max_tokens=20,
        temperature=0,
        extra_body=_extra("snapkv", 0.5, {"window": 8}),
    )
    assert reply.model_extra["kvsqueeze"]["token_ids"] == ids
    assert reply.choices[0].text == text
    stream = client.completions.create(
        model=NAME,
        prompt=PROMPT,
        max_tokens=20,
        temperature=0,
        stream=True,
        extra_body=_extra("snapkv", 0.5, {"window": 8}),
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == text


def test_concurrent_requests_decode_together_and_match_generate(server, client, reference):
    """Mixed methods decoding in one batch, each token-identical to its own generate run."""
    engine = server.app.state.engine
    engine.peak_running = 0
    jobs = [(PROMPT[: 40 + 6 * i], *METHODS[i % len(METHODS)]) for i in range(8)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(lambda job: _chat(client, job[0], *job[1:], 40), jobs))
    for (prompt, method, budget, params), reply in zip(jobs, replies, strict=True):
        ids, _ = reference(prompt, method, budget, params, 40)
        assert reply.model_extra["kvsqueeze"]["token_ids"] == ids, method
    assert engine.peak_running >= 2  # they really ran together


def test_stop_strings_cut_the_text(client, reference):
    _, text = reference(PROMPT, "full", 1.0, {}, 30)
    stop = text[6:9]
    cut = text[: text.find(stop)]
    reply = _chat(client, PROMPT, "full", 1.0, {}, 30, stop=[stop])
    assert reply.choices[0].message.content == cut
    assert reply.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=30,
        temperature=0,
        stop=stop,
        stream=True,
        extra_body=_extra("full", 1.0, {}),
    )
    assert "".join((c.choices[0].delta.content or "") for c in stream if c.choices) == cut


def test_sampling_is_seeded(client):
    def once(seed):
        return (
            client.chat.completions.create(
                model=NAME,
                messages=[{"role": "user", "content": PROMPT}],
                max_tokens=16,
                temperature=0.9,
                top_p=0.8,
                seed=seed,
            )
            .choices[0]
            .message.content
        )

    assert once(7) == once(7)


def test_bad_input_gets_4xx_then_serving_goes_on(server, client):
    messages = [{"role": "user", "content": PROMPT}]
    cases = [
        (400, dict(extra_body={"kvsqueeze": {"method": "no-such-method"}})),
        (400, dict(extra_body={"kvsqueeze": {"method": "snapkv", "budget": 1.5}})),
        (400, dict(extra_body={"kvsqueeze": {"method": "snapkv", "budget": 2}})),  # below the method's floor
        (400, dict(n=2)),
        (400, dict(max_tokens=100_000)),
        (400, dict(messages=[{"role": "user", "content": "x" * 5000}])),  # over the model's 4096 positions
        (404, dict(model="gpt-4o")),
    ]
    for status, kw in cases:
        args = {"model": NAME, "messages": messages, "max_tokens": 8, **kw}
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(**args)
        err = info.value
        assert err.status_code == status, (kw, err)
        message = err.body["message"]
        assert message and "\n" not in message, message
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    status, raw = _http(server.url + "/v1/chat/completions", b'{"model": "tiny-llama", "messages": [', auth)
    assert status == 400 and "JSON" in json.loads(raw)["error"]["message"]
    status, _ = _http(
        server.url + "/v1/completions", json.dumps({"model": NAME, "prompt": "y" * 70_000}).encode(), auth
    )
    assert status == 413
    keyless = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        keyless.chat.completions.create(model=NAME, messages=messages, max_tokens=4)
    assert info.value.body["code"] == "invalid_api_key"
    status, _ = _http(server.url + "/v1/completions", json.dumps({"model": NAME, "prompt": "hi"}).encode())
    assert status == 401
    good = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0)
    assert good.choices[0].finish_reason in ("stop", "length")


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list()] == [NAME]
    status, health = _http(server.url + "/health")
    assert status == 200 and json.loads(health)["status"] == "ok"
    text = _http(server.url + "/metrics")[1].decode()
    for metric in (
        "kvsqueeze_kv_cache_bytes",
        "kvsqueeze_queue_depth",
        "kvsqueeze_decode_tokens_per_second",
        "kvsqueeze_requests_admitted_total",
        "kvsqueeze_requests_rejected_total",
    ):
        assert metric in text, metric


def test_context_prefix_is_compressed_once_and_reused(server, client, reference):
    system = "You answer from this document. " + "The vault code is 4821 and the door is blue. " * 6

    def ask(question: str, method: str = "kvzip", budget=0.5):
        return client.chat.completions.create(
            model=NAME,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
            max_tokens=16,
            temperature=0,
            extra_body=_extra(method, budget, {}, cache_prefix=True),
        )

    engine = server.app.state.engine
    hits = engine.prefixes.hits
    first, second, other = (
        ask("What is the code?"),
        ask("What is the code?"),
        ask("Which colour is the door?"),
    )
    assert first.usage.model_extra["prefix_cached_tokens"] == 0
    cached = second.usage.model_extra["prefix_cached_tokens"]
    assert cached > 0 and other.usage.model_extra["prefix_cached_tokens"] == cached
    assert engine.prefixes.hits == hits + 2
    assert second.model_extra["kvsqueeze"]["token_ids"] == first.model_extra["kvsqueeze"]["token_ids"]
    assert first.usage.model_extra["kv_cache_bytes"] < first.usage.model_extra["kv_cache_full_bytes"]
    # the full "compression" of a prefix is lossless: the same tokens as no prefix caching at all
    lossless = ask("What is the code?", "full", 1.0)
    plain = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": "What is the code?"}],
        max_tokens=16,
        temperature=0,
        extra_body=_extra("full", 1.0, {}),
    )
    assert lossless.model_extra["kvsqueeze"]["token_ids"] == plain.model_extra["kvsqueeze"]["token_ids"]
    with pytest.raises(openai.BadRequestError):
        ask("What is the code?", "snapkv")  # a prefix needs a query-agnostic method


# ---------------------------------------------------------------------- engine and cache, without HTTP


def test_batched_cache_decodes_mixed_methods_like_generate(reference):
    model, tok = _model(), tiny_tokenizer(chat=True)
    kvsqueeze.enable(model)
    specs = [(PROMPT[: 30 + 10 * i], *METHODS[i]) for i in range(len(METHODS))]
    caches, tokens = [], []
    with torch.inference_mode():
        for prompt, method, budget, params in specs:
            cache = SqueezeCache(model, method, budget, tokenizer=tok, **params)
            text = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]  # (1, L)
            logits = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
            caches.append(cache)
            tokens.append([int(logits.argmax())])
        for _ in range(11):
            ids = torch.tensor([[t[-1]] for t in tokens])  # (B, 1)
            positions = torch.tensor([[c.get_seq_length()] for c in caches])  # (B, 1)
            out = model(input_ids=ids, position_ids=positions, cache=BatchedCache(caches), use_cache=True)
            for t, row in zip(tokens, out.logits[:, -1], strict=True):
                t.append(int(row.argmax()))
    for (prompt, method, budget, params), got in zip(specs, tokens, strict=True):
        want, _ = reference(prompt, method, budget, params, 12)
        assert got[: len(want)] == want, method


def test_cache_copy_is_independent():
    model, tok = _model(), tiny_tokenizer()
    kvsqueeze.enable(model)
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        cache = SqueezeCache(model, "snapkv", 0.5, window=8)
        model(input_ids=ids, cache=cache, use_cache=True)
        before, rows = cache.nbytes(), cache.stored_rows().clone()
        twins = [cache.copy(), cache.copy()]
        assert twins[0].model is model and twins[0].method is cache.method
        outs = []
        for twin in twins:
            step = torch.tensor([[5]])
            outs.append(model(input_ids=step, cache=twin, use_cache=True).logits)
            assert twin.get_seq_length() == cache.get_seq_length() + 1
        torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    assert cache.nbytes() == before and torch.equal(cache.stored_rows(), rows)


def _request(n_prompt: int, max_tokens: int = 8) -> GenerationRequest:
    return GenerationRequest(
        prompt_ids=list(range(3, 3 + n_prompt)),
        method=get_method("full"),
        budget=kvsqueeze.Budget.parse(1.0),
        max_tokens=max_tokens,
        sampling=SamplingParams(temperature=0.0),
    )


def test_admission_waits_then_refuses_and_accounts_real_bytes():
    model, tok = _model(), tiny_tokenizer()
    kvsqueeze.enable(model)
    probe = Engine(model, tok, EngineConfig())
    one = probe.estimate(_request(200))
    engine = Engine(model, tok, EngineConfig(kv_memory=int(1.5 * one), max_queue=1))  # one fits, one waits
    handles = [RequestHandle(_request(200)) for _ in range(3)]
    engine.submit(handles[0])
    engine.submit(handles[1])
    with pytest.raises(QueueFull) as info:
        engine.submit(handles[2])
    assert info.value.status == 429
    assert engine.stats()["admitted"] == 1 and engine.stats()["waiting"] == 1
    with pytest.raises(Exception) as too_big:
        engine.submit(RequestHandle(_request(2000)))  # can never fit: a 400, not a wait
    assert getattr(too_big.value, "status", None) == 400
    engine.start()
    try:
        for h in handles[:2]:
            assert h.finished.wait(30)
            assert h.events[-1].kind == "done", h.events[-1]
    finally:
        engine.stop()
    assert engine.admission.reserved == 0
    real = handles[0].events[-1].usage["kv_cache_bytes"]
    assert real > 0 and engine.peak_running == 1  # the second waited for the first's memory


@pytest.mark.skipif(sys.platform != "linux", reason="signals and /proc")
def test_sigterm_finishes_the_running_request_then_exits():
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvsqueeze.cli.main",
            "serve",
            "--model",
            "tiny:llama",
            "--port",
            str(port),
            "--method",
            "full",
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 60
        while True:
            try:
                if _http(f"http://127.0.0.1:{port}/health")[0] == 200:
                    break
            except OSError:
                pass
            assert time.time() < deadline and proc.poll() is None, "server did not start"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        stream = client.completions.create(
            model="tiny:llama",
            prompt=PROMPT,
            max_tokens=300,
            temperature=0,
            stream=True,
            extra_body={"kvsqueeze": {"method": "full"}},
        )
        chunks = iter(stream)
        next(chunks)
        proc.send_signal(signal.SIGTERM)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert finish[-1] in ("stop", "length")  # the request in flight was finished
        code = proc.wait(30)
        # uvicorn re-raises the signal once it has shut down gracefully: killed by SIGTERM, after the drain
        assert code in (0, -signal.SIGTERM), code
        assert "engine stopped (1 requests completed)" in proc.stdout.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sizes_text_stream_and_sampling_units():
    from kvsqueeze.server.engine.detok import TextStream
    from kvsqueeze.server.engine.sampling import sample_token

    assert parse_bytes("4GiB") == 4 * 1024**3 and parse_bytes("1.5GB") == 1_500_000_000
    assert parse_bytes("512MiB") == 512 * 1024**2 and parse_bytes("1000") == 1000
    with pytest.raises(ValueError):
        parse_bytes("lots")
    tok = tiny_tokenizer()
    ids = tok("héllo END world", add_special_tokens=False)["input_ids"]
    stream = TextStream(tok, ["END"])
    deltas = []
    for token in ids:
        deltas.append(stream.push(token))
        if stream.stopped:
            break
    assert "".join(deltas) == "héllo " and stream.stopped  # the stop string is cut, split bytes held back
    plain = TextStream(tok, [])
    assert "".join(plain.push(t) for t in ids) + plain.finish() == "héllo END world"
    logits = torch.tensor([0.0, 5.0, 4.9, -3.0])
    assert sample_token(logits, SamplingParams(temperature=0.0), None) == 1
    narrow = SamplingParams(temperature=1.0, top_p=0.05, seed=1)
    assert {sample_token(logits, narrow, narrow.generator()) for _ in range(20)} == {1}
    with pytest.raises(ValueError):
        SamplingParams(temperature=3.0)


@pytest.mark.slow
def test_packaged_smollm2_serves_like_generate_and_caches_a_kvzap_prefix(smollm2):
    """The packaged SmolLM2: snapkv and kivi batched together equal generate; a kvzap prefix is reused."""
    model, tok = smollm2
    app = build_app(
        model, tok, model_name="smollm2-135m", method="snapkv", budget=0.25, context_method="kvzap"
    )
    srv = _Server(app)
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=600)
        document = "The vault code is 4821. " + "The archive keeps old letters and maps of the city. " * 40
        prompt = document + "What is the vault code?"
        jobs = [("snapkv", 0.25, {}), ("kivi", 1.0, {}), ("h2o", 0.2, {})]
        with ThreadPoolExecutor(len(jobs)) as pool:
            replies = list(pool.map(lambda job: _chat(client, prompt, *job, 12, model="smollm2-135m"), jobs))
        for (method, budget, params), reply in zip(jobs, replies, strict=True):
            want = kvsqueeze.generate(model, tok, prompt, method, budget, max_new_tokens=12, **params)
            assert reply.model_extra["kvsqueeze"]["token_ids"] == want.token_ids[0].tolist(), method

        def ask(question: str):
            return client.chat.completions.create(
                model="smollm2-135m",
                messages=[{"role": "system", "content": document}, {"role": "user", "content": question}],
                max_tokens=12,
                temperature=0,
                extra_body={"kvsqueeze": {"budget": 0.25, "cache_prefix": True}},
            )

        first, second = ask("What is the vault code?"), ask("What does the archive keep?")
        assert first.model_extra["kvsqueeze"]["method"] == "kvzap"
        assert first.usage.model_extra["prefix_cached_tokens"] == 0
        assert second.usage.model_extra["prefix_cached_tokens"] > 200
    finally:
        srv.close()
