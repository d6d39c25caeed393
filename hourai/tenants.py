"""Tenant identities: a uid/gid each from a configured range, and a private temp dir.

Like systemd's DynamicUser, uids come from a range that no account in the passwd database
uses, starting from a hash of the tenant's name; the assignment is written to
``<state>/tenants.json`` so a tenant keeps its uid across restarts (its temp files stay its
own) even if a hash collision moved it. Without root there are no uids to give:
everything runs as the invoking user and :attr:`TenantDirectory.warning` says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
from dataclasses import dataclass
from pathlib import Path

from hourai.fsutil import atomic_write
from hourai.registry import check_name

# systemd's DynamicUser range: reserved for exactly this use on most distributions.
DEFAULT_UID_RANGE = (61184, 65519)


@dataclass(frozen=True)
class Tenant:
    name: str
    uid: int | None  # None: not separated (daemon not root)
    gid: int | None
    tmpdir: Path


class TenantDirectory:
    def __init__(
        self,
        state_dir: Path,
        uid_range: tuple[int, int] = DEFAULT_UID_RANGE,
        *,
        separate: bool | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.uid_range = uid_range
        self.separate = os.geteuid() == 0 if separate is None else separate
        self.tmp_root = state_dir / "tmp"
        self.tmp_root.mkdir(parents=True, exist_ok=True)
        # Tenants may pass through (to reach their own dir) but not list the others.
        os.chmod(self.tmp_root, 0o711)
        self._file = state_dir / "tenants.json"
        self._uids: dict[str, int] = self._load()
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
        tmpdir.mkdir(exist_ok=True)
        if uid is not None:
            os.chown(tmpdir, uid, uid)
        os.chmod(tmpdir, 0o700)
        return Tenant(name, uid, uid, tmpdir)

    def _uid(self, name: str) -> int:
        uid = self._uids.get(name)
        if uid is not None:
            return uid
        taken = set(self._uids.values())
        lo, hi = self.uid_range
        size = hi - lo + 1
        # Start from a hash of the name, so the same tenant gets the same uid even from
        # another state dir (two `hourai run`s), and different tenants rarely meet.
        first = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % size
        for step in range(size):
            candidate = lo + (first + step) % size
            if candidate in taken or _account_exists(candidate):
                continue
            self._uids[name] = candidate
            atomic_write(self._file, json.dumps({"uids": self._uids}, indent=1).encode())
            return candidate
        raise RuntimeError(f"no free uid left in the tenant range {lo}-{hi}; widen uid_range")

    def clear_tmp(self, name: str) -> None:
        shutil.rmtree(self.tmp_root / name, ignore_errors=True)


def _account_exists(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True
