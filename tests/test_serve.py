"""The OpenAI endpoint on Ray Serve, end to end: official client, equality with in-process
generation, auth, malformed requests, what a web page may do (Host, Origin, content type),
null parameters, dropped streams, and a rolling update under load.

One Serve application for the whole module (starting Serve takes ~10 s), serving the
`staging` alias of a registered model with local_tiny's architecture; the test that
moves the alias runs last.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import requests

from model import DBRX
from platform.config import load_job
from platform.data import get_tokenizer
from platform.registry import promote
from platform.serving import chat, start_serving
from platform.serving.openai_schema import ChatMessage
from platform.train.checkpointing import open_checkpoints
from platform.provision.head import free_local_port as _free_port

openai = pytest.importorskip("openai")

REPO = Path(__file__).resolve().parents[1]
API_KEY = "test-key-8f3a1c"
MODEL = "serve-test-model"
PROMPT = "def fibonacci(n):\n    "
PAGE = "http://app.test:3000"   # the one web origin the served config allows
NAME = "api.test"               # a host name it answers besides its own address


@pytest.fixture(scope="module")
def served(tmp_path_factory, empty_mlflow_db, ray_local, commit_checkpoint, random_model):
    from ray import serve

    root = tmp_path_factory.mktemp("serve")
    shutil.copy(empty_mlflow_db, root / "mlflow.db")
    cfg = load_job(REPO / "conf" / "local_tiny.yaml", [
        "name=serve-test", f"promote.registered_model={MODEL}", f"checkpoint.uri={root}/checkpoints",
        f"tracking.tracking_uri=sqlite:///{root}/mlflow.db", f"tracking.artifact_location={root}/mlartifacts",
        f"serve.port={_free_port()}", f"serve.api_key={API_KEY}", "serve.replica_cpus=0",
        "serve.num_replicas=1", "serve.max_replicas=1", "serve.alias_poll_s=0.5", "serve.max_concurrent_sequences=8",
        "serve.max_tokens_limit=64", f"serve.allowed_hosts=['{NAME}']", f"serve.allowed_origins=['{PAGE}']"])
    # Weights large enough that greedy decoding wanders through the vocabulary.
    first, second = random_model(cfg.model, 1).eval(), random_model(cfg.model, 2).eval()
    store = open_checkpoints(cfg)
    commit_checkpoint(store, first, 1)
    commit_checkpoint(store, second, 2)
    assert promote(cfg, step=1, gate=False).version == "1"
    try:
        serving = start_serving(cfg)
        yield {"cfg": cfg, "serving": serving, "models": {"1": first, "2": second}}
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def client(served):
    # No retries: every failure must show.
    return openai.OpenAI(base_url=served["serving"].base_url, api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def post(served, path: str, body=None, *, key: str | None = API_KEY, data: bytes | None = None,
         method: str = "POST", headers: dict[str, str] | None = None) -> requests.Response:
    """`body` as JSON or `data` as raw bytes (sent as application/json unless `headers` say otherwise)."""
    headers = {**({"Authorization": f"Bearer {key}"} if key else {}),
               **({"Content-Type": "application/json"} if data is not None else {}), **(headers or {})}
    return requests.request(method, served["serving"].root_url + path, json=body, data=data, headers=headers,
                            timeout=60)


def greedy_text(model: DBRX, tok, prompt_ids: list[int], max_tokens: int, stop_ids) -> tuple[str, int, str]:
    out = model.generate([prompt_ids], max_new_tokens=max_tokens, stop_tokens=stop_ids)
    return tok.decode(out.tokens[0]), len(out.tokens[0]), out.finish_reasons[0]


# ----------------------------------------------------------------------------- the official client


def test_openai_client_lists_completes_chats_and_streams(client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL

    completion = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    assert completion.object == "text_completion" and completion.model == MODEL
    assert completion.choices[0].finish_reason in ("length", "stop") and completion.choices[0].text
    assert completion.usage.prompt_tokens == len(get_tokenizer().encode(PROMPT))
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens

    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": "Be brief."},
                                                                   {"role": "user", "content": "Hello!"}],
                                           max_tokens=10, temperature=0.7, top_p=0.9, seed=4)
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens <= 10 and reply.choices[0].message.content is not None

    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == completion.choices[0].text
    assert chunks[-1].usage.completion_tokens == completion.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == completion.choices[0].finish_reason

    chat_chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello!"}], max_tokens=10, temperature=0, stream=True))
    assert chat_chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chat_chunks)
    whole = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello!"}],
                                           max_tokens=10, temperature=0)
    assert streamed == whole.choices[0].message.content


def test_greedy_and_seeded_outputs_over_http_equal_in_process_generation(served, client, tok):
    model = served["models"]["1"]
    ids = tok.encode(PROMPT)
    text, n, reason = greedy_text(model, tok, ids, 40, [tok.eos_id])
    raw = client.completions.with_raw_response.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0)
    completion = raw.parse()
    assert raw.headers["x-model-version"] == "1"
    assert completion.choices[0].text == text and len(set(text.split())) > 3
    assert completion.usage.completion_tokens == n and completion.choices[0].finish_reason == reason

    # Token-id prompts and chat go through the same engine.
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=40, temperature=0)
    assert by_ids.choices[0].text == text
    messages = [ChatMessage(role="user", content="Write a haiku about GPUs.")]
    chat_ids = chat.render_ids(messages, tok)
    chat_text, chat_n, _ = greedy_text(model, tok, chat_ids, 30, chat.stop_token_ids(tok))
    reply = client.chat.completions.create(model=MODEL, max_tokens=30, temperature=0,
                                           messages=[m.model_dump(exclude_none=True) for m in messages])
    assert reply.choices[0].message.content == chat_text and reply.usage.completion_tokens == chat_n
    assert reply.usage.prompt_tokens == len(chat_ids)

    sampling = dict(temperature=0.8, top_p=0.9, seed=1234)
    sampled = model.generate([ids], max_new_tokens=20, stop_tokens=[tok.eos_id], **sampling)
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, **sampling)
    assert got.choices[0].text == tok.decode(sampled.tokens[0])


def test_concurrent_requests_are_batched_without_changing_outputs(served, client, tok):
    prompts = [PROMPT, "Once upon a time", "import numpy as np\n", "The capital of France is",
               "SELECT * FROM", "Dear Sir,", "1, 2, 3, 5, 8,", "To be or not to be"]
    expected = [greedy_text(served["models"]["1"], tok, tok.encode(p), 16, [tok.eos_id])[0] for p in prompts]
    results: list = [None] * len(prompts)

    def ask(i: int) -> None:
        results[i] = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=16, temperature=0)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.choices[0].text for r in results] == expected
    # Several prompts in one request come back as one choice each, in order.
    multi = client.completions.create(model=MODEL, prompt=prompts[:3], max_tokens=16, temperature=0)
    assert [c.index for c in multi.choices] == [0, 1, 2]
    assert [c.text for c in multi.choices] == expected[:3]


def test_stop_sequences_end_the_reply_in_both_modes(client):
    free = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0).choices[0].text
    stop = free[len(free) // 2: len(free) // 2 + 3]
    cut = free.index(stop)
    stopped = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop])
    assert stopped.choices[0].text == free[:cut] and stopped.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, stop=stop,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == free[:cut]
    assert chunks[-1].choices[0].finish_reason == "stop"


# ----------------------------------------------------------------------------- safety


def test_api_key_is_required(served):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    for key in (None, "wrong-key"):
        r = post(served, "/v1/completions", body, key=key)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key" and API_KEY not in r.text
        assert post(served, "/v1/models", key=key, method="GET").status_code == 401
    assert post(served, "/v1/completions", body).status_code == 200
    assert post(served, "/v1/models", method="GET").status_code == 200
    unauthenticated = openai.OpenAI(base_url=served["serving"].base_url, api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        unauthenticated.models.list()
    health = requests.get(served["serving"].root_url + "/health", timeout=10)   # for load balancers: no key
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_malformed_requests_get_openai_errors_and_the_service_keeps_serving(served):
    context = served["cfg"].model.max_seq_len
    good = {"model": MODEL, "prompt": "hi", "max_tokens": 3}
    chat_ok = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    cases = [
        # (path, body or raw bytes, status, param, code)
        ("/v1/completions", b"{this is not json", 400, None, None),
        ("/v1/completions", b'["a", "list"]', 400, None, None),
        ("/v1/completions", {**good, "model": "gpt-4"}, 404, "model", "model_not_found"),
        ("/v1/completions", {"prompt": "hi"}, 400, "model", "missing_required_parameter"),
        ("/v1/completions", {**good, "prompt": "word " * (context + 10)}, 400, "prompt",
         "context_length_exceeded"),
        ("/v1/completions", {**good, "prompt": "word " * (context - 20), "max_tokens": 40}, 400, "max_tokens",
         "context_length_exceeded"),
        ("/v1/completions", {**good, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
        ("/v1/completions", {**good, "max_tokens": 10_000}, 400, "max_tokens", "invalid_value"),
        ("/v1/completions", {**good, "max_tokens": "ten"}, 400, "max_tokens", "invalid_type"),
        ("/v1/completions", {**good, "temperature": 3.0}, 400, "temperature", "invalid_value"),
        ("/v1/completions", {**good, "top_p": 1.5}, 400, "top_p", "invalid_value"),
        ("/v1/completions", {**good, "prompt": 42}, 400, "prompt", "invalid_type"),
        ("/v1/completions", {**good, "prompt": []}, 400, "prompt", "invalid_value"),
        ("/v1/completions", {**good, "prompt": [1, 200000]}, 400, "prompt", "invalid_value"),
        ("/v1/completions", {**good, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "invalid_value"),
        ("/v1/completions", {**good, "n": 3}, 400, "n", "unsupported_value"),
        ("/v1/completions", {**good, "seed": "abc"}, 400, "seed", "invalid_type"),
        ("/v1/chat/completions", {**chat_ok, "messages": []}, 400, "messages", "invalid_value"),
        ("/v1/chat/completions", {**chat_ok, "messages": [{"role": "user"}]}, 400, "messages[0].content",
         "missing_required_parameter"),
        ("/v1/chat/completions", {**chat_ok, "messages": [{"role": "robot", "content": "x"}]}, 400,
         "messages[0].role", "invalid_type"),
        ("/v1/chat/completions", {**chat_ok, "max_completion_tokens": -1}, 400, "max_completion_tokens",
         "invalid_value"),
        ("/v1/chat/completions", {**chat_ok, "tools": [{"type": "function"}]}, 400, "tools", "unsupported_value"),
        ("/v1/embeddings", {"model": MODEL, "input": "x"}, 404, None, "unknown_url"),
    ]
    assert len(cases) >= 12
    for path, body, status, param, code in cases:
        r = post(served, path, data=body) if isinstance(body, bytes) else post(served, path, body)
        assert r.status_code == status, (path, body, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], r.text
        assert (error["param"], error["code"]) == (param, code), (body, error)
        assert post(served, "/v1/completions", good).status_code == 200   # still serving
    wrong_method = post(served, "/v1/completions", method="GET")
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"
    r = post(served, "/v1/chat/completions", chat_ok)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"


# ----------------------------------------------------------------------------- web pages: Host, Origin, content type

ROUTES = [("GET", "/health"), ("GET", "/v1/models"), ("GET", f"/v1/models/{MODEL}"),
          ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")]
BODIES = {"/v1/completions": {"model": MODEL, "prompt": "hi", "max_tokens": 2},
          "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}}


def call(served, method: str, path: str, headers: dict[str, str]) -> requests.Response:
    return post(served, path, BODIES.get(path), method=method, headers=headers)


def refused(r: requests.Response, status: int, code: str) -> bool:
    error = r.json()["error"]
    return (r.status_code == status and error["code"] == code and set(error) == {"message", "type", "param", "code"}
            and "access-control-allow-origin" not in r.headers)


def test_every_route_answers_only_hosts_that_name_this_server(served):
    """DNS rebinding re-points a page's own name at 127.0.0.1: that name is refused."""
    port = served["cfg"].serve.port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", NAME, f"{NAME}:{port}"):
        for method, path in ROUTES:
            assert call(served, method, path, {"Host": host}).status_code == 200, (host, path)
    for host in (f"rebound.example:{port}", "rebound.example", f"127.0.0.1:{port + 1}", "localhost",
                 f"127.0.0.2:{port}", f"{NAME}.evil.example:{port}", ""):
        for method, path in ROUTES + [("OPTIONS", "/v1/completions")]:
            r = call(served, method, path, {"Host": host, "Origin": PAGE, "Access-Control-Request-Method": "POST"})
            assert refused(r, 403, "host_not_allowed"), (host, path, r.status_code, r.text)


