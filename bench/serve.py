"""Serving throughput: what batching buys over HTTP, and our decoder against transformers'.

One run measures, on the same local_tiny-architecture weights:
1. the Serve endpoint (1 replica, @serve.batch): generated tokens/s with one
   client sending requests back to back, then with N concurrent clients;
   their ratio is what dynamic batching buys;
2. in-process greedy generation: `DBRX.generate` (KV cache) against
   `transformers.DbrxForCausalLM.generate` on the very same weights (the
   version folder is the HF layout, loaded with `from_pretrained`), batch 1 and
   batch N; outputs are checked to be identical before timing counts.
All measurements are interleaved round by round (machine noise hits each
alike) and the medians reported.

    python bench/serve.py                       # 8 clients, 32 new tokens per request
    python bench/serve.py --clients 4 --max-tokens 64 --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from platform.provision.head import free_local_port as free_port  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["def fibonacci(n):\n    ", "Once upon a time", "import numpy as np\n", "The capital of France is",
           "SELECT name FROM users WHERE", "Dear Sir or Madam,", "1, 2, 3, 5, 8, 13,", "To be, or not to be:"]


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
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in this process")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="dbrx-bench-serve-") as scratch:
        os.environ["DBRX_PLATFORM_HOME"] = os.path.join(scratch, "home")   # nothing of ours outlives the run
        report = run(args, os.path.join(scratch, "version"))
    if args.json:
        print(json.dumps(report, indent=2))
        return
    http, local = report["http"], report["in_process"]
    print(f"local_tiny architecture ({report['parameters'] / 1e6:.1f}M parameters), "
          f"greedy, {args.max_tokens} new tokens per request, CPU")
    print(f"Serve endpoint, 1 replica, @serve.batch max_batch_size={args.clients}:")
    print(f"  1 client, sequential      {http['sequential_tok_s']:8.1f} tok/s")
    print(f"  {args.clients} concurrent clients     {http['concurrent_tok_s']:8.1f} tok/s")
    print(f"  concurrent / sequential   {http['concurrency_speedup']:8.2f}x")
    print(f"in-process generation ({args.threads} torch thread(s); Serve replicas get Ray's OMP_NUM_THREADS):")
    for name, r in local.items():
        print(f"  {name:7s} DBRX.generate {r['ours_tok_s']:8.1f} tok/s   "
              f"transformers {r['transformers_tok_s']:8.1f} tok/s   ours/transformers {r['ratio']:5.2f}x   "
              f"identical outputs: {r['identical_outputs']}")


def run(args, folder: str) -> dict:
    from platform.config import load_job

    cfg = load_job(os.path.join(REPO, "conf", "local_tiny.yaml"), [
        "promote.registered_model=bench", f"serve.port={free_port()}", "serve.api_key=null",
        "serve.replica_cpus=0", "serve.num_replicas=1", "serve.max_replicas=1",
        f"serve.max_batch_size={args.clients}", f"serve.max_tokens_limit={args.max_tokens}"])
    ours = make_version(cfg, folder)
    results = measure(cfg, folder, ours, args.clients, args.max_tokens, args.rounds)
    return {"clients": args.clients, "max_tokens": args.max_tokens,
            "parameters": sum(p.numel() for p in ours.parameters()), **results}


if __name__ == "__main__":
    main()
