"""In a snapshot: the import path of a function that declared its dependencies.

The root zygote runs with the daemon's ``sys.path`` (its site-packages, its working
directory, finders that ``.pth`` files installed) and has imported hourai's own
dependencies (msgpack, uvloop, ...). A function that declared its dependencies must see
exactly those, the standard library, and hourai's worker side; so before its code runs:

1. ``sys.path`` keeps the standard library's entries only, then the function's
   distributions' directories (the loader puts the function's own code first);
2. every module already imported that is neither the standard library's nor hourai's is
   taken out of ``sys.modules``: hourai's modules keep the objects they imported (they hold
   them by reference), but an ``import msgpack`` in the function finds the function's own
   msgpack, or none;
3. import hooks that are not the interpreter's own (editable installs' finders,
   setuptools' distutils shim) go;
4. after the privilege drop, ``.pth`` files in the function's distributions are processed,
   as an installed environment would, so namespace packages that rely on them work.

Steps 1-3 run as root, before the uid-reachability fix-up of the library dirs; step 4 may
run code of the declared packages, so it runs as the tenant.
"""

from __future__ import annotations

import importlib
import os
import site
import sys
import sysconfig
from collections.abc import Sequence

_OWN_FINDER_MODULES = {"_frozen_importlib", "_frozen_importlib_external", "zipimport"}


def stdlib_dirs() -> list[str]:
    """The standard library's directories (and its zip, which sits beside them)."""
    paths = sysconfig.get_paths()
    out = {os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib") if k in paths}
    zipped = f"python{sys.version_info.major}{sys.version_info.minor}.zip"
    out.update(os.path.join(os.path.dirname(d), zipped) for d in list(out))
    return sorted(out)


def site_dirs() -> list[str]:
    paths = sysconfig.get_paths()
    out = {os.path.realpath(paths[k]) for k in ("purelib", "platlib") if k in paths}
    out.update(os.path.realpath(p) for p in site.getsitepackages())
    user = site.getusersitepackages()
    if user:
        out.add(os.path.realpath(user))
    return sorted(out)


def _under(path: str, dirs: Sequence[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in dirs)


class _Places:
    def __init__(self) -> None:
        self.stdlib = stdlib_dirs()
        self.sites = site_dirs()
        import hourai

        self.hourai = [os.path.realpath(p) for p in hourai.__path__]

    def stdlib_path(self, path: str) -> bool:
        real = os.path.realpath(path)
        return _under(real, self.stdlib) and not _under(real, self.sites)

    def foreign(self, name: str, module: object) -> bool:
        """Whether ``module`` came from elsewhere than the standard library or hourai."""
        top = name.partition(".")[0]
        if top == "hourai" or name == "__main__":
            return False
        origin = getattr(module, "__file__", None)
        if isinstance(origin, str):
            # by where it is: a stdlib name served from elsewhere (setuptools' distutils)
            # is foreign too
            return not self.stdlib_path(origin) and not _under(
                os.path.realpath(origin), self.hourai
            )
        return top not in sys.stdlib_module_names and top not in sys.builtin_module_names


def isolate(dists: Sequence[str]) -> list[str]:
    """Steps 1-3; returns the names taken out of sys.modules."""
    places = _Places()
    kept = [e for e in sys.path if e and places.stdlib_path(e)]
    sys.path[:] = kept + [d for d in dists if d not in kept]
    evicted = [
        name
        for name, module in list(sys.modules.items())
        if module is not None and places.foreign(name, module)
    ]
    for name in evicted:
        del sys.modules[name]
    sys.meta_path[:] = [f for f in sys.meta_path if _own_finder(f)]
    sys.path_importer_cache.clear()
    importlib.invalidate_caches()
    return evicted


def _own_finder(finder: object) -> bool:
    cls = finder if isinstance(finder, type) else type(finder)
    return cls.__module__ in _OWN_FINDER_MODULES


def process_pth(dists: Sequence[str]) -> None:
    """Step 4: each distribution dir as a site dir (its ``.pth`` files), in order."""
    known = {os.path.normcase(p) for p in sys.path}
    for d in dists:
        if any(name.endswith(".pth") for name in _listdir(d)):
            site.addsitedir(d, known)


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []
