"""Expert parallelism over 2 gloo processes equals one process holding every expert.

One spawn runs all the distributed checks (process start-up dominates the cost):
the MoE layer on skewed routing (most tokens to expert 0) and on routing that
leaves rank 1 without any token, then the whole model with activation
checkpointing, with DeepSpeed's own expert-parallel group passed in.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model.config import DBRXConfig
from model.dbrx import DBRX
from model.moe import DroplessMoE, expert_group_name
from platform.provision.head import free_local_port

torch.set_num_threads(min(2, torch.get_num_threads()))   # never above the suite-wide cap
WORLD = 2
TOL = 1e-5

MOE_CFG = DBRXConfig(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden_size=16,
                     moe_num_experts=8, moe_top_k=2, vocab_size=64, moe_jitter_eps=None)
MODEL_CFG = DBRXConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_size=16,
                       moe_num_experts=8, moe_top_k=2, vocab_size=64, max_seq_len=32,
                       moe_jitter_eps=None, activation_checkpointing=True)


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Within TOL, relative to the tensor's scale once it exceeds 1 (fp32 sums of ~100 terms)."""
    return (got - want).abs().max().item() <= TOL * max(1.0, want.abs().max().item())


def _scenarios() -> dict[str, dict]:
    """MoE weights and a (2 ranks x tokens) batch per routing scenario."""
    out = {}
    torch.manual_seed(0)
    base = DroplessMoE(MOE_CFG).state_dict()
    for p in base.values():
        p.normal_(0.0, 0.3)
    for name in ("skewed", "rank1_idle"):
        sd = {k: v.clone() for k, v in base.items()}
        x = torch.randn(WORLD, 48, MOE_CFG.d_model)
        w = sd["router.layer.weight"]
        if name == "skewed":        # 90% of tokens carry a feature that makes expert 0 win
            x[:, :43, 0] = 4.0
            x[:, 43:, 0] = 0.0
            w[:, 0] = 0.0
            w[0, 0] = 5.0
        else:                       # every token to experts 1 and 2, both on rank 0
            x[..., 0] = 1.0
            w.zero_()
            w[1, 0], w[2, 0] = 50.0, 49.0
        out[name] = {"state": sd, "x": x, "grad": torch.randn_like(x)}
    return out


def _moe_run(moe: DroplessMoE, x: torch.Tensor, grad: torch.Tensor) -> dict:
    x = x.detach().clone().requires_grad_()
    y, stats = moe(x)
    y.backward(grad)
    return {"out": y.detach(), "x_grad": x.grad, "counts": stats.expert_counts,
            "grads": {n: p.grad.clone() for n, p in moe.named_parameters()}}


def _model_inputs() -> dict:
    torch.manual_seed(1)
    model = DBRX(MODEL_CFG)
    ids = torch.randint(0, MODEL_CFG.vocab_size, (WORLD * 2, 12))
    logit_grad = torch.randn(WORLD * 2, 12, MODEL_CFG.vocab_size)
    return {"state": model.state_dict(), "ids": ids, "logit_grad": logit_grad}


