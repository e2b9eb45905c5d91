"""One GPU check for any H100/H200: correctness of the GPU path and its speed, in one run.

    python bench/gpu_check.py [--json PATH] [--sections device,kernels,...]

Needs torch alone; transformers and deepspeed are used when present (a section
whose package is missing is reported as skipped, not failed). No Ray, no MLflow,
no Hydra: the GPU machines this runs on have torch and little else. Sections:

  device    the GPU, and its bf16 GEMM peak measured here (the ceiling for ratios)
  kernels   the MoE kernel chosen on CUDA (also after a no-grad forward), every
            backend forward+backward against an fp32 reference, autocast bf16/fp16
  hf        logits equal transformers' DbrxForCausalLM: fp32 within 1e-4; bf16 by
            the routing-tie-tolerant measure (bench/accuracy.py), no worse than
            transformers' own bf16
  moe       the MoE layer fwd+bwd at DBRX width (16384 tokens, bf16) against
            transformers' DbrxFFN and the bench's GEMM floor; a kernel profile
  train     training-step MFU, plain PyTorch (bf16 weights, fused AdamW): DBRX width
            (d 6144, 48 heads, 8 KV heads, ffn 10752, 16 experts top-4) x 2 layers,
            seq 4096, micro batch 4
  engine    the platform's DeepSpeed engine (platform/train/engine.py: bf16, ZeRO-1,
            world size 1, NCCL) against plain PyTorch on the same model (d 2048 x 4)
  decode    the serving engine's decode step, ms per layer-step (bench/serve.py): a
            4-layer DBRX-width slice, 2k-token KV, bf16 eager / CUDA graphs and 8-bit
            weights at batch 1 and 8; CUDA-graph tokens must equal eager ones

MFU is model FLOPs (model/counting.py, no recomputation) over 989 TFLOP/s, the
H100/H200 dense bf16 datasheet figure; the measured GEMM peak is printed beside
it. Prints one table; --json writes the same as JSON. Exits 1 when a
correctness check fails or a section crashes. On a machine without CUDA it says
so, runs the sections that can run on CPU (kernels, hf) and exits 0.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402

DATASHEET_BF16_TFLOPS = 989.0
SECTIONS = ("device", "kernels", "hf", "moe", "train", "engine", "decode")
CPU_SECTIONS = ("device", "kernels", "hf")
DBRX_WIDTH = dict(d_model=6144, n_heads=48, n_kv_heads=8, ffn_hidden_size=10752,
                  moe_num_experts=16, moe_top_k=4, vocab_size=100352)


@dataclass(frozen=True)
class Sizes:
    """The shapes each section measures. SMOKE runs every section on CPU at toy sizes
    (--smoke, used by the test suite so that this script keeps working where no GPU is)."""

    gemm: int = 8192
    width: dict = field(default_factory=lambda: dict(DBRX_WIDTH))       # the DBRX-width model
    small: dict = field(default_factory=lambda: dict(                   # the engine/decode model
        d_model=2048, n_heads=16, n_kv_heads=4, ffn_hidden_size=5632, n_layers=4))
    moe_tokens: int = 16384
    seq: int = 4096
    micro: int = 4


FULL = Sizes()
SMOKE = Sizes(gemm=256,
              width=dict(d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden_size=128,
                         moe_num_experts=16, moe_top_k=4, vocab_size=512),
              small=dict(d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden_size=128, n_layers=2,
                         vocab_size=512),
              moe_tokens=256, seq=64, micro=2)
RUN = {"sizes": FULL, "device": "cuda"}


class Skipped(Exception):
    """A section that cannot run here (missing package, no GPU): reported, not failed."""


class CheckFailed(Exception):
    """A correctness check failed: the run exits 1."""


# ----------------------------------------------------------------------------- helpers

def cuda() -> bool:
    return torch.cuda.is_available() and RUN["device"] == "cuda"


def sizes() -> Sizes:
    return RUN["sizes"]


def dev() -> str:
    return RUN["device"]


def sync() -> None:
    if cuda():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], warmup: int, iters: int) -> list[float]:
    """Seconds per call of `fn`, each call synchronised."""
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - start)
    return out


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def free_memory() -> None:
    gc.collect()
    if cuda():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 1e9 if cuda() else float("nan")


def dbrx_config(**overrides):
    """A DBRX config at this run's width (DBRX's own, or the smoke run's), overridden."""
    from model.config import DBRXConfig

    return DBRXConfig(**{**sizes().width, "max_seq_len": max(4096, sizes().seq), **overrides})


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| over the whole tensor (L2), in float32."""
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------- sections

def section_device(state: dict) -> dict:
    info = {"torch": torch.__version__, "cuda": cuda()}
    if cuda():
        props = torch.cuda.get_device_properties(0)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gb=round(props.total_memory / 1e9, 1), sms=props.multi_processor_count)
    elif RUN["sizes"] is not SMOKE:
        info["note"] = "no CUDA device: GPU sections are skipped"
        return info
    n, w = sizes().gemm, sizes().width
    a, b = (torch.randn(n, n, device=dev(), dtype=torch.bfloat16) for _ in range(2))
    t = median(timed(lambda: a @ b, warmup=3, iters=10))
    info["gemm_square"] = n
    info["gemm_square_bf16_tflops"] = 2 * n ** 3 / t / 1e12
    # The MoE's own GEMM class: a micro batch of tokens x the expert width.
    rows, d, f = sizes().moe_tokens, w["d_model"], w["ffn_hidden_size"]
    x = torch.randn(rows, d, device=dev(), dtype=torch.bfloat16)
    wt = torch.randn(f, d, device=dev(), dtype=torch.bfloat16)
    t = median(timed(lambda: x @ wt.t(), warmup=3, iters=10))
    info["gemm_moe_shape"] = f"{rows}x{d}x{f}"
    info["gemm_moe_shape_bf16_tflops"] = 2 * rows * d * f / t / 1e12
    state["gemm_peak"] = info["gemm_square_bf16_tflops"]
    return info


def section_kernels(state: dict) -> dict:
    from model.kernels import _grouped_mm_works, grouped_glu, select_backend

    device = torch.device(dev() if cuda() or RUN["sizes"] is SMOKE else "cpu")
    out: dict = {}
    # Defect 1: the choice after an eval (no-grad) forward must be the training one.
    from model.moe import DroplessMoE

    _grouped_mm_works.cache_clear()
    moe = DroplessMoE(dbrx_config(d_model=256, ffn_hidden_size=512, n_heads=4, n_kv_heads=2,
                                  moe_jitter_eps=None)).to(device, torch.bfloat16)
    with torch.no_grad():
        moe(torch.randn(64, 256, device=device, dtype=torch.bfloat16))
    out["backend_after_no_grad"] = select_backend(device, torch.bfloat16, DBRX_WIDTH["d_model"],
                                                  DBRX_WIDTH["ffn_hidden_size"])
    expected = "grouped_mm" if cuda() else "loop"
    if out["backend_after_no_grad"] != expected:
        raise CheckFailed(f"backend after a no-grad forward is {out['backend_after_no_grad']}, "
                          f"expected {expected}")

    # Every backend, fwd+bwd, against an fp32 loop reference; one expert gets no tokens.
    torch.manual_seed(0)
    n_local, d, ffn = 8, 256, 512
    counts = torch.tensor([300, 0, 41, 129, 7, 200, 1, 90], device=device)
    x = torch.randn(int(counts.sum()), d, device=device)
    ws = [torch.randn(n_local * ffn, d, device=device) / d ** 0.5 for _ in range(3)]
    dy = torch.randn_like(x)

    def fwd_bwd(fn, dtype):
        leaves = [t.detach().to(dtype).clone().requires_grad_() for t in (x, *ws)]
        y = fn(*leaves)
        y.backward(dy.to(dtype))
        return [y] + [t.grad for t in leaves]

    ref = fwd_bwd(lambda *t: grouped_glu(*t, counts, backend="loop"), torch.float32)
    variants = {"loop": lambda *t: grouped_glu(*t, counts, backend="loop")}
    if _grouped_mm_works(device.type, torch.bfloat16):
        variants["grouped_mm"] = lambda *t: grouped_glu(*t, counts, backend="grouped_mm")
    errors = {}
    for name, fn in variants.items():
        got = fwd_bwd(fn, torch.bfloat16)
        errors[name] = max(rel_err(g, r) for g, r in zip(got, ref))
        empty = got[2].view(n_local, ffn, d)[1]
        if errors[name] > 2e-2 or empty.abs().sum().item() != 0:
            raise CheckFailed(f"{name}: bf16 fwd/bwd rel err {errors[name]:.3g} vs fp32 (max 2e-2), "
                              f"empty expert grad {empty.abs().sum().item()}")
    out["bf16_rel_err_vs_fp32"] = errors

    # Defect 2: autocast around an fp32 layer, forward and backward, every backend.
    autocast = {}
    for dtype in (torch.bfloat16, torch.float16):
        for name in ("loop", "grouped_mm"):
            if name == "grouped_mm" and not _grouped_mm_works(device.type, dtype):
                continue
            leaves = [t.clone().requires_grad_() for t in (x, *ws)]
            with torch.autocast(device.type, dtype=dtype):
                y = grouped_glu(*leaves, counts, backend=name)
            y.float().backward(dy)
            err = max(rel_err(g, r) for g, r in zip([y] + [t.grad for t in leaves], ref))
            autocast[f"{name}/{str(dtype).removeprefix('torch.')}"] = err
            if y.dtype != dtype or err > 2e-2:
                raise CheckFailed(f"autocast {dtype} with {name}: output {y.dtype}, rel err {err:.3g}")
    out["autocast_rel_err"] = autocast
    return out


def section_hf(state: dict) -> dict:
    try:
        import transformers
    except ImportError as exc:
        raise Skipped(f"transformers not installed ({exc})")
    from accuracy import agreement
    from model import DBRX
    from model.hf import config_to_hf

    device = dev() if cuda() or RUN["sizes"] is SMOKE else "cpu"
    cfg = dbrx_config(d_model=512, n_layers=2, n_heads=8, n_kv_heads=2, ffn_hidden_size=1024,
                      vocab_size=4096, max_seq_len=512)
    torch.manual_seed(0)
    hf = transformers.DbrxForCausalLM(transformers.DbrxConfig(**config_to_hf(cfg))).eval()
    ours = DBRX.from_hf(hf).eval()
    hf, ours = hf.to(device), ours.to(device)
    ids = torch.randint(0, cfg.vocab_size, (4, 256), device=device)
    with torch.no_grad():
        ref = hf(ids).logits.float()
        fp32_diff = (ours(ids).logits.float() - ref).abs().max().item()
        result = {"transformers": transformers.__version__, "fp32_max_abs_diff": fp32_diff}
        if fp32_diff >= 1e-4:
            raise CheckFailed(f"fp32 logits differ from transformers by {fp32_diff:.3g} (max 1e-4)")
        if not cuda():
            return result
        ours_bf16 = agreement(ours.to(torch.bfloat16)(ids).logits, ref, torch.bfloat16)
        hf_bf16 = agreement(hf.to(torch.bfloat16)(ids).logits, ref, torch.bfloat16)
    result.update(bf16_ours=ours_bf16.as_dict(), bf16_transformers=hf_bf16.as_dict())
    # Logits pass through every layer's routing: judged against transformers' own bf16.
    if (ours_bf16.agree_share < hf_bf16.agree_share - 0.01
            or ours_bf16.mean_rel_err > 1.5 * hf_bf16.mean_rel_err + 1e-3):
        raise CheckFailed(f"bf16 logits: ours {ours_bf16}; transformers {hf_bf16}")
    return result


def require_cuda() -> None:
    if not cuda() and RUN["sizes"] is not SMOKE:
        raise Skipped("needs a CUDA GPU")


def section_moe(state: dict) -> dict:
    require_cuda()
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        raise Skipped(f"transformers not installed ({exc})")
    import moe_layer

    w = sizes().width
    r = moe_layer.bench_shape(w["d_model"], w["ffn_hidden_size"], sizes().moe_tokens,
                              w["moe_num_experts"], w["moe_top_k"], max_iters=12, budget_s=12.0,
                              device=torch.device(dev()), dtype=torch.bfloat16)
    moe_layer.print_result(r)
    layers = r["layers"]
    floor = r["floor_best_s"]
    summary = {"backend": r["backend"],
               "ours_of_floor": floor / layers["ours"]["best_s"],
               "ours_over_transformers": layers["ours"]["tokens_per_s"]
               / layers["transformers"]["tokens_per_s"],
               "accuracy": {name: m["accuracy"] for name, m in layers.items()}}
    if "megablocks" in layers:
        summary["ours_over_megablocks"] = (layers["ours"]["tokens_per_s"]
                                           / layers["megablocks"]["tokens_per_s"])
    if cuda():
        summary["profile"] = moe_profile()
        summary["up_projection_fusion"] = up_projection_fusion()
    free_memory()
    return {"summary": summary, "detail": r}


def kernel_profile(step: Callable[[], object], label: str, top: int = 12) -> list[dict]:
    """Where one call of `step` spends GPU time, by kernel (after one warm-up call)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        sync()
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in events) or 1.0
    rows = [{"kernel": e.key[:90], "calls": e.count, "ms": e.self_device_time_total / 1e3,
             "share": e.self_device_time_total / total}
            for e in sorted(events, key=lambda e: -e.self_device_time_total)[:top]]
    print(f"  profile of {label} ({total / 1e3:.1f} ms of GPU time):")
    for r in rows:
        print(f"    {r['ms']:8.2f} ms {r['share']:6.1%} x{r['calls']:<5d} {r['kernel']}")
    return rows


