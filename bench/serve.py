"""Serving speed: the decode engine per precision and batch size, and (--http) the Serve endpoint.

Default: the decode engine in process (model.decode, what the server and
`model.generate` run), for every weight format the device supports (CPU:
fp32, bf16, int8; CUDA: bf16, int8, and fp8 on compute capability 9.0+), at
batch 1, 8 (and 64 on a GPU):
  tokens/s per user and aggregate, time to first token (prefill of one
  prompt + its first token), ms per layer-step (a decode step / n_layers).
This mode imports only torch and `model/`, so it runs on a GPU machine that
has torch and nothing else of the platform.

    python bench/serve.py --quick              # toy sizes, < 60 s on 2 CPU cores
    python bench/serve.py                      # a 4-layer DBRX-width slice, 2k-token prompts (a GPU)
    python bench/serve.py --json

On a GPU every point runs with CUDA graphs (the server's default there) and
bf16 at batch 1 also eagerly, so the graphs' share is measured, not assumed.
It ends with a projection for the whole model (40 layers) on 8 GPUs with
experts split 8 ways, from the measured 8-bit batch-1 layer step; its
assumptions are printed with it.

--http: the older comparison on local_tiny weights (needs Ray, the platform
and transformers): the Serve endpoint's tokens/s with one client sending
requests back to back and with N concurrent clients, and in-process
`DBRX.generate` against `transformers.DbrxForCausalLM.generate` on the same
weights (outputs checked identical), medians of interleaved rounds.

    python bench/serve.py --http --clients 4 --max-tokens 64 --json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from model import DBRX, DBRXConfig  # noqa: E402
from model.decode import DecodeEngine, Sampling  # noqa: E402
from model.quant import fp8_supported, quantize_model, weight_bytes  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["def fibonacci(n):\n    ", "Once upon a time", "import numpy as np\n", "The capital of France is",
           "SELECT name FROM users WHERE", "Dear Sir or Madam,", "1, 2, 3, 5, 8, 13,", "To be, or not to be:"]

# ----------------------------------------------------------------------------- the decode engine

QUICK = DBRXConfig(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden_size=256, moe_num_experts=16,
                   moe_top_k=4, vocab_size=4096, max_seq_len=512, rope_theta=10000.0)
# DBRX's width (d 6144, 48 heads, 8 KV heads, 16 experts of 10752, top 4), 4 of its 40 layers.
FULL = DBRXConfig(d_model=6144, n_layers=4, n_heads=48, n_kv_heads=8, ffn_hidden_size=10752, moe_num_experts=16,
                  moe_top_k=4, vocab_size=100352, max_seq_len=4096, rope_theta=500000.0, clip_qkv=8.0)
DBRX_LAYERS = 40
ALL_TO_ALL_S = 20e-6      # assumed: one all-to-all of a few tokens over NVLink (two per layer)


def formats(device: torch.device) -> list[str]:
    """Weight formats worth measuring on `device` (fp32 on a GPU is left out: nobody serves it)."""
    if device.type == "cpu":
        return ["fp32", "bf16", "int8"]
    return ["bf16", "int8"] + ([] if fp8_supported(device) else ["fp8"])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(cfg: DBRXConfig, fmt: str, device: torch.device, base: DBRX | None = None) -> DBRX:
    """The bench model in `fmt`: a copy of `base` (CPU), or made on the GPU itself (a DBRX-width
    slice is 57 GB in fp32: no host copy), bf16 before quantization."""
    if base is not None:
        model = copy.deepcopy(base).to(device)
    else:
        torch.manual_seed(0)
        with torch.device(device):
            model = DBRX(cfg)
        model.to(torch.bfloat16)
    quantize_model(model, fmt)
    return model.eval()


def engine_run(model: DBRX, fmt: str, device: torch.device, batch: int, prompt_len: int,
               new_tokens: int, graphs: bool | None = None) -> dict:
    """One (format, batch) point: TTFT, decode step time, tokens/s per user and aggregate.

    Medians over repeats (TTFT: 3 prompts; steps: each step timed alone), so a
    busy machine's stalls do not masquerade as the engine's cost.
    """
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.cfg.vocab_size, (batch + 3, prompt_len), generator=gen).tolist()
    engine = DecodeEngine(model, slots=batch, max_len=prompt_len + new_tokens + 8, cuda_graphs=graphs)
    ttfts = []
    for p in prompts[batch:]:                              # the first one also warms up
        sync(device)
        start = time.perf_counter()
        slot = engine.admit(p, Sampling())
        engine.step()                                      # returns the first token on the host
        ttfts.append(time.perf_counter() - start)
        engine.step()
        engine.release(slot)
    for p in prompts[:batch]:
        engine.admit(p, Sampling())
    engine.step()                                          # the prefill tokens
    engine.step()                                          # warm-up of the decode shapes
    steps = []
    for _ in range(new_tokens):
        sync(device)
        start = time.perf_counter()
        engine.step()                                      # ends with the tokens on the host
        steps.append(time.perf_counter() - start)
    step_s = statistics.median(steps)
    return {"format": fmt, "batch": batch, "cuda_graphs": engine.cuda_graphs,
            "weights_mb": weight_bytes(model) / 2 ** 20,
            "ttft_ms": statistics.median(ttfts[1:]) * 1e3, "step_ms": step_s * 1e3,
            "ms_per_layer_step": step_s * 1e3 / model.cfg.n_layers,
            "tok_s_per_user": 1.0 / step_s, "tok_s_aggregate": batch / step_s}


def engine_bench(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = QUICK if args.quick else FULL
    gpu = device.type == "cuda"
    batches = [1, 8] + ([64] if gpu else [])
    prompt_len, new_tokens = (32, 12) if args.quick else (2048, 32) if gpu else (128, 32)
    if not gpu and not args.threads:
        torch.set_num_threads(1)          # steady numbers on a shared CPU; --threads to change
    base = None
    if not gpu:
        torch.manual_seed(0)
        base = DBRX(cfg).eval()
    points = []
    for fmt in formats(device):
        model = build(cfg, fmt, device, base)
        if gpu and fmt == "bf16":
            points.append(engine_run(model, fmt, device, 1, prompt_len, new_tokens, graphs=False))
        points += [engine_run(model, fmt, device, b, prompt_len, new_tokens) for b in batches]
        del model
        if gpu:
            torch.cuda.empty_cache()
    return {"device": str(device) if not gpu else torch.cuda.get_device_name(device),
            "model": {"d_model": cfg.d_model, "n_layers": cfg.n_layers, "experts": cfg.moe_num_experts,
                      "top_k": cfg.moe_top_k, "ffn": cfg.ffn_hidden_size, "vocab": cfg.vocab_size,
                      "n_kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim},
            "prompt_len": prompt_len, "new_tokens": new_tokens, "points": points,
            "projection": projection(cfg, points)}


def projection(cfg: DBRXConfig, points: list[dict]) -> dict | None:
    """Tokens/s per user at batch 1 for the whole model on 8 GPUs, experts split 8 ways, from
    the measured 8-bit batch-1 layer step.

    The busiest GPU of a layer reads the attention weights and at most 2 of the 4 routed
    experts (16 experts over 8 GPUs, 2 each), so the layer's time scales by those bytes
    over the slice's (attention + 4 experts), plus two all-to-alls (ALL_TO_ALL_S each).
    """
    eight_bit = [p for p in points if p["batch"] == 1 and p["format"] in ("fp8", "int8") and p["cuda_graphs"]]
    if not eight_bit:
        return None
    best = min(eight_bit, key=lambda p: p["ms_per_layer_step"])
    d, kv = cfg.d_model, cfg.n_kv_heads * cfg.head_dim
    attention = d * (d + 2 * kv) + d * d
    expert = 3 * d * cfg.ffn_hidden_size
    share = (attention + 2 * expert) / (attention + cfg.moe_top_k * expert)
    layer_s = best["ms_per_layer_step"] / 1e3 * share + 2 * ALL_TO_ALL_S
    return {"format": best["format"], "measured_ms_per_layer": best["ms_per_layer_step"],
            "busiest_gpu_share": share, "all_to_all_s": ALL_TO_ALL_S, "layers": DBRX_LAYERS,
            "ms_per_token": layer_s * DBRX_LAYERS * 1e3, "tok_s_per_user": 1.0 / (layer_s * DBRX_LAYERS)}


def print_engine(report: dict) -> None:
    m = report["model"]
    print(f"decode engine on {report['device']}: d {m['d_model']} x {m['n_layers']} layers, {m['experts']} experts "
          f"top-{m['top_k']}, vocab {m['vocab']}; prompt {report['prompt_len']}, {report['new_tokens']} steps timed")
    print(f"  {'weights':7s} {'graphs':6s} {'batch':>5s} {'MB':>8s} {'TTFT ms':>9s} {'step ms':>9s} "
          f"{'ms/layer':>9s} {'tok/s/user':>11s} {'tok/s':>10s}")
    for p in report["points"]:
        print(f"  {p['format']:7s} {'yes' if p['cuda_graphs'] else 'no':6s} {p['batch']:5d} {p['weights_mb']:8.1f} "
              f"{p['ttft_ms']:9.2f} {p['step_ms']:9.2f} {p['ms_per_layer_step']:9.3f} "
              f"{p['tok_s_per_user']:11.1f} {p['tok_s_aggregate']:10.1f}")
    proj = report.get("projection")
    if proj:
        print(f"projection, DBRX ({proj['layers']} layers) on 8 GPUs, experts split 8 ways, {proj['format']} "
              f"weights, batch 1: {proj['measured_ms_per_layer']:.3f} ms/layer measured x "
              f"{proj['busiest_gpu_share']:.2f} (the busiest GPU's bytes: attention + 2 of 4 routed experts) "
              f"+ 2 all-to-alls of {proj['all_to_all_s'] * 1e6:.0f} us (assumed) = "
              f"{proj['ms_per_token']:.2f} ms/token, {proj['tok_s_per_user']:.0f} tokens/s per user "
              f"(target >= 150)")


# ----------------------------------------------------------------------------- HTTP (--http)


def make_version(cfg, folder: str):
    """local_tiny weights (random, large enough that decoding does not repeat one token) as a version."""
    from model import DBRX
    from platform.registry.artifacts import write_version

    torch.manual_seed(0)
    model = DBRX(cfg.model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.2)
    write_version(folder, model.eval(), {"step": 0, "note": "bench/serve.py random weights"})
    return model.eval()


# ----------------------------------------------------------------------------- HTTP


def http_rate(base_url: str, clients: int, requests_per_client: int, max_tokens: int) -> float:
    """Generated tokens/s of `clients` concurrent clients, each sending requests back to back."""
    import openai

    tokens = [0] * clients
    errors: list[str] = []

    def run(i: int) -> None:
        client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
        for r in range(requests_per_client):
            try:
                out = client.completions.create(model="bench", prompt=PROMPTS[(i + r) % len(PROMPTS)],
                                                max_tokens=max_tokens, temperature=0)
                tokens[i] += out.usage.completion_tokens
            except Exception as exc:   # noqa: BLE001 - reported, then fatal
                errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise SystemExit(f"{len(errors)} requests failed, first: {errors[0]}")
    return sum(tokens) / elapsed


# ----------------------------------------------------------------------------- in process, and the rounds


def in_process_runners(ours, folder: str, batch: int, max_tokens: int) -> dict:
    """name -> zero-argument generation run, for batch 1 and `batch`; outputs checked identical."""
    from transformers import DbrxForCausalLM

    hf = DbrxForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    runners, identical = {}, {}
    for size in (1, batch):
        ids = torch.randint(0, 100_000, (size, 16), generator=gen)

        def run_ours(ids=ids):
            return torch.tensor(ours.generate(ids.tolist(), max_new_tokens=max_tokens).tokens)

        def run_hf(ids=ids):
            with torch.no_grad():
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                  min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
            return out[:, ids.shape[1]:]

        identical[size] = torch.equal(run_ours(), run_hf())                 # also warms both up
        runners[f"ours_b{size}"], runners[f"transformers_b{size}"] = run_ours, run_hf
    return {"runners": runners, "identical": identical}


def measure(cfg, folder: str, ours, clients: int, max_tokens: int, rounds: int) -> dict:
    """Every measurement once per round, interleaved, so machine noise hits all alike; medians."""
    import ray
    from ray import serve

    from platform.serving import start_serving

    local = in_process_runners(ours, folder, clients, max_tokens)
    ray.init(address="local", num_cpus=2, object_store_memory=200 * 1024 ** 2, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    rates: dict[str, list[float]] = {}
    try:
        serving = start_serving(cfg, checkpoint=folder)
        http_rate(serving.base_url, clients, 1, max_tokens)                      # warm up
        for _ in range(rounds):
            rates.setdefault("http_sequential", []).append(http_rate(serving.base_url, 1, clients, max_tokens))
            rates.setdefault("http_concurrent", []).append(http_rate(serving.base_url, clients, 2, max_tokens))
            for name, run in local["runners"].items():
                size = 1 if name.endswith("_b1") else clients
                start = time.perf_counter()
                run()
                rates.setdefault(name, []).append(size * max_tokens / (time.perf_counter() - start))
    finally:
        serve.shutdown()
        ray.shutdown()
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {
        "http": {"sequential_tok_s": med["http_sequential"], "concurrent_tok_s": med["http_concurrent"],
                 "concurrency_speedup": med["http_concurrent"] / med["http_sequential"]},
        "in_process": {f"batch{size}": {"ours_tok_s": med[f"ours_b{size}"],
                                         "transformers_tok_s": med[f"transformers_b{size}"],
                                         "ratio": med[f"ours_b{size}"] / med[f"transformers_b{size}"],
                                         "identical_outputs": local["identical"][size]}
                       for size in (1, clients)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes (CPU, < 60 s)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--http", action="store_true", help="the Serve endpoint and transformers comparison")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads in this process")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.http:
        report = engine_bench(args)
        print(json.dumps(report, indent=2)) if args.json else print_engine(report)
        return
    with tempfile.TemporaryDirectory(prefix="dbrx-bench-serve-") as scratch:
        os.environ["DBRX_PLATFORM_HOME"] = os.path.join(scratch, "home")   # nothing of ours outlives the run
        report = run(args, os.path.join(scratch, "version"))
    if args.json:
        print(json.dumps(report, indent=2))
        return
    http, local = report["http"], report["in_process"]
    print(f"local_tiny architecture ({report['parameters'] / 1e6:.1f}M parameters), "
          f"greedy, {args.max_tokens} new tokens per request, CPU")
    print(f"Serve endpoint, 1 replica, continuous batching, {args.clients} clients:")
    print(f"  1 client, sequential      {http['sequential_tok_s']:8.1f} tok/s")
    print(f"  {args.clients} concurrent clients     {http['concurrent_tok_s']:8.1f} tok/s")
    print(f"  concurrent / sequential   {http['concurrency_speedup']:8.2f}x")
    print(f"in-process generation ({torch.get_num_threads()} torch thread(s); "
          "Serve replicas get Ray's OMP_NUM_THREADS):")
    for name, r in local.items():
        print(f"  {name:7s} DBRX.generate {r['ours_tok_s']:8.1f} tok/s   "
              f"transformers {r['transformers_tok_s']:8.1f} tok/s   ours/transformers {r['ratio']:5.2f}x   "
              f"identical outputs: {r['identical_outputs']}")


def run(args, folder: str) -> dict:
    from platform.config import load_job
    from platform.provision.head import free_local_port as free_port

    cfg = load_job(os.path.join(REPO, "conf", "local_tiny.yaml"), [
        "promote.registered_model=bench", f"serve.port={free_port()}", "serve.api_key=null",
        "serve.replica_cpus=0", "serve.num_replicas=1", "serve.max_replicas=1",
        f"serve.max_concurrent_sequences={args.clients}", f"serve.max_tokens_limit={args.max_tokens}"])
    ours = make_version(cfg, folder)
    results = measure(cfg, folder, ours, args.clients, args.max_tokens, args.rounds)
    return {"clients": args.clients, "max_tokens": args.max_tokens,
            "parameters": sum(p.numel() for p in ours.parameters()), **results}


if __name__ == "__main__":
    main()
