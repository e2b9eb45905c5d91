"""Promotion: checkpoint -> MLflow Model Registry version + alias, lineage, protection, the gate."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from model import DBRX
from platform.config import load_job
from platform.errors import UserError, run_cli
from platform.registry import GateRefused, ModelRegistry, load_version, promote
from platform.registry import models as reg
from platform.registry.artifacts import PICKLE_SUFFIXES, VersionFormatError, check_safetensors_only
from platform.train.checkpointing import open_checkpoints

REPO = Path(__file__).resolve().parents[1]
WORDS = "the of and to in a is that for it as was with be by on not he this are or his from at".split()

JOB_YAML = """
defaults:
  - model: dbrx_tiny
  - cluster: local
  - data: local_corpus
  - train: tiny
  - checkpoint: local
  - tracking: local
  - promote: default
  - serve: default
  - _self_
name: promote-test
data:
  sources:
    - {{name: prose, path: "{corpus}", format: text}}
  curriculum: []
  cache_dir: "{root}/data-cache"
  eval_fraction: 0.3
  num_tokenize_workers: 1
train:
  global_batch_size: 8
  micro_batch_size: 4
  seq_len: 32
  eval_batches: 2
checkpoint:
  uri: "{root}/checkpoints"
tracking:
  tracking_uri: "sqlite:///{root}/mlflow.db"
  artifact_location: "{root}/mlartifacts"
promote:
  registered_model: dbrx-test
  alias: staging
  gate: true
