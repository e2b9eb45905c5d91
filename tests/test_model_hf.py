"""DBRX matches transformers' DbrxForCausalLM and round-trips through its format."""

from __future__ import annotations

import json
import os

import pytest
import torch

from model import DBRX
from model.config import DBRXConfig
from model.hf import config_from_hf, config_to_hf, from_hf_key, to_hf_key

transformers = pytest.importorskip("transformers")

torch.set_num_threads(min(2, torch.get_num_threads()))   # never above the suite-wide cap

CFG = DBRXConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_size=32,
                 moe_num_experts=8, moe_top_k=2, vocab_size=97, max_seq_len=64,
                 rope_theta=1000.0, clip_qkv=0.4, moe_jitter_eps=None)


def random_hf_model(cfg: DBRXConfig = CFG, seed: int = 0):
    """An HF model whose weights are large enough that clipping, routing and RoPE all matter."""
    torch.manual_seed(seed)
    hf = transformers.DbrxForCausalLM(transformers.DbrxConfig(**config_to_hf(cfg)))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.2)
    return hf.eval()


def test_logits_match_transformers():
    hf = random_hf_model()
    ours = DBRX.from_hf(hf).eval()
    ids = torch.randint(0, CFG.vocab_size, (3, 24))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids).logits
    assert got.shape == (3, 24, CFG.vocab_size)
    assert (got - expected).abs().max().item() < 1e-4


def test_loss_and_gradients_match_transformers():
    """Training-mode forward/backward (jitter off) gives HF's loss and parameter gradients."""
    hf = random_hf_model(seed=1).train()
    ours = DBRX.from_hf(hf).train()
    ids = torch.randint(0, CFG.vocab_size, (2, 16))
    labels = ids.clone()
    labels[0, :5] = -100
    hf_loss = hf(ids, labels=labels).loss
    out = ours(ids, labels=labels)
    assert abs(out.lm_loss.item() - hf_loss.item()) < 1e-5
    hf_loss.backward()
    out.lm_loss.backward()
    hf_grads = {from_hf_key(n): p.grad for n, p in hf.named_parameters()}
    for name, p in ours.named_parameters():
        assert (p.grad - hf_grads[name]).abs().max().item() < 1e-4, name


def test_hf_semantics_we_rely_on():
    """Guard the conventions read from transformers' source (they differ across versions)."""
    from transformers.models.dbrx import modeling_dbrx as m

    hf = random_hf_model()
    # w2 is stored [experts * ffn, d_model] and applied untransposed.
    assert hf.transformer.blocks[0].ffn.experts.mlp.w2.shape == (CFG.moe_num_experts * CFG.ffn_hidden_size,
                                                                   CFG.d_model)
    # RoPE theta comes from rope_parameters.
    assert hf.config.rope_parameters["rope_theta"] == CFG.rope_theta
    assert hasattr(m, "DbrxFFN")


def test_key_renames_are_inverse():
    ours = DBRX(CFG)
    for name in ours.state_dict():
        assert from_hf_key(to_hf_key(name)) == name
    hf_names = set(random_hf_model().state_dict())
    assert {to_hf_key(n) for n in ours.state_dict()} == hf_names


def test_export_import_round_trip_is_exact(tmp_path):
    torch.manual_seed(3)
    model = DBRX(CFG)
    model.to_hf(str(tmp_path))
    again = DBRX.from_hf(str(tmp_path))
    assert again.cfg == CFG
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_transformers_loads_our_export(tmp_path):
    hf = random_hf_model(seed=4)
    ours = DBRX.from_hf(hf).eval()
    ours.to_hf(str(tmp_path))
    reloaded = transformers.DbrxForCausalLM.from_pretrained(str(tmp_path)).eval()
    ids = torch.randint(0, CFG.vocab_size, (2, 12))
    with torch.no_grad():
        assert (reloaded(ids).logits - ours(ids).logits).abs().max().item() < 1e-4


def test_load_transformers_save_pretrained_and_sharded(tmp_path):
    hf = random_hf_model(seed=5)
    hf.save_pretrained(str(tmp_path / "hf"))
    from_dir = DBRX.from_hf(str(tmp_path / "hf")).eval()
    # Tiny shards force the index path of both writer and reader.
    from_dir.to_hf(str(tmp_path / "sharded"), max_shard_bytes=20_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    sharded = DBRX.from_hf(str(tmp_path / "sharded")).eval()
    ids = torch.randint(0, CFG.vocab_size, (1, 10))
    with torch.no_grad():
        expected = hf(ids).logits
        assert (from_dir(ids).logits - expected).abs().max().item() < 1e-4
        assert (sharded(ids).logits - expected).abs().max().item() < 1e-4
    for name, tensor in from_dir.state_dict().items():
        assert torch.equal(sharded.state_dict()[name], tensor), name


def test_state_dict_source_and_dtype():
    hf = random_hf_model(seed=6)
    with pytest.raises(ValueError, match="config"):
        DBRX.from_hf(hf.state_dict())
    model = DBRX.from_hf(hf.state_dict(), config=hf.config, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # The copy is independent of the source model.
    with torch.no_grad():
        model.wte.weight.zero_()
    assert hf.transformer.wte.weight.abs().sum() > 0


def test_tied_embeddings_export_untied_copy(tmp_path):
    cfg = DBRXConfig(**{**CFG.__dict__, "tie_word_embeddings": True})
    model = DBRX(cfg)
    assert model.lm_head.weight is model.wte.weight
    model.to_hf(str(tmp_path))
    hf_cfg = json.loads((tmp_path / "config.json").read_text())
    assert hf_cfg["tie_word_embeddings"] is False      # transformers refuses tied DBRX
    again = DBRX.from_hf(str(tmp_path))
    assert again.cfg.tie_word_embeddings and again.lm_head.weight is again.wte.weight
    assert torch.equal(again.wte.weight, model.wte.weight)


def test_config_from_original_dbrx_json():
    """The released checkpoints' config.json keeps rope_theta in attn_config only."""
    original = {"d_model": 6144, "n_heads": 48, "n_layers": 40, "max_seq_len": 32768,
                "vocab_size": 100352,
                "attn_config": {"clip_qkv": 8, "kv_n_heads": 8, "rope_theta": 500000},
                "ffn_config": {"ffn_hidden_size": 10752, "moe_num_experts": 16, "moe_top_k": 4,
                               "moe_jitter_eps": 0.01, "moe_loss_weight": 0.05,
                               "moe_normalize_expert_weights": 1}}
    cfg = config_from_hf(original)
    assert cfg == DBRXConfig(moe_z_loss_weight=0.0, clip_qkv=8, moe_normalize_expert_weights=1)
    assert config_from_hf(config_to_hf(cfg)) == cfg


def test_missing_weights_named(tmp_path):
    model = DBRX(CFG)
    model.to_hf(str(tmp_path))
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        DBRX.from_hf(str(tmp_path))
