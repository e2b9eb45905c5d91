"""Forward+backward throughput of our dropless MoE layer vs transformers' DbrxFFN.

Both layers get the same weights and the same tokens; before timing, each
output is checked against an fp32 reference with a measure that tolerates
routing ties (bench/accuracy.py). On a GPU (bf16) MegaBlocks' dMoE is measured too when the
`megablocks` extra is installed. Runs and timings are interleaved so that machine
noise hits every layer alike; the median step time is reported. A "GEMM floor"
(the 9 expert matmuls of a fwd+bwd alone, on a balanced split) is timed in the
same rounds: it bounds what any implementation of this math can reach, ours
and transformers' alike, so the report says how close to it each one runs.

    python bench/moe_layer.py                  # local_tiny shapes and 4x hidden, at its micro batch
    python bench/moe_layer.py --tokens 4096 --shapes 256x512
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from accuracy import agreement  # noqa: E402
from model.config import DBRXConfig  # noqa: E402
from model.hf import config_to_hf  # noqa: E402
from model.kernels import select_backend  # noqa: E402
from model.moe import DroplessMoE  # noqa: E402


def build(d_model: int, ffn: int, experts: int, top_k: int, device, dtype):
    from transformers import DbrxConfig as HFConfig
    from transformers.models.dbrx.modeling_dbrx import DbrxFFN

    cfg = DBRXConfig(d_model=d_model, n_layers=1, n_heads=4, n_kv_heads=4, ffn_hidden_size=ffn,
                     moe_num_experts=experts, moe_top_k=top_k, vocab_size=128, moe_jitter_eps=None)
    ours = DroplessMoE(cfg)
    hf = DbrxFFN(HFConfig(**config_to_hf(cfg)))
    with torch.no_grad():
        ours.router.layer.weight.normal_(0, 0.5 / d_model ** 0.5)
        for name in ("w1", "v1", "w2"):
            getattr(ours.experts, name).normal_(0, 1 / d_model ** 0.5)
        hf.router.layer.weight.copy_(ours.router.layer.weight)
        for name in ("w1", "v1", "w2"):
            getattr(hf.experts.mlp, name).copy_(getattr(ours.experts, name))
    layers = {"ours": ours.to(device, dtype), "transformers": hf.to(device, dtype)}
    mb = megablocks_dmoe(cfg, ours, device, dtype)
    if mb is not None:
        layers["megablocks"] = mb
    return cfg, layers


def megablocks_dmoe(cfg: DBRXConfig, ours: DroplessMoE, device, dtype):
    """MegaBlocks' dMoE with our weights, on CUDA with MegaBlocks installed; else None."""
    if device.type != "cuda":
        return None
    try:
        from megablocks.layers.arguments import Arguments
        from megablocks.layers.dmoe import dMoE
    except Exception as exc:  # not installed, or its CUDA extensions did not build
        print(f"  megablocks dMoE unavailable: {exc}")
        return None
    args = Arguments(hidden_size=cfg.d_model, ffn_hidden_size=cfg.ffn_hidden_size,
                     moe_num_experts=cfg.moe_num_experts, moe_top_k=cfg.moe_top_k,
                     mlp_type="glu", mlp_impl="grouped", moe_normalize_expert_weights=1.0,
                     bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, device=device)
    layer = dMoE(args)
    with torch.no_grad():
        layer.router.layer.weight.copy_(ours.router.layer.weight)
        for name in ("w1", "v1", "w2"):
            getattr(layer.experts.mlp, name).copy_(getattr(ours.experts, name))
    return layer


