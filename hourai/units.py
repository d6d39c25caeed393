"""Sizes and CPU amounts as people write them in configs and on the command line.

Sizes use binary units only: ``K``, ``M``, ``G``, ``T`` are powers of 1024, whatever the case
and whether or not ``iB``/``B`` follows (``128M`` == ``128MiB`` == ``128mb``). Memory limits
are page-granular binary quantities, and a config that said ``1G`` but meant 10**9 bytes
would be 7% off without anyone noticing; one meaning for every spelling avoids that.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_UNIT_NAMES = [("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)]

_SIZE_RE = re.compile(
    r"""^\s*
    (?P<num>\d+(?:\.\d*)?|\.\d+)
    \s*
    (?:(?P<unit>[kmgt])(?:i?b)?|b)?
    \s*$""",
    re.IGNORECASE | re.VERBOSE,
)
_SIZE_FORMS = (
    "a non-negative number of bytes with an optional binary unit K, M, G or T "
    "(powers of 1024, case-insensitive, optionally followed by iB or B), "
    "e.g. 1048576, 512k, 128M, 1.5G, 2GiB"
)

_CPUS_RE = re.compile(r"^\s*(?P<num>\d+(?:\.\d*)?|\.\d+)\s*(?P<milli>m)?\s*$")
_CPUS_FORMS = "a positive number of cores, e.g. 0.5, 2, or millicores such as 500m"


def parse_size(value: str | int) -> int:
    """Bytes in ``value``: ``"128M"``, ``"1.5G"``, ``"512k"``, ``"2GiB"``, ``"1048576"`` or an int.

    Fractions of a unit are allowed and rounded down to whole bytes (``"1.5K"`` is 1536).
    Raises ValueError naming the bad value and the accepted forms.
    """
    if isinstance(value, bool):
        raise ValueError(f"invalid size {value!r}: expected {_SIZE_FORMS}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"invalid size {value!r}: negative; expected {_SIZE_FORMS}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"invalid size {value!r}: expected {_SIZE_FORMS}")
    m = _SIZE_RE.match(value)
    if m is None:
        raise ValueError(f"invalid size {value!r}: expected {_SIZE_FORMS}")
    unit = (m.group("unit") or "").lower()
    # Fraction, not float: "1.1T" as a float is off by a few bytes, and limits written back
    # to cgroup files should be exactly what the user typed.
    return math.floor(Fraction(m.group("num")) * _UNITS[unit])


def format_size(n: int, *, exact: bool = True) -> str:
    """``n`` bytes for people: ``"128 MiB"``, ``"1.5 GiB"``, ``"1000 B"``.

    With ``exact`` (the default) the text parses back to ``n`` with :func:`parse_size`: the
    largest unit that shows the value with at most two decimals and no rounding, else bytes.
    With ``exact=False`` the value is rounded to one decimal in the largest unit that keeps
    it at least 1, which reads better for measurements (``"117.7 MiB"``).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"invalid byte count {n!r}: expected a non-negative integer")
    for name, size in _UNIT_NAMES:
        if n < size:
            continue
        if exact:
            hundredths = n * 100
            if hundredths % size == 0:
                return f"{_trim(hundredths // size)} {name}"
        else:
            return f"{n / size:.1f} {name}"
    return f"{n} B"


def _trim(hundredths: int) -> str:
    whole, frac = divmod(hundredths, 100)
    if frac == 0:
        return str(whole)
    return f"{whole}.{frac:02d}".rstrip("0")


def parse_cpus(value: str | float | int) -> float:
    """Cores in ``value``: ``"0.5"``, ``"2"``, ``"500m"`` (millicores) or a number; must be > 0.

    Raises ValueError naming the bad value and the accepted forms.
    """
    if isinstance(value, bool):
        raise ValueError(f"invalid CPU amount {value!r}: expected {_CPUS_FORMS}")
    if isinstance(value, int | float):
        cpus = float(value)
    elif isinstance(value, str):
        m = _CPUS_RE.match(value)
        if m is None:
            raise ValueError(f"invalid CPU amount {value!r}: expected {_CPUS_FORMS}")
        cpus = float(m.group("num"))
        if m.group("milli"):
            cpus /= 1000
    else:
        raise ValueError(f"invalid CPU amount {value!r}: expected {_CPUS_FORMS}")
    if not math.isfinite(cpus) or cpus <= 0:
        raise ValueError(f"invalid CPU amount {value!r}: not above 0; expected {_CPUS_FORMS}")
    return cpus
