"""Prepare a job's corpus: list, tokenize, pack and cache it once, before training.

    python -m platform.data.prepare conf/local_tiny.yaml [key=value ...] [--rebuild]

`platform.submit` calls `ensure_prepared(job)` when the cache is missing; training
workers then only memory-map the result (platform.data.loader).
"""

from __future__ import annotations

import datetime
import logging
import os
import time

from platform.data.cache import CACHE_FORMAT_VERSION, PreparedData, cache_key, cache_root, key_lock, publish, staging_dir
from platform.data.errors import DataError
from platform.data.packing import num_sequences
from platform.data.sources import check_source_name, list_files
from platform.data.tokenizer import get_tokenizer

log = logging.getLogger(__name__)


def _plan(data_cfg, vocab_size: int):
    """(tokenizer, file listings, cache key, cache dir) of a data config; raises DataError early."""
    if not data_cfg.sources:
        raise DataError("data.sources is empty: add at least one {name, path}")
    names = [s.name for s in data_cfg.sources]
    for name in names:
        check_source_name(name)
        if names.count(name) > 1:
            raise DataError(f"data source name {name!r} is used more than once")
    if not 0 <= data_cfg.eval_fraction < 1:
        raise DataError(f"data.eval_fraction must be in [0, 1), got {data_cfg.eval_fraction}")
    tok = get_tokenizer(vocab_size)
    listings = [list_files(s, data_cfg.s3_endpoint_url) for s in data_cfg.sources]
    key = cache_key(data_cfg.sources, listings, data_cfg.eval_fraction, tok.fingerprint)
    return tok, listings, key, cache_root(data_cfg.cache_dir)


def find_prepared(data_cfg, vocab_size: int) -> PreparedData | None:
    """The complete cache for this data config, or None when it must be built."""
    _, _, key, root = _plan(data_cfg, vocab_size)
    path = os.path.join(root, key)
    return PreparedData.load(path) if os.path.exists(path) else None


def prepare_data(data_cfg, vocab_size: int, *, ray_address: str = "", progress: bool = True,
                 rebuild: bool = False) -> PreparedData:
    """Build the cache for `data_cfg` unless a complete one exists (or `rebuild`)."""
    tok, listings, key, root = _plan(data_cfg, vocab_size)
    final = os.path.join(root, key)
    if os.path.exists(final) and not rebuild:
        return PreparedData.load(final)
    with key_lock(root, key):
        if os.path.exists(final) and not rebuild:
            return PreparedData.load(final)  # another process built it while we waited
        start = time.monotonic()
        sources = data_cfg.sources
        files = [(i, f) for i, listing in enumerate(listings) for f in listing]
        with staging_dir(root, key) as staging:
            from platform.data.pipeline import tokenize_corpus

            stats = tokenize_corpus(files, [s.name for s in sources], [s.text_field for s in sources],
                                    staging, vocab_size=vocab_size, eval_fraction=data_cfg.eval_fraction,
                                    endpoint_url=data_cfg.s3_endpoint_url,
                                    num_workers=data_cfg.num_tokenize_workers, ray_address=ray_address,
                                    progress=progress)
            for s, st, listing in zip(sources, stats, listings):
                _settle_splits(s.name, st, staging, len(listing))
            manifest = {
                "format": CACHE_FORMAT_VERSION,
                "key": key,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "seconds": round(time.monotonic() - start, 2),
                "tokenizer": {"fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size,
                              "eos_id": tok.eos_id},
                "eval_fraction": data_cfg.eval_fraction,
                "sources": {s.name: {"path": s.path, **st} for s, st in zip(sources, stats)},
            }
            prepared = publish(staging, root, key, manifest)
    total = sum(st["tokens"]["train"] + st["tokens"]["eval"] for st in stats)
    log.info("prepared %s tokens from %d files in %.1f s at %s", f"{total:,}", len(files),
             manifest["seconds"], prepared.path)
    return prepared


def _settle_splits(name: str, st: dict, staging: str, num_files: int) -> None:
    """Refuse an empty source; give a source whose every document was held out to training."""
    docs = st["documents"]
    if docs["train"] + docs["eval"] == 0:
        skipped = f" ({st['binary_files_skipped']} skipped as binary)" if st["binary_files_skipped"] else ""
        raise DataError(f"data source {name!r} is empty: no text in its {num_files} file(s){skipped}")
    if docs["train"] == 0:
        # A tiny source (e.g. one file) can land entirely in the eval split by its hash;
        # training on it matters more than holding it out.
        log.warning("data source %r: all %d document(s) fell into the eval split; using them for "
                    "training and holding none out", name, docs["eval"])
        os.replace(os.path.join(staging, f"{name}.eval.u32"), os.path.join(staging, f"{name}.train.u32"))
        open(os.path.join(staging, f"{name}.eval.u32"), "wb").close()
        st["documents"] = {"train": docs["eval"], "eval": 0}
        st["tokens"] = {"train": st["tokens"]["eval"], "eval": 0}


def ensure_prepared(job_cfg, progress: bool = True, rebuild: bool = False) -> PreparedData:
    """The job's prepared corpus, building it first (with a tqdm progress bar) if missing.

    Uses the Ray the caller is connected to, else `cluster.ray_address`, else a small
    local instance. Raises DataError with a message naming the source on bad inputs.
    """
    return prepare_data(job_cfg.data, job_cfg.model.vocab_size, ray_address=job_cfg.cluster.ray_address,
                        progress=progress, rebuild=rebuild)


def describe(prepared: PreparedData, seq_len: int | None = None) -> str:
    """A short table of what a cache holds, for the CLI and logs."""
    lines = [f"prepared data: {prepared.path}"]
    for name, st in prepared.manifest["sources"].items():
        tok, docs = st["tokens"], st["documents"]
        seqs = f", {num_sequences(tok['train'], seq_len):,} train sequences of {seq_len}" if seq_len else ""
        lines.append(f"  {name}: {st['files']} files, {docs['train']:,}+{docs['eval']:,} docs (train+eval), "
                     f"{tok['train']:,}+{tok['eval']:,} tokens{seqs}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from platform.errors import ArgumentParser

    parser = ArgumentParser(prog="python -m platform.data.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="job YAML, e.g. conf/local_tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data.eval_fraction=0.05")
    parser.add_argument("--rebuild", action="store_true", help="rebuild even if a complete cache exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_intermixed_args(argv)   # flags and overrides in any order
    from platform.config import load_job

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    job = load_job(args.config, args.overrides)
    prepared = ensure_prepared(job, progress=not args.quiet, rebuild=args.rebuild)
    print(describe(prepared, job.train.seq_len))
    return 0


if __name__ == "__main__":
    from platform.errors import run_cli

    run_cli(main)
