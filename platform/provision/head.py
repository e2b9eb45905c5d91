"""The embedded Ray head on this host, and Ray's token authentication.

With no `cluster.ray_address`, the platform starts its own Ray head here:
`ray start --head --block` in a session of its own, CPU-less (training runs on
the worker nodes Terraform adds), dashboard on 127.0.0.1, small object store,
and its own temp dir so that a plain `ray.init()` elsewhere on the host never
attaches to it by accident. A head that already answers on the port is reused
and left running on stop().

Ray 2.60 token auth (checked on this Ray version): `ray start --head` turns it
on by default and uses ~/.ray/auth_token, but `ray start --address=...` and
`ray.init(address=...)` only send the token when RAY_AUTH_MODE=token is set in
their environment; without it the worker node loops on "InvalidAuthToken".
So the head, every worker node (through Terraform's environment) and this
process (for ray.init and the state API) all run with RAY_AUTH_MODE=token, and
read the token from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.
Ray's GCS and raylet listen on all interfaces (Ray offers no loopback-only
mode); the token is what keeps them closed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from platform.provision import procs
from platform.provision.errors import ProvisionError

log = logging.getLogger(__name__)

AUTH_MODE_ENV = "RAY_AUTH_MODE"
_config_refreshed = False   # Ray's config re-read since RAY_AUTH_MODE=token was set


def ray_bin() -> str:
    """The `ray` CLI of this interpreter's environment (the same Ray version as the driver)."""
    beside = Path(sys.executable).parent / "ray"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("ray")
    if not found:
        raise ProvisionError("the `ray` command is not installed in this environment")
    return found


def token_auth_enabled() -> bool:
    """Token auth is on unless RAY_AUTH_MODE says otherwise (Ray's own default for new heads)."""
    return os.environ.get(AUTH_MODE_ENV, "token").lower() != "disabled"


def _token_path() -> Path:
    custom = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(custom).expanduser() if custom else Path.home() / ".ray" / "auth_token"


def ensure_auth_token() -> None:
    """Create ~/.ray/auth_token (mode 0600) if no token is configured; never prints it."""
    if not token_auth_enabled() or os.environ.get("RAY_AUTH_TOKEN"):
        return
    path = _token_path()
    if path.is_file() and path.read_text().strip():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))   # Ray's own format: 256 random bits, hex
    log.info("created a Ray auth token at %s", path)


def ray_auth_env() -> dict[str, str]:
    """Environment every Ray process of the cluster needs to authenticate."""
    return {AUTH_MODE_ENV: "token"} if token_auth_enabled() else {}


def enable_token_auth_in_process() -> None:
    """Make ray.init() and the state API of *this* process send the token.

    Ray reads RAY_AUTH_MODE into its config once; if Ray is already loaded,
    refresh that config the way Ray does for a head it starts itself."""
    global _config_refreshed
    if not token_auth_enabled():
        return
    already = os.environ.get(AUTH_MODE_ENV) == "token"
    os.environ[AUTH_MODE_ENV] = "token"
    if "ray._raylet" in sys.modules and not (already and _config_refreshed):
        try:
            from ray._private.authentication.authentication_token_setup import _enable_token_auth
        except ImportError:   # a Ray without token auth: nothing to refresh
            return
        _enable_token_auth()
        _config_refreshed = True


def free_local_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    return free_local_ports(1)[0]


def free_local_ports(n: int) -> list[int]:
    """`n` distinct TCP ports free on 127.0.0.1 right now. All are held until all are chosen:
    two separate `free_local_port()` calls may return the same port (the kernel may hand out a
    port again as soon as it is released), and Ray refuses a head whose components share one."""
    with contextlib.ExitStack() as held:
        ports = []
        for _ in range(n):
            s = held.enter_context(socket.socket())
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
        return ports


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


# Ray's GCS declares a node dead after `failure_threshold` failed health checks
# `period_ms` apart (defaults 5 x 3 s). A local node is a process on this host: a
# dead one refuses the check at once, so 3 x 1 s notices a lost node within ~3 s
# and the run moves to the survivors sooner; a merely slow one still has Ray's
# 10 s timeout per check.
LOCAL_HEALTH_CHECKS = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}


# `platform.stop` of a detached job: Ray's job supervisor sends SIGTERM and, by default,
# SIGKILL 3 s later. The controller needs longer to tear its nodes down.
JOB_STOP_GRACE = {"RAY_JOB_STOP_WAIT_TIME_S": "120"}


