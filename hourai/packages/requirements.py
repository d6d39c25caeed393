"""What a function dir declares it needs: ``requirements.txt`` and/or ``pyproject.toml``'s
``[project] dependencies``.

Only requirements by name (PEP 508: name, extras, version specifiers, markers) are accepted.
The daemon installs them, as its own user, from the index the host is configured with: a
requirements file must not be able to point it at another index, a URL or a local path (an
option line, ``pkg @ URL``, ``-e``, ``./dir``), or the tenant would choose what the daemon
fetches and reads.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from hourai.packages import PackageError

REQUIREMENTS_TXT = "requirements.txt"
PYPROJECT = "pyproject.toml"
# A name, optional extras, then anything uv checks (specifiers, markers) but no direct
# reference: "name @ url" is refused below.
_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?\s*(\[[^\]]*\])?\s*")
MAX_REQUIREMENTS = 1000


class RequirementsError(PackageError):
    """The declaration cannot be used; the message names the file and line."""


def declared(root: Path) -> list[str] | None:
    """The requirements declared in ``root``; None when it declares nothing (no file).

    An empty ``requirements.txt`` declares "no packages": the function then runs with the
    standard library only, like every function that declares its dependencies.
    """
    found = False
    out: list[str] = []
    txt = root / REQUIREMENTS_TXT
    if txt.is_file():
        found = True
        try:
            text = txt.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise RequirementsError(f"{txt}: {exc}") from None
        for number, line in enumerate(text.splitlines(), 1):
            line = line.split(" #", 1)[0].strip()
            if line.startswith("#"):
                continue
            if line:
                out.append(check(line, f"{txt}:{number}"))
    pyproject = root / PYPROJECT
    if pyproject.is_file():
        try:
            data = tomllib.loads(pyproject.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise RequirementsError(f"{pyproject}: {exc}") from None
        project = data.get("project")
        deps = project.get("dependencies") if isinstance(project, dict) else None
        if deps is not None:
            found = True
            if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
                raise RequirementsError(
                    f"{pyproject}: [project] dependencies must be a list of strings"
                )
            out += [check(d.strip(), f"{pyproject}: [project] dependencies") for d in deps]
    if len(out) > MAX_REQUIREMENTS:
        raise RequirementsError(f"{root}: more than {MAX_REQUIREMENTS} requirements")
    return out if found else None


def check(line: str, where: str) -> str:
    """One requirement by name, or RequirementsError saying what is allowed."""
    if line.startswith("-") or "--" in line or line.endswith("\\"):
        raise RequirementsError(
            f"{where}: {line!r}: options are not allowed in a function's requirements (the "
            "index is the host's; list packages by name, e.g. flask>=3)"
        )
    match = _NAME.match(line)
    rest = line[match.end() :] if match else line
    if match is None or rest.startswith("@") or "://" in line:
        raise RequirementsError(
            f"{where}: {line!r}: only packages by name are allowed (no URLs, paths or direct "
            "references); e.g. flask>=3"
        )
    return line
