"""The plan: exact counts, memory that fits, a constant global batch, fast dry runs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from model.config import DBRXConfig
from model.counting import active_params, param_counts, total_params
from platform.config import load_job
from platform.layout import allowed_layouts, best_layout, layout_for
from platform.plan import make_plan

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "conf" / "local_tiny.yaml"
BIG = ROOT / "conf" / "pretrain_132b.yaml"


def test_132b_counts_match_the_published_dbrx():
    plan = make_plan(load_job(BIG))
    assert abs(plan.params_total / 132e9 - 1) < 0.015
    assert abs(plan.params_active / 36e9 - 1) < 0.015


def test_132b_fits_in_80gb_per_gpu_and_would_not_without_checkpointing():
    plan = make_plan(load_job(BIG))
    assert plan.fits and 0 < plan.memory_per_gpu_gb <= 80
    no_ckpt = make_plan(load_job(BIG, ["model.activation_checkpointing=false"]))
    assert not no_ckpt.fits


def test_counts_by_hand_for_a_small_config():
    c = DBRXConfig(d_model=8, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden_size=4,
                   moe_num_experts=4, moe_top_k=2, vocab_size=10, max_seq_len=16)
    attn = 8 * (8 + 2 * 4) + 8 * 8           # Wqkv + out_proj
    expert = 3 * 8 * 4                        # w1, v1, w2
    per_layer = attn + 8 * 4 + 4 * expert + 2 * 8   # + router + experts + two norms
    assert total_params(c) == 2 * 10 * 8 + 2 * per_layer + 8
    assert active_params(c) == total_params(c) - 2 * 2 * expert
    assert param_counts(c).lm_head == 80


def test_global_batch_is_constant_across_world_sizes():
    cfg = load_job(TINY)
    allowed, skipped = allowed_layouts(cfg)
    assert [l.world_size for l in allowed] == [1, 2] and not skipped
    for layout in allowed:
        assert layout.world_size * layout.micro_batch_size * layout.grad_accum == 16
    assert (allowed[0].expert_parallel, allowed[1].expert_parallel) == (1, 2)
    big = load_job(BIG)
    for layout in allowed_layouts(big)[0]:
        assert layout.world_size * layout.grad_accum * layout.micro_batch_size == 512
        assert 16 % layout.expert_parallel == 0 and layout.world_size % layout.expert_parallel == 0


def test_world_sizes_that_cannot_split_the_batch_are_skipped():
    cfg = load_job(TINY, ["cluster.max_nodes=3", "train.global_batch_size=8", "train.micro_batch_size=2"])
    assert isinstance(layout_for(cfg, 3), str)
    assert best_layout(cfg, 3).world_size == 2
    assert best_layout(cfg, 0) is None


def test_json_plan_for_scripts():
    proc = subprocess.run([sys.executable, "-m", "platform.submit", str(BIG), "--dry-run", "--json"],
                          capture_output=True, text=True, timeout=60, check=True)
    plan = json.loads(proc.stdout)
    for key in ("params_total", "params_active", "flops_per_token", "tokens_per_step",
                "memory_per_gpu_gb"):
        assert key in plan
    assert plan["tokens_per_step"] == 512 * 8192
    assert plan["memory_per_gpu_gb"] == max(l["memory_gb"]["total"] for l in plan["layouts"])


@pytest.mark.parametrize("config", [TINY, BIG], ids=["local_tiny", "pretrain_132b"])
def test_dry_run_is_quick_and_prints_the_plan(config):
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "platform.submit", str(config), "--dry-run"],
                          capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    assert elapsed < 10
    for fragment in ("parameters total", "active per token", "tokens per step", "EP",
                     "memory per worker", "$/hour"):
        assert fragment in proc.stdout
    # What Terraform would do, or why it cannot say (infra/aws needs the AWS provider's download).
    if config == TINY:
        assert "Terraform plan (infra/local):" in proc.stdout and "2 to add" in proc.stdout, proc.stdout
    else:
        assert "Terraform plan (infra/aws):" in proc.stdout, proc.stdout
