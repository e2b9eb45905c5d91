"""The checkpoint protocol on a local folder and on S3 (moto): complete and verified, or invisible."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import multiprocessing
import os
import random

import pytest

from platform.checkpoint import (
    MANIFEST_NAME,
    CheckpointCommitError,
    CheckpointCorruptError,
    CheckpointNotFoundError,
    CheckpointStore,
    FileEntry,
    load_tensors,
    read_tensor_index,
    rng_state,
    save_tensors,
    set_rng_state,
    step_dir,
)
from platform.storage import LocalStore, S3Store, open_store


@pytest.fixture(scope="module")
def torch():
    """torch, imported only by the tests that need it: the crash tests' child
    processes import this module, and should start fast."""
    import torch

    return torch


@pytest.fixture
def ckpts(any_store, tmp_path) -> CheckpointStore:
    return CheckpointStore(any_store, staging_root=tmp_path / "staging")


def files_for(step: int) -> dict[str, bytes]:
    return {
        "model/shard_0.bin": bytes([step % 256]) * 1000,
        "model/shard_1.bin": random.Random(step).randbytes(2000),
        "optim/rank_00000.bin": random.Random(-step).randbytes(1500),
    }


def save(ckpts: CheckpointStore, step: int, files: dict[str, bytes] | None = None):
    staging = ckpts.begin(step)
    for rel, data in (files or files_for(step)).items():
        staging.file(rel).write_bytes(data)
    return ckpts.commit(staging, {"data_position": step * 10, "mlflow_run_id": "abc"}, world_size=4)


def reopen(ckpts: CheckpointStore, tmp_path) -> CheckpointStore:
    """A fresh CheckpointStore over the same root, as after a process restart."""
    root = ckpts.root
    endpoint = root.endpoint_url if isinstance(root, S3Store) else None
    return CheckpointStore(open_store(root.uri, endpoint_url=endpoint), staging_root=tmp_path / "staging")


# ----------------------------------------------------------------------------- commit


def test_commit_makes_a_complete_verified_checkpoint(ckpts, tmp_path):
    ckpt = save(ckpts, 5)
    assert ckpts.list_committed() == [5]
    got = ckpts.get(5, verify=True)
    assert got.manifest == ckpt.manifest
    assert got.metadata == {"data_position": 50, "mlflow_run_id": "abc"}
    assert got.manifest.world_size == 4
    assert dt.datetime.fromisoformat(got.manifest.created).tzinfo is not None
    expected = {rel: (len(data), hashlib.sha256(data).hexdigest()) for rel, data in files_for(5).items()}
    assert {e.path: (e.size, e.sha256) for e in got.manifest.files} == expected
    for rel, data in files_for(5).items():
        assert got.store.read_bytes(rel) == data
    assert got.uri.endswith("/step_000000005")
    if isinstance(ckpts.root, LocalStore):
        assert got.local_path == ckpts.root.root / "step_000000005"
        assert os.listdir(ckpts.root.root / ".staging") == []
    else:
        assert got.local_path is None
        assert os.listdir(tmp_path / "staging") == []


def test_uncommitted_work_is_invisible(ckpts):
    staging = ckpts.begin(3)
    staging.file("model/shard_0.bin").write_bytes(b"half a checkpoint")
    ckpts.root.write_bytes("step_000000004/model/shard_0.bin", b"files but no manifest")
    assert ckpts.list_committed() == []
    assert ckpts.latest_valid() == (None, [])
    with pytest.raises(CheckpointNotFoundError, match="step 4"):
        ckpts.get(4)
    ckpts.commit(staging)
    assert ckpts.list_committed() == [3]


def _crash_while_saving(root_uri: str, endpoint: str | None, staging_root: str, mode: str) -> None:
    """Child process: save step 2, and die (os._exit, no cleanup) part-way through."""
    from platform import storage

    ckpts = CheckpointStore(storage.open_store(root_uri, endpoint_url=endpoint), staging_root=staging_root)
    staging = ckpts.begin(2)
    for i, (rel, data) in enumerate(files_for(2).items()):
        if mode == "writing" and i == 2:
            os._exit(17)
        staging.file(rel).write_bytes(data)
    # mode == "committing": die at the last instant before the commit point, with
    # every file hashed, fsynced and (on S3) uploaded and size-checked.
    if isinstance(ckpts.root, storage.LocalStore):
        os.rename = lambda src, dst: os._exit(17)
    else:
        storage.S3Store.write_bytes = lambda self, key, data: os._exit(17)
    ckpts.commit(staging, {"data_position": 20})
    os._exit(0)


@pytest.mark.parametrize("mode", ["writing", "committing"])
def test_a_crash_mid_save_is_never_seen_and_the_previous_one_is_used(ckpts, tmp_path, mode):
    save(ckpts, 1)
    endpoint = ckpts.root.endpoint_url if isinstance(ckpts.root, S3Store) else None
    child = multiprocessing.get_context("spawn").Process(
        target=_crash_while_saving, args=(ckpts.root.uri, endpoint, str(tmp_path / "staging"), mode)
    )
    child.start()
    child.join(60)
    assert child.exitcode == 17  # it died where we made it die

    leftovers = [k for k in ckpts.root.list() if not k.startswith("step_000000001/")]
    staged = list((tmp_path / "staging").rglob("*.bin")) + list(ckpts.root.list(".staging"))
    assert leftovers or staged  # the crash really left half a checkpoint behind
    if mode == "committing" and isinstance(ckpts.root, S3Store):
        assert len(ckpts.root.list("step_000000002")) == 3  # all data there, only the manifest missing

    for reader in (ckpts, reopen(ckpts, tmp_path)):
        assert reader.list_committed() == [1]
        latest, skipped = reader.latest_valid(verify=True)
        assert latest.step == 1 and skipped == []
        assert latest.metadata["data_position"] == 10

    assert ckpts.cleanup(older_than_s=3600) == []  # too fresh: might be a live writer
    removed = ckpts.cleanup(older_than_s=0)
    assert removed
    assert ckpts.root.list() == sorted(f"step_000000001/{k}" for k in [*files_for(1), MANIFEST_NAME])
    assert not any((tmp_path / "staging").rglob("*"))
    save(ckpts, 2)  # the resumed run saves the step again
    assert ckpts.latest_valid()[0].step == 2


def test_metadata_must_be_json_and_the_manifest_name_is_reserved(ckpts):
    staging = ckpts.begin(1)
    staging.file("a.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="plain JSON"):
        ckpts.commit(staging, {"loss": float("nan")})
    with pytest.raises(ValueError, match="plain JSON"):
        ckpts.commit(staging, {"tags": {"a", "b"}})
    with pytest.raises(ValueError, match="reserved"):
        staging.file(MANIFEST_NAME)
    assert ckpts.list_committed() == []
    ckpts.commit(staging, {"loss": 1.5})
    assert ckpts.get(1).metadata == {"loss": 1.5}


# ----------------------------------------------------------------------------- damage


def _damage(root, step: int, kind: str) -> None:
    key = f"{step_dir(step)}/model/shard_1.bin"
    if kind == "flip":
        data = bytearray(root.read_bytes(key))
        data[1234] ^= 0x01
        root.write_bytes(key, bytes(data))
    elif kind == "truncate":
        root.write_bytes(key, root.read_bytes(key)[:999])
    elif kind == "delete":
        root.delete(key)
    elif kind == "manifest":
        root.write_bytes(f"{step_dir(step)}/{MANIFEST_NAME}", b'{"format": "dbrx-platform/checkp')


@pytest.mark.parametrize(
    "kind, verify, reason",
    [
        ("flip", True, "model/shard_1.bin fails its sha256 check"),
        ("truncate", "size", "model/shard_1.bin has 999 bytes, manifest says 2000"),
        ("delete", "size", "model/shard_1.bin is missing"),
        ("manifest", "none", "manifest is not valid JSON"),
    ],
)
def test_damage_is_detected_and_the_previous_checkpoint_used(ckpts, kind, verify, reason):
    for step in (1, 2, 3):
        save(ckpts, step)
    _damage(ckpts.root, 3, kind)
    latest, skipped = ckpts.latest_valid(verify=verify)
    assert latest.step == 2
    assert [(s, r[: len(reason)]) for s, r in skipped] == [(3, reason)]
    _damage(ckpts.root, 2, kind)
    _damage(ckpts.root, 1, kind)
    latest, skipped = ckpts.latest_valid(verify=verify)
    assert latest is None
    assert [(s, r[: len(reason)]) for s, r in skipped] == [(3, reason), (2, reason), (1, reason)]


def test_size_verification_misses_a_flipped_byte_full_verification_does_not(ckpts):
    save(ckpts, 1)
    save(ckpts, 2)
    _damage(ckpts.root, 2, "flip")
    assert ckpts.latest_valid(verify="size")[0].step == 2  # cheap check: sizes only
    assert ckpts.latest_valid(verify="full")[0].step == 1


def test_download_copies_and_verifies(ckpts, tmp_path):
    ckpt = save(ckpts, 8)
    dest = ckpts.download(ckpt, tmp_path / "local")
    for rel, data in files_for(8).items():
        assert (dest / rel).read_bytes() == data
    assert json.loads((dest / MANIFEST_NAME).read_text())["step"] == 8
    _damage(ckpts.root, 8, "flip")
    with pytest.raises(CheckpointCorruptError, match="model/shard_1.bin does not match"):
        ckpts.download(ckpt, tmp_path / "again")
    _damage(ckpts.root, 8, "delete")
    with pytest.raises(CheckpointCorruptError, match="model/shard_1.bin is missing"):
        ckpts.download(ckpt, tmp_path / "third", verify="size")


# ----------------------------------------------------------------------------- ranks


def _two_hosts(any_store, tmp_path):
    """Rank 0 and rank 1 on different hosts (their own staging folders) writing one attempt at
    step 7 of the same store: (host0, host1, staging0, staging1); the token is what rank 0
    broadcasts."""
    host0 = CheckpointStore(any_store, staging_root=tmp_path / "host0")
    host1 = CheckpointStore(any_store, staging_root=tmp_path / "host1")
    staging0 = host0.begin(7)
    return host0, host1, staging0, host1.attach(staging0.token)


def test_ranks_on_other_hosts_push_their_files_and_rank0_commits(any_store, tmp_path):
    host0, host1, staging0, staging1 = _two_hosts(any_store, tmp_path)
    if isinstance(any_store, LocalStore):
        assert staging1.path == staging0.path  # one folder on the shared filesystem
    else:
        assert staging1.path != staging0.path  # each host stages locally
    staging0.file("model/rank0.bin").write_bytes(b"r0" * 500)
    staging1.file("model/rank1.bin").write_bytes(b"r1" * 700)
    pushed = [entry.to_json() for entry in host1.push(staging1, ["model/rank1.bin"])]  # gather_object
    assert host0.list_committed() == []  # pushed files alone are not a checkpoint
    ckpt = host0.commit(staging0, {"rank_files": 2}, world_size=2, pushed=json.loads(json.dumps(pushed)))
    assert [e.path for e in ckpt.manifest.files] == ["model/rank0.bin", "model/rank1.bin"]
    got, _ = host0.latest_valid(verify=True)
    assert got.step == 7 and got.manifest.world_size == 2
    assert got.store.read_bytes("model/rank1.bin") == b"r1" * 700


def test_commit_refuses_pushed_files_that_do_not_match(any_store, tmp_path):
    host0, host1, staging0, staging1 = _two_hosts(any_store, tmp_path)
    staging1.file("w.bin").write_bytes(b"x" * 10)
    (entry,) = host1.push(staging1, ["w.bin"])
    lying = FileEntry(entry.path, entry.size + 1, entry.sha256)
    with pytest.raises(CheckpointCommitError, match="w.bin has 10 bytes, manifest says 11"):
        host0.commit(staging0, pushed=[lying])
    assert host0.list_committed() == []
    host0.abort(staging0)
    assert any_store.list() == []
    assert not staging0.path.exists()


def test_ranks_post_records_without_collectives_and_they_stay_out_of_the_checkpoint(any_store, tmp_path):
    """What a background commit uses instead of gather_object: records through the store."""
    host0, host1, staging0, staging1 = _two_hosts(any_store, tmp_path)
    staging1.file("rank1.bin").write_bytes(b"r1" * 700)
    pushed = [e.to_json() for e in host1.push(staging1, ["rank1.bin"])]
    host1.post(staging1, 2, {"rank": 2, "entries": []})
    host1.post(staging1, 1, {"rank": 1, "entries": pushed})
    records = host0.collect(staging0, [1, 2], timeout_s=10)
    assert [r["rank"] for r in records] == [1, 2] and records[0]["entries"] == pushed
    ckpt = host0.commit(staging0, world_size=3, pushed=[e for r in records for e in r["entries"]])
    assert [e.path for e in ckpt.manifest.files] == ["rank1.bin"]
    assert any_store.list() == [f"{step_dir(7)}/{MANIFEST_NAME}", f"{step_dir(7)}/rank1.bin"]


def test_collect_gives_up_naming_the_ranks_that_posted_nothing(ckpts):
    staging = ckpts.begin(3)
    ckpts.post(staging, 1, {"rank": 1})
    with pytest.raises(CheckpointCommitError, match=r"1 rank\(s\) posted no record .*rank-00002"):
        ckpts.collect(staging, [1, 2], timeout_s=0.2)


# ----------------------------------------------------------------------------- retention


def test_retention_keeps_the_newest_the_protected_and_the_latest_valid(ckpts, tmp_path):
    for step in range(1, 7):
        save(ckpts, step)
    ckpts.protect(2, reason="promoted as dbrx-tiny v1")
    ckpts = reopen(ckpts, tmp_path)  # protection is stored, so it survives restarts
    assert ckpts.protected() == [2]

    assert ckpts.retain(keep_last=2, protected_steps=[3]) == [1, 4]
    assert ckpts.list_committed() == [2, 3, 5, 6]
    assert ckpts.root.list("step_000000001") == [] and ckpts.root.list("step_000000004") == []

    _damage(ckpts.root, 5, "truncate")
    _damage(ckpts.root, 6, "truncate")
    assert ckpts.retain(keep_last=1) == [5]  # 6 is newest; 3 is the latest valid; 2 is protected
    ckpts.unprotect(2)
    assert ckpts.retain(keep_last=1) == [2]
    assert ckpts.list_committed() == [3, 6]
    assert ckpts.latest_valid()[0].step == 3

    with pytest.raises(CheckpointNotFoundError):
        ckpts.protect(99)
    with pytest.raises(ValueError):
        ckpts.retain(keep_last=-1)


def test_retention_keeps_everything_while_there_are_fewer_than_keep_last(ckpts):
    for step in (5, 10):
        save(ckpts, step)
        assert ckpts.retain(keep_last=3) == []
    assert ckpts.list_committed() == [5, 10]


def test_resaving_a_step_replaces_it_unless_protected(ckpts):
    save(ckpts, 4, {"old_only.bin": b"old", "common.bin": b"old"})
    save(ckpts, 4, {"common.bin": b"new"})
    got = ckpts.get(4, verify=True)
    assert [e.path for e in got.manifest.files] == ["common.bin"]
    assert got.store.read_bytes("common.bin") == b"new"
    assert ckpts.root.list() == ["step_000000004/common.bin", f"step_000000004/{MANIFEST_NAME}"]
    ckpts.protect(4)
    with pytest.raises(CheckpointCommitError, match="protected"):
        ckpts.begin(4)
    assert ckpts.get(4).store.read_bytes("common.bin") == b"new"


# ----------------------------------------------------------------------------- tensor format


def _bits(t):
    return t.reshape(-1).view(dtype=__import__("torch").uint8) if t.numel() else t.reshape(-1)


def _sample_tensors(torch):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 48, generator=g)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40, 3.0])
    tensors = {
        "fp32": base,
        "bf16": (base * 3).to(torch.bfloat16),
        "fp16_special": special.to(torch.float16),
        "bf16_special": special.to(torch.bfloat16),
        "int64": torch.randint(-(2**62), 2**62, (17,), generator=g),
        "int8": torch.randint(-128, 127, (5, 5), generator=g).to(torch.int8),
        "uint8": torch.arange(256, dtype=torch.uint8),
        "bool": torch.rand(33, generator=g) > 0.5,
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 7),
        "transposed": base.t(),  # not contiguous
        "slice": base[10:20, 5:9],  # a view into a larger storage
        "tied_a": base,  # same storage under a second name
        "experts.w1": torch.randn(4, 32, 16, generator=g),
    }
    if hasattr(torch, "float8_e4m3fn"):
        tensors["fp8"] = torch.randn(9, generator=g).to(torch.float8_e4m3fn)
    return tensors


def test_safetensors_round_trip_is_bit_exact(torch, tmp_path):
    tensors = _sample_tensors(torch)
    files = save_tensors(tmp_path / "model", "model", tensors, max_shard_mb=0.004)
    assert files[-1] == "model.safetensors.index.json" and len(files) > 3
    loaded = load_tensors(tmp_path / "model", "model")
    assert list(loaded) == list(tensors)
    for name, original in tensors.items():
        got = loaded[name]
        assert got.dtype == original.dtype and got.shape == original.shape, name
        assert torch.equal(_bits(got), _bits(original.contiguous())), name
    subset = load_tensors(str(tmp_path / "model"), "model", names=["slice", "bool"])
    assert list(subset) == ["slice", "bool"] and torch.equal(subset["slice"], tensors["slice"])
    with pytest.raises(KeyError, match="nope"):
        load_tensors(tmp_path / "model", "model", names=["nope"])
    pickle_free = all(not f.endswith((".pt", ".pkl", ".bin")) for f in os.listdir(tmp_path / "model"))
    assert pickle_free


def test_shards_respect_the_size_limit_and_follow_the_hf_index_layout(torch, tmp_path):
    tensors = {f"layer.{i}": torch.full((25_000,), float(i)) for i in range(10)}  # 100 kB each
    tensors["huge"] = torch.zeros(300_000)  # 1.2 MB: more than a shard, gets its own
    limit_mb = 0.25
    files = save_tensors(tmp_path, "model", tensors, max_shard_mb=limit_mb, metadata={"step": 3})
    shards = files[:-1]
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / files[-1]).read_text())
    assert index["metadata"] == {"total_size": 10 * 100_000 + 1_200_000, "step": 3}
    assert index["weight_map"] == read_tensor_index(tmp_path, "model")
    assert set(index["weight_map"].values()) == set(shards)
    for shard in shards:
        members = [k for k, v in index["weight_map"].items() if v == shard]
        payload = sum(tensors[k].numel() * 4 for k in members)
        assert payload <= limit_mb * 1024 * 1024 or members == ["huge"]
    assert len(shards) == 6  # 2 + 2 + 2 + 2 + 2 layers, then "huge"


def test_tensors_load_from_a_committed_checkpoint_on_any_store(ckpts, torch):
    tensors = _sample_tensors(torch)
    staging = ckpts.begin(11)
    save_tensors(staging.path / "model", "model", tensors, max_shard_mb=0.004)
    ckpts.commit(staging)
    ckpt, _ = ckpts.latest_valid(verify=True)
    loaded = load_tensors(ckpt.store.child("model"), "model")
    for name, original in tensors.items():
        assert torch.equal(_bits(loaded[name]), _bits(original.contiguous())), name


def test_rng_state_round_trips_through_json(torch):
    import numpy as np

    state = json.loads(json.dumps(rng_state()))
    first = (random.random(), np.random.rand(3).tolist(), torch.rand(4).tolist(), random.gauss(0, 1))
    set_rng_state(state)
    again = (random.random(), np.random.rand(3).tolist(), torch.rand(4).tolist(), random.gauss(0, 1))
    assert first == again
    with pytest.raises(ValueError, match="format"):
        set_rng_state({**state, "format_version": 99})
