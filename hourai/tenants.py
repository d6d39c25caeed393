"""Tenant identities: a uid/gid each, unique on the whole host, and (without uids) a temp dir.

Like systemd's DynamicUser, uids come from a range that no account in the passwd database
uses, starting from a hash of the tenant's name. Every hourai instance on the host (daemons
with their own state dirs, each `hourai run`) allocates from the same range, so the choice
is coordinated host-wide: a lease file per uid in :data:`LEASE_DIR`, written under one
``flock``. A lease names its holder (pid and start time, state dir, tenant). It is free to
take when its holder is provably gone: the process is not running any more and, for a
daemon, its state dir no longer gives that tenant that uid (a stopped daemon keeps its uids:
its code store is readable by their groups). `hourai run` releases its leases when it stops.

The assignment is also kept in ``<state>/tenants.json`` so a tenant keeps its uid across
restarts; if another instance took it meanwhile, the tenant gets a new one (and the code
store regrants its files). Without root there are no uids to give: everything runs as the
invoking user and :attr:`TenantDirectory.warning` says so.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pwd
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hourai.fsutil import atomic_write
from hourai.registry import check_name

# systemd's DynamicUser range: reserved for exactly this use on most distributions.
DEFAULT_UID_RANGE = (61184, 65519)
# Host-wide: every instance must see the same leases. /run is per boot, like the processes
# whose liveness a lease stands for; a daemon's own tenants.json carries them over a reboot.
LEASE_DIR = Path("/run/hourai/uids")


@dataclass(frozen=True)
class Tenant:
    name: str
    uid: int | None  # None: not separated (daemon not root)
    gid: int | None
    tmpdir: Path  # used only without uids: with them, each snapshot has a private /tmp


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot); None if not running.

    With the pid it names one process for good: a reused pid has a later start time.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: fields follow the last ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    return int(fields[19])


class UidLeases:
    """Host-wide uid leases: ``<dir>/<uid>`` holds the holder's identity as JSON."""

    def __init__(self, state_dir: Path, *, persistent: bool, directory: Path = LEASE_DIR) -> None:
        self.dir = directory
        self.state_dir = str(state_dir.absolute())
        self.persistent = persistent
        self.me = {"pid": os.getpid(), "start": process_start_time(os.getpid())}
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.dir, 0o700)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read(self, uid: int) -> dict[str, Any] | None:
        try:
            doc = json.loads((self.dir / str(uid)).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: treat as held, never steal on a guess
        return doc if isinstance(doc, dict) else {}

    def holder(self, uid: int) -> dict[str, Any] | None:
        """Who else holds ``uid`` (None: free, or ours to take)."""
        lease = self._read(uid)
        if lease is None:
            return None
        ours = lease.get("state_dir") == self.state_dir and lease.get("tenant")
        if ours and (lease.get("pid") == self.me["pid"] or not _running(lease)):
            return None  # ours, from this run or an earlier one of this state dir
        if _running(lease):
            return lease
        if lease.get("persistent") and _still_assigned(lease, uid):
            return lease  # a stopped daemon's: its files are still readable by this uid
        return None

    def take(self, uid: int, tenant: str) -> None:
        doc = {**self.me, "state_dir": self.state_dir, "tenant": tenant}
        doc["persistent"] = self.persistent
        atomic_write(self.dir / str(uid), json.dumps(doc).encode(), mode=0o600)

    def release(self, uids: list[int]) -> None:
        with self.locked():
            for uid in uids:
                lease = self._read(uid)
                if lease and lease.get("pid") == self.me["pid"]:
                    with contextlib.suppress(FileNotFoundError):
                        (self.dir / str(uid)).unlink()


def _running(lease: dict[str, Any]) -> bool:
    pid, start = lease.get("pid"), lease.get("start")
    if not isinstance(pid, int):
        return True  # a lease we cannot read is held
    return start is not None and process_start_time(pid) == start


def _still_assigned(lease: dict[str, Any], uid: int) -> bool:
    try:
        doc = json.loads((Path(str(lease["state_dir"])) / "tenants.json").read_text())
        return int(doc["uids"][lease["tenant"]]) == uid
    except (OSError, ValueError, KeyError, TypeError):
        return False


class TenantDirectory:
    def __init__(
        self,
        state_dir: Path,
        uid_range: tuple[int, int] = DEFAULT_UID_RANGE,
        *,
        separate: bool | None = None,
        persistent: bool = True,
        lease_dir: Path = LEASE_DIR,
    ) -> None:
        self.state_dir = state_dir
        self.uid_range = uid_range
        self.separate = os.geteuid() == 0 if separate is None else separate
        self.tmp_root = state_dir / "tmp"
        self._file = state_dir / "tenants.json"
        self._uids: dict[str, int] = self._load()
        self._checked: set[str] = set()  # tenants whose uid is leased to us in this run
        self.leases = (
            UidLeases(state_dir, persistent=persistent, directory=lease_dir)
            if self.separate
            else None
        )
        self.warning = (
            None
            if self.separate
            else (
                "hourai is not running as root: every tenant runs as this user, so tenants are "
                "not separated from each other (run the daemon as root for per-tenant uids)"
            )
        )

    def _load(self) -> dict[str, int]:
        try:
            data = json.loads(self._file.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise RuntimeError(
                f"{self._file} is unreadable or corrupt ({exc}); restore it "
                "from a backup or remove it to reassign tenant uids"
            ) from None
        return {str(k): int(v) for k, v in data.get("uids", {}).items()}

    def get(self, name: str) -> Tenant:
        check_name(name, "tenant name")
        uid = self._uid(name) if self.separate else None
        tmpdir = self.tmp_root / name
        if uid is None:
            # Without uids there is no sandbox: the tenant's temp dir is on disk.
            self.tmp_root.mkdir(parents=True, exist_ok=True)
            os.chmod(self.tmp_root, 0o711)
            tmpdir.mkdir(exist_ok=True)
            os.chmod(tmpdir, 0o700)
        return Tenant(name, uid, uid, tmpdir)

    def _uid(self, name: str) -> int:
        uid = self._uids.get(name)
        if uid is not None and name in self._checked:
            return uid
        assert self.leases is not None
        with self.leases.locked():
            if uid is not None and self.leases.holder(uid) is None:
                self.leases.take(uid, name)
            else:
                uid = self._allocate(name)
            self._checked.add(name)
        return uid

    def _allocate(self, name: str) -> int:
        assert self.leases is not None
        taken = {u for t, u in self._uids.items() if t != name}
        lo, hi = self.uid_range
        size = hi - lo + 1
        # Start from a hash of the name so a tenant usually gets the same uid again; the
        # leases make sure no other instance on the host holds it.
        first = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % size
        for step in range(size):
            candidate = lo + (first + step) % size
            if candidate in taken or _account_exists(candidate):
                continue
            if self.leases.holder(candidate) is not None:
                continue
            self.leases.take(candidate, name)
            self._uids[name] = candidate
            atomic_write(self._file, json.dumps({"uids": self._uids}, indent=1).encode())
            return candidate
        raise RuntimeError(
            f"no free uid left in the tenant range {lo}-{hi} (leases in {self.leases.dir}); "
            "widen uid_range"
        )

    def release(self) -> None:
        """Give this instance's uids back (a `hourai run` that stops: nothing of it stays)."""
        if self.leases is not None:
            self.leases.release([self._uids[t] for t in self._checked if t in self._uids])
            self._checked.clear()

    def clear_tmp(self, name: str) -> None:
        shutil.rmtree(self.tmp_root / name, ignore_errors=True)


def _account_exists(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True
