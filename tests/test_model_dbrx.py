"""The DBRX module: outputs, losses, activation checkpointing, masks, validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model import DBRX
from model.config import DBRXConfig

torch.set_num_threads(min(2, torch.get_num_threads()))   # never above the suite-wide cap

CFG = DBRXConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_size=16,
                 moe_num_experts=4, moe_top_k=2, vocab_size=40, max_seq_len=32,
                 moe_loss_weight=0.05, moe_z_loss_weight=0.01, moe_jitter_eps=None)


def test_output_fields_and_loss_composition(random_model):
    model = random_model(CFG)
    ids = torch.randint(0, CFG.vocab_size, (3, 10))
    labels = ids.clone()
    labels[:, :4] = -100
    out = model(ids, labels=labels)
    assert out.logits.shape == (3, 10, CFG.vocab_size)
    assert out.expert_counts.shape == (CFG.n_layers, CFG.moe_num_experts)
    assert out.expert_counts.dtype == torch.int64
    assert (out.expert_counts.sum(1) == 3 * 10 * CFG.moe_top_k).all()
    # Label t is predicted from position t-1; labels 0..3 are ignored.
    want_lm = F.cross_entropy(out.logits[:, 3:-1].reshape(-1, CFG.vocab_size), ids[:, 4:].reshape(-1))
    assert torch.allclose(out.lm_loss, want_lm, atol=1e-6)
    assert torch.allclose(out.loss, out.lm_loss + 0.05 * out.lb_loss + 0.01 * out.z_loss)
    assert out.lb_loss.item() >= 1.0 - 1e-5                 # 1 is perfectly balanced
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    no_labels = model(ids)
    assert no_labels.loss is None and no_labels.lm_loss is None
    # Packed training data comes already shifted: the same loss, no logits materialised.
    shifted = model(ids[:, :-1], shift_labels=labels[:, 1:], return_logits=False)
    assert shifted.logits is None and torch.allclose(shifted.lm_loss, want_lm, atol=1e-6)
    with pytest.raises(ValueError, match="not both"):
        model(ids, labels=labels, shift_labels=labels)


def test_activation_checkpointing_same_loss_and_gradients(random_model):
    ids = torch.randint(0, CFG.vocab_size, (2, 12))
    grads = []
    for ckpt in (False, True):
        cfg = DBRXConfig(**{**CFG.__dict__, "activation_checkpointing": ckpt, "moe_jitter_eps": 0.05})
        model = random_model(cfg).train()
        torch.manual_seed(5)                    # same jitter draws; checkpointing replays them
        out = model(ids, labels=ids)
        out.loss.backward()
        grads.append((out.loss.detach(), [p.grad for p in model.parameters()]))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6)
    for a, b in zip(grads[0][1], grads[1][1]):
        assert torch.allclose(a, b, atol=1e-6)


def test_activation_checkpointing_recomputes_blocks(random_model, monkeypatch):
    cfg = DBRXConfig(**{**CFG.__dict__, "activation_checkpointing": True})
    model = random_model(cfg).train()
    calls = []
    block = model.blocks[0]
    original = block.forward
    monkeypatch.setattr(block, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    model(torch.randint(0, 40, (1, 8)), labels=torch.randint(0, 40, (1, 8))).loss.backward()
    assert len(calls) == 2                      # forward, then the recomputation in backward
    calls.clear()
    with torch.no_grad():
        model(torch.randint(0, 40, (1, 8)))
    assert len(calls) == 1


def test_training_reduces_loss(random_model):
    model = random_model(CFG, 2).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, CFG.vocab_size, (4, 16))
    losses = []
    for _ in range(15):
        opt.zero_grad()
        out = model(ids, labels=ids)
        out.loss.backward()
        opt.step()
        losses.append(out.lm_loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_padding_mask_ignores_padded_tokens_in_stats(random_model):
    model = random_model(CFG).eval()
    ids = torch.randint(1, CFG.vocab_size, (2, 8))
    padded = torch.cat([torch.zeros(2, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(2, 3), torch.ones(2, 8)], dim=1).long()
    with torch.no_grad():
        plain = model(ids)
        masked = model(padded, attention_mask=mask)
    assert (masked.logits[:, 3:] - plain.logits).abs().max() < 1e-4
    assert torch.equal(masked.expert_counts, plain.expert_counts)


def test_tied_embeddings_share_one_tensor(random_model):
    model = random_model(DBRXConfig(**{**CFG.__dict__, "tie_word_embeddings": True}))
    assert model.lm_head.weight is model.wte.weight
    model(torch.randint(0, 40, (1, 4)), labels=torch.randint(0, 40, (1, 4))).loss.backward()
    assert model.wte.weight.grad is not None


def test_errors_name_what_to_change(random_model):
    with pytest.raises(ValueError, match="n_kv_heads"):
        DBRX(DBRXConfig(**{**CFG.__dict__, "n_kv_heads": 3}))
    model = random_model(CFG)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, CFG.max_seq_len + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 5))


def test_builds_on_meta_device_for_large_configs():
    with torch.device("meta"):
        model = DBRX(DBRXConfig())
    assert sum(p.numel() for p in model.parameters()) > 1.3e11