@dataclasses.dataclass
class LocalHead:
    """A Ray head on 127.0.0.1:`port`, started here or found already running."""

    port: int = 6379
    dashboard_port: int = 8265
    object_store_mb: int = 128
    num_cpus: int = 0
    client_port: int | None = None     # Ray Client server port (Ray's default: 10001)
    state_dir: str | None = None       # default: platform.config.state_dir()/ray-head-<port>
    temp_dir: str | None = None        # default: /tmp/dbrx-ray-<uid>-<port> (short: socket paths)
    owned: bool = dataclasses.field(default=False, init=False)   # started by this platform

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def _dir(self) -> Path:
        if self.state_dir:
            return Path(self.state_dir)
        from platform.config import state_dir

        return Path(state_dir()) / f"ray-head-{self.port}"

    @property
    def _temp(self) -> str:
        return self.temp_dir or f"/tmp/dbrx-ray-{os.getuid()}-{self.port}"

    def _record(self) -> dict | None:
        try:
            return json.loads((self._dir / "head.json").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def owned_pid(self) -> int | None:
        """The pid of a head this platform started and that is still running."""
        rec = self._record()
        if rec and procs.session_members(rec["pid"], rec["start_time"]):
            return rec["pid"]
        return None

    def start(self, timeout_s: float = 90.0) -> "LocalHead":
        """Start the head unless one already answers on the port; then wait until it serves."""
        enable_token_auth_in_process()
        if port_open("127.0.0.1", self.port):
            self.owned = self.owned_pid() is not None
            log.info("Ray head already running at %s; reusing it", self.address)
            self._wait_ready(timeout_s)
            return self
        ensure_auth_token()
        self._dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **ray_auth_env(), **LOCAL_HEALTH_CHECKS, **JOB_STOP_GRACE}
        cmd = [ray_bin(), "start", "--head", "--block", f"--port={self.port}",
               f"--num-cpus={self.num_cpus}", "--num-gpus=0",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={self.dashboard_port}",
               f"--object-store-memory={self.object_store_mb * 1024 * 1024}",
               # Ray's default agent port (52365) is taken by any other Ray on this host, and an
               # agent without its HTTP server leaves the job server unable to take jobs.
               f"--dashboard-agent-listen-port={self._free_agent_port()}",
               f"--temp-dir={self._temp}", "--disable-usage-stats"]
        if self.client_port is not None:
            cmd.append(f"--ray-client-server-port={self.client_port}")
        log_path = self._dir / "head.log"
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        (self._dir / "head.json").write_text(json.dumps(
            {"pid": proc.pid, "start_time": procs.start_time(proc.pid), "port": self.port,
             "temp_dir": self._temp}))
        self.owned = True
        try:
            self._wait_ready(timeout_s, proc, log_path)
        except BaseException:
            self.stop()
            raise
        log.info("Ray head started at %s (dashboard %s)", self.address, self.dashboard_url)
        return self

    def _free_agent_port(self) -> int:
        """A free port none of the head's own ports can take: they are not bound yet."""
        taken = {self.port, self.dashboard_port, self.client_port}
        return next(p for p in free_local_ports(len(taken) + 1) if p not in taken)

    def _wait_ready(self, timeout_s: float, proc: subprocess.Popen | None = None,
                    log_path: Path | None = None) -> None:
        """Until the head answers Ray's node query: an open port alone may be another program."""
        from ray.util.state import list_nodes

        deadline = time.monotonic() + timeout_s
        last_error = "port not open"
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:] if log_path else ""
                raise ProvisionError(f"the Ray head exited at start (status {proc.returncode}); "
                                     f"end of {log_path}:\n{tail}")
            # The state API waits for the dashboard: for a head started here, ask once
            # its port is open too (a reused head's dashboard may be elsewhere).
            if port_open("127.0.0.1", self.port) and (
                    proc is None or port_open("127.0.0.1", self.dashboard_port)):
                try:
                    list_nodes(address=self.address, raise_on_missing_output=False, timeout=5)
                    return
                except Exception as exc:   # not up yet, or not Ray: keep the reason for the error
                    last_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            time.sleep(0.5)
        raise ProvisionError(f"no Ray head answered at {self.address} within {timeout_s:.0f}s "
                             f"({last_error}); if another program holds port {self.port}, set "
                             "cluster.ray_address or pick another port")

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the head if this platform started it (a reused head is left alone)."""
        rec = self._record()
        if not rec:
            return
        killed = procs.stop_session(rec["pid"], rec["start_time"], timeout_s)
        if killed:   # usual: Ray's orderly shutdown takes ~10 s, and the head keeps no state
            log.info("Ray head processes still running after %.0fs were killed: %s", timeout_s, killed)
        (self._dir / "head.json").unlink(missing_ok=True)
        self.owned = False