"""


@pytest.fixture(scope="module")
def job_file(tmp_path_factory, empty_mlflow_db, ray_local) -> Path:
    """A job file over a small prose corpus whose held-out split is prepared (Ray Data)."""
    from platform.data import ensure_prepared

    root = tmp_path_factory.mktemp("promote")
    corpus = root / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        (corpus / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(WORDS, size=int(rng.integers(60, 200)))))
    shutil.copytree(REPO / "conf", root / "conf")
    shutil.copy(empty_mlflow_db, root / "mlflow.db")
    path = root / "conf" / "promote_test.yaml"
    path.write_text(JOB_YAML.format(corpus=corpus, root=root))
    ensure_prepared(load_job(path), progress=False)
    return path


def job(job_file: Path, name: str, *overrides: str):
    """The test job under its own name (own checkpoints) and registered model."""
    return load_job(job_file, [f"name={name}", f"promote.registered_model={name}-model", *overrides])


def trained_model(cfg, model: DBRX, steps: int = 3) -> DBRX:
    """`model` after learning the corpus's word statistics for a few steps: lower held-out loss
    (~9.8 vs 11.5)."""
    from platform.data import TrainingData, find_prepared

    model.train()
    data = TrainingData(cfg, find_prepared(cfg.data, cfg.model.vocab_size))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _, micro_batches in data.batches(0, 1, stop_step=steps):
        for mb in micro_batches:
            model(mb[:, :-1], shift_labels=mb[:, 1:], return_logits=False).lm_loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def registry(cfg) -> ModelRegistry:
    return ModelRegistry(cfg.tracking)


def run_promote_cli(args: list[str], capsys) -> tuple[int, str, str]:
    from platform.promote import main

    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, args)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


# ----------------------------------------------------------------------------- registration


def test_latest_checkpoint_is_registered_with_lineage_protected_and_loadable(job_file, commit_checkpoint,
                                                                              tmp_path, random_model):
    cfg = job(job_file, "lineage")
    store = open_checkpoints(cfg)
    commit_checkpoint(store, random_model(cfg.model, 1, std=None), 10)
    newest = random_model(cfg.model, 2, std=None)
    commit_checkpoint(store, newest, 20, global_batch_size=cfg.train.global_batch_size, loss=4.5)

    result = promote(cfg, gate=False)

    assert (result.name, result.version, result.alias, result.step) == ("lineage-model", "1", "staging", 20)
    assert result.previous_version is None and result.changed
    ref = registry(cfg).require_alias("lineage-model", "staging")
    assert ref.version == "1" and ref.source == f"runs:/{result.run_id}/checkpoints/step_20"
    tags = ref.tags
    assert tags[reg.TAG_RUN_ID] == result.run_id and tags[reg.TAG_JOB] == "lineage"
    assert tags[reg.TAG_STEP] == "20"
    assert tags[reg.TAG_TOKENS] == str(20 * cfg.train.global_batch_size * cfg.train.seq_len)
    assert json.loads(tags[reg.TAG_MIXTURE]) == {"prose": 1.0}
    assert tags[reg.TAG_CODE] and tags[reg.TAG_CHECKPOINT].endswith("lineage/step_000000020")
    # The job had no MLflow run yet: one was made for it, tagged with the job's name.
    run = registry(cfg).client.get_run(result.run_id)
    assert run.data.tags["dbrx.job_name"] == "lineage"

    folder = registry(cfg).local_files(ref, tmp_path / "cache")
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["config.json", "dbrx_tokenizer.json", "lineage.json", "model.safetensors"]
    assert not [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    tokenizer = json.loads((folder / "dbrx_tokenizer.json").read_text())
    assert tokenizer["name"] == "cl100k_base" and tokenizer["vocab_size"] == 100352
    assert tokenizer["special_tokens"]["<|im_start|>"] == 100278
    assert tokenizer["special_tokens"]["<|im_end|>"] == 100279
    lineage = json.loads((folder / "lineage.json").read_text())
    assert lineage["step"] == 20 and lineage["train_loss"] == 4.5 and lineage["run_id"] == result.run_id

    loaded, tok = load_version(folder)
    assert loaded.cfg == cfg.model and tok.im_end_id == 100279
    for key, value in newest.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    # Retention keeps the promoted checkpoint however many newer ones come.
    assert store.protected() == [20]
    commit_checkpoint(store, random_model(cfg.model, 3, std=None), 30)
    commit_checkpoint(store, random_model(cfg.model, 4, std=None), 40)
    assert store.retain(keep_last=1) == [10, 30]
    assert store.list_committed() == [20, 40]


def test_promoting_the_same_checkpoint_again_reuses_its_version(job_file, commit_checkpoint, random_model):
    cfg = job(job_file, "idempotent")
    store = open_checkpoints(cfg)
    commit_checkpoint(store, random_model(cfg.model, 1, std=None), 5)
    first = promote(cfg, gate=False)
    again = promote(cfg, gate=False)
    assert again.version == first.version == "1" and again.reused and not again.changed
    # The same checkpoint under another alias: still one version.
    prod = promote(cfg, alias="production", gate=False)
    assert prod.version == "1" and prod.reused and prod.changed
    assert len(registry(cfg).client.search_model_versions("name='idempotent-model'")) == 1
    assert set(registry(cfg).get_version("idempotent-model", 1).aliases) == {"staging", "production"}


def test_explicit_step_and_clear_errors(job_file, commit_checkpoint, random_model):
    cfg = job(job_file, "errors")
    with pytest.raises(UserError, match="no valid checkpoint to promote"):
        promote(cfg, gate=False)
    store = open_checkpoints(cfg)
    commit_checkpoint(store, random_model(cfg.model, 1, std=None), 3)
    commit_checkpoint(store, random_model(cfg.model, 2, std=None), 6)
    with pytest.raises(UserError, match=r"no committed checkpoint for step 4 .*committed steps: 3, 6"):
        promote(cfg, step=4, gate=False)
    assert promote(cfg, step=3, gate=False).step == 3
    # A checkpoint of another architecture is refused with a message, not a traceback.
    other = job(job_file, "errors", "model.n_layers=2")
    with pytest.raises(UserError, match="does not fit the job's model config"):
        promote(other, step=6, gate=False)


def test_loader_refuses_pickle_and_missing_safetensors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(VersionFormatError, match="no model.safetensors"):
        check_safetensors_only(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(VersionFormatError, match="pickle-based weight files"):
        load_version(tmp_path)


# ----------------------------------------------------------------------------- the gate


def test_gate_refuses_a_worse_checkpoint_and_accepts_a_better_one(job_file, commit_checkpoint, capsys,
                                                                   random_model):
    cfg = job(job_file, "gated")
    store = open_checkpoints(cfg)
    commit_checkpoint(store, random_model(cfg.model, 1, std=None), 10)   # near-uniform predictions
    assert promote(cfg).version == "1"                                    # nothing to compare with: passes
    commit_checkpoint(store, random_model(cfg.model, 2, std=1.0), 20)    # confidently wrong: worse

    code, out, err = run_promote_cli([str(job_file), "name=gated", "promote.registered_model=gated-model",
                                      "--step", "20"], capsys)
    assert code == 1
    assert "not promoting step 20" in err and "is worse than" in err and "gated-model version 1" in err
    assert "Traceback" not in err and "Traceback" not in out
    assert registry(cfg).require_alias("gated-model", "staging").version == "1"
    assert len(registry(cfg).client.search_model_versions("name='gated-model'")) == 1
    assert store.protected() == [10]

    commit_checkpoint(store, trained_model(cfg, random_model(cfg.model, 3, std=None)), 30)
    better = promote(cfg, step=30)
    assert better.version == "2" and better.previous_version == "1"
    assert better.candidate_loss < better.previous_loss
    ref = registry(cfg).require_alias("gated-model", "staging")
    assert ref.version == "2" and abs(float(ref.tags[reg.TAG_HELDOUT]) - better.candidate_loss) < 1e-5

    # --no-gate promotes the worse one anyway (an explicit operator decision).
    code, out, err = run_promote_cli([str(job_file), "name=gated", "promote.registered_model=gated-model",
                                      "--step", "20", "--no-gate", "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["version"] == "3" and result["previous_version"] == "2" and result["step"] == 20
    assert sorted(store.protected()) == [10, 20, 30]


def test_gate_tolerance_accepts_a_small_regression(job_file, commit_checkpoint, random_model):
    cfg = job(job_file, "tolerant")
    store = open_checkpoints(cfg)
    base = random_model(cfg.model, 1, std=None)
    commit_checkpoint(store, base, 1)
    promote(cfg, gate=False)
    worse = random_model(cfg.model, 1, std=None)
    with torch.no_grad():
        worse.wte.weight.mul_(1.5)   # slightly more confident, slightly worse
    commit_checkpoint(store, worse, 2)
    with pytest.raises(GateRefused):
        promote(cfg, step=2)
    loose = dataclasses.replace(cfg, promote=dataclasses.replace(cfg.promote, gate_tolerance=1.0))
    result = promote(loose, step=2)
    assert result.version == "2" and 0 < result.candidate_loss - result.previous_loss < 1.0


def test_versions_on_remote_artifact_stores_are_downloaded_once(job_file, commit_checkpoint, tmp_path,
                                                                monkeypatch, random_model):
    cfg = job(job_file, "remote")
    commit_checkpoint(open_checkpoints(cfg), random_model(cfg.model, 1, std=None), 1)
    promote(cfg, gate=False)
    reg_ = registry(cfg)
    ref = reg_.require_alias("remote-model", "staging")
    in_place = reg_.local_files(ref, tmp_path / "cache")
    assert tmp_path not in in_place.parents                       # local artifact store: read in place
    monkeypatch.setattr(reg_, "_local_artifact_dir", lambda ref: None)   # as for s3:// or an MLflow server
    downloaded = reg_.local_files(ref, tmp_path / "cache")
    assert downloaded == tmp_path / "cache" / "remote-model" / "1"
    for f in in_place.iterdir():
        assert (downloaded / f.name).read_bytes() == f.read_bytes()
    stamp = (downloaded / "model.safetensors").stat().st_mtime_ns
    assert reg_.local_files(ref, tmp_path / "cache") == downloaded
    assert (downloaded / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "cache" / "remote-model").iterdir()] == ["1"]   # no staging left


def test_the_gate_evaluates_both_models_at_the_precision_they_will_be_served_in(job_file, commit_checkpoint,
                                                                                 random_model):
    from platform.registry.evaluate import heldout_batches, heldout_loss

    cfg = job(job_file, "served")
    store = open_checkpoints(cfg)
    base = random_model(cfg.model, 1, std=0.2)
    commit_checkpoint(store, base, 1)
    promote(cfg, gate=False)
    commit_checkpoint(store, base, 2)                      # the same weights again
    int8 = dataclasses.replace(cfg, serve=dataclasses.replace(cfg.serve, weights="int8"))
    result = promote(int8, step=2)                         # promote.gate_weights: serve -> int8
    fp32_loss = heldout_loss(base, heldout_batches(cfg))
    # both sides quantized alike: equal to each other, and not the fp32 loss
    assert result.candidate_loss == result.previous_loss != fp32_loss
    assert abs(result.candidate_loss - fp32_loss) < 0.05
    explicit = dataclasses.replace(int8, promote=dataclasses.replace(int8.promote, gate_weights="fp32"))
    commit_checkpoint(store, base, 3)
    assert promote(explicit, step=3).candidate_loss == pytest.approx(fp32_loss, abs=1e-6)
