"""8-bit serving weights (model.quant): per-channel int8 close to fp32, fp8 refused off Hopper."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from model import DBRX
from model.config import DBRXConfig
from model.quant import Int8Linear, QuantExperts, quantize, quantize_model, weight_bytes

torch.set_num_threads(min(2, torch.get_num_threads()))

CFG = DBRXConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_size=64, moe_num_experts=4,
                 moe_top_k=2, vocab_size=97, max_seq_len=128, rope_theta=500.0, clip_qkv=8.0)
# Bounds on held-out tokens, for weights at a trained model's scale (std 0.1 ~ 1/sqrt(d_model)):
# int8 may move the fp32 model's next-token loss, and its mean KL from fp32, by at most this (nats).
LOSS_BOUND = 0.01
KL_BOUND = 0.01


@pytest.fixture(scope="module")
def pair(random_model) -> tuple[DBRX, DBRX]:
    fp32 = random_model(CFG, std=0.1).eval()
    return fp32, quantize_model(copy.deepcopy(fp32), "int8").eval()


def test_per_channel_int8_rounds_each_weight_to_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(24, 40) * torch.linspace(0.01, 3.0, 24)[:, None]   # rows of very different scales
    q, scale = quantize(w, "int8")
    assert q.dtype == torch.int8 and scale.shape == (24, 1)
    assert torch.allclose(scale[:, 0], w.abs().amax(1) / 127)
    assert ((q.float() * scale - w).abs() <= scale / 2 + 1e-7).all()
    lin = Int8Linear(w)
    x = torch.randn(5, 40)
    assert (lin(x) - x @ (q.float() * scale).T).abs().max() < 1e-4


def test_int8_model_quantizes_experts_and_projections_and_is_smaller(pair):
    fp32, int8 = pair
    block = int8.blocks[0]
    assert isinstance(block.ffn.experts, QuantExperts) and isinstance(block.attn.Wqkv, Int8Linear)
    assert isinstance(int8.lm_head, Int8Linear)
    assert block.ffn.router.layer.weight.dtype == torch.float32          # routing stays exact
    assert block.ffn.experts.w2_s.shape == (CFG.moe_num_experts, 1, CFG.d_model)   # per output column
    assert weight_bytes(int8) < 0.45 * weight_bytes(fp32)


def test_int8_held_out_loss_and_greedy_text_stay_close_to_fp32(pair):
    fp32, int8 = pair
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, CFG.vocab_size, (4, 48), generator=gen)
    with torch.no_grad():
        la, lb = fp32(ids).logits, int8(ids).logits

    def loss(logits):
        return F.cross_entropy(logits[:, :-1].reshape(-1, CFG.vocab_size), ids[:, 1:].reshape(-1))

    assert abs(float(loss(la)) - float(loss(lb))) < LOSS_BOUND
    kl = F.kl_div(lb.log_softmax(-1), la.log_softmax(-1), log_target=True, reduction="none").sum(-1).mean()
    assert float(kl) < KL_BOUND
    assert (la.argmax(-1) == lb.argmax(-1)).float().mean() > 0.9
    prompt = [[1, 2, 3, 4]]
    a = fp32.generate(prompt, max_new_tokens=16).tokens[0]
    b = int8.generate(prompt, max_new_tokens=16).tokens[0]
    assert a[:12] == b[:12]


def test_quantized_experts_decode_paths_equal_their_grouped_path(pair):
    _, int8 = pair
    moe = int8.blocks[1].ffn
    x = torch.randn(12, CFG.d_model)
    with torch.no_grad():
        grouped, _ = moe(x)                                  # dequantize all, sorted grouped GLU
        assert (moe.decode(x) - grouped).abs().max() < 1e-5  # 24 pairs > 4 per expert: sorted
        dense = torch.cat([moe.decode(x[i:i + 2]) for i in range(0, 12, 2)])   # every expert, every row
        assert (dense - grouped).abs().max() < 1e-5
        alone = torch.cat([moe.decode(x[i:i + 1]) for i in range(12)])   # 2 pairs < 4 experts: gathered
        assert (alone - grouped).abs().max() < 1e-5


def test_fp8_is_refused_off_hopper_with_a_clear_message(pair, tmp_path):
    fp32, _ = pair
    with pytest.raises(ValueError, match="compute capability 9.0"):
        quantize_model(copy.deepcopy(fp32), "fp8")
    with pytest.raises(ValueError, match="one of fp32, bf16, int8, fp8"):
        quantize_model(copy.deepcopy(fp32), "int4")


def test_the_loader_quantizes_at_load_and_refuses_fp8_on_cpu(tmp_path, random_model):
    from platform.config import load_job
    from platform.errors import UserError
    from platform.registry.artifacts import write_version
    from platform.serving.loader import ModelLoader, ModelSource, ServerSettings
    from platform.tracking.store import Store

    cfg = load_job("conf/local_tiny.yaml").model
    write_version(tmp_path / "export", random_model(cfg, 3).eval(), {"step": 1})

    def loader(weights: str) -> ModelLoader:
        return ModelLoader(ServerSettings(ModelSource("m", checkpoint=str(tmp_path / "export")),
                                          Store("sqlite:///unused", None), cfg, str(tmp_path / "cache"),
                                          weights=weights))

    loaded = loader("int8").load()
    assert isinstance(loaded.model.blocks[0].ffn.experts, QuantExperts) and not loaded.model.training
    assert loader("bf16").load().model.wte.weight.dtype == torch.bfloat16
    with pytest.raises(UserError, match="fp8.*use int8 or bf16"):
        loader("fp8").load()
    with pytest.raises(UserError, match="serve.weights"):
        loader("int4").load()
