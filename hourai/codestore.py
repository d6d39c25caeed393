"""The content-addressed code store: every deployed version's code, frozen and shared.

A version's code tree is copied once into ``<state>/code/<digest>/`` where the digest is a
hash of the tree's paths and bytes. The copy is owned by the daemon's user and read-only to
tenants (files 0644, dirs 0755), so a tenant can read its code but not change it, and an
edit of the original files never reaches a running version.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
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


def digest_tree(root: Path) -> str:
    h = hashlib.sha256()
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
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o755)

    def path(self, digest: str) -> Path:
        return self.root / digest

    def put(self, src: Path) -> tuple[str, Path]:
        """Copy `src` into the store (once per content); returns (digest, stored path)."""
        digest = digest_tree(src)
        dest = self.path(digest)
        if dest.is_dir():
            return digest, dest
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{digest[:12]}."))
        try:
            for path in tree_files(src):
                target = tmp / path.relative_to(src)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
                os.chmod(target, 0o644)
            for dirpath, _dirs, _files in os.walk(tmp):
                os.chmod(dirpath, 0o755)
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

    def digests(self) -> set[str]:
        return {p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")}

    def remove(self, digest: str) -> None:
        shutil.rmtree(self.path(digest), ignore_errors=True)
