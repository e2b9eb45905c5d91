"""bench/checkpoint.py: its baselines write exactly the checkpoint's bytes, and it reports both."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import checkpoint as bench  # noqa: E402

NBYTES = 3 * bench.BLOCK + 12345      # not a whole number of blocks


def test_raw_write_and_dd_write_exactly_the_bytes_asked(tmp_path):
    bench.raw_write(tmp_path / "raw", NBYTES, os.urandom(bench.BLOCK))
    bench.dd_write(tmp_path / "dd", NBYTES)
    assert (tmp_path / "raw").stat().st_size == (tmp_path / "dd").stat().st_size == NBYTES


def test_every_measurement_leads_a_round_in_turn():
    order = ["save", "raw", "dd"]
    assert [bench.rotated(order, r)[0] for r in range(3)] == order


def test_a_mismatch_is_explained():
    reasons = bench.mismatch_reasons([300.0, 1400.0], [700.0, 720.0], 10 << 20, "btrfs")
    text = " ".join(reasons)
    assert "raw varied 300..1400 MB/s" in text and "btrfs may compress" in text
    assert "small" in text and "dd varied" not in text


def test_quick_run_prints_both_baselines_and_the_ratio(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "checkpoint.py"), "--quick",
                           "--dir", str(tmp_path)], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for fragment in ("round 2", "  save sync  stall", "  save async stall", "  raw        stall",
                     "  dd         stall", "dd command: dd if=/dev/zero", "  raw write / dd: ",
                     "  save sync MB/s / raw write MB/s: ", "  save async MB/s / raw write MB/s: ",
                     "(target >= 0.8)", "  stall save async / total save sync: ", "(target <= 10%)"):
        assert fragment in out, out
    assert list(tmp_path.iterdir()) == []          # its folder is gone, checkpoints and all
