"""The content-addressed code store: every deployed version's code, frozen.

A version's code tree is copied once into ``<state>/code/<digest>/`` where the digest is a
hash of the owning tenant's name and the tree's paths and bytes: the same code deployed by
two tenants is two copies, because each copy is readable by its own tenant only. A copy is
owned by the daemon's user with the tenant's group (dirs 0750, files 0640): the tenant can
read its code (and the ``.env`` or ``hourai.toml`` in it) but not change it, no other tenant
can read or even list it (the store itself is 0711), and an edit of the original files
never reaches a running version.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from hourai.fsutil import fsync_dir

# Not code: version control, caches and virtualenvs (a function's dependencies belong in
# the daemon's environment or a preload, not in a per-version copy).
SKIP = {
    ".git",
    ".hg",
    ".svn",
    "__pycache__",
    ".venv",
    "venv",
    "node_modules",
    ".mypy_cache",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
    ".tox",
}
MAX_TREE_BYTES = 256 * 1024 * 1024


class CodeStoreError(Exception):
    pass


def tree_files(root: Path) -> list[Path]:
    """Files of a code tree in a stable order, without what SKIP names."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP and not d.endswith(".egg-info"))
        for name in sorted(filenames):
            if name.endswith((".pyc", ".pyo")):
                continue
            path = Path(dirpath, name)
            if path.is_file() and not path.is_symlink():
                out.append(path)
    return out


def digest_tree(root: Path, tenant: str = "") -> str:
    h = hashlib.sha256()
    h.update(len(tenant).to_bytes(4, "big") + tenant.encode())
    total = 0
    for path in tree_files(root):
        data = path.read_bytes()
        total += len(data)
        if total > MAX_TREE_BYTES:
            raise CodeStoreError(
                f"{root} holds more than {MAX_TREE_BYTES >> 20} MiB of files; deploy the "
                "function's own directory, not a larger tree"
            )
        rel = path.relative_to(root).as_posix().encode()
        h.update(len(rel).to_bytes(4, "big") + rel + len(data).to_bytes(8, "big") + data)
    return h.hexdigest()


class CodeStore:
    """``group_of(tenant)``: the gid that may read the tenant's code (None: no uids here,
    the daemon's own user is everyone)."""

    def __init__(self, root: Path, group_of: Callable[[str], int | None] = lambda _t: None) -> None:
        self.root = root
        self.group_of = group_of
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o711)  # tenants pass through to their own copy, list nothing

    def path(self, digest: str) -> Path:
        return self.root / digest

    def put(self, src: Path, tenant: str = "default") -> tuple[str, Path]:
        """Copy `src` into the store for `tenant` (once per content); (digest, stored path)."""
        digest = digest_tree(src, tenant)
        dest = self.path(digest)
        if dest.is_dir():
            self.grant(dest, tenant)
            return digest, dest
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{digest[:12]}."))
        try:
            for path in tree_files(src):
                target = tmp / path.relative_to(src)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
            _set_access(tmp, self.group_of(tenant))
            os.replace(tmp, dest)
            fsync_dir(self.root)
        except FileExistsError:  # pragma: no cover - a concurrent put of the same content
            shutil.rmtree(tmp, ignore_errors=True)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CodeStoreError(f"cannot store code from {src}: {exc}") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return digest, dest

    def grant(self, stored: Path, tenant: str) -> None:
        """Make a stored copy readable by ``tenant``'s group and nobody else's.

        Cheap when nothing changed (one stat): it runs before every snapshot build, so a
        tenant whose uid had to change, or a copy stored before copies were private, is
        put right before its code runs.
        """
        if stored.parent != self.root:
            return  # not a copy of ours (a spec built by hand): never touch the user's files
        gid = self.group_of(tenant)
        st = stored.stat()
        if st.st_gid == (gid if gid is not None else st.st_gid) and st.st_mode & 0o7777 == (
            _DIR_MODE if gid is not None else _PRIVATE_DIR_MODE
        ):
            return
        _set_access(stored, gid)

    def digests(self) -> set[str]:
        return {p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")}

    def remove(self, digest: str) -> None:
        shutil.rmtree(self.path(digest), ignore_errors=True)


_DIR_MODE, _FILE_MODE = 0o750, 0o640
_PRIVATE_DIR_MODE, _PRIVATE_FILE_MODE = 0o700, 0o600


def _set_access(root: Path, gid: int | None) -> None:
    """Owner (the daemon) reads; with ``gid``, that group reads too; nobody writes."""
    dir_mode, file_mode = (
        (_DIR_MODE, _FILE_MODE) if gid is not None else (_PRIVATE_DIR_MODE, _PRIVATE_FILE_MODE)
    )
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            if gid is not None:
                os.chown(path, -1, gid)
            os.chmod(path, file_mode)
        if gid is not None:
            os.chown(dirpath, -1, gid)
        os.chmod(dirpath, dir_mode)
