"""What a deployed function is: its code, entry point, tenant, environment and limits."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from hourai.isolate.loader import Target
from hourai.scheduler.core import FunctionLimits

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def check_name(name: str, what: str = "function name") -> str:
    """Names appear in URLs (``/<name>/``, ``<name>.<domain>``) and paths: DNS-label rules."""
    if not _NAME.match(name):
        raise ValueError(
            f"bad {what} {name!r}: use 1-63 lower-case letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class FunctionSpec:
    name: str
    target: Target
    version: str
    kind: str | None = None
    tenant: str = "default"
    env: dict[str, str] = field(default_factory=dict)
    limits: FunctionLimits = field(default_factory=FunctionLimits)


def code_version(target: Target) -> str:
    """A short content hash of the function's code tree (its .py files), so an unchanged
    redeploy is recognised and a changed one gets a new version."""
    digest = hashlib.sha256()
    root = Path(target.root)
    for path in sorted(root.rglob("*.py")):
        if any(
            part.startswith(".") or part == "__pycache__" for part in path.relative_to(root).parts
        ):
            continue
        digest.update(str(path.relative_to(root)).encode())
        try:
            digest.update(path.read_bytes())
        except OSError:
            continue
    digest.update(f"{target.module}:{target.attr}".encode())
    return digest.hexdigest()[:12]


def default_env(name: str, tmpdir: str | None = None) -> dict[str, str]:
    """The environment a function starts from: enough to run Python, nothing of the daemon's."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "HOURAI_FUNCTION": name,
        "AWS_LAMBDA_FUNCTION_NAME": name,
    }
    if tmpdir:
        env["TMPDIR"] = env["HOME"] = tmpdir
    return env
