"""Forward+backward throughput of our dropless MoE layer vs transformers' DbrxFFN.

Shapes come from the tiny job's model (conf/local_tiny.yaml -> conf/model/dbrx_tiny.yaml:
d_model, ffn_hidden_size, experts, top-k) and the same with d_model and ffn 4x larger,
each at a realistic micro batch (the tiny job runs 4 sequences x 128 tokens = 512 tokens)
and at 2048 tokens. Both layers get the same weights (fp32 on CPU) and the same tokens;
outputs and all gradients (input, router, experts) are checked to agree before timing.
On a GPU (bf16) MegaBlocks' dMoE is measured too when the `gpu` extra is installed.
Runs are interleaved (the order rotates every round) so that machine noise hits every
layer alike, the thread count is the same for all, and the median step time is
reported. A "GEMM floor" (the 9 expert matmuls of a fwd+bwd alone, on a balanced
split) is timed in the same rounds: it bounds what any implementation of this math
can reach, ours and transformers' alike, so the report says how close to it each
one runs. The whole run takes under 2 minutes on 2 cores.

    python bench/moe_layer.py                          # local_tiny shapes and 4x hidden
    python bench/moe_layer.py --tokens 4096 --shapes 256x512
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

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
    """MegaBlocks' dMoE with our weights, on CUDA with the `gpu` extra; else None."""
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


