"""Give the name `platform` to this project's package in every interpreter.

The standard library has a module named `platform`, and the standard library
comes before site-packages on sys.path, so `import platform.submit` would
otherwise fail everywhere: in the driver, in Ray workers and in Serve
replicas. `dbrx_platform_hook.pth` runs this module while `site` starts the
interpreter, before anything imports `platform`; it installs the project's
package under that name. The package executes the standard module's source
in its own namespace (see platform/__init__.py), so `platform.system()` and
the rest of the standard API keep working for torch, Ray and MLflow.
"""

import importlib.machinery
import importlib.util
import os
import sys


def _find_package():
    """The spec of a `platform` *package*: beside this hook (wheel install) or on
    sys.path (editable install), skipping the standard library's `platform.py`."""
    here = os.path.dirname(os.path.abspath(__file__))
    for entry in [here, *sys.path]:
        spec = importlib.machinery.PathFinder.find_spec("platform", [entry or os.getcwd()])
        # A regular package only: an editable install leaves a namespace folder
        # `platform/_infra` (the bundled Terraform modules) in site-packages.
        if spec is not None and spec.submodule_search_locations is not None and spec.origin:
            return spec
    return None


def install() -> None:
    current = sys.modules.get("platform")
    if current is not None and hasattr(current, "__path__"):
        return  # already ours
    spec = _find_package()
    if spec is None:
        return  # the package is not installed; leave the standard module alone
    module = importlib.util.module_from_spec(spec)
    sys.modules["platform"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        if current is not None:
            sys.modules["platform"] = current
        else:
            del sys.modules["platform"]
        raise


try:
    install()
except Exception as exc:  # never make the interpreter unusable
    sys.stderr.write(f"dbrx-platform: could not install the 'platform' package: {exc!r}\n")
