"""Preparation through Ray Data, the cache, and what training workers read from it."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from platform.config import CurriculumStage, DataConfig, DataSource, JobConfig, TrainConfig, load_job
from platform.data import DataError, TrainingData, ensure_prepared, find_prepared, get_tokenizer, prepare_data
from platform.data.packing import gather_sequences, num_sequences, open_stream
from platform.data.pipeline import in_eval_split
from platform.data.sources import iter_documents, list_files

REPO = Path(__file__).resolve().parents[1]
WORDS = "the of and to in a is that for it as was with be by on not he this are or his from at".split()


def _write_corpus(root: Path) -> tuple[DataSource, DataSource]:
    """A prose folder (with empty and whitespace-only files) and a JSONL code file."""
    rng = np.random.default_rng(0)
    prose = root / "prose"
    prose.mkdir()
    for i in range(40):
        words = rng.choice(WORDS, size=int(rng.integers(5, 200)))
        (prose / f"doc{i:02d}.txt").write_text(" ".join(words) + "\n")
    (prose / "empty.txt").write_text("")
    (prose / "blank.txt").write_text("  \n\n")
    code = root / "code"
    code.mkdir()
    lines = []
    for i in range(60):
        body = "\n".join(f"    x{j} = {int(rng.integers(1000))}" for j in range(int(rng.integers(1, 30))))
        lines.append(json.dumps({"content": f"def f{i}():\n{body}\n    return x0"}))
    (code / "part-0.jsonl").write_text("\n".join(lines[:30]) + "\n")
    (code / "part-1.jsonl").write_text("\n".join(lines[30:]) + "\n")
    return (DataSource(name="prose", path=str(prose), weight=0.75),
            DataSource(name="code", path=str(code), format="jsonl", text_field="content", weight=0.25))


def _job(data: DataConfig, **train) -> JobConfig:
    base = dict(global_batch_size=8, micro_batch_size=2, seq_len=16, seed=7, eval_batches=3)
    return JobConfig(name="t", data=data, train=TrainConfig(**{**base, **train}))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("corpus")
    prose, code = _write_corpus(root)
    data = DataConfig(sources=[prose, code], cache_dir=str(root / "cache"), eval_fraction=0.2)
    prepared = prepare_data(data, 100352, progress=False)
    return data, prepared


def _hash(row) -> str:
    return hashlib.sha1(np.asarray(row, dtype=np.int64).tobytes()).hexdigest()


def _windows(prepared, source: str, split: str, seq_len: int = 16) -> set[str]:
    """Hashes of every sequence of one stream."""
    stream = open_stream(prepared.stream_path(source, split), prepared.num_tokens(source, split))
    n = num_sequences(len(stream), seq_len)
    return {_hash(r) for r in gather_sequences(stream, np.arange(n), seq_len)} if n else set()


def test_prepared_streams_hold_every_document_once_with_eos(corpus, ray_local):
    data, prepared = corpus
    assert ray_local.is_initialized()  # prepared inside the caller's Ray, which stays up
    tok = get_tokenizer()
    total = {"train": 0, "eval": 0}
    for source in data.sources:
        expected = {"train": [], "eval": []}
        for f in list_files(source):
            for i, text in enumerate(iter_documents(source.name, f, source.text_field)):
                if text.strip():
                    split = "eval" if in_eval_split(source.name, f.relpath, i, data.eval_fraction) else "train"
                    expected[split] += tok.encode(text) + [tok.eos_id]
        for split in ("train", "eval"):
            stream = open_stream(prepared.stream_path(source.name, split), prepared.num_tokens(source.name, split))
            assert stream.tolist() == expected[split], (source.name, split)
            total[split] += prepared.manifest["sources"][source.name]["documents"][split]
    assert prepared.manifest["sources"]["prose"]["files"] == 42
    assert total["train"] + total["eval"] == 40 + 60  # the empty and blank files hold no document
    assert 0.05 < total["eval"] / 100 < 0.4


def test_cache_is_reused_and_keyed_by_what_changes_the_tokens(corpus, tmp_path, monkeypatch):
    data, prepared = corpus
    import platform.data.pipeline as pipeline

    def must_not_run(*args, **kwargs):
        raise AssertionError("the cache was rebuilt")

    monkeypatch.setattr(pipeline, "tokenize_corpus", must_not_run)
    assert prepare_data(data, 100352, progress=False).path == prepared.path
    # Weights, curriculum, batch shape and seq_len do not change the token streams.
    reweighted = replace(data, sources=[replace(s, weight=1.0) for s in data.sources],
                         curriculum=[CurriculumStage(5, {"code": 1.0})])
    assert find_prepared(reweighted, 100352).path == prepared.path
    assert ensure_prepared(_job(reweighted, seq_len=64), progress=False).path == prepared.path
    # The eval split, the tokenizer's vocabulary and the files do.
    assert find_prepared(replace(data, eval_fraction=0.1), 100352) is None
    assert find_prepared(data, 100480) is None
    extra = Path(data.sources[0].path) / "zz_new.txt"
    extra.write_text("a new document")
    try:
        assert find_prepared(data, 100352) is None
    finally:
        extra.unlink()
    assert find_prepared(data, 100352).path == prepared.path


def test_resume_across_world_sizes_reads_exactly_the_uninterrupted_order(corpus):
    data, prepared = corpus
    job = _job(data)
    steps, switch, switch2 = 40, 13, 27
    reference = TrainingData(job, prepared)
    assert reference.epochs_at(steps)["prose"] > 1  # runs past the end of a source

    def run(world, start_step, stop_step):
        """Hashes of each global batch, assembled from every rank's micro batches in rank order."""
        readers = [TrainingData(job, prepared.path) for _ in range(world)]  # fresh, as after a restart
        iters = [r.batches(rank, world, start_sequences=start_step * 8, stop_step=stop_step)
                 for rank, r in enumerate(readers)]
        out = []
        for parts in zip(*iters):
            assert len({step for step, _ in parts}) == 1
            rows = [row for _, mbs in parts for mb in mbs for row in mb]
            for _, mbs in parts:
                assert all(mb.shape == (2, 17) and str(mb.dtype) == "torch.int64" for mb in mbs)
            out.append([_hash(r) for r in rows])
        return out

    uninterrupted = run(1, 0, steps)
    assert len(uninterrupted) == steps and all(len(b) == 8 for b in uninterrupted)
    assert [[_hash(r) for r in reference.global_batch(s)] for s in (0, 21)] == [uninterrupted[0], uninterrupted[21]]
    elastic = run(2, 0, switch) + run(1, switch, switch2) + run(4, switch2, steps)
    assert elastic == uninterrupted
    # No sequence repeats before its source is exhausted.
    first_epoch = [h for batch in uninterrupted[:5] for h in batch]
    assert len(set(first_epoch)) == len(first_epoch)


