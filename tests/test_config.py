"""Job configs: composition, overrides, and one clear message for every bad config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from platform.config import ConfigError, load_job, to_dict

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "conf" / "local_tiny.yaml"
BIG = ROOT / "conf" / "pretrain_132b.yaml"


def test_pretrain_132b_is_the_released_dbrx():
    m = load_job(BIG).model
    assert (m.d_model, m.n_layers, m.n_heads, m.n_kv_heads) == (6144, 40, 48, 8)
    assert (m.ffn_hidden_size, m.moe_num_experts, m.moe_top_k) == (10752, 16, 4)
    assert (m.vocab_size, m.max_seq_len, m.rope_theta) == (100352, 32768, 500000.0)
    assert (m.clip_qkv, m.moe_normalize_expert_weights, m.moe_loss_weight) == (8.0, 1.0, 0.05)
    assert m.tie_word_embeddings is False
    cluster = load_job(BIG).cluster
    assert (cluster.provider, cluster.instance_type, cluster.gpus_per_node) == ("aws", "p5.48xlarge", 8)


def test_local_tiny_keeps_the_moe_shape_on_two_local_nodes():
    cfg = load_job(TINY)
    assert (cfg.model.moe_num_experts, cfg.model.moe_top_k) == (16, 4)
    assert (cfg.cluster.provider, cfg.cluster.max_nodes, cfg.cluster.gpus_per_node) == ("local", 2, 0)
    for source in cfg.data.sources:
        assert Path(source.path).exists(), source


def test_overrides_use_hydra_grammar_and_types_are_checked():
    cfg = load_job(TINY, ["train.lr=0.01", "model=dbrx_132b", "train.seq_len=512",
                          "cluster.tags={team: infra}"])
    assert cfg.train.lr == 0.01 and cfg.model.d_model == 6144 and cfg.train.seq_len == 512
    assert cfg.cluster.tags == {"team": "infra"}
    assert isinstance(cfg.train.lr, float)


def test_secrets_come_from_the_environment_and_are_redacted(monkeypatch):
    monkeypatch.setenv("DBRX_SERVE_API_KEY", "s3cret-key")
    cfg = load_job(TINY)
    assert cfg.serve.api_key == "s3cret-key"
    assert "s3cret-key" not in repr(to_dict(cfg))
    assert to_dict(cfg)["serve"]["api_key"] == "***"


BAD = [
    (["train.foo=1"], "train.foo", "unknown key"),
    (["+model.expert_count=4"], "model.expert_count", "unknown key"),
    (["train.lr=fast"], "train.lr", "must be a number"),
    (["train.seq_len=1.5"], "train.seq_len", "must be an integer"),
    (["cluster.keep_cluster=maybe"], "cluster.keep_cluster", "true/false"),
    (["model.moe_top_k=17"], "model.moe_top_k", "exceeds moe_num_experts"),
    (["model.n_kv_heads=3"], "model.n_kv_heads", "divisible by n_kv_heads"),
    (["model.n_heads=5"], "model.n_heads", "not divisible by n_heads"),
    (["train.expert_parallel_size=3"], "train.expert_parallel_size", "must divide model.moe_num_experts"),
    (["cluster.min_nodes=3"], "cluster.min_nodes", "exceeds max_nodes"),
    (["train.global_batch_size=6"], "train.global_batch_size", "no allowed world size"),
    (["data.sources.0.path=/no/such/corpus"], "data.sources[0].path", "does not exist"),
    (["data.sources.0.weight=0", "data.sources.1.weight=0"], "data.sources", "sum to 0"),
    (["train.zero_stage=3"], "train.zero_stage", "ZeRO 0, 1 or 2"),
    (["train.precision=bf16"], "train.precision", "needs GPUs"),
    (["train.seq_len=4096"], "train.seq_len", "exceeds the model context"),
    (["cluster.provider=gcp"], "cluster.provider", "not one of"),
    (["cluster.dashboard_port=6379"], "cluster.dashboard_port", "already cluster.head_port"),
    (["serve.port=8265"], "serve.port", "already cluster.dashboard_port"),
    (["serve.host=0.0.0.0"], "serve.api_key", "set an API key"),
    (["serve.weights=int4"], "serve.weights", "not one of"),
    (["serve.weights=fp8"], "serve.weights", "need a GPU replica"),
    (["name=My Job"], "name", "lowercase"),
    (["checkpoint.keep_last=0"], "checkpoint.keep_last", "at least 1"),
    (["+data.curriculum=[{start_step: 0, weights: {wiki: 1.0}}]"], "data.curriculum[0].weights.wiki",
     "no data source named"),
    (["model=dbrx_7b"], "", "Could not find 'model/dbrx_7b'"),
    (["train.min_lr=1.0"], "train.min_lr", "between 0 and train.lr"),
]


@pytest.mark.parametrize("overrides,path,fragment", BAD, ids=[b[1] or b[2] for b in BAD])
def test_bad_config_names_the_key_and_the_fix(overrides, path, fragment):
    with pytest.raises(ConfigError) as info:
        load_job(TINY, overrides)
    matching = [p for p in info.value.problems if p.path == path]
    assert matching, f"no problem at {path!r}: {info.value}"
    assert any(fragment in p.message for p in matching), str(info.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        load_job(TINY, ["model.moe_top_k=20", "train.typo=1", "cluster.min_nodes=5",
                        "train.lr=abc", "model.n_kv_heads=3"])
    paths = {p.path for p in info.value.problems}
    assert {"model.moe_top_k", "train.typo", "cluster.min_nodes", "train.lr",
            "model.n_kv_heads"} <= paths


def test_unknown_key_in_a_job_file_suggests_the_right_one(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text((TINY.read_text() + "train:\n  learning_rate: 0.1\n"))
    for group in ("model", "cluster", "data", "train", "checkpoint", "tracking", "promote", "serve"):
        (tmp_path / group).symlink_to(ROOT / "conf" / group)
    with pytest.raises(ConfigError) as info:
        load_job(job)
    assert "train.learning_rate: unknown key" in str(info.value)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_job(tmp_path / "nope.yaml")


def test_cli_exits_2_with_one_message_and_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "platform.submit", str(TINY), "model.moe_top_k=20",
         "train.nope=1", "--dry-run"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "model.moe_top_k" in proc.stderr and "train.nope" in proc.stderr
    assert proc.stderr.startswith("error: invalid job config")