def test_pages_of_other_origins_can_neither_call_nor_read(served):
    for origin in ("https://evil.example", "null", "http://app.test:3001", "http://app.test", "https://app.test:3000"):
        for method, path in ROUTES:
            assert refused(call(served, method, path, {"Origin": origin}), 403, "origin_not_allowed"), (origin, path)
        preflight = requests.options(served["serving"].root_url + "/v1/completions", timeout=10, headers={
            "Origin": origin, "Access-Control-Request-Method": "POST"})
        assert refused(preflight, 403, "origin_not_allowed")


def test_pages_of_an_allowed_origin_get_cors_answers(served):
    for method, path in ROUTES:
        r = call(served, method, path, {"Origin": PAGE})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == PAGE, path
        assert "x-model-version" in r.headers["access-control-expose-headers"] and "Origin" in r.headers["vary"]
    error = post(served, "/v1/completions", BODIES["/v1/completions"], key="wrong", headers={"Origin": PAGE})
    assert error.status_code == 401 and error.headers["access-control-allow-origin"] == PAGE   # readable
    asked = "authorization, content-type, x-stainless-os"
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", f"/v1/models/{MODEL}", "/health"):
        r = requests.options(served["serving"].root_url + path, timeout=10, headers={
            "Origin": PAGE, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": asked})
        assert r.status_code == 204 and r.headers["access-control-allow-origin"] == PAGE, (path, r.text)
        assert "POST" in r.headers["access-control-allow-methods"]
        assert r.headers["access-control-allow-headers"] == asked and int(r.headers["access-control-max-age"]) > 0
    not_preflight = requests.options(served["serving"].root_url + "/v1/completions", timeout=10)
    assert refused(not_preflight, 405, "method_not_allowed")
    assert post(served, "/v1/embeddings", method="OPTIONS").status_code == 404


def test_post_bodies_must_be_sent_as_json(served):
    """A page may send text/plain (or no type) without a preflight; JSON needs one."""
    for path in ("/v1/completions", "/v1/chat/completions"):
        data = json.dumps(BODIES[path]).encode()
        for content_type in (None, "text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                             "multipart/form-data; boundary=x", "application/jsonx"):
            headers = {"Authorization": f"Bearer {API_KEY}", **({"Content-Type": content_type} if content_type else {})}
            r = requests.post(served["serving"].root_url + path, data=data, headers=headers, timeout=60)
            assert refused(r, 415, "unsupported_media_type"), (path, content_type, r.text)
        for content_type in ("application/json", "application/json; charset=utf-8", "Application/JSON"):
            assert post(served, path, data=data, headers={"Content-Type": content_type}).status_code == 200


# ----------------------------------------------------------------------------- null parameters, dropped streams


def test_null_parameters_mean_their_defaults(served):
    """OpenAI's SDKs send null for parameters left unset: 16 tokens for a completion, not the limit (64)."""
    nulls = {k: None for k in ("max_tokens", "temperature", "top_p", "n", "stop", "stream", "stream_options",
                               "presence_penalty", "frequency_penalty", "logit_bias", "user")}
    sampled = {"model": MODEL, "prompt": PROMPT, "seed": 11}
    plain, nulled = (post(served, "/v1/completions", body).json() for body in (sampled, {**sampled, **nulls}))
    assert nulled["choices"] == plain["choices"] and nulled["usage"] == plain["usage"]
    assert plain["usage"]["completion_tokens"] <= 16
    greedy = {"model": MODEL, "prompt": PROMPT, "temperature": 0, "max_tokens": 20}
    assert post(served, "/v1/completions", {**greedy, "seed": None}).json()["choices"] == \
        post(served, "/v1/completions", greedy).json()["choices"]
    chat_body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi", "name": None}], "seed": 3,
                 "max_tokens": 8}
    chat_nulls = {**{k: v for k, v in nulls.items() if k != "max_tokens"}, "max_completion_tokens": None,
                  "tools": None, "tool_choice": None, "response_format": None}
    plain, nulled = (post(served, "/v1/chat/completions", body).json()
                     for body in (chat_body, {**chat_body, **chat_nulls}))
    assert nulled["choices"] == plain["choices"] and nulled["usage"] == plain["usage"]
    assert refused(post(served, "/v1/completions", {"model": MODEL, "prompt": None}), 400, "invalid_type")


def _replica_logs() -> dict[Path, int]:
    """The Serve and worker log files of this Ray session, with their sizes now."""
    import ray

    context = ray.get_runtime_context()
    logs = Path(context.get_temp_dir()) / context.get_session_name() / "logs"
    files = [*logs.glob("serve/*"), *logs.glob("worker-*")]
    return {f: f.stat().st_size for f in files if f.is_file()}


def test_a_dropped_stream_leaves_no_traceback_in_the_replica_logs(served, client):
    before = _replica_logs()
    url = served["serving"].root_url
    headers = {"Authorization": f"Bearer {API_KEY}"}
    for path, body in [("/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 60, "stream": True}),
                       ("/v1/completions", {"model": MODEL, "prompt": [PROMPT, "Hi"], "max_tokens": 60,
                                            "stream": True}),
                       ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                                 "max_tokens": 60, "stream": True})] * 2:
        with requests.post(url + path, json=body, headers=headers, stream=True, timeout=60) as r:
            lines = r.iter_lines()
            assert [next(lines) for _ in range(3)][0].startswith(b"data: ")
        # leaving the block closes the connection mid-stream
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4).choices   # still serving
    time.sleep(3)   # the replica logs what it logs about the dropped requests
    added = ""
    for f, size in _replica_logs().items():
        with open(f, errors="replace") as fh:
            fh.seek(before.get(f, 0))
            added += fh.read()
    for unwanted in ("never retrieved", "Traceback", "graceful_shutdown failed"):
        assert unwanted not in added, added[added.find(unwanted) - 2000:][:4000]


