"""Real wheels built from tiny packages written on the spot (PEP 427: a zip with its
dist-info), so the package tests need no network and no build backend."""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path


def build_wheel(
    out: Path, name: str, version: str, files: dict[str, str], requires: tuple[str, ...] = ()
) -> Path:
    """``files`` maps paths inside the wheel (``pkg/__init__.py``) to their text."""
    out.mkdir(parents=True, exist_ok=True)
    dist = f"{name}-{version}.dist-info"
    entries = dict(files)
    entries[f"{dist}/METADATA"] = (
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        + "".join(f"Requires-Dist: {r}\n" for r in requires)
    )
    entries[f"{dist}/WHEEL"] = (
        "Wheel-Version: 1.0\nGenerator: hourai-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    record = []
    path = out / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as whl:
        for member, text in entries.items():
            data = text.encode()
            whl.writestr(member, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            record.append(f"{member},sha256={digest.decode()},{len(data)}")
        record.append(f"{dist}/RECORD,,")
        whl.writestr(f"{dist}/RECORD", "\n".join(record) + "\n")
    return path


def wheelhouse(out: Path) -> Path:
    """alpha 1.0 (needs beta>=2), beta 1.0 and 2.1, gamma 0.3: a small index of our own."""
    build_wheel(out, "alpha", "1.0", {"alpha/__init__.py": "X = 'alpha 1.0'\n"}, ("beta>=2",))
    build_wheel(out, "beta", "1.0", {"beta/__init__.py": "Y = 'beta 1.0'\n"})
    build_wheel(
        out, "beta", "2.1", {"beta/__init__.py": "Y = 'beta 2.1'\n", "beta/sub.py": "Z = 1\n"}
    )
    build_wheel(out, "gamma", "0.3", {"gamma/__init__.py": "G = 'gamma 0.3'\n"})
    # the name of a package hourai itself has imported in the root zygote
    build_wheel(out, "msgpack", "0.0.1", {"msgpack/__init__.py": "X = 'the tenant msgpack'\n"})
    return out
