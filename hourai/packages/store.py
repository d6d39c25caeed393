"""The package store: every distribution version installed once on the host, read-only,
shared by every function that resolves to it.

Layout of ``<state>/packages``::

    dists/<name>-<version>-<digest>/   one distribution, as uv installed it (with bytecode)
    index.json                         "<interpreter>/<name>==<version>" -> its directory
    cache/                             uv's cache (unless ``[packages] cache_dir`` says)

A directory's digest is a hash of the interpreter it was compiled for and of its files, so
the same content is stored once and a rebuilt wheel under an old version number never
replaces what running functions import. Directories and files belong to the daemon and are
readable by everyone (they are public code, and tenants import them) but writable by no
tenant; ``dists/`` itself can be crossed but not listed, so a tenant does not learn what
other tenants depend on. A function's import path is the list of its distributions'
directories (see :mod:`hourai.packages.importpath`).

A deploy resolves its requirements (uv, every time: the index may have moved on), installs
only the pins the store lacks, and gets the directory names back *held*: garbage collection
leaves them alone until the caller has recorded them in a version and released them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import sysconfig
import tempfile
import threading
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hourai.fsutil import atomic_write, fsync_dir, sync_tree
from hourai.packages.installer import Installer, InstallError, Pin, normalize
from hourai.packages.requirements import declared

# What an installer writes about the install itself (times, its own name): not content.
_NOT_CONTENT = {"RECORD", "INSTALLER", "REQUESTED", "uv_cache.json", "direct_url.json"}
_DIR_MODE, _FILE_MODE = 0o755, 0o644
_HASH_BLOCK = 1 << 20
_EXACT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([A-Za-z0-9.+!_-]+)\s*$")


def interpreter_tag() -> str:
    """What compiled bytecode and extension modules are bound to."""
    return f"{sys.implementation.cache_tag}-{sysconfig.get_platform()}"


class PackageStore:
    def __init__(self, root: Path, installer: Installer | None = None) -> None:
        self.root = root
        self.dists = root / "dists"
        self.installer = installer or Installer()
        self.tag = interpreter_tag()
        self._lock = threading.Lock()
        self._held: Counter[str] = Counter()
        self.dists.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o711)
        os.chmod(self.dists, 0o711)
        self._index_path = root / "index.json"
        self._index: dict[str, str] = {}
        self._closed: set[str] = set()  # pin sets that resolve to themselves (see provide)
        self._load_index()

    def path(self, name: str) -> Path:
        return self.dists / name

    def names(self) -> set[str]:
        return {e.name for e in os.scandir(self.dists) if not e.name.startswith(".")}

    # ------------------------------------------------------------------ deploy

    def provide_for(self, root: Path) -> list[str] | None:
        """What the function dir ``root`` declares, provided (see :meth:`provide`); None when
        it declares nothing and so runs with the daemon's environment."""
        wanted = declared(root)
        return None if wanted is None else self.provide(wanted)

    def provide(self, requirements: list[str]) -> list[str]:
        """The store directories of everything ``requirements`` resolve to, installing what
        is missing; held until :meth:`release`. Raises InstallError with uv's message.

        Requirements that pin every distribution they need (``pip freeze`` output, a lock
        file) are resolved once: when uv's answer was exactly those pins, the same pins are
        the answer again, and the next deploy of them needs no uv at all.
        """
        exact = exact_pins(requirements)
        closed = exact is not None and self._closed_key(exact) in self._closed
        pins = (
            sorted(exact) if closed and exact is not None else self.installer.resolve(requirements)
        )
        with self._lock:
            found: dict[Pin, str] = {}
            missing = []
            for pin in pins:
                name = self._index.get(self._key(pin))
                if name is not None and self.path(name).is_dir():
                    found[pin] = name
                else:
                    missing.append(pin)
            if missing:
                found.update(self._install(missing))
            names = [found[pin] for pin in pins]
            self._held.update(names)
            if exact is not None and not closed and exact == set(pins):
                self._closed.add(self._closed_key(exact))
                self._save_index()
            return names

    def release(self, names: Iterable[str]) -> None:
        with self._lock:
            for name in names:
                self._held[name] -= 1
                if self._held[name] <= 0:
                    del self._held[name]

    def _install(self, pins: list[Pin]) -> dict[Pin, str]:
        staging = Path(tempfile.mkdtemp(dir=self.root, prefix=".staging-"))
        try:
            self.installer.install(pins, staging)
            out: dict[Pin, str] = {}
            for info in sorted(staging.glob("*.dist-info")):
                pin = _pin_of(info)
                if pin in pins:
                    out[pin] = self._store(staging, info, pin)
            lost = [str(p) for p in pins if p not in out]
            if lost:
                raise InstallError(f"uv installed no distribution for {', '.join(lost)}")
            for pin, name in out.items():
                self._index[self._key(pin)] = name
            self._save_index()
            return out
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _store(self, staging: Path, info: Path, pin: Pin) -> str:
        """Move one distribution's files (by its RECORD) out of ``staging`` into a
        directory of its own, named by its content."""
        files = _files_of(staging, info)
        digest = hashlib.sha256(self.tag.encode())
        meta = info.relative_to(staging)
        for rel in files:
            if "__pycache__" in rel.parts or (rel.parent == meta and rel.name in _NOT_CONTENT):
                continue
            _hash_file(digest, staging / rel, str(rel))
        name = f"{pin.name}-{pin.version}-{digest.hexdigest()[:16]}"
        dest = self.path(name)
        if dest.is_dir():
            return name  # the same content, installed before under another key
        tmp = Path(tempfile.mkdtemp(dir=self.dists, prefix=f".{name}."))
        try:
            for rel in files:
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / rel, target)
            _set_access(tmp)
            sync_tree(tmp)  # named by a version record once the deploy is acknowledged
            os.replace(tmp, dest)
            fsync_dir(self.dists)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return name

    # ------------------------------------------------------------------ garbage

    def collect(self, keep: set[str]) -> list[str]:
        """Remove every distribution neither in ``keep`` nor held, and what an interrupted
        install left; returns the names removed."""
        with self._lock:
            removed = []
            for entry in os.scandir(self.dists):
                if entry.name in keep or entry.name in self._held:
                    continue
                shutil.rmtree(entry.path, ignore_errors=True)
                if not entry.name.startswith("."):
                    removed.append(entry.name)
            for entry in os.scandir(self.root):
                if entry.name.startswith(".staging-"):
                    shutil.rmtree(entry.path, ignore_errors=True)
            if removed:
                gone = set(removed)
                self._index = {k: v for k, v in self._index.items() if v not in gone}
                self._save_index()
            return removed

    # ------------------------------------------------------------------ index

    def _key(self, pin: Pin) -> str:
        return f"{self.tag}/{pin}"

    def _closed_key(self, pins: set[Pin]) -> str:
        text = "\n".join([self.tag, *map(str, sorted(pins))])
        return hashlib.sha256(text.encode()).hexdigest()

    def _load_index(self) -> None:
        # Only a cache of what dists/ holds and of resolutions: a lost or unreadable index
        # costs the next deploys a resolution and an install, nothing else.
        try:
            data = json.loads(self._index_path.read_bytes())
        except (OSError, ValueError):
            return
        if not isinstance(data, dict):
            return
        dists, closed = data.get("dists"), data.get("closed")
        if isinstance(dists, dict):
            self._index = {k: v for k, v in dists.items() if isinstance(v, str)}
        if isinstance(closed, list):
            self._closed = {k for k in closed if isinstance(k, str)}

    def _save_index(self) -> None:
        doc = {"dists": self._index, "closed": sorted(self._closed)}
        atomic_write(self._index_path, json.dumps(doc, indent=1, sort_keys=True).encode(), 0o600)


