"""What a deployed function is: its code, entry point, tenant, environment and limits."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from hourai.cgroup import TenantLimits
from hourai.codestore import CodeStore
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
    # The tenant's cgroup limits this deploy declares (memory, cpu, pids); they count
    # with its other functions' (see Runtime.effective_tenant_limits).
    resources: TenantLimits | None = None
    # Where the code was deployed from: tracebacks name these files, not the code store's.
    source_root: str | None = None
    # The package store's directories of the distributions the function declared (see
    # hourai.packages); None: it declared none and imports from the daemon's environment.
    packages: tuple[str, ...] | None = None
    # Modules its snapshot imports before its code (``preload`` in its hourai.toml): the
    # imports its handler would do lazily, done once for every worker.
    preload: tuple[str, ...] = ()
    # Requests its snapshot serves before it forks (``warmup``): the lazy work of a
    # framework's first request, done once for every worker (see isolate.worker.prime).
    warmup: tuple[str, ...] = ()


def build_spec(
    store: CodeStore,
    name: str,
    target: Target,
    *,
    kind: str | None = None,
    tenant: str = "default",
    env: dict[str, str] | None = None,
    limits: FunctionLimits | None = None,
    resources: TenantLimits | None = None,
    packages: list[str] | None = None,
    preload: tuple[str, ...] = (),
    warmup: tuple[str, ...] = (),
) -> FunctionSpec:
    """Freeze the function's code into the store and name the version.

    The version is a hash of everything a snapshot is built from (code, entry point, kind,
    environment, tenant, resolved packages), so an unchanged redeploy is recognised and any
    change that needs a new snapshot gets a new version. Limits are not part of it: they
    change in place.
    """
    check_name(name)
    check_name(tenant, "tenant name")
    digest, stored = store.put(Path(target.root), tenant)
    stored_target = dataclasses.replace(target, root=str(stored))
    env = dict(env or {})
    fields: list[object] = [digest, target.module, target.attr, kind, sorted(env.items()), tenant]
    if packages is not None:
        fields.append(packages)
    if preload:
        fields.append(["preload", *preload])
    if warmup:
        fields.append(["warmup", *warmup])
    identity = json.dumps(fields, separators=(",", ":"))
    version = hashlib.sha256(identity.encode()).hexdigest()[:12]
    return FunctionSpec(
        name=name,
        target=stored_target,
        version=version,
        kind=kind,
        tenant=tenant,
        env=env,
        limits=limits or FunctionLimits(),
        resources=resources,
        source_root=target.root,
        packages=tuple(packages) if packages is not None else None,
        preload=tuple(preload),
        warmup=tuple(warmup),
    )


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
