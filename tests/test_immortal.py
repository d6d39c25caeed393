"""Immortal objects (PEP 683) in the zygotes: what hourai.snapshot.immortal promises."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from hourai.snapshot import immortal

needs_312 = pytest.mark.skipif(
    not immortal.SUPPORTED, reason=f"immortal objects need CPython 3.12/3.13, this is {sys.version}"
)


def _run(code: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout


def test_older_pythons_are_left_alone() -> None:
    if immortal.SUPPORTED:
        pytest.skip("this interpreter supports immortal objects")
    assert immortal.immortalize() == 0


@needs_312
def test_objects_become_immortal_and_references_no_longer_write_them() -> None:
    out = _run(
        """
        import gc, sys
        from hourai.snapshot import immortal
        table = {f"key{i}": [i, str(i)] for i in range(2000)}
        changed = immortal.immortalize()
        gc.freeze()
        value = table["key7"]
        before = sys.getrefcount(value)
        refs = [value] * 100  # a hundred new references...
        after = sys.getrefcount(value)
        del refs
        print(changed > 4000, before == after, before > 2**31)
        """
    )
    assert out.split() == ["True", "True", "True"]


@needs_312
def test_a_forked_child_reading_the_heap_copies_fewer_pages() -> None:
    """The point of it: a child that reads every object of a large heap un-shares its pages
    when refcounts are written, and does not when the objects are immortal."""
    code = """
        import gc, os, sys
        from hourai.snapshot import immortal
        heap = [[str(i), i, (i,)] for i in range(200_000)]
        if sys.argv[1] == "immortal":
            immortal.immortalize()
        gc.freeze()
        def private_kib():
            with open("/proc/self/smaps_rollup") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            return sum(int(fields[k].split()[0]) for k in ("Private_Dirty", "Private_Clean"))
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            base = private_kib()
            for item in heap:  # read, take and drop references
                x = item[0]; y = item[2]
            os.write(w, str(private_kib() - base).encode()); os._exit(0)
        os.waitpid(pid, 0)
        print(os.read(r, 64).decode())
    """
    def private_growth(mode: str) -> int:
        run = [sys.executable, "-c", textwrap.dedent(code), mode]
        return int(subprocess.run(run, capture_output=True, text=True, check=True).stdout)

    mortal, immortal_kib = private_growth("mortal"), private_growth("immortal")
    assert immortal_kib < mortal / 4, (immortal_kib, mortal)
