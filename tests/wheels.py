"""The tests' own small index of wheels (built by bench.wheels.build_wheel), so the package
tests need no network."""

from __future__ import annotations

from pathlib import Path

from bench.wheels import build_wheel

__all__ = ["build_wheel", "wheelhouse"]


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
