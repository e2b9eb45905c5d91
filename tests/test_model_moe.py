"""Dropless MoE: exact top-k mixtures under adversarial routing, aux losses, kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.config import DBRXConfig
from model.kernels import BACKENDS, _grouped_mm_ok, grouped_glu, select_backend
from model.moe import DroplessMoE, _Combine, _Dispatch, _inverse_permutation, _Permute, expert_group_name

torch.set_num_threads(min(2, torch.get_num_threads()))   # never above the suite-wide cap


def moe_config(**overrides) -> DBRXConfig:
    base = dict(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden_size=16,
                moe_num_experts=8, moe_top_k=2, vocab_size=64, moe_jitter_eps=None)
    return DBRXConfig(**{**base, **overrides})


def force_experts(moe: DroplessMoE, experts: list[int], margin: float = 50.0) -> None:
    """Make every token's top-k exactly `experts` (ranked in that order) whatever its input.

    The router reads a constant feature (x[..., 0] == 1 in the inputs used here).
    """
    with torch.no_grad():
        w = moe.router.layer.weight
        w.zero_()
        for rank, e in enumerate(experts):
            w[e, 0] = margin - rank


def inputs_with_constant_feature(n: int, d: int, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    x = torch.randn(n, d)
    x[:, 0] = 1.0
    return x


def reference_mixture(moe: DroplessMoE, x: torch.Tensor) -> torch.Tensor:
    """Per token: the normalised-weight sum of exactly its top-k experts, in dense math."""
    _, _, weights, ids = moe.route(x)
    f = moe.experts.ffn_hidden_size
    w1, v1, w2 = (getattr(moe.experts, n).view(-1, f, x.shape[-1])[ids] for n in ("w1", "v1", "w2"))
    h = F.silu(torch.einsum("nkfd,nd->nkf", w1, x)) * torch.einsum("nkfd,nd->nkf", v1, x)
    return torch.einsum("nk,nkf,nkfd->nd", weights, h, w2)


@pytest.mark.parametrize("experts", [[3, 5], [0, 1]])
def test_all_tokens_to_the_same_experts_none_dropped(random_moe, experts):
    cfg = moe_config()
    moe = random_moe(cfg).eval()
    force_experts(moe, experts)
    x = inputs_with_constant_feature(300, cfg.d_model)
    out, stats = moe(x)
    assert stats.expert_counts.tolist() == [300 if e in experts else 0 for e in range(8)]
    assert torch.allclose(out, reference_mixture(moe, x), atol=1e-5, rtol=1e-5)


def test_top1_every_token_to_one_expert(random_moe):
    cfg = moe_config(moe_top_k=1)
    moe = random_moe(cfg, seed=2)
    force_experts(moe, [6])
    x = inputs_with_constant_feature(257, cfg.d_model)
    out, stats = moe(x)
    assert stats.expert_counts[6] == 257 and stats.expert_counts.sum() == 257
    assert torch.allclose(out, reference_mixture(moe, x), atol=1e-5, rtol=1e-5)
    # Perfectly collapsed routing: f_6 = 1, P_6 ~ 1  ->  load-balancing loss ~ E.
    assert stats.lb_loss.item() == pytest.approx(cfg.moe_num_experts, rel=1e-3)


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_random_routing_matches_dense_reference_and_gradients(random_moe, monkeypatch, backend):
    monkeypatch.setenv("DBRX_MOE_KERNEL", backend)
    cfg = moe_config(moe_top_k=3)
    moe = random_moe(cfg, seed=3)
    x = torch.randn(2, 37, cfg.d_model, requires_grad=True)
    out, _ = moe(x)
    expected = reference_mixture(moe, x.detach().reshape(-1, cfg.d_model)).view_as(out)
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5)
    # Gradients against plain autograd through the dense reference.
    grad = torch.randn_like(out)
    out.backward(grad)
    got = [x.grad.clone()] + [p.grad.clone() for p in moe.parameters()]
    moe.zero_grad()
    x2 = x.detach().clone().requires_grad_()
    reference_mixture(moe, x2.reshape(-1, cfg.d_model)).view_as(out).backward(grad)
    want = [x2.grad] + [p.grad for p in moe.parameters()]
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5, rtol=1e-4)


def test_weights_normalised_by_p_norm(random_moe):
    for p in (1.0, 2.0, None):
        moe = random_moe(moe_config(moe_top_k=4, moe_normalize_expert_weights=p))
        _, probs, weights, _ = moe.route(torch.randn(50, 32))
        if p is None:
            assert torch.allclose(weights, probs.topk(4, dim=-1).values)
        else:
            assert torch.allclose(weights.norm(p=p, dim=-1), torch.ones(50), atol=1e-6)


def test_stats_aux_losses_and_padding_mask(random_moe):
    cfg = moe_config()
    moe = random_moe(cfg, seed=4)
    x = torch.randn(4, 10, cfg.d_model)
    valid = torch.ones(4, 10, dtype=torch.bool)
    valid[:, :3] = False
    _, full = moe(x)
    _, masked = moe(x, valid)
    _, real_only = moe(x[:, 3:])
    assert full.expert_counts.sum() == 4 * 10 * cfg.moe_top_k
    assert torch.equal(masked.expert_counts, real_only.expert_counts)
    assert torch.allclose(masked.lb_loss, real_only.lb_loss)
    assert torch.allclose(masked.z_loss, real_only.z_loss)
    logits = moe.router(x.reshape(-1, cfg.d_model))
    assert torch.allclose(full.z_loss, torch.logsumexp(logits, -1).square().mean())
    # The balance loss is differentiable through the router only.
    full.lb_loss.backward()
    assert moe.router.layer.weight.grad.abs().sum() > 0
    assert moe.experts.w1.grad is None


def test_router_jitter_only_in_training(random_moe):
    cfg = moe_config(moe_jitter_eps=0.2)
    moe = random_moe(cfg)
    x = torch.randn(64, cfg.d_model)
    moe.eval()
    assert torch.equal(moe.router(x), moe.router(x))
    moe.train()
    assert not torch.equal(moe.router(x), moe.router(x))


def test_row_shuffles_gradcheck():
    torch.manual_seed(0)
    n, k, d = 5, 3, 4
    order = torch.randperm(n * k)
    inv = _inverse_permutation(order)
    assert torch.equal(order[inv], torch.arange(n * k))
    x = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    y = torch.randn(n * k, d, dtype=torch.float64, requires_grad=True)
    w = torch.rand(n, k, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: _Dispatch.apply(a, order, inv, k), (x,))
    assert torch.autograd.gradcheck(lambda a, b: _Combine.apply(a, b, order, inv), (y, w))
    assert torch.autograd.gradcheck(lambda a: _Permute.apply(a, order, inv), (y,))


@pytest.mark.parametrize("d_model,ffn", [(32, 16), (12, 6)])    # (12, 6): unaligned for grouped_mm
def test_kernel_backends_agree(monkeypatch, d_model, ffn):
    torch.manual_seed(0)
    n_local = 4
    counts = torch.tensor([5, 0, 11, 3])
    x = torch.randn(int(counts.sum()), d_model)
    weights = [torch.randn(n_local * ffn, d_model) * 0.3 for _ in range(3)]
    results = {}
    assert select_backend(x.device, x.dtype, d_model, ffn) == "loop"             # the CPU default
    available = ["loop"] + (["grouped_mm"] if _grouped_mm_ok(x.device, x.dtype, d_model, ffn) else [])
    assert ("grouped_mm" in available) == (d_model == 32)
    for backend in available:
        xs = [x.clone().requires_grad_()] + [w.clone().requires_grad_() for w in weights]
        out = grouped_glu(*xs, counts, backend=backend)
        out.sum().backward()          # a stride-0 gradient, which grouped_mm cannot take as is
        results[backend] = [out] + [t.grad for t in xs]
    # Dense reference.
    rows = torch.repeat_interleave(torch.arange(n_local), counts)
    w1, v1, w2 = (w.view(n_local, ffn, d_model)[rows] for w in weights)
    ref = torch.einsum("nf,nfd->nd", F.silu(torch.einsum("nfd,nd->nf", w1, x))
                       * torch.einsum("nfd,nd->nf", v1, x), w2)
    for backend, (out, *grads) in results.items():
        assert torch.allclose(out, ref, atol=1e-5), backend
        for g, g_loop in zip(grads, results["loop"][1:]):
            assert torch.allclose(g, g_loop, atol=1e-5), backend
        # Experts without tokens still get a (zero) gradient: every parameter is in the graph.
        assert grads[1].view(n_local, ffn, d_model)[1].abs().sum() == 0
    # Only what is asked for: frozen input or frozen weights.
    ws = [w.clone().requires_grad_() for w in weights]
    grouped_glu(x, *ws, counts, backend="loop").sum().backward()
    assert all(torch.allclose(w.grad, g) for w, g in zip(ws, results["loop"][2:]))
    xg = x.clone().requires_grad_()
    grouped_glu(xg, *weights, counts, backend="loop").sum().backward()
    assert torch.allclose(xg.grad, results["loop"][1])
    monkeypatch.setenv("DBRX_MOE_KERNEL", "grouped_mm")
    if d_model == 32:
        assert select_backend(x.device, x.dtype, d_model, ffn) == "grouped_mm"
    else:
        with pytest.raises(RuntimeError, match="aligned"):
            select_backend(x.device, x.dtype, d_model, ffn)
    monkeypatch.setenv("DBRX_MOE_KERNEL", "nope")
    with pytest.raises(ValueError, match="DBRX_MOE_KERNEL"):
        select_backend(x.device, x.dtype, d_model, ffn)
    monkeypatch.setenv("DBRX_MOE_KERNEL", "megablocks")
    with pytest.raises(RuntimeError, match="MegaBlocks"):
        select_backend(x.device, x.dtype, d_model, ffn)
    assert set(BACKENDS) == {"megablocks", "grouped_mm", "loop"}


def test_no_tokens_at_all(random_moe):
    moe = random_moe(moe_config())
    x = torch.zeros(0, 32, requires_grad=True)
    out, stats = moe(x)
    assert out.shape == (0, 32) and stats.expert_counts.sum() == 0
    out.sum().backward()


def test_bf16_forward_and_backward(random_moe):
    cfg = moe_config()
    moe = random_moe(cfg, seed=5)
    x = torch.randn(40, cfg.d_model)
    ref, _ = moe(x)
    xb = x.to(torch.bfloat16).requires_grad_()
    out, _ = moe.to(torch.bfloat16)(xb)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()
    out.float().square().sum().backward()
    assert xb.grad.dtype == torch.bfloat16
    assert all(p.grad.dtype == torch.bfloat16 and p.grad.abs().sum() > 0 for p in moe.parameters())


def test_deepspeed_group_name_convention(random_moe):
    assert expert_group_name(4) == "ep_size_4"
    # Without an expert-parallel group the experts are plain data-parallel parameters.
    moe = random_moe(moe_config())
    assert not hasattr(moe.experts.w1, "allreduce")
