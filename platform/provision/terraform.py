"""Terraform CLI driver: one working directory, state and lock per job.

Each job gets `state_dir()/terraform/<job>/`: a copy of the provider's module
(infra/local or infra/aws), its `terraform.tfstate`, `.terraform/`, the
variables of the last operation and a log per operation. Copying the module
keeps a running job's state tied to the files it was applied with, and gives
every job its own `.terraform` and state.

Two controllers must never apply the same state: every state-touching
operation holds an fcntl lock on the working directory for its whole length
(and Terraform's own state lock, with `-lock-timeout`). Operations run under
a wall-clock timeout; transient failures (throttling, timeouts, dropped
connections) are retried with backoff, capacity shortages a bounded number of
times, and any failure ends in one ProvisionError holding Terraform's own
`Error:` text rather than a Python stack.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from platform.provision.errors import (
    CAPACITY, LOCKED, TIMEOUT, TRANSIENT, CapacityError, LockError, ProvisionError,
    classify,
)
from platform.retry import Backoff

log = logging.getLogger(__name__)

TERRAFORM_BIN_ENV = "DBRX_TERRAFORM_BIN"   # an explicit terraform binary
INFRA_DIR_ENV = "DBRX_PLATFORM_INFRA"      # where infra/<provider> modules live
_LOCK_FILE = ".dbrx-provision.lock"
_VARS_FILE = "dbrx.tfvars.json"
_INIT_STAMP = ".dbrx-init-stamp"
_MODULE_IGNORE = shutil.ignore_patterns(".terraform", ".terraform.lock.hcl", "*.tfstate",
                                        "*.tfstate.*", "run", "logs", "__pycache__")
# Terraform init failures that mean "the module's providers cannot be installed here".
_PROVIDER_MISSING = ("Failed to query available provider packages", "Failed to install provider",
                     "Failed to resolve provider packages", "could not connect to registry",
                     "Inconsistent dependency lock file", "Required plugins are not installed")


def infra_dir() -> Path:
    """The folder holding the Terraform modules: $DBRX_PLATFORM_INFRA, else the
    `infra/` beside the installed package (a source checkout or editable install)."""
    if os.environ.get(INFRA_DIR_ENV):
        return Path(os.environ[INFRA_DIR_ENV]).expanduser().resolve()
    import platform as package   # this project's package (see platform/__init__.py)

    pkg = Path(package.__file__).resolve().parent
    for candidate in (pkg.parent / "infra", pkg / "_infra"):
        if candidate.is_dir():
            return candidate
    raise ProvisionError(f"cannot find the Terraform modules (looked in {pkg.parent / 'infra'}); "
                         f"set {INFRA_DIR_ENV} to the repository's infra/ folder")


def module_dir(provider: str) -> Path:
    """infra/<provider>, checked to exist."""
    path = infra_dir() / provider
    if not (path.is_dir() and any(path.glob("*.tf"))):
        raise ProvisionError(f"no Terraform module for provider {provider!r} at {path}")
    return path


def terraform_binary() -> str | None:
    """$DBRX_TERRAFORM_BIN or `terraform` on the PATH; None if neither exists."""
    explicit = os.environ.get(TERRAFORM_BIN_ENV)
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    return shutil.which("terraform")


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How often to try an operation again, by failure kind, and how long to wait."""

    transient_attempts: int = 4      # throttling, timeouts, connection resets
    capacity_attempts: int = 2       # InsufficientInstanceCapacity: a second try, then give up
    backoff_s: float = 10.0          # first wait; doubles per attempt, with jitter
    max_backoff_s: float = 120.0

    def attempts(self, kind: str) -> int:
        return {TRANSIENT: self.transient_attempts, CAPACITY: self.capacity_attempts}.get(kind, 1)

    def delay(self, attempt: int) -> float:
        return Backoff(self.backoff_s, self.max_backoff_s).delay(attempt)


@dataclasses.dataclass(frozen=True)
class PlanSummary:
    """What a plan would do: counts and (action, resource address) pairs."""

    add: int
    change: int
    destroy: int
    actions: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        head = f"Plan: {self.add} to add, {self.change} to change, {self.destroy} to destroy."
        return "\n".join([head] + [f"  {action:8} {addr}" for action, addr in self.actions])