def run(name: str, layer, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One fwd+bwd; (output, input gradient)."""
    x = x.detach().requires_grad_()
    out = layer(x.transpose(0, 1) if name == "megablocks" else x)   # megablocks: [seq, batch, d]
    out = out[0] if isinstance(out, tuple) else out
    if name == "megablocks":
        out = out.transpose(0, 1)
    out.backward(grad)
    if name == "megablocks":   # dMoE keeps every step's balancing loss in a module-level list
        from megablocks.layers import moe as mb_moe
        getattr(mb_moe, "clear_load_balancing_loss", lambda: None)()
    return out.detach(), x.grad


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


def param_grads(name: str, layer) -> dict[str, torch.Tensor]:
    """Router and expert weight gradients under common names."""
    experts = layer.experts if name == "ours" else layer.experts.mlp
    grads = {n: getattr(experts, n).grad for n in ("w1", "v1", "w2")}
    grads["router"] = layer.router.layer.weight.grad
    return grads


def bench_shape(d_model, ffn, tokens, experts, top_k, max_iters, budget_s, device, dtype,
                verbose=False):
    torch.manual_seed(0)
    cfg, layers = build(d_model, ffn, experts, top_k, device, dtype)
    x = torch.randn(1, tokens, d_model, device=device, dtype=dtype)
    grad = torch.randn_like(x)
    floor = gemm_floor_fn(tokens * top_k, d_model, ffn, experts, device, dtype)
    steps = {name: (lambda layer=layer, name=name: run(name, layer, x, grad))
             for name, layer in layers.items()}
    steps["GEMM floor"] = floor

    def clear():
        for layer in layers.values():
            for p in layer.parameters():
                p.grad = None

    # Warm-up round, which also checks that every layer computes the same thing.
    clear()
    start = time.perf_counter()
    outs = {name: step() for name, step in steps.items()}
    round_s = time.perf_counter() - start
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    ref_out, ref_dx = outs["transformers"]
    ref_grads = param_grads("transformers", layers["transformers"])
    for name in layers:
        out, dx = outs[name]
        pairs = [("output", out, ref_out), ("input grad", dx, ref_dx)]
        if name == "ours":
            pairs += [(f"{k} grad", g, ref_grads[k]) for k, g in param_grads(name, layers[name]).items()]
        for what, got, want in pairs:
            diff = (got.float() - want.float()).abs().max().item()
            scale = max(1.0, want.float().abs().max().item())
            assert diff < tol * scale, f"{name} {what} disagrees with transformers: max diff {diff}"
    # As many interleaved rounds as fit the time budget: at least 3, at most max_iters.
    iters = max(3, min(max_iters, int(budget_s / max(round_s, 1e-6))))
    times = {name: [] for name in steps}
    names = list(steps)
    for i in range(iters):
        for name in names[i % len(names):] + names[:i % len(names)]:     # rotate the order
            clear()
            sync(device)
            start = time.perf_counter()
            steps[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    w1 = layers["ours"].experts.w1
    backend = select_backend(x.reshape(-1, d_model), w1, ffn)
    if verbose:
        for name, t in times.items():
            print(f"  {name}: " + " ".join(f"{v * 1e3:.0f}" for v in t))
    med = {name: statistics.median(t) for name, t in times.items()}
    best = {name: min(t) for name, t in times.items()}
    tps = {name: tokens / med[name] for name in layers}
    print(f"d_model={d_model} ffn={ffn} experts={experts} top_k={top_k} tokens={tokens} "
          f"{str(dtype).removeprefix('torch.')} on {device.type}, {torch.get_num_threads()} threads "
          f"(our kernel: {backend}), {iters} rounds")
    for name, rate in tps.items():
        print(f"  {name:>12}: {rate:9.0f} tokens/s fwd+bwd   median {med[name] * 1e3:8.1f} ms, "
              f"best {best[name] * 1e3:8.1f} ms")
    for other in tps:
        if other != "ours":
            print(f"  ours / {other}: {tps['ours'] / tps[other]:.2f}x  (best vs best "
                  f"{best[other] / best['ours']:.2f}x)")
    # Best-of times estimate an unloaded machine: a lower bound needs the least-disturbed run.
    print(f"  GEMM floor (the 9 expert matmuls alone) best {best['GEMM floor'] * 1e3:.1f} ms: ours runs "
          f"at {best['GEMM floor'] / best['ours']:.0%} of matmul-bound speed; no implementation of "
          f"this math can beat transformers by more than {best['transformers'] / best['GEMM floor']:.2f}x")
    return tps


def tiny_model_shapes(config: str) -> tuple[int, int, int, int]:
    """(d_model, ffn_hidden_size, experts, top_k) of a job config's model."""
    from platform.config import load_job

    model = load_job(config).model
    return model.d_model, model.ffn_hidden_size, model.moe_num_experts, model.moe_top_k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "conf", "local_tiny.yaml"),
                        help="job config whose model gives the shapes (default: the tiny job)")
    parser.add_argument("--tokens", default="512,2048",
                        help="comma-separated tokens per call (default: the tiny job's micro batch "
                             "of 4 x 128 tokens, and 2048)")
    parser.add_argument("--shapes", default="",
                        help="comma-separated d_model x ffn_hidden_size (default: the config's and "
                             "both 4x larger)")
    parser.add_argument("--experts", type=int, default=0, help="default: the config's")
    parser.add_argument("--top-k", type=int, default=0, help="default: the config's")
    parser.add_argument("--iters", type=int, default=0, help="most timed rounds (default: 25 CPU, 20 GPU)")
    parser.add_argument("--budget", type=float, default=20.0,
                        help="seconds of timed rounds per case (keeps the run under 2 minutes)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: all cores)")
    parser.add_argument("--verbose", action="store_true", help="print every round's times")
    args = parser.parse_args()

    start = time.perf_counter()
    d_model, ffn, experts, top_k = tiny_model_shapes(args.config)
    experts, top_k = args.experts or experts, args.top_k or top_k
    shapes = ([tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
              if args.shapes else [(d_model, ffn), (4 * d_model, 4 * ffn)])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    iters = args.iters or (20 if device.type == "cuda" else 25)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; shapes of "
          f"{os.path.relpath(args.config, ROOT)}: d_model={d_model} ffn={ffn} "
          f"experts={experts} top_k={top_k}")
    summary = []
    for d, f in shapes:
        for tokens in (int(t) for t in args.tokens.split(",")):
            tps = bench_shape(d, f, tokens, experts, top_k, iters, args.budget, device, dtype,
                              args.verbose)
            summary.append((d, f, tokens, tps["ours"] / tps["transformers"]))
    print("ours / transformers (fwd+bwd tokens/s, medians):")
    for d, f, tokens, ratio in summary:
        print(f"  d_model={d:<5} ffn={f:<5} tokens={tokens:<5} {ratio:.2f}x")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
