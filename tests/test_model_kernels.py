"""The GPU path's kernel choices, tested where CI runs (CPU).

Two defects seen on an H200 are pinned here: the grouped_mm probe cached a
wrong answer when it first ran under no_grad (eval, promotion gate, serving),
and torch.autocast crashed the per-expert loop kernel. Every backend that runs
on this machine is exercised under no_grad, inference_mode and autocast (bf16
and fp16), forward and backward.
"""

from __future__ import annotations

import pytest
import torch

from model import DBRX
from model.config import DBRXConfig
from model.kernels import _grouped_mm_works, grouped_glu, select_backend

torch.set_num_threads(min(2, torch.get_num_threads()))

CPU_BACKENDS = ["loop", "grouped_mm"]


MOE_CFG = DBRXConfig(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden_size=16,
                     moe_num_experts=8, moe_top_k=2, vocab_size=64, moe_jitter_eps=None)


@pytest.mark.parametrize("first_call", [torch.no_grad, torch.inference_mode])
def test_grouped_mm_probe_ignores_the_callers_grad_mode(random_moe, monkeypatch, first_call):
    """The first forward of a process under no_grad must not switch grouped_mm off for good."""
    _grouped_mm_works.cache_clear()
    monkeypatch.setenv("DBRX_MOE_KERNEL", "grouped_mm")
    moe = random_moe(MOE_CFG)
    x = torch.randn(24, 32)
    try:
        with first_call():
            eval_out, _ = moe(x)                # the probe runs here, under the caller's mode
        assert _grouped_mm_works("cpu", torch.float32)
        x = x.clone().requires_grad_()
        out, _ = moe(x)                         # training after eval still gets grouped_mm
        out.square().sum().backward()
        assert torch.allclose(out, eval_out, atol=1e-6)
        assert x.grad is not None and moe.experts.w1.grad.abs().sum() > 0
    finally:
        _grouped_mm_works.cache_clear()


def test_backend_choice_is_a_function_of_device_dtype_and_shape_only():
    _grouped_mm_works.cache_clear()
    try:
        with torch.no_grad():
            first = select_backend(torch.device("cpu"), torch.bfloat16, 32, 16)
        with torch.enable_grad():
            second = select_backend(torch.device("cpu"), torch.bfloat16, 32, 16)
        assert first == second == "loop"     # the CPU default
    finally:
        _grouped_mm_works.cache_clear()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_kernel_runs_under_autocast(random_moe, monkeypatch, backend, dtype):
    """fp32 weights under autocast: the experts compute in the autocast dtype, forward and
    backward, and gradients land on the fp32 parameters close to an fp32 run's."""
    monkeypatch.setenv("DBRX_MOE_KERNEL", backend)
    moe = random_moe(MOE_CFG, seed=1)
    x = torch.randn(40, 32)
    grad = torch.randn(40, 32)
    ref_x = x.clone().requires_grad_()
    ref, _ = moe(ref_x)
    ref.backward(grad)
    ref_grads = [p.grad.clone() for p in moe.parameters()]
    moe.zero_grad()

    xa = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        out, _ = moe(xa)
    assert out.dtype == dtype
    out.float().backward(grad)
    scale = ref.abs().max()
    assert (out.float() - ref).abs().max() < 0.05 * scale
    assert xa.grad.dtype == torch.float32
    assert (xa.grad - ref_x.grad).abs().max() < 0.05 * ref_x.grad.abs().max()
    for p, g in zip(moe.parameters(), ref_grads):
        assert p.grad.dtype == torch.float32
        assert (p.grad - g).abs().max() < 0.05 * g.abs().max()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_grouped_glu_under_autocast_with_frozen_weights_and_empty_experts(backend):
    torch.manual_seed(2)
    counts = torch.tensor([6, 0, 9, 1])
    x = torch.randn(16, 32, requires_grad=True)
    weights = [torch.randn(4 * 16, 32) * 0.3 for _ in range(3)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = grouped_glu(x, *weights, counts, backend=backend)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and x.grad.dtype == torch.float32


def test_whole_model_trains_under_autocast():
    """A user's usual wrapping: fp32 model, bf16 autocast, loss and backward."""
    cfg = DBRXConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_size=16,
                     moe_num_experts=4, moe_top_k=2, vocab_size=97, max_seq_len=64)
    torch.manual_seed(3)
    model = DBRX(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    out.loss.backward()
    reference = DBRX(cfg)
    reference.load_state_dict(model.state_dict())
    expected = reference(ids, labels=ids).loss
    assert torch.isfinite(out.loss) and abs(out.loss.item() - expected.item()) < 0.05
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
