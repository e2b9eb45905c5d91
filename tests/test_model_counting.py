"""model.counting agrees with the instantiated module, and the released DBRX sizes."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from model.config import DBRXConfig
from model.counting import active_params, expert_params_per_rank, param_counts, total_params

REPO = Path(__file__).resolve().parents[1]

TINY = [
    DBRXConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_size=16,
               moe_num_experts=8, moe_top_k=2, vocab_size=64),
    DBRXConfig(d_model=48, n_layers=3, n_heads=6, n_kv_heads=1, ffn_hidden_size=40,
               moe_num_experts=4, moe_top_k=4, vocab_size=101, tie_word_embeddings=True),
    DBRXConfig(d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, ffn_hidden_size=8,
               moe_num_experts=16, moe_top_k=1, vocab_size=10),
]


def test_default_config_is_132b_total_36b_active():
    cfg = DBRXConfig()
    assert total_params(cfg) == pytest.approx(132e9, rel=0.015)
    assert active_params(cfg) == pytest.approx(36e9, rel=0.015)


@pytest.mark.parametrize("cfg", TINY, ids=["untied", "tied-mqa", "top1"])
def test_counts_equal_module_numel(cfg):
    import torch

    from model import DBRX

    torch.manual_seed(0)
    model = DBRX(cfg)
    numel = sum(p.numel() for p in model.parameters())      # parameters() dedups the tied head
    counts = param_counts(cfg)
    assert total_params(cfg) == numel
    assert counts.experts == sum(p.numel() for p in model.expert_parameters())
    assert counts.dense == sum(p.numel() for p in model.dense_parameters())
    assert counts.router == sum(b.ffn.router.layer.weight.numel() for b in model.blocks)
    assert counts.attention == sum(p.numel() for b in model.blocks for p in b.attn.parameters())
    # Active: every dense parameter plus top_k of E experts in each layer.
    assert active_params(cfg) * cfg.moe_num_experts == (
        counts.dense * cfg.moe_num_experts + counts.experts * cfg.moe_top_k)
    for ep in (1, 2, 4):
        if cfg.moe_num_experts % ep == 0:
            assert expert_params_per_rank(cfg, ep) * ep == counts.experts


def test_planner_imports_stay_torch_free():
    code = ("import sys, model, model.config, model.counting; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "assert 'DBRX' in dir(model); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def _imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at its top or inside a function (lazy imports count)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_model_imports_nothing_from_the_platform_and_hf_only_its_config():
    """model/ is a library the platform uses, never the reverse; model.hf maps names and
    configs only, so DBRX, generate and hf import each other in one direction (they once
    formed a cycle held together by lazy imports)."""
    for path in sorted((REPO / "model").glob("*.py")):
        platform = {m for m in _imported_modules(path) if m.split(".")[0] == "platform"}
        assert not platform, (path.name, platform)
    own = {m for m in _imported_modules(REPO / "model" / "hf.py") if m.split(".")[0] == "model"}
    assert own == {"model.config"}, own


def test_lazy_exports_resolve():
    import model
    from model.dbrx import DBRX

    assert model.DBRX is DBRX
    assert model.DBRXConfig is DBRXConfig
    with pytest.raises(AttributeError):
        model.NotAThing  # noqa: B018
