"""The steps that confine a process before tenant code runs in it.

Each function here is one line of the checklist that the snapshot runs between ``fork()`` and
importing the tenant's code (see :mod:`hourai.snapshot.zygote`); workers inherit the result.
They are plain syscalls with no policy: the daemon decides the values and ships them in the
function's spec.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import resource
import signal
import sys

_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_CHILD_SUBREAPER = 36

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


def set_oom_score_adj(value: int) -> None:
    """Bias the OOM killer (raising needs no privilege, lowering does)."""
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write(str(value))


def child_subreaper() -> None:
    """Orphans of tenant code (a worker's children whose worker died) reparent to us, not to
    init, so we reap them and they stay inside the tree the daemon can kill."""
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def keep_sys_path_reachable(uid: int, gid: int) -> None:
    """Keep the interpreter's library dirs importable after dropping to ``uid``.

    An interpreter installed under a private home (pyenv in /root, mode 0700) cannot be
    reached by a tenant uid: path lookup needs search permission on every ancestor. An
    O_PATH fd opened now, while we are root, names the directory itself; ``/proc/self/fd/N``
    resolves through that fd without walking the ancestors again, and the directories below
    are world-readable like any Python install. Only the library dirs get such an fd, and
    they hold nothing another tenant could not read on a normal install.
    """
    moved: dict[str, str] = {}
    for i, entry in enumerate(sys.path):
        if not entry or not os.path.isdir(entry) or _reachable(entry, uid, gid):
            continue
        try:
            fd = os.open(entry, os.O_PATH | os.O_DIRECTORY)
        except OSError:
            continue
        moved[entry.rstrip("/")] = sys.path[i] = f"/proc/self/fd/{fd}"
    # Packages imported already (encodings, email, ...) find their submodules through their
    # own __path__, not sys.path: point those through the same descriptors.
    for module in list(sys.modules.values()):
        paths = getattr(module, "__path__", None)
        if not isinstance(paths, list):
            continue
        for j, p in enumerate(paths):
            for old, new in moved.items():
                if p == old or p.startswith(old + "/"):
                    paths[j] = new + p[len(old):]
                    break
    sys.path_importer_cache.clear()
    importlib.invalidate_caches()


def _reachable(path: str, uid: int, gid: int) -> bool:
    """Whether ``uid``/``gid`` may search every directory from / down to ``path``."""
    current = os.path.abspath(path)
    while True:
        try:
            st = os.stat(current)
        except OSError:
            return False
        if st.st_uid == uid:
            ok = st.st_mode & 0o100
        elif st.st_gid == gid:
            ok = st.st_mode & 0o010
        else:
            ok = st.st_mode & 0o001
        if not ok:
            return False
        parent = os.path.dirname(current)
        if parent == current:
            return True
        current = parent


def unreachable_ancestor(path: str) -> str | None:
    """The first directory on the way to ``path`` that a stranger may not search, if any."""
    current = os.path.abspath(path)
    chain = []
    while True:
        chain.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    for directory in reversed(chain):
        try:
            if not os.stat(directory).st_mode & 0o001:
                return directory
        except OSError:
            return directory
    return None
