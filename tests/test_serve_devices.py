"""A replica over 2 devices (serve.devices_per_replica=2): experts split over 2 real processes.

The replica class runs in this process as rank 0 (no Serve: starting it costs ~10 s and adds
nothing here) and starts rank 1 as a Ray actor; the two form a gloo group and decode in lock
step. Its answers must be those of a one-device replica of the same weights, alone and for
concurrent requests, greedy and seeded; a rolling update to a training checkpoint loads on
both ranks; and shutting the replica down ends the shard's process.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest
import torch

from platform.config import load_job

torch.set_num_threads(2)

PROMPTS = ["def fibonacci(n):\n    ", "Hello", "The quick brown fox"]


def _settings(root, path, devices: int):
    from platform.serving.loader import ModelSource, ServerSettings
    from platform.tracking.store import Store

    cfg = load_job("conf/local_tiny.yaml").model
    return ServerSettings(ModelSource("m", checkpoint=str(path)), Store("sqlite:///unused", None), cfg,
                          str(root / "cache"), max_concurrent_sequences=4, max_tokens_limit=64,
                          devices_per_replica=devices)


def _replica(settings):
    from platform.serving.app import OpenAIServer

    replica_class = next(c for c in OpenAIServer.func_or_class.__mro__ if c.__dict__.get("_tokens"))
    return replica_class(settings)


def _request(body: dict):
    from starlette.requests import Request

    data = json.dumps(body).encode()
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "headers": [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"),
                                              (b"content-length", str(len(data)).encode())],
             "scheme": "http", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5000)}

    async def receive():
        return {"type": "http.request", "body": data, "more_body": False}

    return Request(scope, receive)


def complete(replica, bodies: list[dict]) -> list[dict]:
    """The replica's answers to `bodies`, sent concurrently."""
    async def one(body):
        response = await replica._guard(_request({"model": "m", **body}), replica._completions)
        assert response.status_code == 200, response.body
        return json.loads(response.body)

    async def every():
        return await asyncio.gather(*(one(b) for b in bodies))

    return asyncio.run(every())


def texts(answers: list[dict]) -> list[list[str]]:
    return [[c["text"] for c in a["choices"]] for a in answers]


@pytest.fixture(scope="module")
def exports(tmp_path_factory, random_model, commit_checkpoint):
    from platform.checkpoint import CheckpointStore
    from platform.registry.artifacts import write_version

    root = tmp_path_factory.mktemp("devices")
    cfg = load_job("conf/local_tiny.yaml").model
    first, second = random_model(cfg, 1).eval(), random_model(cfg, 2).eval()
    write_version(root / "export", first, {"step": 3})
    ckpt = commit_checkpoint(CheckpointStore(str(root / "ckpts")), second, 9)
    return root, root / "export", ckpt.local_path, first


@pytest.fixture(scope="module")
def one_device(exports):
    root, export, _, _ = exports
    replica = _replica(_settings(root, export, 1))
    yield replica
    replica.shutdown()


@pytest.fixture(scope="module")
def two_devices(exports, ray_local):
    root, export, _, _ = exports
    replica = _replica(_settings(root, export, 2))
    yield replica
    replica.shutdown()


GREEDY = [{"prompt": p, "max_tokens": 12, "temperature": 0} for p in PROMPTS]


def test_two_devices_answer_like_one(one_device, two_devices):
    assert two_devices.shards is not None and len(two_devices.shards.shards) == 1
    model = two_devices._model.model
    assert model.ep_size == 2 and list(model.local_experts) == list(range(model.cfg.moe_num_experts // 2))
    want = texts(complete(one_device, GREEDY))
    assert texts([complete(two_devices, [body])[0] for body in GREEDY]) == want     # one at a time
    assert texts(complete(two_devices, GREEDY[:2])) == want[:2]                      # two concurrent requests
    assert len({w[0] for w in want}) == len(PROMPTS) and all(w[0] for w in want)    # outputs that tell apart
    both = [{"prompt": PROMPTS, "max_tokens": 10, "temperature": 0.9, "top_p": 0.9, "seed": 7}]
    assert texts(complete(two_devices, both)) == texts(complete(one_device, both))


def test_a_rolling_update_loads_on_every_rank(exports, one_device, two_devices):
    from platform.serving.shards import ShardedLoader

    _, export, ckpt, _ = exports
    before = texts(complete(two_devices, GREEDY[:1]))
    for replica in (one_device, two_devices):
        replica._install(replica.loader.load_path(ckpt))     # what the alias watcher does on a move
    assert isinstance(two_devices.loader, ShardedLoader) and two_devices._model.version == "step-9"
    after = texts(complete(two_devices, GREEDY[:1]))
    assert after == texts(complete(one_device, GREEDY[:1])) and after != before


def test_serve_runs_a_two_device_replica_in_a_placement_group(exports, ray_local):
    """The deployment path: Serve gives the replica 2 bundles of 0.5 CPU, its shard takes the second."""
    import requests
    from ray import serve

    from platform.data import get_tokenizer
    from platform.provision.head import free_local_port
    from platform.serving import start_serving

    root, export, _, first = exports
    cfg = load_job("conf/local_tiny.yaml", [
        f"serve.port={free_local_port()}", "serve.num_replicas=1", "serve.max_replicas=1", "serve.replica_cpus=0.5",
        "serve.devices_per_replica=2", "serve.max_concurrent_sequences=4", f"tracking.tracking_uri=sqlite:///{root}/m.db"])
    tok = get_tokenizer()
    try:
        serving = start_serving(cfg, checkpoint=str(export), app_name="devices")
        answers = [requests.post(f"{serving.base_url}/completions", timeout=120, json={
            "model": serving.model, "prompt": p, "max_tokens": 12, "temperature": 0}) for p in PROMPTS[:2]]
        [group] = [g for g in ray_local.util.placement_group_table().values() if g["state"] == "CREATED"]
        assert group["strategy"] == "STRICT_PACK" and list(group["bundles"].values()) == [{"CPU": 0.5}] * 2
        bundles = [f"CPU_group_{i}_{group['placement_group_id']}" for i in (0, 1)]
        free, total = ray_local.available_resources(), ray_local.cluster_resources()
        assert all(total[b] == 0.5 and free.get(b, 0) == 0 for b in bundles)   # taken: replica and shard
        serving.stop()
    finally:
        serve.shutdown()
    for prompt, answer in zip(PROMPTS, answers):
        assert answer.status_code == 200, answer.text
        want = first.generate([tok.encode(prompt)], max_new_tokens=12, stop_tokens=[tok.eos_id]).tokens[0]
        assert answer.json()["choices"][0]["text"] == tok.decode(want)


def test_shutting_the_replica_down_ends_its_shard_processes(two_devices, ray_local):
    [shard] = two_devices.shards.shards
    pid = ray_local.get(shard.ready.remote())
    assert pid != os.getpid()
    two_devices.shutdown()
    deadline = time.time() + 30
    while time.time() < deadline and _running(pid):
        time.sleep(0.2)
    assert not _running(pid)
    assert not torch.distributed.is_initialized()


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:                  # a zombie has ended too
        return f.read().split(")")[-1].split()[0] != "Z"
