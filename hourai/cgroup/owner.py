"""Which hourai owns a cgroup subtree: one lock per subtree directory, host-wide.

Two daemons whose subtrees land on the same directories (the same ``cgroup_subtree`` in a
cgroup v1 hierarchy where both sit in the root group, say) would remove each other's tenant
groups and kill each other's processes as "left by an earlier run". So a daemon takes an
``flock`` on a lock file named after each of its subtree directories before it touches
them and holds it for its whole life. The kernel drops the lock when the process dies, so
taking it proves the previous owner is gone: only then are leftovers removed. The file says
who holds it (pid, state dir), for the message the second daemon gives.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from hourai.cgroup import CgroupError

OWNER_DIR = Path("/run/hourai/cgroups")


class SubtreeInUse(CgroupError):
    pass


class SubtreeClaim:
    """Held locks on our subtree directories; :meth:`release` at stop."""

    def __init__(self, held: list[tuple[Path, int]]) -> None:
        self.held = held

    def release(self) -> None:
        # Unlinked while still locked: a daemon that opened the file meanwhile sees, once it
        # has the lock, that the name is gone and starts over (see _lock).
        for path, fd in self.held:
            with contextlib.suppress(OSError):
                path.unlink()
            with contextlib.suppress(OSError):
                os.close(fd)
        self.held = []


def claim_subtree(
    dirs: Sequence[str], state_dir: str, *, directory: Path = OWNER_DIR
) -> SubtreeClaim:
    """Lock every directory of our subtree, or raise SubtreeInUse naming the owner."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    held: list[tuple[Path, int]] = []
    try:
        for path in dirs:
            name = hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:32]
            lock = directory / f"{name}.lock"
            fd = _lock(lock, path)
            doc = {"pid": os.getpid(), "state_dir": state_dir, "dir": path}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(doc).encode(), 0)
            held.append((lock, fd))
    except BaseException:
        SubtreeClaim(held).release()
        raise
    return SubtreeClaim(held)


def _lock(lock: Path, subtree_dir: str) -> int:
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise SubtreeInUse(
                f"the cgroup subtree {subtree_dir} belongs to another running hourai (pid "
                f"{holder.get('pid', '?')}, state dir {holder.get('state_dir', '?')}); give "
                "this daemon a subtree of its own with cgroup_subtree in its config"
            ) from None
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # its owner released and unlinked it as we opened it: again


def _holder(fd: int) -> dict[str, object]:
    try:
        doc = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}