def _model_run(model: DBRX, ids: torch.Tensor, logit_grad: torch.Tensor) -> dict:
    model.train()
    out = model(ids)
    out.logits.backward(logit_grad)
    return {"logits": out.logits.detach(),
            "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}


def _expert_rows(cfg: DBRXConfig, rank: int) -> slice:
    rows = cfg.moe_num_experts // WORLD * cfg.ffn_hidden_size
    return slice(rank * rows, (rank + 1) * rows)


def _shard(state: dict, cfg: DBRXConfig, rank: int) -> dict:
    return {k: (v[_expert_rows(cfg, rank)] if k.split(".")[-1] in ("w1", "v1", "w2") else v)
            for k, v in state.items()}


def _worker(rank: int, port: int, payload: dict, results: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    from deepspeed.utils import groups

    from platform.train.engine import expert_parallel_group

    # The training workers' own set-up: DeepSpeed adopts the gloo group and makes its expert
    # groups, without JIT-compiling its CPU inference all-reduce (~30 s of g++ on 2 cores).
    ep_group = expert_parallel_group(WORLD)
    assert ep_group is groups._get_expert_parallel_group(expert_group_name(WORLD))
    out: dict = {"moe": {}}

    for name, sc in payload["moe"].items():
        moe = DroplessMoE(MOE_CFG, ep_group=ep_group)
        moe.load_state_dict(_shard(sc["state"], MOE_CFG, rank))
        out["moe"][name] = _moe_run(moe, sc["x"][rank], sc["grad"][rank])

    model = DBRX(MODEL_CFG, ep_group=ep_group)
    model.load_state_dict(_shard(payload["model"]["state"], MODEL_CFG, rank))
    half = slice(rank * 2, rank * 2 + 2)
    res = _model_run(model, payload["model"]["ids"][half], payload["model"]["logit_grad"][half])
    # Data-parallel reduction of dense gradients (what DeepSpeed does); experts stay local.
    for p_name, p in model.named_parameters():
        if not getattr(p, "allreduce", True):
            continue
        dist.all_reduce(res["grads"][p_name], group=groups._get_data_parallel_group())
    res["tags"] = {n: (getattr(p, "allreduce", True), getattr(p, "group_name", None))
                   for n, p in model.named_parameters()}
    res["edp_groups"] = sorted(groups._get_expert_data_parallel_group_dict())
    res["local_experts"] = list(model.local_experts)
    out["model"] = res
    # Generation: each rank decodes its own prompts (counts and lengths differ) in lock step.
    gen = payload["generate"]
    out["generate"] = {kind: model.generate(gen["prompts"][rank], max_new_tokens=gen["max_new"],
                                            stop_tokens=gen["stop"], **kwargs)
                       for kind, kwargs in GENERATE_KINDS.items()}
    # Hugging Face interop under EP: each rank loads only its experts; export gathers them.
    loaded = DBRX.from_hf(payload["hf_dir"], ep_group=ep_group)
    out["hf_loaded"] = loaded.state_dict()
    loaded.to_hf(os.path.join(results, "export"))
    torch.save(out, os.path.join(results, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


GENERATE_KINDS = {"greedy": {}, "seeded": {"temperature": 1.0, "top_p": 0.9, "seed": 11}}


def _generate_inputs(full: DBRX) -> dict:
    """Rank 0: two prompts; rank 1: one, which stops early on a stop token (its second greedy
    token), so rank 1 keeps stepping with the others after its own sequence is done."""
    prompts = {0: [[1, 2, 3], [4, 5, 6, 7, 8, 9]], 1: [[10, 11]]}
    stop = full.generate(prompts[1], max_new_tokens=2).tokens[0][1]
    return {"prompts": prompts, "max_new": 6, "stop": [stop]}


@pytest.fixture(scope="module")
def ep_results(tmp_path_factory):
    pytest.importorskip("deepspeed")
    results = str(tmp_path_factory.mktemp("ep"))
    payload = {"moe": _scenarios(), "model": _model_inputs()}
    full = DBRX(MODEL_CFG)
    full.load_state_dict(payload["model"]["state"])
    payload["generate"] = _generate_inputs(full)
    payload["hf_dir"] = os.path.join(results, "hf")
    full.to_hf(payload["hf_dir"])
    mp.spawn(_worker, args=(free_local_port(), payload, results), nprocs=WORLD, join=True)
    ranks = [torch.load(os.path.join(results, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
    return payload, ranks, results


@pytest.mark.parametrize("scenario", ["skewed", "rank1_idle"])
def test_moe_layer_ep2_equals_ep1(ep_results, scenario):
    payload, ranks, _ = ep_results
    sc = payload["moe"][scenario]
    moe = DroplessMoE(MOE_CFG)
    moe.load_state_dict(sc["state"])
    ref = _moe_run(moe, sc["x"].reshape(-1, MOE_CFG.d_model), sc["grad"].reshape(-1, MOE_CFG.d_model))
    counts = ref["counts"]
    if scenario == "skewed":
        assert counts[0] >= 0.9 * WORLD * 48 and counts[0] == counts.max()
    else:
        assert counts[4:].sum() == 0          # rank 1's experts 4..7 receive no token
    tokens = sc["x"].shape[1]
    for rank, res in enumerate(ranks):
        got = res["moe"][scenario]
        rows = slice(rank * tokens, (rank + 1) * tokens)
        assert close(got["out"], ref["out"][rows])
        assert close(got["x_grad"], ref["x_grad"][rows])
        for name, g in got["grads"].items():
            if name.startswith("experts."):
                assert close(g, ref["grads"][name][_expert_rows(MOE_CFG, rank)]), (scenario, rank, name)
    # The router is data-parallel: the ranks' gradients sum to the single-process one.
    router = "router.layer.weight"
    assert close(sum(r["moe"][scenario]["grads"][router] for r in ranks), ref["grads"][router])
    assert torch.equal(sum(r["moe"][scenario]["counts"] for r in ranks), counts)


def test_model_ep2_with_checkpointing_equals_ep1(ep_results):
    payload, ranks, _ = ep_results
    ref_model = DBRX(MODEL_CFG)
    ref_model.load_state_dict(payload["model"]["state"])
    ref = _model_run(ref_model, payload["model"]["ids"], payload["model"]["logit_grad"])
    for rank, res in enumerate(ranks):
        got = res["model"]
        assert got["local_experts"] == list(range(rank * 4, rank * 4 + 4))
        assert close(got["logits"], ref["logits"][rank * 2:rank * 2 + 2])
        for name, g in got["grads"].items():
            want = ref["grads"][name]
            if name.split(".")[-1] in ("w1", "v1", "w2"):
                want = want[_expert_rows(MODEL_CFG, rank)]
            assert close(g, want), (rank, name)


def test_generate_under_ep2_equals_one_process_rank_by_rank(ep_results):
    payload, ranks, _ = ep_results
    full = DBRX(MODEL_CFG)
    full.load_state_dict(payload["model"]["state"])
    gen = payload["generate"]
    for rank, res in enumerate(ranks):
        for kind, kwargs in GENERATE_KINDS.items():
            want = full.generate(gen["prompts"][rank], max_new_tokens=gen["max_new"],
                                 stop_tokens=gen["stop"], **kwargs)
            assert res["generate"][kind] == want, (rank, kind)
    assert ranks[1]["generate"]["greedy"].finish_reasons == ["stop"]     # done before rank 0


def test_expert_params_tagged_for_deepspeed(ep_results):
    _, ranks, _ = ep_results
    for res in ranks:
        tags = res["model"]["tags"]
        experts = {n for n in tags if n.split(".")[-1] in ("w1", "v1", "w2")}
        assert experts and all(tags[n] == (False, "ep_size_2") for n in experts)
        assert all(tags[n] == (True, None) for n in tags if n not in experts)
        assert "ep_size_2" in res["model"]["edp_groups"]


def test_hf_load_shards_experts_and_export_gathers_them(ep_results):
    payload, ranks, results = ep_results
    state = payload["model"]["state"]
    for rank, res in enumerate(ranks):
        want = _shard(state, MODEL_CFG, rank)
        assert res["hf_loaded"].keys() == want.keys()
        for name, tensor in res["hf_loaded"].items():
            assert torch.equal(tensor, want[name]), (rank, name)
    exported = DBRX.from_hf(os.path.join(results, "export"))
    for name, tensor in exported.state_dict().items():
        assert torch.equal(tensor, state[name]), name
