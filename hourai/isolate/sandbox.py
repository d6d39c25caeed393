"""The steps that confine a process before tenant code runs in it.

Each function here is one line of the checklist that the snapshot runs between ``fork()`` and
importing the tenant's code (see :mod:`hourai.snapshot.zygote`); workers inherit the result.
They are plain syscalls with no policy: the daemon decides the values and ships them in the
function's spec.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal

_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38

RLIMITS = {
    "core": resource.RLIMIT_CORE,
    "nofile": resource.RLIMIT_NOFILE,
    "nproc": resource.RLIMIT_NPROC,
    "as": resource.RLIMIT_AS,
    "fsize": resource.RLIMIT_FSIZE,
}


def _prctl(option: int, arg: int) -> None:
    if _libc.prctl(option, arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


def die_with_parent(expected_parent: int) -> None:
    """SIGKILL this process when its parent dies, so nothing outlives the daemon.

    The parent may already be gone by the time the flag is set; then we would never get
    the signal, so check and leave now.
    """
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != expected_parent:
        os._exit(1)


def no_new_privs() -> None:
    """No setuid binary or file capability can raise this process's privileges again."""
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)


def join_cgroup(procs_files: list[str]) -> None:
    """Move this process into the tenant's groups (one ``cgroup.procs`` file per hierarchy).

    Must run before the tenant's code is imported: memory is charged to the group where it
    is first touched, so pages faulted in outside would hide the tenant's memory.
    """
    pid = str(os.getpid())
    for path in procs_files:
        with open(path, "w") as f:
            f.write(pid)


def set_rlimits(limits: dict[str, int]) -> None:
    """Apply soft=hard limits, never raising one above its current hard limit."""
    for name, value in limits.items():
        res = RLIMITS[name]
        _soft, hard = resource.getrlimit(res)
        if hard != resource.RLIM_INFINITY and (value == resource.RLIM_INFINITY or value > hard):
            value = hard
        resource.setrlimit(res, (value, value))


def drop_privileges(uid: int, gid: int) -> None:
    """Become the tenant's uid/gid, with no supplementary groups (gid first: after setuid we
    could no longer change it)."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def reset_signals() -> None:
    """Default dispositions for what a zygote handled itself; no inherited wakeup fd."""
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    # Python ignores SIGPIPE at start-up so writes raise BrokenPipeError; keep that for tenants.
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
