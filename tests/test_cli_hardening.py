"""Bad command lines: every CLI answers a bad value with exit 2 and a message, never a
traceback, a path outside the state folder, a secret or a screenful of echoed input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "conf" / "local_tiny.yaml"


def cli(module: str, *args: str, timeout: float = 60) -> tuple[int, str, str]:
    """Run `python -m platform.MODULE ARGS` for real (DBRX_PLATFORM_HOME is the test's)."""
    proc = subprocess.run([sys.executable, "-m", f"platform.{module}", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def test_overrides_may_follow_the_flags():
    code, out, err = cli("submit", "--dry-run", str(TINY), "--json", "train.seq_len=64")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["tokens_per_step"] == 16 * 64
    assert "terraform_plan" in plan


@pytest.mark.skipif(shutil.which("terraform") is None, reason="terraform is not on the PATH")
def test_dry_run_fails_when_terraform_rejects_the_jobs_module():
    # infra/local's own variable validation, reached through cluster.terraform_vars.
    code, out, err = cli("submit", str(TINY), "cluster.terraform_vars={start_timeout_s: '1'}",
                         "--dry-run")
    assert code == 2, err
    assert "terraform plan failed" in err and "start_timeout_s must be at least 10" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("kind", ["status", "logs", "stop"])
@pytest.mark.parametrize("job_id", ["../../etc/passwd", "a/b", "..", "/tmp/x", "x\n"])
def test_job_ids_are_validated_before_any_file_is_read(kind, job_id):
    code, out, err = cli(kind, job_id)
    assert code == 2, err
    assert err.startswith("error: job id") and "Traceback" not in err


@pytest.mark.parametrize("record", ["{", "[]", '{"job_id": "raysubmit_abc"}', "\udcff"])
def test_a_corrupt_job_record_is_a_clear_error(record):
    from platform.config import state_dir

    records = Path(state_dir()) / "jobs"
    records.mkdir(parents=True, exist_ok=True)
    (records / "raysubmit_abc.json").write_bytes(record.encode("utf-8", "surrogateescape"))
    code, out, err = cli("status", "raysubmit_abc")
    assert code == 1, err
    assert "job record" in err and "is corrupt" in err and "Traceback" not in err


@pytest.mark.parametrize("args,fragment", [
    (["--step", "-1"], "a checkpoint step must be at least 0"),
    (["--step", "ten"], "'ten' is not a whole number"),
    (["--step", "1" * 30], "must be at most"),
    (["--alias", "../prod"], "without '..'"),
    (["--alias", "a b"], "must be 1-128 letters"),
])
def test_promote_rejects_bad_values_with_exit_2(args, fragment):
    code, out, err = cli("promote", str(TINY), *args)
    assert code == 2, err
    assert fragment in err and "Traceback" not in err


def test_argument_errors_are_clipped_and_hide_secrets():
    code, out, err = cli("submit", str(TINY), "--serve.api_key=98765432", "--" + "z" * 100_000)
    assert code == 2
    assert "98765432" not in err and len(err) < 2000, err[:300]


@pytest.mark.parametrize("module,flags", [("serve", ["--alias", "staging"]), ("data.prepare", ["--quiet"])])
def test_serve_and_prepare_take_overrides_after_flags_and_refuse_bad_values(module, flags):
    """Overrides after a flag reach Hydra (not argparse's 'unrecognized arguments'), and the
    bad value is refused as a config error before anything starts."""
    code, out, err = cli(module, *flags, str(TINY), "train.lr=inf")
    assert code == 2, err
    assert "train.lr" in err and "finite" in err and "unrecognized" not in err
    assert "Traceback" not in err