def run(name: str, layer, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_()
    out = layer(x.transpose(0, 1) if name == "megablocks" else x)   # megablocks: [seq, batch, d]
    out = out[0] if isinstance(out, tuple) else out
    if name == "megablocks":
        out = out.transpose(0, 1)
    out.backward(grad)
    if name == "megablocks":   # dMoE keeps every step's balancing loss in a module-level list
        from megablocks.layers import moe as mb_moe
        getattr(mb_moe, "clear_load_balancing_loss", lambda: None)()
    return out.detach()


def gemm_floor_fn(rows: int, d_model: int, ffn: int, experts: int, device, dtype):
    """The 9 expert GEMMs of one fwd+bwd on a balanced split, and nothing else (no routing,
    no activations, no copies): no implementation of the same math can be faster."""
    n = rows // experts
    x, dy = (torch.randn(rows, d_model, device=device, dtype=dtype).split(n) for _ in range(2))
    h = torch.randn(rows, ffn, device=device, dtype=dtype).split(n)
    w = torch.randn(3, experts, ffn, d_model, device=device, dtype=dtype)

    def once():
        for e in range(experts):
            w1, v1, w2 = w[0, e], w[1, e], w[2, e]
            x[e] @ w1.t(), x[e] @ v1.t(), h[e] @ w2                # forward
            dy[e] @ w2.t(), h[e].t() @ dy[e]                       # backward through w2
            h[e].t() @ x[e], h[e].t() @ x[e], h[e] @ w1, h[e] @ v1  # backward through w1, v1
    return once


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def fp32_reference(ours: DroplessMoE, x: torch.Tensor) -> torch.Tensor:
    """Our layer's forward in fp32 on the same weights and tokens: the accuracy yardstick."""
    ref = copy.deepcopy(ours).float()
    with torch.no_grad():
        out, _ = ref(x.float())
    del ref
    return out


def bench_shape(d_model, ffn, tokens, experts, top_k, max_iters, budget_s, device, dtype,
                verbose=False) -> dict:
    """Check every layer against an fp32 reference, then time interleaved fwd+bwd rounds.

    Returns {"shape", "backend", "iters", "layers": {name: {median_s, best_s, tokens_per_s,
    accuracy}}, "floor_best_s"}; raises AssertionError when a layer disagrees with the reference.
    """
    torch.manual_seed(0)
    cfg, layers = build(d_model, ffn, experts, top_k, device, dtype)
    x = torch.randn(1, tokens, d_model, device=device, dtype=dtype)
    grad = torch.randn_like(x)
    ref = fp32_reference(layers["ours"], x)
    floor = gemm_floor_fn(tokens * top_k, d_model, ffn, experts, device, dtype)
    steps = {name: (lambda layer=layer, name=name: run(name, layer, x, grad))
             for name, layer in layers.items()}
    steps["GEMM floor"] = floor
    start = time.perf_counter()
    outs = {name: step() for name, step in steps.items()}                           # warm-up
    round_s = time.perf_counter() - start
    # More warm-up: a layer's first rounds run slower while the allocator settles (by 30-50%
    # for transformers' per-expert gathers), which flatters whichever layer settles first.
    for _ in range(3):
        for step in steps.values():
            step()
    accuracy = {name: agreement(outs[name], ref, dtype) for name in layers}
    bad = {name: str(a) for name, a in accuracy.items() if not a.ok}
    assert not bad, f"layers disagree with the fp32 reference: {bad}"
    # As many interleaved rounds as fit the time budget: at least 2, at most max_iters.
    iters = max(2, min(max_iters, int(budget_s / max(round_s, 1e-6))))
    times = {name: [] for name in steps}
    for _ in range(iters):
        for name, step in steps.items():
            for p in layers[name].parameters() if name in layers else ():
                p.grad = None
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - start)
    if verbose:
        for name, t in times.items():
            print(f"  {name}: " + " ".join(f"{v * 1e3:.0f}" for v in t))
    result = {"shape": dict(d_model=d_model, ffn=ffn, experts=experts, top_k=top_k, tokens=tokens,
                            dtype=str(dtype).removeprefix("torch."), device=device.type),
              "backend": select_backend(device, dtype, d_model, ffn), "iters": iters,
              "floor_best_s": min(times["GEMM floor"]), "layers": {}}
    for name in layers:
        med, best = statistics.median(times[name]), min(times[name])
        result["layers"][name] = {"median_s": med, "best_s": best, "tokens_per_s": tokens / med,
                                  "accuracy": accuracy[name].as_dict()}
    return result


def print_result(r: dict) -> None:
    s, layers = r["shape"], r["layers"]
    print(f"d_model={s['d_model']} ffn={s['ffn']} experts={s['experts']} top_k={s['top_k']} "
          f"tokens={s['tokens']} {s['dtype']} on {s['device']} (our kernel: {r['backend']}), "
          f"{r['iters']} rounds")
    for name, m in layers.items():
        a = m["accuracy"]
        print(f"  {name:>12}: {m['tokens_per_s']:9.0f} tokens/s fwd+bwd   median "
              f"{m['median_s'] * 1e3:8.1f} ms, best {m['best_s'] * 1e3:8.1f} ms   vs fp32: "
              f"{a['agree_share']:.2%} tokens agree, mean rel err {a['mean_rel_err']:.1e}")
    for other in layers:
        if other != "ours":
            print(f"  ours / {other}: {layers['ours']['tokens_per_s'] / layers[other]['tokens_per_s']:.2f}x"
                  f"  (best vs best {layers[other]['best_s'] / layers['ours']['best_s']:.2f}x)")
    floor = r["floor_best_s"]
    # Best-of times estimate an unloaded machine: a lower bound needs the least-disturbed run.
    print(f"  GEMM floor (the 9 expert matmuls alone) best {floor * 1e3:.1f} ms: ours runs "
          f"at {floor / layers['ours']['best_s']:.0%} of matmul-bound speed; no implementation of "
          f"this math can beat transformers by more than {layers['transformers']['best_s'] / floor:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512,
                        help="tokens per fwd+bwd (default: local_tiny's micro batch, 4 x 128)")
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--shapes", default="128x256,512x1024",
                        help="comma-separated d_model x ffn_hidden_size")
    parser.add_argument("--iters", type=int, default=0, help="most timed steps (default: 30 CPU, 20 GPU)")
    parser.add_argument("--budget", type=float, default=30.0,
                        help="seconds of timed steps per shape (keeps the run under 2 minutes)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: all cores)")
    parser.add_argument("--verbose", action="store_true", help="print every round's times")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    iters = args.iters or (20 if device.type == "cuda" else 30)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    start = time.perf_counter()
    for shape in args.shapes.split(","):
        d_model, ffn = (int(v) for v in shape.lower().split("x"))
        print_result(bench_shape(d_model, ffn, args.tokens, args.experts, args.top_k, iters,
                                 args.budget, device, dtype, args.verbose))
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
