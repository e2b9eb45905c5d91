"""The package `platform` is this project and the standard module at once, everywhere."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _standard_module():
    path = Path(sysconfig.get_paths()["stdlib"]) / "platform.py"
    spec = importlib.util.spec_from_file_location("_stdlib_platform", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _probe() -> dict:
    """Run in any process: the standard API and the project's subpackages."""
    import platform
    import platform.config
    import platform.plan

    return {
        "system": platform.system(),
        "machine": platform.machine(),
        "python_version": platform.python_version(),
        "uname": tuple(platform.uname()),
        "node": platform.node(),
        "release": platform.release(),
        "platform": platform.platform(),
        "python_implementation": platform.python_implementation(),
        "is_package": hasattr(platform, "__path__"),
        "has_load_job": callable(platform.config.load_job),
        "has_plan": callable(platform.plan.make_plan),
    }


def _expected() -> dict:
    std = _standard_module()
    return {
        "system": std.system(), "machine": std.machine(),
        "python_version": std.python_version(), "uname": tuple(std.uname()),
        "node": std.node(), "release": std.release(), "platform": std.platform(),
        "python_implementation": std.python_implementation(),
        "is_package": True, "has_load_job": True, "has_plan": True,
    }


def test_standard_api_and_subpackages_in_this_process():
    assert _probe() == _expected()


def test_every_public_standard_function_is_there():
    import platform

    std = _standard_module()
    public = [n for n in dir(std) if not n.startswith("_") and callable(getattr(std, n))]
    missing = [n for n in public if not hasattr(platform, n)]
    assert not missing
    assert platform.architecture() == std.architecture()


def test_fresh_interpreter_outside_the_repo(tmp_path):
    code = ("import platform, platform.submit, json; "
            "print(json.dumps([platform.system(), platform.python_version(), "
            "platform.submit.__name__]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, check=True, timeout=60).stdout
    std = _standard_module()
    assert out.strip() == f'["{std.system()}", "{std.python_version()}", "platform.submit"]'


def test_python_dash_m_reaches_the_project_from_any_directory(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "platform.submit", "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--dry-run" in proc.stdout


def test_libraries_that_import_platform_still_work():
    import platform  # noqa: F401  (ours)

    code = "import torch, ray, mlflow, platform; print(torch.__version__, platform.system())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[1] == _standard_module().system()


def test_in_a_ray_task_and_actor(ray_local):
    ray = ray_local
    # Ship this test module's functions by value: workers cannot import tests/.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    probe = ray.remote(_probe)
    assert ray.get(probe.remote(), timeout=120) == _expected()

    @ray.remote
    class Prober:
        def probe(self):
            return _probe()

    actor = Prober.remote()
    assert ray.get(actor.probe.remote(), timeout=120) == _expected()
    ray.kill(actor)


@pytest.mark.slow
def test_in_a_serve_replica(ray_local):
    from ray import serve

    ray_local.cloudpickle.register_pickle_by_value(sys.modules[__name__])

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Probe:
        def __call__(self, request=None):
            return _probe()

    handle = serve.run(Probe.bind(), name="platform-probe", route_prefix=None)
    try:
        assert handle.remote().result(timeout_s=120) == _expected()
    finally:
        serve.shutdown()