def exact_pins(requirements: list[str]) -> set[Pin] | None:
    """The pins when every requirement is exactly ``name==version``, else None."""
    out = set()
    for line in requirements:
        match = _EXACT.match(line)
        if match is None:
            return None
        out.add(Pin(normalize(match.group(1)), match.group(2)))
    return out


def _pin_of(info: Path) -> Pin:
    name = version = ""
    with open(info / "METADATA", encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                break
            key, _, value = line.partition(":")
            if key == "Name":
                name = value.strip()
            elif key == "Version":
                version = value.strip()
    return Pin(normalize(name), version)


def _files_of(staging: Path, info: Path) -> list[Path]:
    """The distribution's files below ``staging`` (its RECORD, plus the bytecode uv compiled
    for them); scripts and data outside the import root are left behind."""
    out: set[Path] = set()
    root = staging.resolve()
    with open(info / "RECORD", encoding="utf-8", errors="replace") as f:
        for line in f:
            rel = line.rsplit(",", 2)[0] if line.count(",") >= 2 else line.strip()
            if not rel:
                continue
            full = (staging / rel).resolve()
            if not full.is_relative_to(root) or not full.is_file():
                continue
            relative = full.relative_to(root)
            if relative.parts[0] == "bin":
                continue
            out.add(relative)
            if relative.suffix == ".py":
                compiled = f"{relative.stem}.{sys.implementation.cache_tag}.pyc"
                pyc = relative.parent / "__pycache__" / compiled
                if (staging / pyc).is_file():
                    out.add(pyc)
    return sorted(out)


def _hash_file(digest: Any, path: Path, rel: str) -> None:
    """Add one file to a directory's digest: its path, its size, its bytes. Read in blocks:
    a whole numpy extension read at once is a 30 MiB buffer that glibc keeps in the daemon's
    heap after it is freed (its mmap threshold grows past such sizes)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        digest.update(len(rel).to_bytes(4, "big") + rel.encode() + size.to_bytes(8, "big"))
        while block := f.read(_HASH_BLOCK):
            digest.update(block)


def _set_access(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            os.chmod(os.path.join(dirpath, name), _FILE_MODE)
        os.chmod(dirpath, _DIR_MODE)
