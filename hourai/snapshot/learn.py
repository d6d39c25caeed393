"""Which packages a function imports: what the zygote tree (hourai.snapshot.tree) is built from.

A snapshot reports the top-level packages its import left in ``sys.modules``; a worker
reports what its first invocations imported on top (lazy imports inside a handler, as
SeBS's wrappers do). Only third-party packages count: not the standard library, not hourai,
not the function's own code. Both reports come from processes that run tenant code, so the
daemon takes them only through :func:`check_modules`.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Sequence
from typing import Any

# A module name (top-level as learned; dotted as a function may declare it), nothing odd.
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")
_MAX_NAME = 200
MAX_MODULES = 256  # per report, and per function in the daemon's view
LEARN_INVOCATIONS = 16  # a worker watches its first invocations' imports, then stops


def check_modules(value: Any, what: str = "modules") -> list[str]:
    """``value`` as a list of top-level package names, or ValueError saying what is wrong."""
    if type(value) is not list or len(value) > MAX_MODULES:
        raise ValueError(f"{what} must be a list of at most {MAX_MODULES} names")
    for name in value:
        if type(name) is not str or len(name) > _MAX_NAME or not _NAME.match(name):
            raise ValueError(f"{what}: {name!r:.60} is not a module name")
    return value


def third_party(code_root: str | None, names: Iterable[str] | None = None) -> list[str]:
    """The top-level third-party packages in ``sys.modules`` (of ``names`` if given)."""
    from hourai.packages.importpath import _Places

    places = _Places()
    own = os.path.realpath(code_root) if code_root else None
    tops: set[str] = set()
    for name in list(sys.modules) if names is None else names:
        top = name.partition(".")[0]
        if top in tops or top.startswith("_"):
            continue
        module = sys.modules.get(top)
        if module is None or not places.foreign(top, module):
            continue
        origin = getattr(module, "__file__", None) or next(
            iter(getattr(module, "__path__", None) or ()), None
        )
        if not isinstance(origin, str):
            continue  # built in, or a namespace package with nowhere to be
        if own is not None and os.path.realpath(origin).startswith(own.rstrip("/") + "/"):
            continue  # the function's own modules
        if len(top) <= _MAX_NAME and _NAME.match(top):
            tops.add(top)
    return sorted(tops)[:MAX_MODULES]


class ImportWatch:
    """In a worker: the third-party packages its first invocations imported, once each
    (what it was forked with is its snapshot's, already reported)."""

    def __init__(self, code_root: str | None, known: Sequence[str]) -> None:
        self.code_root = code_root
        self.known = set(known)
        self.left = LEARN_INVOCATIONS
        self.base = set(sys.modules)

    def after_invocation(self) -> list[str] | None:
        """New packages since the last call (None: nothing new, or done watching)."""
        if self.left <= 0:
            return None
        self.left -= 1
        if len(sys.modules) == len(self.base):
            return None  # the common case: one len() per invocation
        names = [name for name in list(sys.modules) if name not in self.base]
        self.base.update(names)
        new = [m for m in third_party(self.code_root, names) if m not in self.known]
        if not new:
            return None
        self.known.update(new)
        return new
