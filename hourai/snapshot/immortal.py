"""Immortal objects before forking (PEP 683, Python 3.12+): pages that stay shared.

A forked worker shares every page with its zygote until it writes one. CPython writes to an
object whenever it takes or drops a reference to it (the refcount lives in the object's
header), so merely *reading* the snapshot's objects, as every request does, copies their
pages one by one into the worker. PEP 683 made some objects immortal: their refcount is a
sentinel that ``Py_INCREF``/``Py_DECREF`` check and leave alone. Setting that sentinel on
the zygote's own objects just before it forks makes them read-only in practice: a worker
reads them without copying a page (the same trick as Instagram's pre-fork servers, and
Cinder's ``immortalize_heap``).

What it costs: such objects are never freed, which is what a zygote's heap is for anyway
(it lives as long as the zygote); the collector must not walk them either (its bookkeeping
writes into their headers), so :func:`immortalize` is followed by ``gc.freeze()``.

Only on 64-bit CPython 3.12 and 3.13, where the sentinel is the low 32 bits of the refcount
all set (``_Py_IMMORTAL_REFCNT``, checked as a negative ``int32``); elsewhere it does
nothing and says so.
"""

from __future__ import annotations

import ctypes
import gc
import sys
import sysconfig

# 3.12/3.13 on 64-bit: Py_INCREF skips an object whose low refcount word is 0xFFFFFFFF,
# Py_DECREF one whose low word is negative as an int32.
_IMMORTAL = 0xFFFFFFFF
SUPPORTED = (
    sys.implementation.name == "cpython"
    and (3, 12) <= sys.version_info[:2] <= (3, 13)
    and sys.maxsize > 2**32
    and sys.byteorder == "little"
    and not sysconfig.get_config_var("Py_GIL_DISABLED")  # free-threaded builds count apart
)


def immortalize() -> int:
    """Make every object the collector tracks, and what they refer to directly (strings,
    numbers, bytes: untracked), immortal; returns how many were changed (0: unsupported).

    Objects already frozen by an earlier ``gc.freeze()`` (the root zygote's, in a snapshot)
    are not listed by ``gc.get_objects()`` and were done then.
    """
    if not SUPPORTED:
        return 0
    word = ctypes.c_uint32
    done = 0
    objects = gc.get_objects()
    seen: set[int] = {id(objects)}  # our own list would hold everything forever
    for obj in objects:
        for item in (obj, *gc.get_referents(obj)):
            address = id(item)
            if address in seen:
                continue
            seen.add(address)
            refcnt = word.from_address(address)  # the low half of ob_refcnt (little-endian)
            if refcnt.value != _IMMORTAL:
                refcnt.value = _IMMORTAL
                done += 1
    return done
