"""The benchmarks' accuracy check: tolerant of bf16 routing ties, strict about wrong kernels."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from accuracy import agreement  # noqa: E402

from model.config import DBRXConfig  # noqa: E402
from model.moe import DroplessMoE  # noqa: E402


def reference(n: int = 2000, d: int = 64) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(n, d)


def test_a_few_flipped_tokens_pass_where_max_abs_would_fail():
    ref = reference()
    out = ref * (1 + 1e-3 * torch.randn_like(ref))
    out[::250] = torch.randn(out[::250].shape)              # 0.4% of tokens took other experts
    result = agreement(out, ref, torch.bfloat16)
    assert result.max_abs_err > 1.0                          # what the old check rejected
    assert result.ok and result.agree_share == pytest.approx(0.996)


def test_widespread_disagreement_fails():
    ref = reference()
    out = ref.clone()
    out[::10] = torch.randn(out[::10].shape)                 # 10% of tokens wrong: a routing bug
    assert not agreement(out, ref, torch.bfloat16).ok


def test_small_error_on_every_token_fails():
    ref = reference()
    out = ref * 1.05                                        # e.g. unnormalised expert weights
    result = agreement(out, ref, torch.bfloat16)
    assert result.agree_share == 1.0 and not result.ok


def test_fp32_is_held_to_fp32_precision():
    ref = reference()
    assert agreement(ref + 1e-7 * torch.randn_like(ref), ref, torch.float32).ok
    assert not agreement(ref * (1 + 1e-3), ref, torch.float32).ok


def test_our_layer_in_bf16_agrees_with_its_fp32_self():
    """The real case, on CPU: bf16 compute with routing ties against fp32 on the same weights."""
    cfg = DBRXConfig(d_model=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden_size=128,
                     moe_num_experts=16, moe_top_k=4, vocab_size=64, moe_jitter_eps=None)
    torch.manual_seed(1)
    moe = DroplessMoE(cfg)
    with torch.no_grad():
        moe.router.layer.weight.normal_(0, 0.5 / 8)
        for p in moe.experts.parameters():
            p.normal_(0, 1 / 8)
    x = torch.randn(1024, 64)
    with torch.no_grad():
        ref, _ = moe(x)
        out, _ = moe.to(torch.bfloat16)(x.to(torch.bfloat16))
    result = agreement(out, ref, torch.bfloat16)
    assert result.ok, str(result)
