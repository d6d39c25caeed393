"""The zygotes: the root zygote and the per-function snapshots it forks.

Run as ``python -m hourai.snapshot.zygote --channel FD [--preload MOD ...]`` by the daemon.
Both zygotes are single-threaded blocking loops with no event loop: the only kind of
process that is safe to fork. The root zygote imports the hourai runtime and the preloads,
freezes the heap (``gc.freeze``: the objects move out of the collector's reach so collections
in children do not write to, and so un-share, their pages) and then only forks snapshots. A
snapshot joins its tenant's cgroup, drops privileges, imports the function, runs its
module-level code and init once, freezes again, and then only forks workers.

Each zygote reaps its own children (one owner for waitpid per process) and reports their
exits to the daemon.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import os
import random
import select
import signal
import socket
import sys
import time
import traceback
from typing import Any

from hourai.channel import BlockingChannel, ChannelClosed
from hourai.isolate import context as invocation_context
from hourai.isolate import sandbox
from hourai.isolate.adapters import Invoker, StartupError
from hourai.isolate.loader import LoadError, Target, load
from hourai.isolate.tracebacks import show_as, user_paths
from hourai.isolate.worker import prime, serve_worker, serve_worker_concurrent, warm_up
from hourai.packages import importpath
from hourai.snapshot import immortal, learn

# Tenants' processes go before the daemon (0) when the host runs out of memory. Workers
# inherit it: after dropping privileges /proc/self is root's and they cannot change it.
SNAPSHOT_OOM_SCORE_ADJ = 300
# Walks of the request path a sync function's snapshot takes before it forks (Snapshot.run):
# enough for the interpreter to specialise what they run (16 and 64 measured the same).
SNAPSHOT_WALKS = 16


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class _Reaper:
    """SIGCHLD turned into a readable fd, so one poll() waits for commands and child exits."""

    def __init__(self) -> None:
        self.rfd, self.wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wfd, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)

    def drain(self) -> None:
        try:
            while os.read(self.rfd, 512):
                pass
        except BlockingIOError:
            pass

    def reap(self) -> list[tuple[int, int]]:
        """Every child that has ended, as (pid, wait status)."""
        ended = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            ended.append((pid, status))
        return ended

    def close(self) -> None:
        os.close(self.rfd)
        os.close(self.wfd)


def exit_message(pid: int, status: int) -> dict[str, Any]:
    code = os.waitstatus_to_exitcode(status)
    return {
        "t": "exited",
        "pid": pid,
        "code": code if code >= 0 else None,
        "signal": -code if code < 0 else None,
    }


def _serve(channel: BlockingChannel, reaper: _Reaper, on_message: Any, on_exit: Any) -> None:
    """The zygote loop: commands from the daemon, exits of children, until the channel closes.

    ``on_exit(pid, status)`` turns a reaped child into the message the daemon gets, or None.
    """
    poller = select.poll()
    poller.register(channel.fileno(), select.POLLIN)
    poller.register(reaper.rfd, select.POLLIN)
    while True:
        if not channel.has_buffered():
            try:
                poller.poll()
            except InterruptedError:
                continue
        reaper.drain()
        try:
            for pid, status in reaper.reap():
                message = on_exit(pid, status)
                if message is not None:
                    channel.send(message)
            if channel.has_buffered() or _readable(channel):
                msg, fds = channel.recv()
                if on_message(msg, fds) is False:
                    return
        except (ChannelClosed, BrokenPipeError, ConnectionResetError):
            return  # the daemon is gone or done with us


def _readable(channel: BlockingChannel) -> bool:
    return bool(select.select([channel.fileno()], [], [], 0)[0])


# --------------------------------------------------------------------------- root zygote


class RootZygote:
    def __init__(self, channel: BlockingChannel, preloads: list[str], immortal: bool) -> None:
        self.channel = channel
        self.preloads = preloads
        self.immortal = immortal

    def run(self) -> None:
        sandbox.die_with_parent(os.getppid())
        # A snapshot is pid 1 of its own pid namespace, where getppid() says 0: it watches
        # this pidfd of ours instead. The namespace handle lets us come back from unshare().
        self.pidfd = os.pidfd_open(os.getpid())
        self.pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        gc.disable()  # re-enabled in workers; zygotes allocate little and must not dirty pages
        preload(self.preloads)  # (operator's: a missing one is slower, not broken)
        if self.immortal:
            immortal.immortalize()
        gc.freeze()
        self.reaper = _Reaper()
        self.channel.send({"t": "hello", "pid": os.getpid()})
        _serve(self.channel, self.reaper, self.on_message, exit_message)

    def on_message(self, msg: dict[str, Any], fds: list[int]) -> bool:
        if msg["t"] == "spawn":
            self.spawn(msg, fds)
        elif msg["t"] == "stop":
            return False
        else:
            for fd in fds:
                os.close(fd)
        return True

    def spawn(self, msg: dict[str, Any], fds: list[int]) -> None:
        snapshot_fd, output_fd = fds
        sys.stdout.flush()
        sys.stderr.flush()
        if msg["spec"].get("sandbox"):
            pid = sandbox.fork_in_new_pid_namespace(self.pid_ns)
        else:
            pid = os.fork()
        if pid == 0:
            try:
                self._become_snapshot(msg["spec"], snapshot_fd, output_fd)
            finally:
                os._exit(70)
        os.close(snapshot_fd)
        os.close(output_fd)
        self.channel.send({"t": "spawned", "fid": msg["fid"], "pid": pid})

    def _become_snapshot(self, spec: dict[str, Any], snapshot_fd: int, output_fd: int) -> None:
        # The checklist between fork() and tenant code. Keep it short and linear: it is the
        # security boundary.
        # 1. signals: the root zygote's SIGCHLD hook and wakeup fd are not ours
        sandbox.reset_signals()
        # 2. fds: drop the root's channel, reaper and namespace handle; output goes to the
        # daemon's pipe
        self.channel.sock.close()
        self.reaper.close()
        os.close(self.pid_ns)
        _output_to(output_fd)
        channel = BlockingChannel(socket.socket(fileno=snapshot_fd))
        # 3. die with the root zygote (and so with the daemon)
        sandbox.die_with_parent(parent_pidfd=self.pidfd)
        try:
            self._confine(spec)
        except OSError as exc:
            channel.send(
                {
                    "t": "failed",
                    "error": f"cannot confine the function's snapshot: {exc}",
                    "details": traceback.format_exc(),
                }
            )
            return
        # 9. the tenant's code: a function's, or the packages of a zygote of the tenant's
        # own (hourai.snapshot.tree) that its functions' snapshots fork from
        if spec.get("role") == "zygote":
            PackageZygote(channel, spec).run()
        else:
            Snapshot(channel, spec).run()

    def _confine(self, spec: dict[str, Any]) -> None:
        uid, gid = spec.get("uid"), spec.get("gid")
        # 4. the tenant's cgroup, before a single tenant page is touched; under memory
        # pressure the kernel takes workers first, then snapshots, never the daemon
        sandbox.join_cgroup(spec.get("cgroup_procs", []))
        sandbox.set_oom_score_adj(SNAPSHOT_OOM_SCORE_ADJ)
        # 5. a sandbox of our own (we are pid 1 of a new pid namespace): only our processes
        # in /proc, a private tmpfs behind /tmp and /dev/shm. Without one, orphans of tenant
        # code are still ours to reap and kill as subreaper.
        packages = spec.get("packages")
        if spec.get("sandbox"):
            needed = [
                spec.get("cwd") or "",
                *spec.get("keep", ()),
                *sys.path,
                *sandbox.package_dirs(),
                *(packages or ()),
            ]
            sandbox.private_mounts(spec["tmp_size"], uid, gid, keep=needed)
        else:
            sandbox.child_subreaper()
        # ... and a function that declared its dependencies imports those, the standard
        # library and hourai: nothing else of the daemon's environment
        if packages is not None:
            importpath.isolate(packages)
        # 6. limits, then privileges (the library path first: after setuid we could not
        # open it any more)
        sandbox.set_rlimits(spec.get("rlimits", {}))
        if uid is not None:
            sandbox.keep_sys_path_reachable(uid, gid)
            sandbox.drop_privileges(uid, gid)
        # 7. the credential change cleared the death signal: set it again, now for good
        sandbox.die_with_parent(parent_pidfd=self.pidfd)
        os.close(self.pidfd)
        sandbox.no_new_privs()
        # 8. environment: only what the function was given
        os.environ.clear()
        os.environ.update(spec.get("env", {}))
        if spec.get("cwd"):
            os.chdir(spec["cwd"])
        if packages:
            importpath.process_pth(packages)  # may run the packages' code: as the tenant


# --------------------------------------------------------------------------- snapshot


class Snapshot:
    def __init__(self, channel: BlockingChannel, spec: dict[str, Any]) -> None:
        self.channel = channel
        self.spec = spec
        self.invoker: Invoker | None = None
        self.imports: learn.ImportWatch | None = None
        self.children: dict[int, int] = {}  # pid -> wid of our workers

    def run(self) -> None:
        started = time.perf_counter()
        show_as(self.spec.get("cwd"), self.spec.get("source_root"))
        # before the import: a logging handler made at import keeps the stream it saw
        invocation_context.install()
        # What this snapshot imports counts as the function's; what it inherited (hourai's
        # own dependencies, the operator's preloads, its zygote's packages) does not.
        inherited = set(sys.modules)
        # what the function was seen importing lazily, or declared, and its zygote (if it
        # has one) did not import already: its workers find it done
        preload(self.spec.get("preload", ()))
        try:
            target = Target(**self.spec["target"])
            invoker = load(
                target, self.spec.get("kind"), multithread=self.spec.get("concurrency", 1) > 1
            )
            invoker.startup()
            warmup = self.spec.get("warmup") or ()
            if warmup:
                ms = prime(invoker, warmup)
                print(f"hourai: {len(warmup)} warm-up requests served in {ms:.1f} ms", flush=True)
        except (LoadError, StartupError) as exc:
            self.channel.send(
                {"t": "failed", "error": str(exc), "details": user_paths(exc.details)}
            )
            return
        except Exception as exc:
            self.channel.send(
                {
                    "t": "failed",
                    "error": f"{type(exc).__name__}: {exc}",
                    "details": user_paths(traceback.format_exc()),
                }
            )
            return
        self.invoker = invoker
        init_ms = (time.perf_counter() - started) * 1000
        new = [name for name in sys.modules if name not in inherited]
        self.spec["modules"] = modules = learn.third_party(self.spec.get("cwd"), new)
        if not invoker.is_async:  # (an async walk would make a loop every worker replaces)
            # Run hourai's side of an invocation here, through a stand-in of the function
            # (nothing of the tenant's), until the interpreter has specialised its code:
            # each worker then finds that done instead of rewriting it, page by page.
            for _ in range(SNAPSHOT_WALKS):
                if not warm_up(invoker):
                    break
        # Made once here, before the fork, for every worker: what they import beyond this.
        self.imports = learn.ImportWatch(self.spec.get("cwd"), modules)
        _freeze_heap(self.spec.get("immortalize", True))
        self.reaper = _Reaper()
        self.channel.send(
            {
                "t": "ready",
                "kind": invoker.kind,
                "attr": invoker.attr,
                "init_ms": init_ms,
                "pid": os.getpid(),
                "modules": modules,
            }
        )
        _serve(self.channel, self.reaper, self.on_message, self.on_exit)
        # The daemon closed the channel or said stop: our workers go with us.
        for pid in self.children:
            _kill_group(pid)

    def on_exit(self, pid: int, status: int) -> dict[str, Any] | None:
        """A child ended. What a worker started goes with it: its process group at once, and
        whatever escaped the group (setsid and a double fork) reparented to the worker, a
        subreaper, and now to us. Our only rightful children are workers, so every other
        child is such a leftover. Orphans are not the daemon's business; workers are, by wid
        (our pids mean nothing in the daemon's pid namespace)."""
        wid = self.children.pop(pid, None)
        if wid is not None:
            _kill_group(pid)
        self._kill_strays()
        if wid is None:
            return None
        return {**exit_message(pid, status), "wid": wid}

    def _kill_strays(self) -> None:
        _kill_strays(self.children)

    def on_message(self, msg: dict[str, Any], fds: list[int]) -> bool:
        kind = msg["t"]
        if kind == "fork":
            self.fork_worker(msg["wid"], spare=msg.get("spare") is True)
        elif kind == "stop":
            return False
        for fd in fds:
            os.close(fd)
        return True

    def fork_worker(self, wid: int, *, spare: bool = False) -> None:
        daemon_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        out_r, out_w = os.pipe()
        try:
            pid = os.fork()
        except OSError as exc:  # EAGAIN under pids.max, ENOMEM: the worker just isn't there
            for s in (daemon_end, worker_end):
                s.close()
            os.close(out_r)
            os.close(out_w)
            self.channel.send({"t": "fork_failed", "wid": wid, "error": f"fork: {exc.strerror}"})
            return
        if pid == 0:
            code = 0
            try:
                self._become_worker(worker_end, daemon_end, out_r, out_w, spare)
            except BaseException:
                traceback.print_exc()
                code = 70
            finally:
                os._exit(code)
        worker_end.close()
        os.close(out_w)
        self.children[pid] = wid
        # The daemon sees another pid namespace: a pidfd tells it which process this is.
        pidfd = os.pidfd_open(pid)
        self.channel.send(
            {"t": "forked", "wid": wid, "pid": pid}, fds=[daemon_end.fileno(), out_r, pidfd]
        )
        daemon_end.close()
        os.close(out_r)
        os.close(pidfd)

    def _become_worker(
        self,
        worker_end: socket.socket,
        daemon_end: socket.socket,
        out_r: int,
        out_w: int,
        spare: bool,
    ) -> None:
        parent = os.getppid()
        # 0. our own process group, so whatever the function forks dies with us
        os.setpgid(0, 0)
        # 1. signals back to defaults
        sandbox.reset_signals()
        # 2. fds: only our channel and our own output pipe
        daemon_end.close()
        self.channel.sock.close()
        self.reaper.close()
        os.close(out_r)
        _output_to(out_w)
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        # 3. die with the snapshot; keep what the function starts below us, even what
        # escapes our process group, so it can be killed with us (see Snapshot.on_exit)
        sandbox.die_with_parent(parent)
        sandbox.child_subreaper()
        # 4. this process allocates: collect again (the frozen heap stays out of it)
        gc.enable()
        # 5. fresh randomness: Python reseeds `random` at fork; do it explicitly so a
        # worker never repeats a sibling's sequence even if a library replaced the hook.
        random.seed()
        # 6. the function's own per-process setup (e.g. a fresh event loop)
        assert self.invoker is not None
        self.invoker.after_fork()
        concurrency = self.spec.get("concurrency", 1)
        if concurrency > 1:
            serve_worker_concurrent(worker_end, self.invoker, concurrency, self.imports)
        else:
            # A spare serves the function's declared warm-up again, in itself: what the
            # snapshot's did is shared, but its first request would still copy in every
            # page that the path writes to (for Flask: 4.7 -> 2.2 ms, a warm worker's).
            warmup = (self.spec.get("warmup") or ()) if spare else ()
            serve_worker(BlockingChannel(worker_end), self.invoker, self.imports, warmup)


def _output_to(fd: int) -> None:
    """Our stdout and stderr go to ``fd``, the daemon's pipe for this process's output."""
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _freeze_heap(immortalize: bool) -> None:
    """What is imported now is shared by everything forked from us: collect once, then
    freeze it so their collections never touch (and so copy) these pages, and (3.12+) make
    it immortal so their reads do not either."""
    gc.collect()
    if immortalize:
        immortal.immortalize()
    gc.freeze()


def _kill_strays(children: dict[int, Any]) -> None:
    """Kill every child of ours that is not one of ``children`` (an orphan that escaped a
    process below us, reparented to us as subreaper or pid 1)."""
    try:
        with open(f"/proc/self/task/{os.getpid()}/children") as f:
            pids = [int(p) for p in f.read().split()]
    except OSError:
        return
    for pid in pids:
        if pid not in children:
            _kill_group(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def preload(modules: Any) -> tuple[list[str], list[str]]:
    """Import ``modules``; (imported, failed). A failure is said on stderr and skipped: a
    preload makes starts faster, its absence never breaks the function."""
    done, failed = [], []
    for name in modules:
        try:
            importlib.import_module(name)
        except BaseException as exc:  # SystemExit too: module code is the tenant's
            print(f"hourai: preload {name!r} failed: {exc!r}", file=sys.stderr, flush=True)
            failed.append(name)
        else:
            done.append(name)
    return done, failed


# --------------------------------------------------------------------------- package zygote


class PackageZygote:
    """A zygote of one tenant's packages: a node of the zygote tree (hourai.snapshot.tree).

    Forked from the root zygote and confined exactly like a snapshot (the tenant's cgroup,
    uid and sandbox, the declared packages' import path), it imports the packages its
    functions were seen using, freezes them, and then forks the snapshots of those functions
    (or a deeper zygote with more packages), so each snapshot starts with the import done
    and the packages' pages are shared by all of them. Tenant-chosen code runs in it only
    as the tenant, after the drop: the root zygote still imports none.

    Its snapshots are its children in its sandbox: they share its /tmp and pid namespace,
    which are the tenant's anyway (same uid, same cgroup); another tenant's never do.
    """

    def __init__(self, channel: BlockingChannel, spec: dict[str, Any]) -> None:
        self.channel = channel
        self.spec = spec
        self.children: dict[int, str] = {}  # pid -> fid of what we forked

    def run(self) -> None:
        started = time.perf_counter()
        invocation_context.install()  # before the imports, as in a snapshot
        loaded, failed = preload(self.spec.get("preload", ()))
        _freeze_heap(self.spec.get("immortalize", True))
        self.reaper = _Reaper()
        self.channel.send(
            {
                "t": "zygote_ready",
                "pid": os.getpid(),
                "loaded": loaded,
                "failed": failed,
                "init_ms": (time.perf_counter() - started) * 1000,
            }
        )
        _serve(self.channel, self.reaper, self.on_message, self.on_exit)
        for pid in self.children:  # (as pid 1 of the sandbox, our exit takes them anyway)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def on_message(self, msg: dict[str, Any], fds: list[int]) -> bool:
        if msg["t"] == "spawn" and len(fds) == 2:
            self.spawn(msg, fds)
            return True
        for fd in fds:
            os.close(fd)
        return msg["t"] != "stop"

    def spawn(self, msg: dict[str, Any], fds: list[int]) -> None:
        snapshot_fd, output_fd = fds
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as exc:  # pids.max: the daemon hears it as a snapshot that failed
            os.close(output_fd)
            failed = BlockingChannel(socket.socket(fileno=snapshot_fd))
            with contextlib.suppress(OSError):
                failed.send({"t": "failed", "error": f"fork: {exc.strerror}", "details": ""})
            failed.close()
            return
        if pid == 0:
            try:
                self._become_child(msg["spec"], snapshot_fd, output_fd)
            finally:
                os._exit(70)
        os.close(snapshot_fd)
        os.close(output_fd)
        self.children[pid] = msg["fid"]
        pidfd = os.pidfd_open(pid)  # our pids are not the daemon's
        try:
            self.channel.send({"t": "spawned", "fid": msg["fid"], "pid": pid}, fds=[pidfd])
        finally:
            os.close(pidfd)

    def _become_child(self, spec: dict[str, Any], snapshot_fd: int, output_fd: int) -> None:
        # Already confined (cgroup, sandbox, limits, uid, no_new_privs): what is left is
        # what differs between our children.
        sandbox.reset_signals()
        self.channel.sock.close()
        self.reaper.close()
        _output_to(output_fd)
        channel = BlockingChannel(socket.socket(fileno=snapshot_fd))
        sandbox.die_with_parent(os.getppid())  # same uid: the death signal stays set
        sandbox.child_subreaper()  # what escapes our workers stays ours to kill
        os.environ.clear()
        os.environ.update(spec.get("env", {}))
        if spec.get("cwd"):
            os.chdir(spec["cwd"])
        if spec.get("role") == "zygote":
            PackageZygote(channel, spec).run()
        else:
            Snapshot(channel, spec).run()

    def on_exit(self, pid: int, status: int) -> dict[str, Any] | None:
        fid = self.children.pop(pid, None)
        _kill_strays(self.children)
        if fid is None:
            return None
        return {**exit_message(pid, status), "fid": fid}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hourai.snapshot.zygote")
    parser.add_argument("--channel", type=int, required=True)
    parser.add_argument("--preload", action="append", default=[])
    parser.add_argument("--mortal", action="store_true", help="do not immortalize (3.12+)")
    args = parser.parse_args(argv)
    channel = BlockingChannel(socket.socket(fileno=args.channel))
    RootZygote(channel, args.preload, immortal=not args.mortal).run()


if __name__ == "__main__":
    main()