def test_ships_to_workers_as_config_and_path(corpus):
    data, prepared = corpus
    d = TrainingData(_job(data), prepared)
    blob = pickle.dumps(d)
    assert len(blob) < 4096
    clone = pickle.loads(blob)
    assert clone.cache_key == d.cache_key
    assert (clone.global_batch(3) == d.global_batch(3)).all()


def test_curriculum_changes_the_realised_mixture_at_the_declared_step(corpus):
    data, prepared = corpus
    staged = replace(data, curriculum=[CurriculumStage(0, {"prose": 0.75, "code": 0.25}),
                                       CurriculumStage(64, {"code": 1.0})])
    d = TrainingData(_job(staged, global_batch_size=64, micro_batch_size=4), prepared)
    before = np.array([[d.mixture_at(s)["prose"], d.mixture_at(s)["code"]] for s in range(64)]).sum(0)
    assert before[0] / before.sum() == pytest.approx(0.75, abs=0.01)
    assert d.mixture_at(63)["prose"] > 30
    assert d.mixture_at(64) == {"prose": 0, "code": 64}
    assert d.weights_at(64) == {"prose": 0.0, "code": 1.0}
    # The batch at the switch holds only code sequences.
    assert {_hash(r) for r in d.global_batch(64)} <= _windows(prepared, "code", "train")
    assert d.epochs_at(64)["prose"] > 0


def test_eval_batches_come_from_held_out_documents_only(corpus):
    data, prepared = corpus
    d = TrainingData(_job(data), prepared)
    held_out = _windows(prepared, "prose", "eval") | _windows(prepared, "code", "eval")
    trained = _windows(prepared, "prose", "train") | _windows(prepared, "code", "train")
    batches = [[row for mb in mbs for row in mb] for mbs in d.eval_batches(0, 1)]
    assert len(batches) == 3 and all(len(b) == 8 for b in batches)
    assert {_hash(r) for b in batches for r in b} <= held_out - trained
    halves = list(zip(d.eval_batches(0, 2), d.eval_batches(1, 2)))
    assert [[_hash(r) for mb in a + b for r in mb] for a, b in halves] == [[_hash(r) for r in b] for b in batches]
    code_only = [_hash(row) for mbs in d.eval_batches(0, 1, num_batches=2, source="code") for mb in mbs for row in mb]
    assert len(code_only) == 16 and set(code_only) <= _windows(prepared, "code", "eval")


def test_worker_layout_errors(corpus):
    data, prepared = corpus
    d = TrainingData(_job(data), prepared)
    with pytest.raises(DataError, match="global_batch_size 8 cannot be split evenly across 3 workers"):
        d.batches(0, 3)
    with pytest.raises(DataError, match="4 sequences per worker .* not a multiple of train.micro_batch_size 3"):
        TrainingData(_job(data, micro_batch_size=3), prepared).batches(0, 2)
    with pytest.raises(DataError, match="cannot resume at 12 sequences"):
        d.batches(0, 1, start_sequences=12)
    with pytest.raises(DataError, match="the weights sum to 0"):
        TrainingData(_job(replace(data, sources=[replace(s, weight=0) for s in data.sources])), prepared)
    with pytest.raises(DataError, match="has no source 'web'"):
        TrainingData(_job(replace(data, sources=[*data.sources, DataSource(name="web", path="/x")])), prepared)
    with pytest.raises(DataError, match="tokenized for vocab_size 100352, the model has 100480"):
        TrainingData(replace(_job(data), model=replace(_job(data).model, vocab_size=100480)), prepared)


