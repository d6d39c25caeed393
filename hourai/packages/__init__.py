"""Functions' own dependencies: what a function declares, the installer that resolves and
installs it, the host-wide content-addressed store of installed distributions, and the
import path a snapshot builds from them.

- :mod:`.requirements`: what a function dir declares (``requirements.txt``, ``pyproject.toml``)
- :mod:`.installer`: ``uv``, run by the daemon at deploy time
- :mod:`.store`: ``<state>/packages``: one read-only directory per distribution version
- :mod:`.importpath`: in the snapshot, ``sys.path`` without the daemon's environment
"""


class PackageError(Exception):
    """A function's dependencies cannot be provided; the message says why (uv's own words
    for a requirement that cannot be resolved or installed)."""