def up_projection_fusion() -> dict:
    """Would storing w1 and v1 as one (experts, 2*ffn, d) weight pay? One grouped_mm of twice
    the width against the two it replaces, forward, on a balanced split."""
    import torch.nn.functional as F

    w = sizes().width
    e, f, d = w["moe_num_experts"], w["ffn_hidden_size"], w["d_model"]
    rows = sizes().moe_tokens * w["moe_top_k"]
    x = torch.randn(rows, d, device="cuda", dtype=torch.bfloat16)
    w1, v1 = (torch.randn(e, f, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w13 = torch.cat([w1, v1], dim=1)
    offs = torch.arange(1, e + 1, device="cuda", dtype=torch.int32) * (rows // e)
    two = median(timed(lambda: (F.grouped_mm(x, w1.transpose(1, 2), offs=offs),
                                F.grouped_mm(x, v1.transpose(1, 2), offs=offs)), 3, 10))
    one = median(timed(lambda: F.grouped_mm(x, w13.transpose(1, 2), offs=offs), 3, 10))
    flops = 2 * 2 * rows * d * f
    return {"two_ms": two * 1e3, "fused_ms": one * 1e3, "two_tflops": flops / two / 1e12,
            "fused_tflops": flops / one / 1e12}


def moe_profile() -> list[dict]:
    from model.moe import DroplessMoE

    torch.manual_seed(0)
    cfg = dbrx_config(moe_jitter_eps=None)
    layer = DroplessMoE(cfg).to("cuda", torch.bfloat16)
    x = torch.randn(sizes().moe_tokens, cfg.d_model, device="cuda", dtype=torch.bfloat16,
                    requires_grad=True)

    def step():
        out, _ = layer(x)
        out.backward(torch.ones_like(out))

    rows = kernel_profile(step, "one fwd+bwd of our MoE layer")
    del layer, x
    return rows


def plain_train_mfu(cfg, seq: int, micro: int, steps: int = 5, warmup: int = 2,
                    profile: bool = False) -> dict:
    """Plain PyTorch: bf16 weights, fused AdamW, one micro batch per step; timed without
    and with gradient clipping (torch's foreach clip_grad_norm_: two more passes over the
    gradients), on the same model."""
    from model import DBRX
    from model.counting import total_params, training_flops_per_token

    free_memory()
    torch.manual_seed(0)
    with torch.device(dev()):
        model = DBRX(cfg)
    model.to(torch.bfloat16).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=cuda() or None)
    tokens = torch.randint(0, cfg.vocab_size, (micro, seq + 1), device=dev())

    def step(clip: bool):
        out = model(tokens[:, :-1], shift_labels=tokens[:, 1:], return_logits=False)
        out.loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    flops = training_flops_per_token(cfg, seq) * micro * seq
    t = median(timed(lambda: step(False), warmup=warmup, iters=steps))
    t_clip = median(timed(lambda: step(True), warmup=1, iters=steps))
    result = {"d_model": cfg.d_model, "layers": cfg.n_layers, "seq": seq, "micro_batch": micro,
              "params_b": total_params(cfg) / 1e9, "step_ms": t * 1e3,
              "mfu": flops / t / (DATASHEET_BF16_TFLOPS * 1e12), "step_ms_with_clip": t_clip * 1e3,
              "mfu_with_clip": flops / t_clip / (DATASHEET_BF16_TFLOPS * 1e12), "peak_gb": peak_gb()}
    if profile and cuda():
        result["profile"] = kernel_profile(lambda: step(True), "one plain training step", top=15)
    del model, opt
    free_memory()
    return result


def section_train(state: dict) -> dict:
    require_cuda()
    from model.kernels import select_backend

    cfg = dbrx_config(n_layers=2)
    r = plain_train_mfu(cfg, seq=sizes().seq, micro=sizes().micro, profile=True)
    r["backend"] = select_backend(torch.device(dev()), torch.bfloat16, cfg.d_model, cfg.ffn_hidden_size)
    if state.get("gemm_peak"):
        r["of_measured_gemm_peak"] = r["mfu"] * DATASHEET_BF16_TFLOPS / state["gemm_peak"]
    return r


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def section_engine(state: dict) -> dict:
    """The platform's engine beside plain PyTorch on the same model; each engine variant in a
    process of its own, so that its peak memory is its own (DeepSpeed keeps references)."""
    require_cuda()
    try:
        import deepspeed  # noqa: F401
    except ImportError as exc:
        raise Skipped(f"deepspeed not installed ({exc}); README 'GPU check' says how to bring it")
    import multiprocessing

    cfg = dbrx_config(**sizes().small)
    result = {"plain": plain_train_mfu(cfg, sizes().seq, sizes().micro)}
    ctx = multiprocessing.get_context("spawn")
    for master in ("fp32", "bf16"):
        queue = ctx.Queue()
        proc = ctx.Process(target=_engine_variant, args=(master, RUN["sizes"] is SMOKE, queue))
        proc.start()
        try:
            child = queue.get(timeout=300)
        except Exception:
            child = {"error": f"no result (exit code {proc.exitcode})"}
        proc.join(timeout=60)
        if "error" in child:
            raise RuntimeError(f"engine with {master} master weights: {child['error']}")
        child["of_plain"] = child["mfu"] / result["plain"]["mfu"]
        child["bytes_per_param"] = child["peak_gb"] / result["plain"]["params_b"]
        result[f"deepspeed_{master}_master"] = child
    return result


def _engine_variant(master: str, smoke: bool, queue) -> None:
    """One engine variant, in a spawned process: its step time, MFU and peak memory."""
    try:
        if smoke:
            RUN.update(sizes=SMOKE, device="cpu")
        queue.put(_measure_engine(master))
    except Exception as exc:   # the parent reports it
        traceback.print_exc()
        queue.put({"error": f"{type(exc).__name__}: {exc}"[:300]})


def _measure_engine(master: str) -> dict:
    import torch.distributed as dist

    import _platform_hook  # noqa: F401  (the project's `platform` package, not the stdlib module)
    from model import DBRX
    from model.counting import training_flops_per_token
    from platform.train.engine import EngineSpec, build_engine, expert_parallel_group

    seq, micro = sizes().seq, sizes().micro
    cfg = dbrx_config(**sizes().small)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl" if cuda() else "gloo", rank=0, world_size=1)
    expert_parallel_group(1)
    tokens = torch.randint(0, cfg.vocab_size, (micro, seq + 1), device=dev())
    torch.manual_seed(0)
    with torch.device(dev()):
        model = DBRX(cfg)
    spec = EngineSpec(global_batch_size=micro, micro_batch_size=micro, grad_accum=1,
                      zero_stage=1, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                      grad_clip=1.0, bf16=True, master_weights=master)
    eng = build_engine(spec, model, num_experts=cfg.moe_num_experts, expert_parallel=1)

    def step():   # the core of platform.train.step.train_step
        out = eng.engine(tokens[:, :-1], shift_labels=tokens[:, 1:], return_logits=False)
        eng.engine.backward(out.loss)
        eng.engine.step()

    t = median(timed(step, warmup=2, iters=5))
    flops = training_flops_per_token(cfg, seq) * micro * seq
    result = {"step_ms": t * 1e3, "mfu": flops / t / (DATASHEET_BF16_TFLOPS * 1e12),
              "peak_gb": peak_gb()}
    if cuda() and master == "fp32":
        result["profile"] = kernel_profile(step, "one DeepSpeed engine step (fp32 master)", top=15)
    dist.destroy_process_group()
    return result


def section_decode(state: dict) -> dict:
    """The serving engine's decode step (bench/serve.py's measurement) on a 4-layer DBRX-width
    slice with 2k-token prompts: bf16 eager and with CUDA graphs, and 8-bit weights (fp8 where
    the GPU has it, else int8), at batch 1 and 8; CUDA graphs must decode the eager tokens."""
    require_cuda()
    import serve as serve_bench
    from model.decode import DecodeEngine, Sampling
    from model.quant import fp8_supported

    smoke = RUN["sizes"] is SMOKE
    cfg = serve_bench.QUICK if smoke else serve_bench.FULL
    prompt_len, new = (32, 8) if smoke else (2048, 32)
    device = torch.device(dev())
    eight_bit = "fp8" if cuda() and fp8_supported(device) is None else "int8"
    result: dict = {"d_model": cfg.d_model, "layers": cfg.n_layers, "prompt": prompt_len, "points": []}
    for fmt, runs in (("bf16", [(1, False), (1, None), (8, None)]), (eight_bit, [(1, None), (8, None)])):
        model = serve_bench.build(cfg, fmt, device)
        if fmt == "bf16":
            prompt = torch.randint(0, cfg.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(1))
            tokens = {}
            for graphs in (False, None):
                engine = DecodeEngine(model, slots=1, max_len=prompt_len + 24, cuda_graphs=graphs)
                engine.admit(prompt.tolist(), Sampling())
                tokens[engine.cuda_graphs] = [engine.step()[0] for _ in range(16)]
            result["graphs_equal_eager"] = len(set(map(tuple, tokens.values()))) == 1
        result["points"] += [serve_bench.engine_run(model, fmt, device, batch, prompt_len, new, graphs=graphs)
                             for batch, graphs in runs]
        del model
        free_memory()
    if not result["graphs_equal_eager"]:
        raise CheckFailed(f"CUDA-graph decode gave other greedy tokens than eager: {tokens}")
    return result


RUNNERS = {"device": section_device, "kernels": section_kernels, "hf": section_hf,
           "moe": section_moe, "train": section_train, "engine": section_engine,
           "decode": section_decode}


# ----------------------------------------------------------------------------- report

def headline(name: str, r: dict) -> str:
    """The one line of the table for a section that ran."""
    if name == "device":
        if "gemm_square" not in r:
            return f"torch {r['torch']}, no CUDA device"
        return (f"{r.get('name', 'CPU')} (sm {r.get('capability', '-')}, {r.get('memory_gb', '-')} GB), "
                f"torch {r['torch']}; bf16 GEMM {r['gemm_square']}^3 "
                f"{r['gemm_square_bf16_tflops']:.0f} TFLOP/s, {r['gemm_moe_shape']} "
                f"{r['gemm_moe_shape_bf16_tflops']:.0f}")
    if name == "kernels":
        worst = max(r["bf16_rel_err_vs_fp32"].values())
        return (f"backend {r['backend_after_no_grad']} after a no-grad forward; backends "
                f"{', '.join(r['bf16_rel_err_vs_fp32'])} within {worst:.1e} of fp32; autocast ok")
    if name == "hf":
        line = f"fp32 max |diff| {r['fp32_max_abs_diff']:.1e}"
        if "bf16_ours" in r:
            o, h = r["bf16_ours"], r["bf16_transformers"]
            line += (f"; bf16 vs fp32: ours {o['agree_share']:.1%} agree / {o['mean_rel_err']:.1e}, "
                     f"transformers {h['agree_share']:.1%} / {h['mean_rel_err']:.1e}")
        return line
    if name == "moe":
        s = r["summary"]
        return (f"{s['backend']}: {s['ours_of_floor']:.0%} of the GEMM floor; ours / transformers "
                f"{s['ours_over_transformers']:.2f}x")
    if name == "train":
        return (f"d {r['d_model']} x {r['layers']} layers, seq {r['seq']}, mb {r['micro_batch']}: "
                f"{r['step_ms']:.0f} ms/step, MFU {r['mfu']:.1%} ({r['mfu_with_clip']:.1%} with "
                f"grad clipping), peak {r['peak_gb']:.1f} GB")
    if name == "engine":
        p = r["plain"]
        parts = [f"plain {p['mfu']:.1%} ({p['peak_gb']:.0f} GB)"]
        for key in ("deepspeed_fp32_master", "deepspeed_bf16_master"):
            if key in r:
                d = r[key]
                parts.append(f"{key.removeprefix('deepspeed_')} {d['mfu']:.1%} = {d['of_plain']:.0%} of "
                             f"plain ({d['peak_gb']:.0f} GB)")
        return f"d {p['d_model']} x {p['layers']}: " + "; ".join(parts)
    if name == "decode":
        cells = [f"{p['format']}{'' if p['cuda_graphs'] else ' eager'} b{p['batch']} "
                 f"{p['ms_per_layer_step']:.3f}" for p in r["points"]]
        return (f"ms per layer-step, d {r['d_model']} x {r['layers']}, {r['prompt']}-token KV: "
                + ", ".join(cells))
    return ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--smoke", action="store_true",
                        help="every section on CPU at toy sizes: checks the script, measures nothing")
    args = parser.parse_args()
    if args.smoke:
        RUN.update(sizes=SMOKE, device="cpu")
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in RUNNERS]
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    if not cuda() and not args.smoke:
        print("no CUDA GPU here: running the CPU-capable sections "
              f"({', '.join(s for s in wanted if s in CPU_SECTIONS)}) and skipping the rest")

    started = time.perf_counter()
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "sections": {}}
    state: dict = {}
    failed = False
    for name in wanted:
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            data = RUNNERS[name](state)
            entry = {"status": "ok", "result": data, "line": headline(name, data)}
        except Skipped as exc:
            entry = {"status": "skipped", "line": str(exc)}
        except CheckFailed as exc:
            entry = {"status": "FAILED", "line": str(exc)}
            failed = True
        except Exception as exc:   # a crash is a failure too, reported with its trace
            traceback.print_exc()
            entry = {"status": "ERROR", "line": f"{type(exc).__name__}: {exc}"[:300]}
            failed = True
            free_memory()
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        report["sections"][name] = entry
        print(f"   {entry['status']} in {entry['seconds']} s: {entry['line']}", flush=True)
    report["seconds"] = round(time.perf_counter() - started, 1)

    print(f"\nGPU check, {report['date']}, {report['seconds']} s")
    print(f"| {'section':<8} | {'status':<7} | result")
    print(f"|{'-' * 10}|{'-' * 9}|{'-' * 60}")
    for name, entry in report["sections"].items():
        print(f"| {name:<8} | {entry['status']:<7} | {entry['line']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
