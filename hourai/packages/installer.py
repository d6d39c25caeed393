"""The installer: ``uv``, run by the daemon at deploy time.

uv because it resolves and installs in milliseconds from a warm cache, keeps one cache that
every deploy on the host shares (wheels are downloaded once, then linked or copied out of
it), resolves for a given interpreter, and installs into a plain directory (``--target``)
without a virtualenv per function. Its messages say why a requirement cannot be met, in
words a user can act on; they are passed on as they are.

Wheels only (``--only-binary :all:``): building an sdist runs the package's own code, as
the daemon's user, before any sandbox exists.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hourai.packages import PackageError

# A resolution or an install that takes longer is stuck (a dead index); the deploy says so.
TIMEOUT = 600.0
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)\s*$")


class InstallError(PackageError):
    """The requirements cannot be resolved or installed; the message is uv's."""


@dataclass(frozen=True)
class IndexSettings:
    """Where packages come from (the config's ``[packages]``); empty: uv's own defaults
    (its config files and ``UV_*`` variables, else PyPI)."""

    index_url: str | None = None
    extra_index_urls: tuple[str, ...] = ()
    find_links: tuple[str, ...] = ()
    no_index: bool = False
    cache_dir: Path | None = None

    def args(self) -> list[str]:
        out: list[str] = []
        if self.no_index:
            out.append("--no-index")
        elif self.index_url:
            out += ["--index-url", self.index_url]
        if not self.no_index:
            for url in self.extra_index_urls:
                out += ["--extra-index-url", url]
        for link in self.find_links:
            out += ["--find-links", link]
        if self.cache_dir is not None:
            out += ["--cache-dir", str(self.cache_dir)]
        return out


@dataclass(frozen=True, order=True)
class Pin:
    """One resolved distribution: its normalised name and exact version."""

    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.name}=={self.version}"


def normalize(name: str) -> str:
    """PEP 503: the name as indexes compare it."""
    return re.sub(r"[-_.]+", "-", name).lower()


def uv_binary() -> str:
    try:
        from uv import find_uv_bin

        return str(find_uv_bin())
    except (ImportError, FileNotFoundError):
        found = shutil.which("uv")
        if found is None:
            raise InstallError(
                "uv is not installed (pip install uv): functions with requirements cannot be "
                "deployed"
            ) from None
        return found


@dataclass
class Installer:
    settings: IndexSettings = field(default_factory=IndexSettings)
    python: str = sys.executable

    def resolve(self, requirements: list[str]) -> list[Pin]:
        """Every distribution the requirements need, pinned, for this host's interpreter."""
        if not requirements:
            return []
        out = self._uv(
            ["pip", "compile", "-", "--no-header", "--no-annotate"],
            stdin="\n".join(requirements) + "\n",
        )
        pins = []
        for line in out.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            match = _PIN.match(line)
            if match is None:
                raise InstallError(f"uv's resolution has a line hourai cannot read: {line!r}")
            pins.append(Pin(normalize(match.group(1)), match.group(2)))
        return sorted(set(pins))

    def install(self, pins: list[Pin], target: Path) -> None:
        """Install exactly ``pins`` (no dependency of theirs: they are the whole resolution)
        into ``target``, compiled to bytecode (tenants cannot write ``__pycache__`` there)."""
        self._uv(
            [
                "pip",
                "install",
                "--target",
                str(target),
                "--no-deps",
                "--compile-bytecode",
                "--link-mode",
                "copy",
                *map(str, pins),
            ]
        )

    def _uv(self, args: list[str], stdin: str | None = None) -> str:
        cmd = [
            uv_binary(),
            *args,
            "--python",
            self.python,
            "--only-binary",
            ":all:",
            "--color",
            "never",
            "--quiet",
            *self.settings.args(),
        ]
        env = dict(os.environ)
        env.pop("VIRTUAL_ENV", None)  # never the daemon's own environment
        try:
            done = subprocess.run(
                cmd,
                input=stdin,
                capture_output=True,
                text=True,
                timeout=TIMEOUT,
                env=env,
                # uv reads uv.toml / pyproject.toml of its working dir and its parents:
                # only the host's own config (user, system) may choose the index
                cwd="/",
                stdin=None if stdin is not None else subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            raise InstallError(f"uv did not finish within {TIMEOUT:g}s") from None
        except OSError as exc:
            raise InstallError(f"cannot run uv: {exc}") from None
        if done.returncode != 0:
            message = done.stderr.strip() or done.stdout.strip() or f"exit {done.returncode}"
            # uv's words, without its "error: " (the caller says what failed)
            raise InstallError(message.removeprefix("error: "))
        return done.stdout