@dataclasses.dataclass
class _Run:
    returncode: int
    events: list[dict]       # JSON lines of stdout
    text: list[str]          # other stdout lines
    stderr: list[str]
    log_path: Path


class Terraform:
    """Drives `terraform` on one module copy in one working directory.

    Safe to share between threads: operations on one instance run one at a
    time, and the file lock keeps instances and processes apart.
    """

    def __init__(self, module: str | os.PathLike, workdir: str | os.PathLike, *,
                 binary: str | None = None, env: Mapping[str, str] | None = None,
                 timeout_s: float = 3600.0, lock_wait_s: float = 30.0,
                 retry: RetryPolicy = RetryPolicy()) -> None:
        self.module = Path(module).resolve()
        self.workdir = Path(workdir).resolve()
        self.binary = binary or terraform_binary()
        self.env = dict(env or {})
        self.timeout_s = timeout_s
        self.lock_wait_s = lock_wait_s
        self.retry = retry
        self._lock_depth = 0
        self._thread_lock = threading.RLock()
        self._last_outputs: dict[str, Any] | None = None

    @classmethod
    def for_job(cls, job_name: str, provider: str, **kwargs: Any) -> "Terraform":
        """The driver for job `job_name` on infra/<provider>, in state_dir()/terraform/<job>."""
        from platform.config import state_dir

        return cls(module_dir(provider), Path(state_dir()) / "terraform" / job_name, **kwargs)

    # -- locking ---------------------------------------------------------

    @contextlib.contextmanager
    def locked(self, operation: str, wait_s: float | None = None) -> Iterator[None]:
        """Hold the job's state lock: other processes and other threads wait, the
        holding thread may re-enter (apply runs init inside its own lock)."""
        wait = self.lock_wait_s if wait_s is None else wait_s
        acquired = (self._thread_lock.acquire(timeout=wait) if wait > 0
                    else self._thread_lock.acquire(blocking=False))
        if not acquired:
            raise LockError(f"cannot {operation}: another thread of this controller is changing "
                            f"the Terraform state in {self.workdir}; waited {wait:.0f}s")
        try:
            if self._lock_depth:
                self._lock_depth += 1
                try:
                    yield
                finally:
                    self._lock_depth -= 1
                return
            with self._file_lock(operation, wait):
                self._lock_depth = 1
                try:
                    yield
                finally:
                    self._lock_depth = 0
        finally:
            self._thread_lock.release()

    @contextlib.contextmanager
    def _file_lock(self, operation: str, wait_s: float) -> Iterator[None]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.workdir / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            self._acquire(fd, operation, wait_s)
            holder = {"pid": os.getpid(), "host": socket.gethostname(), "operation": operation,
                      "since": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder).encode(), 0)
            try:
                yield
            finally:
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _acquire(self, fd: int, operation: str, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
            if time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        try:
            holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except ValueError:
            holder = {}
        who = "another process"
        if holder:
            who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, running "
                   f"'{holder.get('operation', '?')}' since {holder.get('since', '?')}")
        raise LockError(f"cannot {operation}: the Terraform state in {self.workdir} is locked by "
                        f"another controller ({who}); waited {wait_s:.0f}s. Let it finish or stop "
                        "that controller, then try again.")

    # -- operations ------------------------------------------------------

    def prepare(self) -> None:
        """Copy the module into the working directory (state and .terraform untouched)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        wanted = {p.name for p in self.module.glob("*.tf")}
        for stale in self.workdir.glob("*.tf"):
            if stale.name not in wanted:
                stale.unlink()
        shutil.copytree(self.module, self.workdir, ignore=_MODULE_IGNORE, dirs_exist_ok=True)

    def init(self, timeout_s: float | None = None, *, retry: bool = True) -> None:
        """Copy the module and `terraform init`, skipped when nothing changed since the last init."""
        with self.locked("init"):
            self.prepare()
            stamp = self._module_digest()
            stamp_file = self.workdir / _INIT_STAMP
            if (self.workdir / ".terraform").is_dir() and stamp_file.is_file() \
                    and stamp_file.read_text() == stamp:
                return
            self._call("init", ["init", "-json", "-input=false"], timeout_s, retry=retry)
            stamp_file.write_text(stamp)

    def plan(self, variables: Mapping[str, Any], *, replace: Sequence[str] = (),
             destroy: bool = False, timeout_s: float | None = None) -> PlanSummary:
        """What apply (or destroy) would change, without changing anything."""
        with self.locked("plan"):
            self.init(timeout_s)
            return self._plan(variables, replace, destroy, timeout_s, retry=True)

    def apply(self, variables: Mapping[str, Any], *, replace: Sequence[str] = (),
              timeout_s: float | None = None) -> dict[str, Any]:
        """Apply with `variables`; `replace` lists resource addresses to recreate.
        Returns the module outputs."""
        with self.locked("apply"):
            self.init(timeout_s)
            args = ["apply", "-json", "-input=false", "-auto-approve", *self._common_args(variables)]
            args += [f"-replace={addr}" for addr in replace]
            self._call("apply", args, timeout_s)
            return self.output()

    def destroy(self, variables: Mapping[str, Any] | None = None, *,
                timeout_s: float | None = None) -> None:
        """Destroy everything in the state; `variables` default to the last operation's."""
        with self.locked("destroy"):
            if not self.has_state():
                return
            self.init(timeout_s)
            args = ["apply", "-destroy", "-json", "-input=false", "-auto-approve",
                    *self._common_args(variables)]
            self._call("destroy", args, timeout_s)

    def output(self) -> dict[str, Any]:
        """The root module's outputs as plain values ({} before the first apply).

        While another thread of this controller is applying, the outputs of
        the last finished operation: the state is mid-change, and those stay
        true until the apply ends."""
        if self._thread_lock.acquire(blocking=False):
            try:
                self._last_outputs = self._read_outputs()
                return dict(self._last_outputs)
            finally:
                self._thread_lock.release()
        if self._last_outputs is not None:
            return dict(self._last_outputs)
        with self.locked("output"):
            return self._read_outputs()

    def _read_outputs(self) -> dict[str, Any]:
        if not self.has_state():
            return {}
        run = self._run(["output", "-json"], timeout_s=60.0, json_lines=False)
        if run.returncode != 0:
            self._raise("output", run)
        try:
            raw = json.loads("".join(run.text) or "{}")
        except ValueError:
            raise ProvisionError(f"terraform output returned no JSON (see {run.log_path})") from None
        return {name: item.get("value") for name, item in raw.items()}

    def has_state(self) -> bool:
        """Whether the job has a state with any resource in it."""
        path = self.workdir / "terraform.tfstate"
        try:
            return bool(json.loads(path.read_text()).get("resources"))
        except (FileNotFoundError, ValueError):
            return False

    def plan_summary(self, variables: Mapping[str, Any], timeout_s: float = 60.0) -> str:
        """One paragraph for `submit --dry-run`: the plan's summary, or why there is none.

        Raises the ProvisionError when Terraform reports an error in the job's
        own module or variables: that job cannot run, and the dry-run must say
        so. What only this machine lacks (terraform itself, the providers'
        download, a lock another controller holds, time) is reported, not
        raised. Never waits long: no retries, short timeouts."""
        where = f"infra/{self.module.name}"
        if self.binary is None:
            return (f"Terraform plan ({where}): unavailable: terraform is not installed "
                    f"(put terraform >= 1.9 on the PATH or set {TERRAFORM_BIN_ENV})")
        try:
            with self.locked("plan", wait_s=0):
                self.init(timeout_s, retry=False)
                summary = self._plan(variables, (), False, timeout_s, retry=False, lock_timeout_s=5)
        except LockError:
            return (f"Terraform plan ({where}): unavailable: another controller is changing "
                    "this job's nodes right now")
        except ProvisionError as exc:
            if any(p in str(exc) for p in _PROVIDER_MISSING):
                return (f"Terraform plan ({where}): unavailable: the module's providers "
                        "are not installed and cannot be downloaded from here "
                        f"({_first_error(exc)}). Run with registry access or a "
                        "provider mirror (TF_CLI_CONFIG_FILE) to see the plan.")
            if exc.kind == TIMEOUT:
                return f"Terraform plan ({where}): unavailable: {_first_error(exc)}"
            raise
        return f"Terraform plan ({where}):\n{summary}"

    # -- internals -------------------------------------------------------

    def _plan(self, variables: Mapping[str, Any], replace: Sequence[str], destroy: bool,
              timeout_s: float | None, *, retry: bool, lock_timeout_s: float | None = None) -> PlanSummary:
        args = ["plan", "-json", "-input=false", *self._common_args(variables, lock_timeout_s)]
        args += [f"-replace={addr}" for addr in replace]
        if destroy:
            args.append("-destroy")
        run = self._call("plan", args, timeout_s, retry=retry)
        counts = {"add": 0, "change": 0, "remove": 0}
        actions = []
        for event in run.events:
            if event.get("type") == "change_summary":
                counts.update({k: event["changes"].get(k, 0) for k in counts})
            elif event.get("type") == "planned_change":
                change = event.get("change", {})
                actions.append((change.get("action", "?"), change.get("resource", {}).get("addr", "?")))
        return PlanSummary(counts["add"], counts["change"], counts["remove"], tuple(sorted(actions)))

    def _common_args(self, variables: Mapping[str, Any] | None,
                     lock_timeout_s: float | None = None) -> list[str]:
        path = self.workdir / _VARS_FILE
        if variables is not None:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(dict(variables), f, indent=2, sort_keys=True)
        elif not path.is_file():
            raise ProvisionError(f"no variables recorded in {self.workdir}: pass them explicitly")
        wait = self.lock_wait_s if lock_timeout_s is None else lock_timeout_s
        return [f"-var-file={path}", f"-lock-timeout={int(max(wait, 1))}s"]

    def _call(self, operation: str, args: list[str], timeout_s: float | None, *,
              retry: bool = True) -> _Run:
        """Run with retries by failure kind; raise the classified error at the end."""
        attempt = 0
        while True:
            attempt += 1
            run = self._run(args, timeout_s=timeout_s or self.timeout_s, json_lines=True)
            if run.returncode == 0:
                return run
            errors = _errors(run)
            kind = classify("\n".join(errors))
            if retry and attempt < self.retry.attempts(kind):
                delay = self.retry.delay(attempt)
                log.warning("terraform %s failed (%s, attempt %d of %d); retrying in %.0fs: %s",
                            operation, kind, attempt, self.retry.attempts(kind), delay,
                            errors[0] if errors else "no error text")
                time.sleep(delay)
                continue
            self._raise(operation, run, errors, kind, attempt)

    def _raise(self, operation: str, run: _Run, errors: list[str] | None = None,
               kind: str | None = None, attempts: int = 1) -> None:
        errors = errors if errors is not None else _errors(run)
        kind = kind or classify("\n".join(errors))
        tried = f" after {attempts} attempts" if attempts > 1 else ""
        body = "\n".join("  " + line for e in errors for line in e.splitlines()) or \
            f"  (terraform exited with status {run.returncode} and no error text)"
        message = (f"terraform {operation} failed{tried} for {self.workdir.name} "
                   f"(infra/{self.module.name}):\n{body}\n  full log: {run.log_path}")
        cls = {CAPACITY: CapacityError, LOCKED: LockError}.get(kind, ProvisionError)
        raise cls(message, kind=kind, errors=errors, log_path=str(run.log_path))

    def _run(self, args: list[str], *, timeout_s: float, json_lines: bool) -> _Run:
        if self.binary is None:
            raise ProvisionError("terraform is not installed: put terraform >= 1.9 on the PATH "
                                 f"or set {TERRAFORM_BIN_ENV}")
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{time.strftime('%Y%m%d-%H%M%S')}-{args[0]}.log"
        cmd = [self.binary, f"-chdir={self.workdir}", *args]
        events: list[dict] = []
        text: list[str] = []
        stderr: list[str] = []
        with open(log_path, "a", encoding="utf-8") as log_file:
            log_file.write("$ " + " ".join(cmd) + "\n")
            log_file.flush()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    stdin=subprocess.DEVNULL, env=self._environment(), text=True,
                                    errors="replace", start_new_session=True)
            write_lock = threading.Lock()
            readers = [
                threading.Thread(target=_pump, daemon=True,
                                 args=(proc.stdout, log_file, write_lock, events, text, json_lines)),
                threading.Thread(target=_pump, daemon=True,
                                 args=(proc.stderr, log_file, write_lock, None, stderr, False)),
            ]
            for reader in readers:
                reader.start()
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _interrupt(proc)
                for reader in readers:
                    reader.join(timeout=10)
                raise ProvisionError(
                    f"terraform {args[0]} timed out after {timeout_s:.0f}s for {self.workdir.name}; "
                    f"it was interrupted (state saved). Full log: {log_path}",
                    kind=TIMEOUT, log_path=str(log_path)) from None
            except BaseException:
                _interrupt(proc)   # Ctrl-C or an error here: let terraform stop cleanly
                raise
            for reader in readers:
                reader.join()
        return _Run(proc.returncode, events, text, stderr, log_path)

    def _environment(self) -> dict[str, str]:
        from platform.config import state_dir

        env = dict(os.environ)
        env.update(self.env)
        env.setdefault("CHECKPOINT_DISABLE", "1")
        env["TF_IN_AUTOMATION"] = "1"
        env["TF_INPUT"] = "0"
        config = env.get("TF_CLI_CONFIG_FILE") or "~/.terraformrc"
        if not Path(config).expanduser().exists():   # else terraform warns on every call
            env["TF_CLI_CONFIG_FILE"] = os.devnull
        if "TF_PLUGIN_CACHE_DIR" not in env:   # one provider download shared by all jobs
            cache = Path(state_dir()) / "terraform" / ".plugin-cache"
            cache.mkdir(parents=True, exist_ok=True)
            env["TF_PLUGIN_CACHE_DIR"] = str(cache)
        return env

    def _module_digest(self) -> str:
        digest = hashlib.sha256(str(self.binary).encode())
        for path in sorted(self.module.rglob("*")):
            if path.is_file() and ".terraform" not in path.parts and path.suffix in (".tf", ".hcl"):
                digest.update(path.relative_to(self.module).as_posix().encode())
                digest.update(path.read_bytes())
        return digest.hexdigest()


