"""Expert-parallel DeepSpeed training equals one process, and its state reshards exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import _dist_train
from platform.checkpoint import CheckpointStore, read_tensor_index
from platform.checkpoint.trainer_state import read_trainer_state, state_tensors
from platform.provision.head import free_local_port as _port


ZEROS = (0, 1, 2)


def _run(world: int, runs: list[dict]) -> None:
    runs = [{k: str(v) if isinstance(v, Path) else v for k, v in spec.items()} for spec in runs]
    mp.spawn(_dist_train.run, args=(world, _port(), runs), nprocs=world, join=True)


def _latest(root: Path) -> Path:
    """The folder of the newest checkpoint a run committed under `root`."""
    return CheckpointStore(str(root)).latest_valid()[0].local_path


def _stored_keys(directory: Path) -> set[str]:
    return {k for name in read_trainer_state(directory).tensor_sets for k in read_tensor_index(directory, name)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Every multi-process job of this file, in three spawns (one process, two, one again:
    start-up is most of a tiny job's cost), with DeepSpeed's JIT build folder watched."""
    root = tmp_path_factory.mktemp("train_state")
    one = [{"zero": z, "save": root / "one" / str(z), "steps": 2} for z in ZEROS]
    two = [{"zero": z, "save": root / "two" / str(z), "steps": 2} for z in ZEROS]    # EP=2 over gloo
    # two workers train 7 steps and save after 2; one worker resumes there for the other 5
    two.append({"zero": 1, "save": root / "resume", "save_at": 2, "steps": 7, "losses": root / "two.json"})
    back = [{"zero": z, "load": root / "two" / str(z), "save": root / "back" / str(z)} for z in ZEROS]
    back.append({"zero": 1, "load": root / "resume", "steps": 5, "losses": root / "one.json"})
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TORCH_EXTENSIONS_DIR", str(root / "torch_extensions"))
        _run(1, one)
        _run(2, two)
        _run(1, back)      # EP=2 checkpoints loaded on 1 worker
    return root


@pytest.mark.parametrize("zero", ZEROS)
def test_expert_parallel_matches_one_process_and_reshards_exactly(trained, zero):
    # nothing compiled: DeepSpeed's CPU shm inference kernel is not built for training
    builds = trained / "torch_extensions"
    assert not list(builds.rglob("*.so")), list(builds.rglob("*"))
    two = _latest(trained / "two" / str(zero))
    a, b = state_tensors(_latest(trained / "one" / str(zero))), state_tensors(two)
    assert a.keys() == b.keys()
    assert any("::exp_avg" in k for k in a) and any(".expert0003" in k for k in a)
    assert any(".rows" in k for k in _stored_keys(two))   # dense state in row ranges
    assert len(read_trainer_state(two).tensor_sets) == 4  # written by both ranks
    for key in a:  # weights and Adam moments after two steps, routing skewed to few experts
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5, msg=key)

    back = _latest(trained / "back" / str(zero))
    c = state_tensors(back)
    for key in b:
        assert torch.equal(c[key], b[key]), key
    state = read_trainer_state(back)
    assert (state.step, state.expert_parallel, state.world_size) == (2, 1, 1)


def test_resume_on_fewer_workers_continues_the_same_losses(trained):
    two = json.loads((trained / "two.json").read_text())
    one = json.loads((trained / "one.json").read_text())
    assert len(two) == 7 and len(one) == 5
    for l1, l2 in zip(one, two[2:]):       # steps 3..7: resumed on one worker, and never stopped
        assert abs(l1 - l2) / abs(l2) < 1e-3


# ----------------------------------------------------------------------------- format, in process


def _state(trainer) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in trainer.model.named_parameters():
        out[name] = p.detach().clone()
        out.update({f"{name}::{k}": v.clone() for k, v in trainer.opt.state[p].items() if k != "step"})
    return out


def test_row_ranges_and_format_1_whole_tensors_load_alike(tmp_path, random_model):
    """Dense state cut in row ranges loads exactly; so does a format-1 checkpoint (every
    dense tensor whole, as rank 0 wrote them before), already on disk in older runs."""
    from platform.checkpoint.trainer_state import TRAINER_FILE, consolidated_weights, load_state

    cfg = _dist_train.tiny_job(0).model
    source = _dist_train.PlainTrainer(random_model(cfg, seed=1))
    source.step()
    for name, chunk in (("cut", 8 << 10), ("whole", 1 << 40)):
        saver = source.checkpointer(CheckpointStore(str(tmp_path / name)), async_save=False, chunk_bytes=chunk)
        saver.save(1, consumed_sequences=8, extra={})
    cut, whole = _latest(tmp_path / "cut"), _latest(tmp_path / "whole")
    state = json.loads((whole / TRAINER_FILE).read_text())
    (whole / TRAINER_FILE).write_text(json.dumps({**state, "format_version": 1}))
    assert any(".rows" in k for k in _stored_keys(cut)) and not any(".rows" in k for k in _stored_keys(whole))

    for folder in (cut, whole):
        target = _dist_train.PlainTrainer(random_model(cfg, seed=2))
        target.step()
        load_state(folder, target.eng, target.model, rank=0, world_size=1)
        loaded, expected = _state(target), _state(source)
        assert loaded.keys() == expected.keys()
        assert all(torch.equal(loaded[k], expected[k]) for k in expected)
        weights = consolidated_weights(folder, cfg.moe_num_experts)
        assert all(torch.equal(weights[n], p) for n, p in source.model.state_dict().items())


def test_row_ranges_must_tile_their_tensor():
    from platform.checkpoint.keys import logical_keys, rows_key

    assert logical_keys([rows_key("w", 4, 9), rows_key("w", 0, 4), "b"]) == {
        "w": [rows_key("w", 0, 4), rows_key("w", 4, 9)], "b": ["b"]}
    with pytest.raises(ValueError, match="do not tile"):
        logical_keys([rows_key("w", 0, 4), rows_key("w", 5, 9)])       # a gap
    with pytest.raises(ValueError, match="do not tile"):
        logical_keys([rows_key("w", 0, 5), rows_key("w", 4, 9)])       # an overlap
    with pytest.raises(ValueError, match="both whole and in row ranges"):
        logical_keys(["w", rows_key("w", 0, 9)])