def test_bad_sources_fail_with_one_message_naming_the_source(tmp_path, ray_local):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    (empty / "b.txt").write_text("\n \n")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "ok.txt").write_text("fine")
    (broken / "x.parquet").write_bytes(b"PAR1 not really parquet")
    cases = [
        (DataSource(name="gone", path=str(tmp_path / "missing")), r"^data source 'gone': .*missing does not exist$"),
        (DataSource(name="void", path=str(empty)), r"^data source 'void' is empty: no text in its 2 file\(s\)$"),
        (DataSource(name="bad", path=str(broken)), r"^data source 'bad': cannot read .*x.parquet as Parquet: "),
    ]
    for source, match in cases:
        data = DataConfig(sources=[source], cache_dir=str(tmp_path / "cache"))
        with pytest.raises(DataError, match=match) as info:
            prepare_data(data, 100352, progress=False)
        assert "Traceback" not in str(info.value) and "\n" not in str(info.value)
        assert info.value.__cause__ is None
    assert not [p for p in os.listdir(tmp_path / "cache") if not p.startswith(".") or p.startswith(".tmp")]


def test_a_source_held_out_entirely_is_used_for_training(tmp_path, ray_local):
    (tmp_path / "only.txt").write_text("a single document")
    data = DataConfig(sources=[DataSource(name="one", path=str(tmp_path / "only.txt"))],
                      cache_dir=str(tmp_path / "cache"), eval_fraction=0.999)
    stats = prepare_data(data, 100352, progress=False).manifest["sources"]["one"]
    assert stats["documents"] == {"train": 1, "eval": 0}
    assert stats["tokens"] == {"train": len(get_tokenizer().encode("a single document")) + 1, "eval": 0}


def test_prepare_cli_builds_and_describes_the_cache(tmp_path, ray_local, capsys):
    from platform.data import prepare

    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.md").write_text("# Title\n\nSome prose to train on.\n")
    job = tmp_path / "job.yaml"
    job.write_text(f"name: t\ndata:\n  sources:\n    - name: notes\n      path: {tmp_path / 'text'}\n"
                   f"  cache_dir: {tmp_path / 'cache'}\ntrain:\n  total_tokens: 100000\n  seq_len: 4\n")
    assert prepare.main([str(job), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"prepared data: {tmp_path / 'cache'}" in out
    # 9 text tokens + EOS, cut into windows of 4 + 1 overlapping by one token: 3 sequences.
    assert "notes: 1 files, 1+0 docs (train+eval), 10+0 tokens, 3 train sequences of 4" in out


def test_prepare_cli_reports_user_errors_without_a_traceback(tmp_path):
    (tmp_path / "nothing").mkdir()
    job = tmp_path / "job.yaml"
    job.write_text(f"name: t\ndata:\n  sources:\n    - name: web\n      path: {tmp_path / 'nothing'}\n"
                   f"  cache_dir: {tmp_path / 'cache'}\ntrain:\n  total_tokens: 100000\n")
    res = subprocess.run([sys.executable, "-m", "platform.data.prepare", str(job)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert res.stderr.strip() == f"error: data source 'web': no files at {tmp_path / 'nothing'}"


@pytest.mark.slow
def test_default_corpus_prepares_quickly_and_trains_on_real_text(tmp_path, ray_local):
    job = load_job(REPO / "conf" / "local_tiny.yaml", [f"data.cache_dir={tmp_path}"])
    start = time.monotonic()
    prepared = ensure_prepared(job, progress=False)
    elapsed = time.monotonic() - start
    assert elapsed < 120, elapsed
    stdlib, plays = prepared.manifest["sources"]["python_stdlib"], prepared.manifest["sources"]["shakespeare"]
    assert stdlib["files"] > 400 and stdlib["tokens"]["train"] > 1_500_000 and stdlib["tokens"]["eval"] > 0
    assert plays["files"] == 38 and plays["tokens"]["train"] > 1_000_000
    d = TrainingData(job, prepared)
    tok = get_tokenizer(job.model.vocab_size)
    text = " ".join(tok.decode(mb[0]) for _, mbs in d.batches(0, 2, stop_step=3) for mb in mbs)
    assert "def " in text or "import " in text or "return" in text
    assert "thou" in text.lower() or "thee" in text.lower() or "lord" in text.lower()
    share = sum(d.mixture_at(s)["shakespeare"] for s in range(256)) / (256 * job.train.global_batch_size)
    assert share == pytest.approx(0.5, abs=0.01)
