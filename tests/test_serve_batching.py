"""Continuous batching: the replica's scheduler, and the app's admission (429) and cancellation, in-process."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
import torch

from model import DBRX
from model.config import DBRXConfig
from platform.serving.engine import GenerationRequest, SamplingParams, Scheduler, TokenEvent, engine_slots

torch.set_num_threads(min(2, torch.get_num_threads()))

CFG = DBRXConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_size=16, moe_num_experts=4,
                 moe_top_k=2, vocab_size=64, max_seq_len=512, rope_theta=500.0, clip_qkv=1.0)


class Loaded:
    """The part of a LoadedModel the scheduler reads."""

    def __init__(self, model: DBRX):
        self.model, self.max_seq_len = model, model.cfg.max_seq_len


class Collector:
    """A request's events as the scheduler thread emits them, and when it finished."""

    def __init__(self):
        self.events: list = []
        self.done = threading.Event()
        self.finished_at = 0.0

    def __call__(self, event) -> None:
        self.events.append(event)
        if isinstance(event, BaseException) or event.finish_reason is not None:
            self.finished_at = time.perf_counter()
            self.done.set()

    @property
    def tokens(self) -> list[int]:
        return [e.token for e in self.events if e.token is not None]


@pytest.fixture(scope="module")
def loaded(random_model) -> Loaded:
    return Loaded(random_model(CFG, std=0.3).eval())


@pytest.fixture
def scheduler(loaded):
    sched = Scheduler(slots=4, context=lambda m: m.max_seq_len).start(loaded)
    yield sched
    sched.stop()


def submit(sched: Scheduler, loaded, prompt, **params) -> tuple[GenerationRequest, Collector]:
    request = GenerationRequest(list(prompt), SamplingParams(**params), loaded)
    assert sched.reserve(1)
    sink = Collector()
    sched.submit(request, sink)
    return request, sink


def test_a_short_request_joins_a_long_one_and_leaves_long_before_it(scheduler, loaded):
    start_long = time.perf_counter()
    _, long = submit(scheduler, loaded, [1, 2, 3], max_tokens=300)
    while len(long.events) < 20:                    # the long request is well under way
        time.sleep(0.001)
    start_short = time.perf_counter()
    _, short = submit(scheduler, loaded, [7, 8], max_tokens=4)
    assert short.done.wait(60) and long.done.wait(120)
    short_s, long_s = short.finished_at - start_short, long.finished_at - start_long
    assert len(short.tokens) == 4 and short.events[-1].finish_reason == "length"
    assert len(long.tokens) == 300
    assert short_s < 0.2 * long_s, (short_s, long_s)
    assert short.finished_at < long.finished_at
    # Decoded next to another request, each still gives what generate gives alone.
    assert short.tokens == loaded.model.generate([[7, 8]], max_new_tokens=4).tokens[0]
    assert long.tokens == loaded.model.generate([[1, 2, 3]], max_new_tokens=300).tokens[0]
    assert scheduler.reserved == 0


def test_sampling_stop_tokens_and_cancellation(scheduler, loaded):
    model = loaded.model
    sampled = dict(temperature=0.9, top_p=0.8, seed=11)
    expected = model.generate([[5, 9, 2]], max_new_tokens=12, **sampled).tokens[0]
    free = model.generate([[4, 4, 4]], max_new_tokens=12).tokens[0]
    stop = free[5]
    _, a = submit(scheduler, loaded, [5, 9, 2], max_tokens=12, **sampled)
    _, b = submit(scheduler, loaded, [4, 4, 4], max_tokens=12, stop_token_ids=frozenset({stop}))
    gone, c = submit(scheduler, loaded, [6] * 10, max_tokens=400)
    assert a.done.wait(60) and b.done.wait(60)
    assert a.tokens == expected
    assert b.tokens == free[:free.index(stop)] and b.events[-1] == TokenEvent(None, "stop")
    gone.cancel()                                    # the client went away
    deadline = time.time() + 30
    while scheduler.reserved and time.time() < deadline:
        time.sleep(0.01)
    assert scheduler.reserved == 0 and not c.done.is_set() and len(c.tokens) < 400


def test_a_finished_request_has_given_its_slot_back_when_its_client_hears_of_it(loaded):
    """A client with its answer sends the next request at once: on a full replica it must find the
    slot free, not a 429 (the slot used to be given back after the last event went out)."""
    sched = Scheduler(slots=1, context=lambda m: 64).start(loaded)
    next_admitted: list[bool] = []

    def client(event) -> None:
        if event.finish_reason is not None:
            next_admitted.append(sched.reserve(1))

    try:
        assert sched.reserve(1)
        sched.submit(GenerationRequest([2, 7], SamplingParams(max_tokens=3), loaded), client)
        deadline = time.time() + 30
        while not next_admitted and time.time() < deadline:
            time.sleep(0.01)
        assert next_admitted == [True]
    finally:
        sched.stop()