def _pump(stream, log_file, write_lock: threading.Lock, events: list[dict] | None,
          lines: list[str], json_lines: bool) -> None:
    """Copy one of terraform's output streams to the log; keep JSON events apart."""
    for line in stream:
        with write_lock:
            log_file.write(line)
            log_file.flush()
        if json_lines and events is not None and line.startswith("{"):
            try:
                event = json.loads(line)
            except ValueError:
                lines.append(line)
                continue
            events.append(event)
            if event.get("type") in ("apply_complete", "apply_errored", "provision_errored",
                                     "change_summary") or event.get("@level") == "error":
                log.info("terraform: %s", event.get("@message", ""))
        else:
            lines.append(line)


def _interrupt(proc: subprocess.Popen, grace_s: float = 60.0) -> None:
    """SIGINT terraform's process group (it then stops and saves state); SIGKILL after grace."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


_BOX = str.maketrans("", "", "│╷╵")


def _errors(run: _Run) -> list[str]:
    """Terraform's error diagnostics as 'Error: summary\\ndetail' strings, de-duplicated."""
    found: list[str] = []
    for event in run.events:
        diag = event.get("diagnostic")
        if event.get("type") == "diagnostic" and diag and diag.get("severity") == "error":
            where = f" ({diag['address']})" if diag.get("address") else ""
            detail = diag.get("detail", "").strip()
            found.append(f"Error: {diag.get('summary', '')}{where}" + (f"\n{detail}" if detail else ""))
    if not found:   # no JSON diagnostics (e.g. a CLI usage error): take the text blocks
        block: list[str] = []
        for line in (l.translate(_BOX).rstrip() for l in run.stderr + run.text):
            stripped = line.strip()
            if stripped.startswith("Error:"):
                if block:
                    found.append("\n".join(block).strip())
                block = [stripped]
            elif block and (stripped.startswith("Warning:") or line == "" and block[-1] == ""):
                found.append("\n".join(block).strip())
                block = []
            elif block:
                block.append(stripped)
        if block:
            found.append("\n".join(block).strip())
    return list(dict.fromkeys(found))


def _first_error(exc: ProvisionError) -> str:
    """A one-line gist of a ProvisionError for a summary line."""
    text = exc.errors[0] if exc.errors else str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines[:2])[:400]
