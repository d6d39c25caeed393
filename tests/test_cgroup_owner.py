"""Who owns a cgroup subtree: the lock files (no cgroups needed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hourai.cgroup.owner import SubtreeInUse, claim_subtree


def test_a_held_subtree_is_refused_naming_its_owner(tmp_path: Path) -> None:
    locks = tmp_path / "locks"
    # the owner is another process, holding its claim until we close its stdin
    owner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from hourai.cgroup.owner import claim_subtree;"
            f"c = claim_subtree(['/x/a', '/x/b'], '/srv/one', directory=Path({str(locks)!r}));"
            "print('held', flush=True); sys.stdin.read(); c.release()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.stdout is not None and owner.stdout.readline().strip() == "held"
        with pytest.raises(SubtreeInUse, match=rf"pid {owner.pid}, state dir /srv/one"):
            claim_subtree(["/x/b"], "/srv/two", directory=locks)
        assert len(list(locks.iterdir())) == 2  # nothing of ours was left behind
    finally:
        assert owner.stdin is not None
        owner.stdin.close()
        owner.wait(10)
    # released (and unlinked): ours now, and the file says so
    claim = claim_subtree(["/x/b"], "/srv/two", directory=locks)
    (lock,) = list(locks.iterdir())
    assert json.loads(lock.read_text())["state_dir"] == "/srv/two"
    claim.release()
    assert list(locks.iterdir()) == []


def test_a_dead_owner_leaves_nothing_to_wait_for(tmp_path: Path) -> None:
    locks = tmp_path / "locks"
    code = (
        "from pathlib import Path; from hourai.cgroup.owner import claim_subtree;"
        f"claim_subtree(['/x/a'], '/srv/one', directory=Path({str(locks)!r}))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)  # exits holding it
    claim_subtree(["/x/a"], "/srv/two", directory=locks).release()
