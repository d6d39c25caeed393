"""The persistent registry: every deployed function, its versions, and which one serves.

One small JSON file per function, ``<state>/functions/<name>.json``, replaced atomically
(:func:`hourai.fsutil.atomic_write`: temp file, fsync, rename, fsync of the directory) on
every change. One file per function keeps a deploy's write small whatever the number of
functions, and confines damage: a corrupt file costs that function, not the registry.

A file that cannot be read back is reported with its path and the reason (see
:class:`StateError`) and left exactly as it is; it is never skipped silently, never
rewritten, and the function it held is listed as ``corrupt`` until an operator restores it
or removes the function.

Each version record holds what its snapshot is built from (the code by its digest in the
code store, the entry point, kind, tenant and environment) and the options the deploy gave;
the limits a function runs with are the daemon's ``[defaults]`` overlaid with those
options, computed when it is (re)deployed, so a changed default reaches every function that
did not set its own.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hourai.fsutil import atomic_write, fsync_dir
from hourai.isolate.loader import Target
from hourai.registry import check_name

log = logging.getLogger("hourai.state")

SCHEMA = 1
KIND = "hourai.function"

# A version's status: "pending" is written before its snapshot is built, so a crash during
# the build leaves a trace; "ok" once it has served; "refused" if the build failed;
# "interrupted" is what a "pending" found at start becomes.
STATUSES = ("pending", "ok", "refused", "interrupted")


class StateError(Exception):
    """A state file is unreadable or corrupt; the message names the file and what to do."""


@dataclass
class VersionRecord:
    version: str
    code: str  # digest of the code tree in the code store
    module: str
    attr: str | None
    source: str
    file: str | None
    kind: str | None  # as declared (None: detected when built)
    tenant: str
    env: dict[str, str]
    options: dict[str, Any]  # the function options this deploy gave (not the defaults)
    deployed_at: float
    status: str = "pending"
    error: str | None = None
    detected: dict[str, Any] | None = None  # {"kind", "attr", "init_ms"} from the build
    activated_at: float | None = None
    source_root: str | None = None  # the deployed directory, for tracebacks
    # the package store's directories it imports (None: the daemon's environment)
    packages: list[str] | None = None

    def target(self, code_root: Path) -> Target:
        return Target(
            root=str(code_root / self.code),
            module=self.module,
            attr=self.attr,
            source=self.source,
            file=self.file,
        )


@dataclass
class FunctionRecord:
    name: str
    created_at: float = field(default_factory=time.time)
    active: str | None = None
    versions: list[VersionRecord] = field(default_factory=list)  # oldest first

    def version(self, version: str) -> VersionRecord | None:
        for v in self.versions:
            if v.version == version:
                return v
        return None

    @property
    def active_version(self) -> VersionRecord | None:
        return self.version(self.active) if self.active else None

    def put(self, record: VersionRecord) -> VersionRecord:
        """Add a version, or replace the record of the same version (moved to the end)."""
        self.versions = [v for v in self.versions if v.version != record.version]
        self.versions.append(record)
        return record

    def previous(self) -> VersionRecord | None:
        """The version that served before the active one (what a bare rollback returns to)."""
        served = [
            v
            for v in self.versions
            if v.version != self.active and v.status == "ok" and v.activated_at is not None
        ]
        return max(served, key=lambda v: v.activated_at or 0.0, default=None)

    def prune(self, keep: int) -> list[VersionRecord]:
        """Drop the oldest versions beyond ``keep`` (never the active one); returns them."""
        dropped = []
        while len(self.versions) > keep:
            victim = next((v for v in self.versions if v.version != self.active), None)
            if victim is None:
                break
            self.versions.remove(victim)
            dropped.append(victim)
        return dropped


def to_json(record: FunctionRecord) -> bytes:
    doc = {
        "schema": SCHEMA,
        "kind": KIND,
        "name": record.name,
        "created_at": record.created_at,
        "active": record.active,
        "versions": [asdict(v) for v in record.versions],
    }
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def from_json(data: bytes, path: Path) -> FunctionRecord:
    """Parse and check one state file; StateError says precisely what is wrong."""

    def bad(why: str) -> StateError:
        return StateError(
            f"state file {path} is corrupt: {why}. The function it holds is not served; "
            f"restore the file from a backup, or remove the function (hourai rm {path.stem})"
        )

    if not data.strip():
        raise bad("it is empty (a crash while it was first written, or the disk lost it)")
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        raise bad("not a hourai function record")
    schema = doc.get("schema")
    if not isinstance(schema, int):
        raise bad("no schema version")
    if schema > SCHEMA:
        raise StateError(
            f"state file {path} has schema {schema}, newer than this hourai understands "
            f"({SCHEMA}): it was written by a newer version; upgrade hourai"
        )
    name = doc.get("name")
    if name != path.stem:
        raise bad(f"it names function {name!r}, but its file name says {path.stem!r}")
    try:
        check_name(name)
        versions = [_version(v) for v in _list(doc.get("versions"), "versions")]
        active = doc.get("active")
        if active is not None and not any(v.version == active for v in versions):
            raise ValueError(f"active version {active!r} is not among its versions")
        created = doc.get("created_at")
        if not isinstance(created, int | float):
            raise ValueError("created_at is not a number")
    except (TypeError, ValueError, KeyError) as exc:
        raise bad(str(exc)) from None
    return FunctionRecord(name=name, created_at=float(created), active=active, versions=versions)


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"{what} is not a list")
    return value


def _version(doc: Any) -> VersionRecord:
    if not isinstance(doc, dict):
        raise ValueError("a version is not an object")
    known = set(VersionRecord.__dataclass_fields__)
    missing = {"version", "code", "module", "source", "tenant"} - set(doc)
    if missing:
        raise ValueError(f"a version lacks {', '.join(sorted(missing))}")
    record = VersionRecord(**{k: v for k, v in doc.items() if k in known})
    for key in ("version", "code", "module", "source", "tenant"):
        if not isinstance(getattr(record, key), str) or not getattr(record, key):
            raise ValueError(f"version field {key} is not a string")
    if record.status not in STATUSES:
        raise ValueError(f"version {record.version}: unknown status {record.status!r}")
    if not isinstance(record.env, dict) or not isinstance(record.options, dict):
        raise ValueError(f"version {record.version}: env and options must be objects")
    if "/" in record.code or record.code.startswith("."):
        raise ValueError(f"version {record.version}: bad code digest {record.code!r}")
    if record.packages is not None and not (
        isinstance(record.packages, list)
        and all(isinstance(p, str) and p and "/" not in p and p[0] != "." for p in record.packages)
    ):
        raise ValueError(f"version {record.version}: bad packages {record.packages!r}")
    return record


class StateStore:
    """The ``functions/`` directory: load everything at start, write one record at a time.

    Writes are synchronous (an fsync or two); the daemon runs them in a thread and holds a
    per-function lock, so one file never has two writers.
    """

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "functions"
        self.root.mkdir(parents=True, exist_ok=True)
        # Records hold the functions' environments, which may carry secrets.
        os.chmod(self.root, 0o700)

    def path(self, name: str) -> Path:
        return self.root / f"{name}.json"

    def load(self) -> tuple[dict[str, FunctionRecord], dict[str, StateError]]:
        """Every record, and every file that could not be read (by function name).

        Leftover temp files of a write that a crash interrupted are removed: the rename
        never happened, so the record they belonged to is still the previous one, whole.
        """
        records: dict[str, FunctionRecord] = {}
        problems: dict[str, StateError] = {}
        for entry in sorted(os.scandir(self.root), key=lambda e: e.name):
            if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                log.warning("removing %s, left by a write that did not finish", entry.path)
                os.unlink(entry.path)
                continue
            if not entry.name.endswith(".json"):
                continue
            path = Path(entry.path)
            try:
                record = from_json(path.read_bytes(), path)
            except OSError as exc:
                problems[path.stem] = StateError(f"cannot read state file {path}: {exc}")
                continue
            except StateError as exc:
                problems[path.stem] = exc
                continue
            for v in record.versions:
                if v.status == "pending":
                    v.status = "interrupted"
                    v.error = "the daemon stopped while this version was being deployed"
            records[record.name] = record
        return records, problems

    def write(self, record: FunctionRecord) -> None:
        """Durably replace the function's record (returns once it is on disk)."""
        atomic_write(self.path(record.name), to_json(record), mode=0o600)

    def remove(self, name: str) -> None:
        try:
            os.unlink(self.path(name))
        except FileNotFoundError:
            return
        fsync_dir(self.root)

    def set_aside(self, name: str) -> Path | None:
        """Move a corrupt record out of the way (kept for inspection); returns where to."""
        path = self.path(name)
        if not path.exists():
            return None
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        os.replace(path, aside)
        fsync_dir(self.root)
        return aside