# ----------------------------------------------------------------------------- rolling update (last)


def test_moving_the_alias_switches_versions_under_load_without_failed_requests(served, tok):
    base_url = served["serving"].base_url
    prompts = [PROMPT, "Once upon a time", "import os\n", "Hello", "The", "SELECT", "Dear", "1, 2,"]
    stop = threading.Event()
    log: list[list[tuple[float, str, str]]] = [[] for _ in prompts]
    failures: list[str] = []

    def loop(i: int) -> None:
        client = openai.OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=60)
        while not stop.is_set():
            start = time.monotonic()
            try:
                raw = client.completions.with_raw_response.create(model=MODEL, prompt=prompts[i], max_tokens=6,
                                                                  temperature=0)
                log[i].append((start, raw.headers["x-model-version"], raw.parse().choices[0].text))
            except Exception as exc:   # noqa: BLE001 - any failure counts
                failures.append(f"client {i}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(len(prompts))]
    for t in threads:
        t.start()
    time.sleep(2.0)
    moved = promote(served["cfg"], step=2, gate=False)
    assert moved.version == "2" and moved.previous_version == "1"
    moved_at = time.monotonic()
    deadline = moved_at + 30
    while time.monotonic() < deadline and not all(entries and entries[-1][1] == "2" for entries in log):
        time.sleep(0.2)
    switched_at = time.monotonic()
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(timeout=60)

    assert not failures, failures[:3]
    for i, entries in enumerate(log):
        versions = [v for _, v, _ in entries]
        assert versions[0] == "1" and versions[-1] == "2", versions
        # Once a client saw the new version it never saw the old one again.
        assert versions == sorted(versions), versions
        # Requests sent after every client had switched all came from version 2, with its weights.
        late = [(v, text) for start, v, text in entries if start > switched_at]
        assert late and all(v == "2" for v, _ in late)
        expected = greedy_text(served["models"]["2"], tok, tok.encode(prompts[i]), 6, [tok.eos_id])[0]
        assert all(text == expected for _, text in late)
        old = greedy_text(served["models"]["1"], tok, tok.encode(prompts[i]), 6, [tok.eos_id])[0]
        assert all(text == old for _, v, text in entries if v == "1")
    assert sum(len(entries) for entries in log) > 3 * len(prompts)
