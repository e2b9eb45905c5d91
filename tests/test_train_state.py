"""Expert-parallel DeepSpeed training equals one process, and its state reshards exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import _dist_train
from platform.checkpoint import load_tensors
from platform.checkpoint.trainer_state import read_trainer_state
from platform.provision.head import free_local_port as _port


def _run(world, zero, *, load="", save="", steps=0, losses=""):
    mp.spawn(_dist_train.run, args=(world, _port(), zero, str(load), str(save), steps, str(losses)),
             nprocs=world, join=True)


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for name in read_trainer_state(directory).tensor_sets:
        out.update(load_tensors(directory, name))
    return out


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_expert_parallel_matches_one_process_and_reshards_exactly(tmp_path, zero):
    one, two, back = tmp_path / "one", tmp_path / "two", tmp_path / "two_on_one"
    _run(1, zero, save=one, steps=2)
    _run(2, zero, save=two, steps=2)               # experts split in two (EP=2) over gloo
    a, b = _tensors(one), _tensors(two)
    assert a.keys() == b.keys()
    assert any("::exp_avg" in k for k in a) and any(".expert0003" in k for k in a)
    for key in a:  # weights and Adam moments after two steps, routing skewed to few experts
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5, msg=key)

    _run(1, zero, load=two, save=back, steps=0)    # EP=2 checkpoint loaded on 1 worker (EP=1)
    c = _tensors(back)
    for key in b:
        assert torch.equal(c[key], b[key]), key
    state = read_trainer_state(back)
    assert (state.step, state.expert_parallel, state.world_size) == (2, 1, 1)


def test_resume_on_fewer_workers_continues_the_same_losses(tmp_path):
    ckpt = tmp_path / "ckpt"
    _run(2, 1, save=ckpt, steps=2)
    _run(2, 1, load=ckpt, steps=5, losses=tmp_path / "two.json")
    _run(1, 1, load=ckpt, steps=5, losses=tmp_path / "one.json")
    two = json.loads((tmp_path / "two.json").read_text())
    one = json.loads((tmp_path / "one.json").read_text())
    assert len(one) == len(two) == 5
    for l1, l2 in zip(one, two):
        assert abs(l1 - l2) / abs(l2) < 1e-3
