"""The steps that confine a process before tenant code runs in it.

Each function here is one line of the checklist that the snapshot runs between ``fork()`` and
importing the tenant's code (see :mod:`hourai.snapshot.zygote`); workers inherit the result.
They are plain syscalls with no policy: the daemon decides the values and ships them in the
function's spec.
"""

from __future__ import annotations

import _signal
import ctypes
import importlib
import os
import resource
import select
import signal
import sys
from collections.abc import Sequence

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_CHILD_SUBREAPER = 36
CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT = 0x1, 0x2, 0x4, 0x8, 0x20
_MS_BIND, _MS_REC, _MS_SLAVE = 0x1000, 0x4000, 0x80000
# Directories every user may write to on a stock host: inside a sandbox each is a directory
# of the function's own tmpfs, so nothing written there is seen by anyone else.
SHARED_WRITABLE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")

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


def die_with_parent(expected_parent: int | None = None, parent_pidfd: int | None = None) -> None:
    """SIGKILL this process when its parent dies, so nothing outlives the daemon.

    The parent may already be gone by the time the flag is set; then we would never get
    the signal, so check and leave now: by its pid, or (as pid 1 of a new pid namespace,
    where getppid() is 0) by a pidfd of the parent, readable once it has exited. The kernel
    clears the flag on every change of credentials: call this again after dropping them.
    """
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if parent_pidfd is not None:
        if select.select([parent_pidfd], [], [], 0)[0]:
            os._exit(1)
    elif expected_parent is not None and os.getppid() != expected_parent:
        os._exit(1)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def fork_in_new_pid_namespace(own_pid_ns: int) -> int:
    """fork() with the child as pid 1 of a new pid namespace; returns like os.fork().

    unshare(CLONE_NEWPID) only decides where the *next* child goes; setns() back to our own
    namespace afterwards, so the call can be repeated (a second unshare would be refused).
    As pid 1 the child is the namespace's init: when it dies the kernel kills every process
    left in the namespace, which is what makes "nothing outlives its snapshot" a guarantee
    rather than a best effort.
    """
    _check(_libc.unshare(CLONE_NEWPID), "unshare(CLONE_NEWPID)")
    try:
        return os.fork()
    finally:
        if os.getpid() != 1:  # the parent (the child has no way back, and needs none)
            _check(_libc.setns(own_pid_ns, CLONE_NEWPID), "setns(pid)")


def private_mounts(
    tmp_size: int, uid: int | None, gid: int | None, keep: Sequence[str] = ()
) -> None:
    """A mount namespace of our own: a fresh /proc and one size-limited tmpfs behind the
    shared writable dirs.

    Runs as root in pid 1 of a new pid namespace, before the tenant's code. The new /proc
    lists only this namespace's processes (the snapshot, its workers and what they start).
    One tmpfs (charged to the memory cgroup of whoever writes to it: the tenant's) holds a
    directory per entry of SHARED_WRITABLE_DIRS, bound over it; the tmpfs root itself is
    covered, so /tmp, /var/tmp and /dev/shm share one ``tmp_size``. It goes when the last
    process of the namespace exits. A new IPC namespace gives SysV IPC and POSIX message
    queues of our own.

    ``keep``: directories the snapshot still needs (its code, the interpreter's library
    dirs) that would vanish under the new /tmp (a state dir made with mkdtemp, a checkout
    in /tmp): each is bound back, read-only, at its own path inside the private tmpfs.
    """
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWIPC), "unshare(CLONE_NEWNS|CLONE_NEWIPC)")
    # Our mounts must not propagate back to the host (shared is the default under systemd).
    _mount(None, "/", None, _MS_REC | _MS_SLAVE)
    # A link (/var/tmp -> /tmp on some hosts) is covered by what it points to.
    covered = [d for d in SHARED_WRITABLE_DIRS if os.path.isdir(d) and not os.path.islink(d)]
    held = [(path, os.open(path, os.O_PATH | os.O_DIRECTORY)) for path in _hidden(keep, covered)]
    _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    owner = f",uid={uid},gid={gid}" if uid is not None else ""
    _mount(
        "tmpfs", "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={tmp_size},mode=0700{owner}"
    )
    # /tmp itself last: the others are bound from paths inside the tmpfs mounted there.
    for target in sorted(covered, key="/tmp".__eq__):
        inside = "/tmp/" + target.strip("/").replace("/", "-")
        os.mkdir(inside)
        os.chmod(inside, 0o1777)  # as on a host; only the tenant's uid exists in here
        _mount(inside, target, None, _MS_BIND)
    for path, fd in held:
        os.makedirs(path, exist_ok=True)  # root's, 0755: the tenant cannot move them
        _mount(f"/proc/self/fd/{fd}", path, None, _MS_BIND | _MS_REC)
        _mount(None, path, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY)
        os.close(fd)


def _hidden(paths: Sequence[str], covered: Sequence[str]) -> list[str]:
    """The outermost of ``paths`` that lie strictly inside one of ``covered``."""
    inside = sorted(
        {
            real
            for real in (os.path.realpath(p) for p in paths if p and os.path.isdir(p))
            if any(real.startswith(c.rstrip("/") + "/") for c in covered)
        }
    )
    out: list[str] = []
    for path in inside:
        if not any(path.startswith(kept + "/") for kept in out):
            out.append(path)
    return out


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    def enc(text: str | None) -> bytes | None:
        return None if text is None else os.fsencode(text)

    _check(
        _libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data) if data else None),
        f"mount {target}",
    )


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


# As plain ints, for the C module: the `signal` module's wrappers turn every argument and
# result into an Enum, Python code whose objects a fresh fork copies in on first touch.
_TO_DEFAULT = tuple(int(s) for s in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP))
_SIGPIPE, _SIG_DFL, _SIG_IGN = int(signal.SIGPIPE), int(signal.SIG_DFL), int(signal.SIG_IGN)
_SIG_SETMASK = int(signal.SIG_SETMASK)


def reset_signals() -> None:
    """Default dispositions for what a zygote handled itself; no inherited wakeup fd.

    On every worker's start path (one fork each): called through ``_signal`` with ints it
    takes about 0.3 ms less there than through ``signal`` (see _TO_DEFAULT)."""
    _signal.set_wakeup_fd(-1)
    for sig in _TO_DEFAULT:
        _signal.signal(sig, _SIG_DFL)
    # Python ignores SIGPIPE at start-up so writes raise BrokenPipeError; keep that for tenants.
    _signal.signal(_SIGPIPE, _SIG_IGN)
    _signal.pthread_sigmask(_SIG_SETMASK, ())


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


def package_dirs() -> list[str]:
    """Where the packages imported so far live (an editable install is not on sys.path)."""
    out: set[str] = set()
    for module in list(sys.modules.values()):
        paths = getattr(module, "__path__", None)
        if paths is not None:
            out.update(p for p in list(paths) if isinstance(p, str))
    return sorted(out)
