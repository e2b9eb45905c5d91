"""dbrx-platform: elastic DBRX mixture-of-experts training on Ray.

This package shares its name with the standard-library module `platform`.
It is both: the standard module's source runs in this namespace first, so
`platform.system()`, `platform.uname()`, ... behave exactly as usual, and the
subpackages (`platform.config`, `platform.submit`, ...) are this project.
`_platform_hook.py` installs the package under the name at interpreter
start-up; see it for why.
"""

import os as _os
import sysconfig as _sysconfig


def _load_standard_platform(namespace: dict) -> None:
    path = _os.path.join(_sysconfig.get_paths()["stdlib"], "platform.py")
    with open(path, encoding="utf-8") as f:
        code = compile(f.read(), path, "exec")
    exec(code, namespace)


_PACKAGE_DOC = __doc__
_load_standard_platform(globals())
__doc__ = _PACKAGE_DOC
del _load_standard_platform, _PACKAGE_DOC

__version__ = "0.1.0"
