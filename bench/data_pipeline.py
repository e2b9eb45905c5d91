"""Tokenization throughput: the Ray Data pipeline against plain single-process tiktoken.

    python bench/data_pipeline.py [--config conf/local_tiny.yaml] [--workers 2] [--repeat 3]

Both sides read the same files (the config's sources) and tokenize them with the same
cl100k_base encoding; the ratio is measured in one run on one machine. The pipeline
figure is `tokenize_corpus` end to end (Ray Data read, parse, eval split, tokenize,
EOS, ordered write of the streams), reported cold (the first run in a fresh Ray
instance, paying worker imports) and warm (the next runs); Ray's start-up and the full
`prepare_data` (listing, cache key, manifest) are reported apart. Runs alternate
between the two sides and both report best and median, since a shared machine's load
moves single timings a lot (the load average is printed).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def baseline(files, tokenizer) -> tuple[int, float]:
    """Plain tiktoken in this process: read, decode, encode_ordinary, file by file."""
    enc = tokenizer.encoding
    start = time.perf_counter()
    tokens = 0
    for _, f in files:
        with open(f.uri, "rb") as fh:
            data = fh.read()
        if b"\0" in data[:8192]:
            continue
        tokens += len(enc.encode_ordinary(data.decode("utf-8", errors="replace")))
    return tokens, time.perf_counter() - start


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "conf" / "local_tiny.yaml"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="pipeline runs (the first is cold)")
    args = parser.parse_args(argv)

    from platform.config import load_job
    from platform.data.pipeline import ray_session, tokenize_corpus
    from platform.data.prepare import prepare_data
    from platform.data.sources import list_files
    from platform.data.tokenizer import get_tokenizer

    job = load_job(args.config)
    data = job.data
    tok = get_tokenizer(job.model.vocab_size)
    files = [(i, f) for i, s in enumerate(data.sources) for f in list_files(s, data.s3_endpoint_url)]
    size_mb = sum(f.size for _, f in files) / 1e6
    print(f"corpus: {len(files)} files, {size_mb:.1f} MB ({', '.join(s.name for s in data.sources)}); "
          f"{os.cpu_count()} CPUs; {args.workers} tokenize workers")

    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    names = [s.name for s in data.sources]
    fields = [s.text_field for s in data.sources]
    runs, base_runs = [], []
    t0 = time.perf_counter()
    with ray_session(job.cluster.ray_address, num_cpus=args.workers):
        ray_start = time.perf_counter() - t0
        for _ in range(args.repeat):
            base_tokens, secs = baseline(files, tok)
            base_runs.append(secs)
            with tempfile.TemporaryDirectory() as out:
                start = time.perf_counter()
                stats = tokenize_corpus(files, names, fields, out, vocab_size=tok.vocab_size,
                                        eval_fraction=data.eval_fraction, endpoint_url=data.s3_endpoint_url,
                                        num_workers=args.workers, progress=False)
                runs.append(time.perf_counter() - start)
        with tempfile.TemporaryDirectory() as cache:
            from dataclasses import replace

            start = time.perf_counter()
            prepare_data(replace(data, cache_dir=cache, num_tokenize_workers=args.workers), tok.vocab_size,
                         progress=False)
            prepare_s = time.perf_counter() - start
    # Pipeline tokens include one EOS per document; count text tokens to compare like with like.
    pipe_tokens = sum(s["tokens"]["train"] + s["tokens"]["eval"] - s["documents"]["train"] - s["documents"]["eval"]
                      for s in stats)
    if pipe_tokens != base_tokens:
        print(f"warning: token counts differ: pipeline {pipe_tokens:,}, baseline {base_tokens:,}")
    warm = runs[1:] or runs
    base_best, base_median = min(base_runs), statistics.median(base_runs)
    rows = [
        ("single-process tiktoken, best", base_best, base_best),
        ("single-process tiktoken, median", base_median, base_median),
        ("Ray Data pipeline, cold", runs[0], base_median),
        ("Ray Data pipeline, warm best", min(warm), base_best),
        ("Ray Data pipeline, warm median", statistics.median(warm), base_median),
    ]
    print(f"tokens: {base_tokens:,}")
    print(f"{'':32}{'seconds':>9}{'tokens/s':>13}{'ratio':>8}")
    for label, secs, ref in rows:
        print(f"{label:32}{secs:9.2f}{base_tokens / secs:13,.0f}{ref / secs:8.2f}")
    print("(ratio: pipeline tokens/s over single-process tokens/s, best over best, median over median)")
    print(f"Ray start-up (not in the rows above): {ray_start:.1f} s; "
          f"full prepare_data in the warm instance: {prepare_s:.1f} s")
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main(sys.argv[1:]))