def test_reservations_cap_the_sequences_and_kv_memory_caps_the_slots(loaded):
    sched = Scheduler(slots=2, context=lambda m: 64)
    assert sched.reserve(2) and not sched.reserve(1)
    sched.unreserve(1)
    assert sched.reserve(1) and not sched.reserve(1)
    per_slot = 2 * CFG.n_layers * CFG.n_kv_heads * 64 * CFG.head_dim * 4
    assert engine_slots(loaded.model, 64, 16, None) == 16
    assert engine_slots(loaded.model, 64, 16, 3 * per_slot + 1) == 3
    with pytest.raises(ValueError, match="max_kv_cache_mb"):
        engine_slots(loaded.model, 64, 16, per_slot - 1)


def test_a_rolling_update_finishes_old_requests_on_old_weights_then_frees_their_cache(loaded, random_model):
    newer = Loaded(random_model(CFG, seed=9, std=0.3).eval())
    sched = Scheduler(slots=2, context=lambda m: 64).start(loaded)
    try:
        _, old = submit(sched, loaded, [3, 1, 4], max_tokens=30)
        sched.set_current(newer)                         # the alias moved while `old` decodes
        _, new = submit(sched, newer, [3, 1, 4], max_tokens=5)
        assert old.done.wait(60) and new.done.wait(60)
        assert old.tokens == loaded.model.generate([[3, 1, 4]], max_new_tokens=30).tokens[0]
        assert new.tokens == newer.model.generate([[3, 1, 4]], max_new_tokens=5).tokens[0]
        deadline = time.time() + 30
        while id(loaded) in sched._engines and time.time() < deadline:
            time.sleep(0.01)
        assert id(loaded) not in sched._engines and id(newer) in sched._engines
        assert sched.reserved == 0
    finally:
        sched.stop()


def test_a_request_that_fails_to_start_gets_the_error_and_gives_its_slot_back(scheduler, loaded):
    _, sink = submit(scheduler, loaded, [1] * CFG.max_seq_len, max_tokens=1)   # no room left in a slot
    assert sink.done.wait(30)
    assert isinstance(sink.events[-1], ValueError) and "no room" in str(sink.events[-1])
    deadline = time.time() + 10
    while scheduler.reserved and time.time() < deadline:
        time.sleep(0.01)
    assert scheduler.reserved == 0


# ----------------------------------------------------------------------------- the app, without Ray


@pytest.fixture(scope="module")
def server(tmp_path_factory, random_model):
    """The app's replica class itself (no Serve), one sequence slot, on a local_tiny export."""
    from platform.config import load_job
    from platform.registry.artifacts import write_version
    from platform.serving.app import OpenAIServer
    from platform.serving.loader import ModelSource, ServerSettings
    from platform.tracking.store import Store

    root = tmp_path_factory.mktemp("batching")
    cfg = load_job("conf/local_tiny.yaml").model
    model = random_model(cfg, 1).eval()
    write_version(root / "export", model, {"step": 3})
    settings = ServerSettings(ModelSource("m", checkpoint=str(root / "export")), Store("sqlite:///unused", None),
                              cfg, str(root / "cache"), max_concurrent_sequences=1, max_tokens_limit=200)
    replica_class = next(c for c in OpenAIServer.func_or_class.__mro__ if c.__dict__.get("_tokens"))
    replica = replica_class(settings)
    yield replica, model
    replica.scheduler.stop()


def http_request(body: dict, path: str = "/v1/completions"):
    from starlette.requests import Request

    data = json.dumps(body).encode()
    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(data)).encode())],
             "scheme": "http", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5000)}

    async def receive():
        return {"type": "http.request", "body": data, "more_body": False}

    return Request(scope, receive)


def test_a_full_replica_answers_429_and_a_disconnect_frees_the_slot(server):
    replica, model = server
    from platform.data import get_tokenizer

    tok = get_tokenizer()

    async def scenario():
        stream = await replica._guard(http_request({"model": "m", "prompt": "Hello", "max_tokens": 200,
                                                    "temperature": 0, "stream": True}), replica._completions)
        assert stream.status_code == 200
        chunks = stream.body_iterator
        first = await chunks.__anext__()                 # decoding: the only slot is taken
        assert first.startswith("data: ")
        busy = await replica._guard(http_request({"model": "m", "prompt": "Hi", "max_tokens": 3}),
                                    replica._completions)
        await chunks.aclose()                            # the client goes away
        for _ in range(500):
            if replica.scheduler.reserved == 0:
                break
            await asyncio.sleep(0.01)
        ok = await replica._guard(http_request({"model": "m", "prompt": "Hi", "max_tokens": 5,
                                                "temperature": 0}), replica._completions)
        return busy, ok

    busy, ok = asyncio.run(scenario())
    assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
    error = json.loads(busy.body)["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests" and "capacity" in error["message"]
    assert ok.status_code == 200
    text = json.loads(ok.body)["choices"][0]["text"]
    expected = model.generate([tok.encode("Hi")], max_new_tokens=5, stop_tokens=[tok.eos_id]).tokens[0]
    assert text == tok.decode(expected)
