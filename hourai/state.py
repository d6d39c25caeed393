"""The persistent registry: every deployed function, its versions, and which one serves.

One JSON document, ``<state_dir>/registry.json``, replaced atomically on every change
(:func:`hourai.fsutil.atomic_write`), so after a crash it holds the last acknowledged state
and never half of one. The code of each version lives in the code store; a record names it
by digest. A file that cannot be read back is an error that says so, never an empty
registry: silently forgetting deployed functions is the one thing a restart must not do.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from hourai.cgroup import TenantLimits
from hourai.codestore import CodeStore
from hourai.fsutil import atomic_write
from hourai.isolate.loader import Target
from hourai.registry import FunctionSpec
from hourai.scheduler.core import FunctionLimits

SCHEMA = 1


class StateError(Exception):
    """The registry file is unreadable or corrupt; the message says which and what to do."""


def spec_to_record(spec: FunctionSpec) -> dict[str, Any]:
    return {
        "code": Path(spec.target.root).name,
        "module": spec.target.module,
        "attr": spec.target.attr,
        "source": spec.target.source,
        "file": spec.target.file,
        "kind": spec.kind,
        "tenant": spec.tenant,
        "env": spec.env,
        "limits": dataclasses.asdict(spec.limits),
        "resources": dataclasses.asdict(spec.resources) if spec.resources else None,
        "created": time.time(),
    }


def record_to_spec(store: CodeStore, name: str, version: str, rec: dict[str, Any]) -> FunctionSpec:
    target = Target(
        root=str(store.path(rec["code"])),
        module=rec["module"],
        attr=rec["attr"],
        source=rec["source"],
        file=rec.get("file"),
    )
    resources = TenantLimits(**rec["resources"]) if rec.get("resources") else None
    return FunctionSpec(
        name=name,
        target=target,
        version=version,
        kind=rec.get("kind"),
        tenant=rec["tenant"],
        env=dict(rec.get("env") or {}),
        limits=FunctionLimits(**rec["limits"]),
        resources=resources,
    )


class Registry:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "registry.json"
        self.functions: dict[str, dict[str, Any]] = self._load()

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise StateError(f"cannot read {self.path}: {exc.strerror}") from None
        try:
            doc = json.loads(text)
            if doc.get("schema") != SCHEMA or not isinstance(doc.get("functions"), dict):
                raise ValueError(f"schema {doc.get('schema')!r}, expected {SCHEMA}")
            for name, entry in doc["functions"].items():
                if entry["active"] not in entry["versions"]:
                    raise ValueError(f"function {name!r}: active version is not recorded")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StateError(
                f"{self.path} is corrupt ({exc}); no function was loaded. Restore it from a "
                "backup, or move it aside to start with an empty registry"
            ) from None
        return doc["functions"]

    def save(self) -> None:
        data = json.dumps({"schema": SCHEMA, "functions": self.functions}, indent=1)
        atomic_write(self.path, data.encode(), mode=0o600)

    def add_version(self, spec: FunctionSpec) -> None:
        """Record a version (durably) before it is built; it is not active yet."""
        entry = self.functions.setdefault(spec.name, {"active": None, "versions": {}, "order": []})
        entry["versions"][spec.version] = spec_to_record(spec)
        if spec.version in entry["order"]:
            entry["order"].remove(spec.version)
        entry["order"].append(spec.version)
        self.save()

    def activate(self, name: str, version: str) -> None:
        self.functions[name]["active"] = version
        self.save()

    def drop_version(self, name: str, version: str) -> None:
        """Forget a version that was refused (and the function, if it never served)."""
        entry = self.functions.get(name)
        if entry is None:
            return
        entry["versions"].pop(version, None)
        if version in entry["order"]:
            entry["order"].remove(version)
        if entry["active"] is None:
            del self.functions[name]
        self.save()

    def remove(self, name: str) -> None:
        self.functions.pop(name, None)
        self.save()

    def active_spec(self, store: CodeStore, name: str) -> FunctionSpec:
        entry = self.functions[name]
        return record_to_spec(store, name, entry["active"], entry["versions"][entry["active"]])

    def spec(self, store: CodeStore, name: str, version: str) -> FunctionSpec:
        return record_to_spec(store, name, version, self.functions[name]["versions"][version])

    def previous(self, name: str) -> str | None:
        """The version deployed before the active one (for rollback)."""
        entry = self.functions[name]
        order = [v for v in entry["order"] if v != entry["active"]]
        return order[-1] if order else None

    def code_in_use(self) -> set[str]:
        return {rec["code"] for e in self.functions.values() for rec in e["versions"].values()}
