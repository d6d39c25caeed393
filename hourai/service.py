"""`hourai daemon`: the long-running service, composed from its parts.

Start, in order: lock the state dir → load the registry (a corrupt record is reported, never
dropped) → the runtime (zygote, scheduler, cgroups, policy; cgroups a crashed run left are
removed) → the control socket (so ``hourai ls`` works while the rest starts) → restore
every function's active version, a few at a time → wait until functions with ``min_warm``
have their warm workers → HTTP listeners → ``READY=1``.

Stop (SIGTERM or SIGINT): stop accepting, let in-flight requests finish for up to
``drain_timeout`` (a second signal cuts it short), then stop every worker, snapshot and
zygote. SIGHUP re-reads the config and applies what can change live.

Every deploy, rollback and removal of one function holds that function's lock, so two of
them never interleave; a deploy is answered only once its record is on disk.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import signal
import time
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

from hourai import lambda_api
from hourai.cgroup import CgroupError
from hourai.codestore import CodeStoreError
from hourai.config import (
    Config,
    ConfigError,
    Limits,
    effective_limits,
    load_config,
    parse_function_options,
    restart_only_changes,
)
from hourai.control import ApiError, ControlAPI, ControlServer, SocketInUse
from hourai.daemon import (
    DeployError,
    Router,
    Runtime,
    RuntimeSettings,
    accept_event,
    event_invoker,
    http_handler,
)
from hourai.debug import DebugError
from hourai.fsutil import sync_tree
from hourai.ingress import HttpProtocol, Request, serve
from hourai.invocations.manager import Invocations
from hourai.invocations.queue import QueueError
from hourai.isolate.loader import Target, TargetError, as_factory, resolve_target
from hourai.logs import FunctionLogs, setup_daemon_logging
from hourai.metrics import CONTENT_TYPE, Metrics
from hourai.packages import PackageError
from hourai.packages.installer import IndexSettings
from hourai.registry import FunctionSpec, build_spec, check_name
from hourai.scheduler.policy import PolicyParams
from hourai.sdnotify import Notifier
from hourai.state import FunctionRecord, StateError, StateStore, VersionRecord
from hourai.tracing import parse_traceparent

log = logging.getLogger("hourai")

FUNCTION_TOML = "hourai.toml"
WARM_CHECK_INTERVAL = 2.0  # how often functions with min_warm are checked for a snapshot
RESTORE_REPORT_INTERVAL = 5.0
INVOKE_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")


class StartError(Exception):
    """The daemon cannot start; the message says why and what to do."""


class Daemon:
    """The service. ``run()`` returns the exit status."""

    def __init__(self, config: Config, overrides: dict[str, Any] | None = None) -> None:
        self.config = config
        # Command-line flags: they win over the file on every reload too.
        self.overrides = overrides or {}
        self.phase = "starting"  # starting -> ready -> stopping
        self.started = time.monotonic()
        self.notifier = Notifier()
        self.records: dict[str, FunctionRecord] = {}
        self.broken: dict[str, StateError] = {}
        self.restore_errors: dict[str, str] = {}
        self.min_warm: dict[str, int] = {}
        self.restoring = 0
        self._locks: dict[str, asyncio.Lock] = {}
        self._store_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._lock_fd: int | None = None
        self._runtime_started = False
        self._reload_pending = False
        # Code digests stored by deploys still in flight: not yet in any record, but not
        # garbage either.
        self._pinned: Counter[str] = Counter()
        self.servers: list[asyncio.base_events.Server] = []
        self.connections: set[HttpProtocol] = set()
        self.metrics_server: asyncio.base_events.Server | None = None
        self.lambda_server: asyncio.base_events.Server | None = None
        self.control: ControlServer | None = None
        self.invocations: Invocations | None = None  # type: ignore[assignment]

    # ------------------------------------------------------------------ life cycle

    async def run(self) -> int:
        start = asyncio.ensure_future(self._start())
        stop = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({start, stop}, return_when=asyncio.FIRST_COMPLETED)
        if not start.done():
            # Stopped while restoring: whatever is half built goes with the rest.
            log.info("stopping before the start finished")
            start.cancel()
            with contextlib.suppress(asyncio.CancelledError, StartError):
                await start
            self.phase = "stopping"
            self.notifier.stopping("stopped while starting")
            await self._teardown()
            return 0
        try:
            start.result()
        except Exception as exc:
            stop.cancel()
            if isinstance(exc, StartError):
                log.error("cannot start: %s", exc)
            else:
                log.exception("cannot start")
            self.notifier.status(f"failed to start: {exc}")
            await self._teardown()
            return 1
        await stop
        await self._shutdown()
        return 0

    async def _start(self) -> None:
        config = self.config
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(
            signal.SIGHUP, lambda: self._spawn(self._reload_quietly(), "reload")
        )
        self.notifier.status("starting")
        self._lock_state_dir()
        try:
            self.state = StateStore(config.state_dir)
            self.records, self.broken = self.state.load()
        except OSError as exc:
            raise StartError(f"cannot read the registry in {config.state_dir}: {exc}") from None
        for name, problem in self.broken.items():
            log.error("function %s cannot be restored: %s", name, problem)
        try:
            self.runtime = Runtime(
                RuntimeSettings(
                    state_dir=config.state_dir,
                    preloads=list(config.preload),
                    max_host_workers=config.max_host_workers,
                    cgroup_backend=config.cgroup_backend,
                    cgroup_subtree=config.cgroup_subtree,
                    uid_range=config.uid_range,
                    show_errors=config.show_errors,
                    tenant_defaults=config.tenant_defaults,
                    tenant_config={t: dict(v) for t, v in config.tenants.items()},
                    policy=PolicyParams(memory_budget_bytes=config.memory_budget)
                    if config.adaptive
                    else None,
                    packages=_index_settings(config),
                    tracing=config.tracing,
                    zygote_tree=config.zygote_tree,
                )
            )
        except (RuntimeError, CgroupError, OSError) as exc:
            raise StartError(str(exc)) from None
        self.metrics = Metrics(self.runtime, ready=lambda: self.phase == "ready")
        self.function_logs = FunctionLogs(
            config.state_dir / "logs", config.log.function_max_size, config.log.function_files
        )
        self.runtime.observers += [self.metrics, self.function_logs]
        self.router = Router(self.runtime.functions, domain=config.domain)
        self.api = ControlAPI(self)
        self.control = ControlServer(self.api.handle, config.socket_path)
        try:
            await self.control.start(config.socket_group)
        except (SocketInUse, OSError) as exc:
            self.control = None
            raise StartError(f"control socket {config.socket_path}: {exc}") from None
        log.info("control API at %s", config.socket_path)
        self._runtime_started = True
        try:
            await self.runtime.start()
        except (RuntimeError, CgroupError) as exc:
            raise StartError(str(exc)) from None
        await self._collect_garbage()
        self.invocations = Invocations(
            config.state_dir,
            event_invoker(self.runtime),
            retention=config.async_retention,
            dead_retention=config.dead_letter_retention,
        )
        try:
            await self.invocations.open()
        except (QueueError, OSError) as exc:
            raise StartError(str(exc)) from None
        self.metrics.collectors.append(self.invocations.collect)

        deadline = loop.time() + config.ready_timeout
        restore = loop.create_task(self._restore())
        self._own(restore, "restore")
        await asyncio.wait({restore}, timeout=config.ready_timeout)
        if not restore.done():
            log.warning(
                "still restoring %d functions after ready_timeout (%gs); reporting ready, the "
                "rest follow",
                self.restoring,
                config.ready_timeout,
            )
        elif not await self._wait_warm(deadline):
            log.warning("functions with min_warm were not all warm after ready_timeout")

        await self._listen()
        self.phase = "ready"
        self._spawn(self._keep_warm(), "min_warm keeper")
        interval = self.notifier.watchdog_interval
        if interval:
            self._spawn(self._watchdog(interval), "watchdog")
        for server in self.servers:
            log.info("serving %d functions at %s", len(self.records), _url(server))
        log.info(
            "ready in %.2fs: %d functions restored%s",
            time.monotonic() - self.started,
            len(self.records) - len(self.restore_errors) - self._without_active(),
            f", {len(self.restore_errors) + len(self.broken)} could not be"
            if self.restore_errors or self.broken
            else "",
        )
        self.notifier.ready(self._status())
        if self._reload_pending:
            self._spawn(self._reload_quietly(), "reload")

    def _on_stop_signal(self, sig: int) -> None:
        if self._stop.is_set():
            log.warning("%s again: not waiting for in-flight requests", signal.Signals(sig).name)
            self._force.set()
        self._stop.set()

    async def _shutdown(self) -> None:
        self.phase = "stopping"
        runtime = self.runtime
        inflight = len(runtime.pending)
        self.notifier.stopping(f"draining {inflight} requests")
        for server in self.servers:
            server.close()
        for conn in list(self.connections):
            conn.shutdown()
        # Said once it is true: whoever reads this line and connects is refused.
        log.info(
            "stopping: no new connections; %d requests in flight get up to %gs",
            inflight,
            self.config.drain_timeout,
        )
        if self.invocations is not None:
            self.invocations.pause()  # queued events wait for the next start
        drain = asyncio.ensure_future(runtime.drain(self.config.drain_timeout))
        force = asyncio.ensure_future(self._force.wait())
        await asyncio.wait({drain, force}, return_when=asyncio.FIRST_COMPLETED)
        force.cancel()
        if not drain.done():
            drain.cancel()
        if runtime.pending:
            log.warning("%d requests still in flight are cut off", len(runtime.pending))
        else:
            # Answered is not yet written: give the connections a moment to send and close.
            deadline = asyncio.get_running_loop().time() + 2.0
            while self.connections and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.01)
        await self._teardown()
        log.info("stopped")

    async def _teardown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for server in self.servers:
            server.close()
        for extra in (self.metrics_server, self.lambda_server):
            if extra is not None:
                extra.close()
        if self.invocations is not None:
            await self.invocations.stop()
        if self._runtime_started:
            # Every worker, snapshot and zygote; and our cgroups.
            await self.runtime.stop()
        if self.control is not None:
            await self.control.close()
        logs = getattr(self, "function_logs", None)
        if logs is not None:
            logs.close()
        self.notifier.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _lock_state_dir(self) -> None:
        """One daemon per state dir: a second one would fight the first over every file."""
        state_dir = self.config.state_dir
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(state_dir / "daemon.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StartError(f"cannot use state dir {state_dir}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StartError(
                f"another hourai daemon (pid {holder}) uses the state dir {state_dir}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    async def _listen(self) -> None:
        handler = http_handler(self.runtime, self.router, self.invocations.accept)
        for address in self.config.listen:
            try:
                server = await serve(
                    handler, address.host, address.port, connections=self.connections
                )
            except OSError as exc:
                raise StartError(f"cannot listen on {address}: {exc.strerror}") from None
            self.servers.append(server)
        if self.config.lambda_listen is not None:
            address = self.config.lambda_listen
            invoke_api = lambda_api.handler(
                self._lambda_lookup, self.runtime.invoke_event, self._enqueue_lambda
            )
            try:
                self.lambda_server = await serve(invoke_api, address.host, address.port)
            except OSError as exc:
                raise StartError(
                    f"cannot listen on {address} (Lambda API): {exc.strerror}"
                ) from None
            log.info("Lambda Invoke API at %s", _url(self.lambda_server).rstrip("/"))
        if self.config.metrics_listen is not None:
            address = self.config.metrics_listen
            try:
                self.metrics_server = await serve(self.api.public, address.host, address.port)
            except OSError as exc:
                raise StartError(f"cannot listen on {address} (metrics): {exc.strerror}") from None
            log.info("metrics at %s/metrics", _url(self.metrics_server).rstrip("/"))

    def _lambda_lookup(self, name: str) -> tuple[FunctionSpec | None, bool]:
        spec = self.runtime.functions.get(name) if self.phase == "ready" else None
        return spec, name in self.records

    def _spawn(self, coro: Any, what: str) -> None:
        self._own(asyncio.get_running_loop().create_task(coro), what)

    def _own(self, task: asyncio.Task[Any], what: str) -> None:
        """Every task is kept, cancelled at stop, and its failure logged."""
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("%s failed", what, exc_info=t.exception())

        task.add_done_callback(done)

    async def _watchdog(self, interval: float) -> None:
        # On the event loop on purpose: if the loop stalls, the pings stop and systemd
        # restarts a daemon that no longer serves.
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    def _status(self) -> str:
        problems = len(self.broken) + len(self.restore_errors)
        tenants = len({s.tenant for s in self.runtime.functions.values()})
        text = f"serving {len(self.runtime.functions)} functions of {tenants} tenants"
        return text + (f"; {problems} could not be restored" if problems else "")

    def _without_active(self) -> int:
        return sum(1 for r in self.records.values() if r.active is None)

    # ------------------------------------------------------------------ restore and warmth

    async def _restore(self) -> None:
        """Rebuild every function's active version, a few snapshots at a time (each build
        forks and imports; hundreds at once would only queue in the kernel)."""
        todo = [(n, r) for n, r in sorted(self.records.items()) if r.active is not None]
        if not todo:
            return
        self.restoring = len(todo)
        self._spawn(self._restore_progress(len(todo)), "restore progress")
        gate = asyncio.Semaphore(max(2, (os.cpu_count() or 1) * 2))

        async def one(name: str, record: FunctionRecord) -> None:
            async with gate, self._lock(name):
                entry = record.active_version
                assert entry is not None
                try:
                    spec = self._spec(name, entry)
                    if not Path(spec.target.root).is_dir():
                        raise DeployError(
                            f"the code of version {entry.version} is missing from the code "
                            f"store ({spec.target.root}); deploy the function again"
                        )
                    self._check_packages(spec)
                    await self._runtime_deploy(spec)
                    self._serve_events(name)
                except (DeployError, ConfigError, CgroupError, ValueError) as exc:
                    self.restore_errors[name] = str(exc)
                    log.error("could not restore %s version %s: %s", name, entry.version, exc)
                    self.function_logs.event(name, f"not restored after a restart: {exc}")
                finally:
                    self.restoring -= 1

        await asyncio.gather(*(one(n, r) for n, r in todo))
        log.info("restored %d functions", len(todo) - len(self.restore_errors))

    async def _restore_progress(self, total: int) -> None:
        """STATUS= while restoring, and more time from systemd as long as it progresses
        (its default start timeout, 90 s, is shorter than restoring thousands takes)."""
        while self.phase == "starting":
            self.notifier.send(
                f"STATUS=restoring functions: {total - self.restoring} of {total} done",
                f"EXTEND_TIMEOUT_USEC={int(RESTORE_REPORT_INTERVAL * 3 * 1e6)}",
            )
            await asyncio.sleep(RESTORE_REPORT_INTERVAL)

    def _warm_enough(self, name: str) -> bool:
        try:
            st = self.runtime.scheduler.stats(name)
        except KeyError:
            return True  # removed meanwhile
        if st["state"] == "failed":
            return True  # nothing will warm it; its refusal is reported elsewhere
        w = st["workers"]
        return (
            st["snapshot"] == "ready" and w["spare"] + w["idle"] + w["busy"] >= self.min_warm[name]
        )

    async def _wait_warm(self, deadline: float) -> bool:
        loop = asyncio.get_running_loop()
        want = [n for n, k in self.min_warm.items() if k > 0 and n not in self.restore_errors]
        if want:
            self.notifier.status(f"warming {len(want)} functions")
        while True:
            want = [n for n in want if n in self.min_warm and not self._warm_enough(n)]
            if not want:
                return True
            if loop.time() >= deadline:
                log.warning("not warm in time: %s", ", ".join(want[:20]))
                return False
            await asyncio.sleep(0.01)

    async def _keep_warm(self) -> None:
        """min_warm is carried out as spares, which live while the snapshot does; when the
        policy or a crash took the snapshot, build it again rather than wait for a request."""
        while True:
            await asyncio.sleep(WARM_CHECK_INTERVAL)
            for name, count in list(self.min_warm.items()):
                if count <= 0:
                    continue
                try:
                    st = self.runtime.scheduler.stats(name)
                except KeyError:
                    continue
                if st["snapshot"] == "absent":
                    log.info("%s: rebuilding its snapshot to keep %d workers warm", name, count)
                    self.runtime.prewarm(name)

    # ------------------------------------------------------------------ building specs

    def _lock(self, name: str) -> asyncio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock

    def _limits(self, options: dict[str, Any]) -> Limits:
        return effective_limits(self.config.defaults, options)

    def _spec(self, name: str, entry: VersionRecord) -> FunctionSpec:
        limits = self._limits(entry.options)
        self.min_warm[name] = limits.min_warm
        return FunctionSpec(
            name=name,
            target=entry.target(self.runtime.codestore.root),
            version=entry.version,
            kind=entry.kind,
            tenant=entry.tenant,
            env=dict(entry.env),
            limits=limits.function,
            resources=limits.tenant,
            source_root=entry.source_root,
            packages=tuple(entry.packages) if entry.packages is not None else None,
            preload=tuple(entry.options.get("preload", ())),
            warmup=tuple(entry.options.get("warmup", ())),
        )

    def _check_packages(self, spec: FunctionSpec) -> None:
        store = self.runtime.packages
        missing = [p for p in spec.packages or () if not store.path(p).is_dir()]
        if missing:
            raise DeployError(
                f"version {spec.version}'s packages are missing from the package store "
                f"({', '.join(missing)}); deploy the function again"
            )

    async def _runtime_deploy(self, spec: FunctionSpec) -> dict[str, Any]:
        """runtime.deploy with a deadline, and with a rebuild of the version's snapshot when
        the scheduler had released it (Runtime.deploy of an unchanged version only updates
        the limits and would wait for a build nobody asked for)."""
        task = asyncio.ensure_future(self.runtime.deploy(spec))
        # Outlived by its caller only when the daemon stops mid-build: its end is moot then.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        await asyncio.sleep(0)  # let deploy() register the version with the scheduler
        if not task.done():
            self.runtime.prewarm(spec.name)
        timeout = self.config.deploy_timeout
        try:
            return await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            pass
        # A build stuck in the function's module-level code: kill its snapshot, which fails
        # the build the ordinary way (the previous version, if any, keeps serving).
        version = self.runtime.versions.get((spec.name, spec.version))
        if version is not None and version.handle is not None:
            version.handle.kill()
        try:
            await asyncio.wait_for(task, 10.0)
        except (DeployError, TimeoutError):
            pass
        raise DeployError(
            f"the snapshot was not ready within deploy_timeout ({timeout:g}s): the function's "
            "module-level code did not finish"
        )

    # ------------------------------------------------------------------ operations

    def _require(self, *phases: str) -> None:
        if self.phase not in phases:
            what = {
                "starting": "starting (restoring functions); try again in a moment",
                "stopping": "stopping",
            }.get(self.phase, self.phase)
            raise ApiError(503, f"hourai is {what}")

    def _check_name(self, name: str) -> None:
        try:
            check_name(name)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None

    def _record(self, name: str) -> FunctionRecord:
        self._check_name(name)
        if name in self.broken:
            raise ApiError(409, str(self.broken[name]))
        record = self.records.get(name)
        if record is None:
            raise ApiError(404, f"no function named {name!r}")
        return record

    async def _write(self, record: FunctionRecord) -> None:
        try:
            await asyncio.to_thread(self.state.write, record)
        except OSError as exc:
            raise ApiError(
                507, f"cannot write the state of {record.name}: {exc.strerror}"
            ) from None

    async def deploy(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        self._check_name(name)
        self._require("ready")
        if name in self.broken:
            raise ApiError(
                409,
                f"{self.broken[name]} (`hourai rm {name}` sets the file aside so the name "
                "can be deployed again)",
            )
        path, cwd, given = _deploy_body(body)
        async with self._lock(name):
            t0 = time.perf_counter()
            try:
                target, options = await asyncio.to_thread(prepare_deploy, path, cwd, given)
                limits = self._limits(options)
            except (ConfigError, TargetError) as exc:
                self.metrics.deployed("invalid")
                raise ApiError(400, str(exc)) from None
            tenant = options.get("tenant", self.config.default_tenant)
            t_packages = time.perf_counter()
            try:
                packages = await asyncio.to_thread(
                    self.runtime.packages.provide_for, Path(target.root)
                )
            except PackageError as exc:
                self.metrics.deployed("refused")
                record = self.records.get(name)
                if record is not None:
                    self.function_logs.event(name, f"deploy refused: requirements: {exc}")
                raise ApiError(
                    422,
                    f"{name}: the function's requirements cannot be installed: {exc}",
                    serving=record.active if record else None,
                ) from None
            packages_ms = (time.perf_counter() - t_packages) * 1e3
            try:
                result = await self._deploy_stored(
                    name, target, options, limits, tenant, packages, t0
                )
                if packages is not None:
                    result["packages_ms"] = round(packages_ms, 1)
                return result
            finally:
                self.runtime.packages.release(packages or ())

    async def _deploy_stored(
        self,
        name: str,
        target: Target,
        options: dict[str, Any],
        limits: Limits,
        tenant: str,
        packages: list[str] | None,
        t0: float,
    ) -> dict[str, Any]:
        """Freeze the code, record the version, build it (see _deploy_spec)."""
        try:
            async with self._store_lock:
                spec = await asyncio.to_thread(
                    _freeze,
                    self.runtime.codestore,
                    name,
                    target,
                    kind=options.get("kind"),
                    tenant=tenant,
                    env=options.get("env", {}),
                    limits=limits,
                    packages=packages,
                    preload=tuple(options.get("preload", ())),
                    warmup=tuple(options.get("warmup", ())),
                )
                code = Path(spec.target.root).name
                self._pinned[code] += 1
        except (CodeStoreError, ValueError, OSError) as exc:
            self.metrics.deployed("invalid")
            raise ApiError(400, f"cannot store the code of {name}: {exc}") from None
        try:
            return await self._deploy_spec(name, spec, options, limits, t0)
        finally:
            self._pinned[code] -= 1
            if self._pinned[code] <= 0:
                del self._pinned[code]

    async def _deploy_spec(
        self,
        name: str,
        spec: FunctionSpec,
        options: dict[str, Any],
        limits: Limits,
        t0: float,
    ) -> dict[str, Any]:
        record = self.records.get(name) or FunctionRecord(name)
        previous = record.active
        own = {k: v for k, v in options.items() if k not in ("entry", "kind", "tenant", "env")}
        unchanged = previous == spec.version
        if unchanged:
            entry = record.active_version
            assert entry is not None
            if entry.options != own:
                entry.options = own
                await self._write(record)
        else:
            entry = VersionRecord(
                version=spec.version,
                code=Path(spec.target.root).name,
                module=spec.target.module,
                attr=spec.target.attr,
                source=spec.target.source,
                file=spec.target.file,
                kind=spec.kind,
                tenant=spec.tenant,
                env=dict(spec.env),
                options=own,
                deployed_at=time.time(),
                source_root=spec.source_root,
                packages=list(spec.packages) if spec.packages is not None else None,
            )
            record.put(entry)
            self.records[name] = record
            await self._write(record)  # durable before it is built: a crash leaves a trace
            self.function_logs.event(
                name, f"deploying version {spec.version} from {spec.target.source}"
            )
        had = name in self.runtime.functions
        self.min_warm[name] = limits.min_warm
        try:
            info = await self._runtime_deploy(spec)
        except DeployError as exc:
            if not had:
                self.runtime.remove(name)  # it never served: nothing of it stays running
            if unchanged:
                entry.error = str(exc)
            else:
                entry.status, entry.error = "refused", str(exc)
            if previous is None:
                self.min_warm.pop(name, None)
            else:
                prev_entry = record.version(previous)
                if prev_entry is not None:
                    self.min_warm[name] = self._limits(prev_entry.options).min_warm
            await self._write(record)
            details = exc.details.rstrip()
            self.function_logs.event(
                name,
                f"version {spec.version} refused: {exc}" + (f"\n{details}" if details else ""),
            )
            self.metrics.deployed("refused")
            raise ApiError(
                422,
                f"{name}: version {spec.version} refused: {exc}",
                version=spec.version,
                details=exc.details,
                serving=previous,
            ) from None
        entry.status, entry.error = "ok", None
        entry.detected = {k: info.get(k) for k in ("kind", "attr", "init_ms")}
        if not unchanged:
            entry.activated_at = time.time()
            record.active = spec.version
        dropped = record.prune(self.config.keep_versions)
        await self._write(record)
        self.restore_errors.pop(name, None)
        self._serve_events(name)
        if dropped:
            await self._collect_garbage()
        self.metrics.deployed(
            "unchanged" if unchanged else "ok", None if unchanged else time.perf_counter() - t0
        )
        if not unchanged:
            self.function_logs.event(
                name,
                f"version {spec.version} serving: {info.get('kind')} {info.get('attr')!r}, "
                f"snapshot built in {info.get('init_ms', 0):.0f} ms",
            )
        self.notifier.status(self._status())
        return {
            "name": name,
            "version": spec.version,
            "previous": previous,
            "unchanged": unchanged,
            "kind": info.get("kind"),
            "attr": info.get("attr"),
            "init_ms": info.get("init_ms"),
            "tenant": spec.tenant,
            "source": spec.target.source,
            "module": spec.target.module,
            "limits": dataclasses.asdict(spec.limits),
            "tenant_limits": spec.resources.describe() if spec.resources else None,
            "min_warm": limits.min_warm,
            "packages": list(spec.packages) if spec.packages is not None else None,
        }

    async def remove(self, name: str) -> dict[str, Any]:
        self._check_name(name)
        self._require("ready")
        async with self._lock(name):
            if name in self.broken:
                aside = await asyncio.to_thread(self.state.set_aside, name)
                problem = self.broken.pop(name)
                log.warning("%s: corrupt record set aside at %s (%s)", name, aside, problem)
                return {"removed": name, "set_aside": str(aside) if aside else None}
            record = self._record(name)
            try:
                await asyncio.to_thread(self.state.remove, name)
            except OSError as exc:
                raise ApiError(507, f"cannot remove the state of {name}: {exc.strerror}") from None
            del self.records[name]
            self.runtime.remove(name)
            await self.invocations.forget(name)
            self.min_warm.pop(name, None)
            self.restore_errors.pop(name, None)
            self.metrics.forget(name)
            self.function_logs.remove(name)
        await self._collect_garbage()
        self.notifier.status(self._status())
        return {"removed": name, "versions": len(record.versions)}

    async def debug(self, name: str, port: int) -> dict[str, Any]:
        """A debug session on a fresh worker of the function (hourai.debug)."""
        self._require("ready")
        self._record(name)
        try:
            return await self.runtime.debugger.open(name, port)
        except DebugError as exc:
            raise ApiError(409, str(exc)) from None

    async def debug_stop(self, name: str) -> dict[str, Any]:
        self._record(name)
        if not self.runtime.debugger.close(name, "hourai debug --stop"):
            raise ApiError(409, f"{name} has no debug session")
        return {"function": name, "stopped": True}

    async def rollback(self, name: str, version: str | None) -> dict[str, Any]:
        self._require("ready")
        self._record(name)
        async with self._lock(name):
            record = self._record(name)
            if version is None:
                entry = record.previous()
                if entry is None:
                    raise ApiError(409, f"{name} has no earlier version that served")
            else:
                entry = record.version(version)
                if entry is None:
                    known = ", ".join(v.version for v in reversed(record.versions))
                    raise ApiError(404, f"{name} has no version {version!r} (it has: {known})")
                if entry.status == "refused":
                    raise ApiError(
                        409, f"{name} version {version} was refused when deployed: {entry.error}"
                    )
            if entry.version == record.active and name in self.runtime.functions:
                return {"name": name, "version": entry.version, "unchanged": True}
            try:
                spec = self._spec(name, entry)
            except ConfigError as exc:
                raise ApiError(409, f"{name} version {entry.version}: {exc}") from None
            if not Path(spec.target.root).is_dir():
                raise ApiError(
                    409, f"the code of {name} version {entry.version} is no longer stored"
                )
            try:
                self._check_packages(spec)
            except DeployError as exc:
                raise ApiError(409, f"{name}: {exc}") from None
            previous = record.active
            try:
                info = await self._runtime_deploy(spec)
            except DeployError as exc:
                if previous is not None and (prev := record.version(previous)) is not None:
                    with contextlib.suppress(ConfigError):
                        self._spec(name, prev)  # min_warm back to what serves
                raise ApiError(
                    422, f"rollback of {name} to {entry.version} refused: {exc}", serving=previous
                ) from None
            entry.status, entry.error = "ok", None
            entry.activated_at = time.time()
            entry.detected = {k: info.get(k) for k in ("kind", "attr", "init_ms")}
            record.active = entry.version
            await self._write(record)
            self.restore_errors.pop(name, None)
            self._serve_events(name)
            self.function_logs.event(name, f"rolled back from {previous} to {entry.version}")
        return {
            "name": name,
            "version": entry.version,
            "previous": previous,
            "kind": info.get("kind"),
            "attr": info.get("attr"),
        }

    async def invoke(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        self._check_name(name)
        self._require("ready")
        spec = self.runtime.functions.get(name)
        if spec is None:
            if name in self.records or name in self.broken:
                raise ApiError(503, f"{name} is not serving (see hourai show {name})")
            raise ApiError(404, f"no function named {name!r}")
        t0 = time.perf_counter()
        if "event" in body or "event_json" in body:
            response = await self.runtime.invoke_event(spec, _direct_event(body))
        else:
            request = _invocation(body)
            response = await self.runtime.invoke(spec, request, "", request.path)
        ms = (time.perf_counter() - t0) * 1e3
        headers = [[k, v] for k, v in response.headers]
        out: dict[str, Any] = {
            "status": response.status,
            "headers": headers,
            "start": next((v for k, v in response.headers if k == "x-hourai-start"), None),
            "ms": round(ms, 3),
        }
        function_error = next((v for k, v in response.headers if k == "x-amz-function-error"), None)
        if function_error:
            out["function_error"] = function_error
        try:
            out["body"] = bytes(response.body).decode("utf-8")
        except UnicodeDecodeError:
            out["body_base64"] = base64.b64encode(bytes(response.body)).decode()
        return out

    async def _enqueue_lambda(self, spec: FunctionSpec, event: bytes, request: Request) -> str:
        """The Invoke API's InvocationType=Event: into the durable queue."""
        return await accept_event(
            self.runtime, self.invocations.accept, spec.name, event, "lambda-api", request
        )

    def _serve_events(self, name: str) -> None:
        """The function serves: its async settings, schedule and trigger follow its active
        version's options (the defaults overlaid with its own)."""
        record = self.records.get(name)
        entry = record.active_version if record else None
        spec = self.runtime.functions.get(name)
        if entry is None or spec is None or self.invocations is None:
            return
        options = {**self.config.function_defaults(), **entry.options}
        lim = spec.limits
        capacity = lim.max_inflight or lim.max_workers * lim.concurrency
        self.invocations.configure(name, options, capacity)

    async def invoke_async(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        """Queue ``body["event"]`` (any JSON) for ``name``; answered once it is durable."""
        self._check_name(name)
        self._require("ready")
        if name not in self.runtime.functions:
            if name in self.records or name in self.broken:
                raise ApiError(503, f"{name} is not serving (see hourai show {name})")
            raise ApiError(404, f"no function named {name!r}")
        if "event" not in body:
            raise ApiError(400, 'give the event as {"event": ...} (any JSON value)')
        event = json.dumps(body["event"], separators=(",", ":")).encode()
        traceparent = body.get("traceparent")
        if traceparent is not None and parse_traceparent(traceparent) is None:
            raise ApiError(400, f"traceparent is not a W3C traceparent: {traceparent!r}")
        try:
            iid = await accept_event(
                self.runtime, self.invocations.accept, name, event, "api", None, traceparent
            )
        except QueueError as exc:
            raise ApiError(507, str(exc)) from None
        return {"id": iid, "function": name, "status": "queued"}

    async def invocations_of(
        self, name: str, iid: str | None, limit: int, status: str | None
    ) -> dict[str, Any]:
        self._check_name(name)
        if name not in self.records and name not in self.broken:
            raise ApiError(404, f"no function named {name!r}")
        if iid is not None:
            doc = await self.invocations.get(name, iid)
            if doc is None:
                raise ApiError(
                    404,
                    f"{name} has no invocation {iid} (results are kept for a retention "
                    "period, then purged)",
                )
            return doc
        return {"invocations": await self.invocations.list(name, limit, status)}

    async def logs(
        self, name: str, lines: int | None, cursor: str | None, wait: float
    ) -> dict[str, Any]:
        self._check_name(name)
        logs = self.function_logs
        if name not in self.records and name not in self.broken and not logs.exists(name):
            raise ApiError(404, f"no function named {name!r}")
        if cursor is None:
            text, cursor = await asyncio.to_thread(logs.tail, name, 100 if lines is None else lines)
            return {"text": text, "cursor": cursor}
        # Watched before the read: a line written while it runs (in a thread) still wakes us.
        watched = logs.watch(name) if wait > 0 else None
        try:
            text, after = await asyncio.to_thread(logs.read, name, cursor)
            if not text and watched is not None and self.phase != "stopping":
                await logs.wait(name, wait, watched)
                text, after = await asyncio.to_thread(logs.read, name, cursor)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        finally:
            if watched is not None:
                logs.unwatch(name, watched)
        return {"text": text, "cursor": after}

    # ------------------------------------------------------------------ views

    def health(self) -> tuple[bool, dict[str, Any]]:
        problems = [str(p) for p in self.broken.values()]
        problems += [f"{n}: {e}" for n, e in sorted(self.restore_errors.items())]
        runtime = getattr(self, "runtime", None)
        down = runtime.problems() if runtime is not None and self.phase == "ready" else []
        problems += down
        doc = {
            "status": self.phase,
            "functions": len(self.records),
            "serving": len(runtime.functions) if runtime is not None else 0,
            "restoring": self.restoring,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "problems": problems,
            "warnings": runtime.warnings if runtime is not None else [],
        }
        # Not ready while nothing can be built; a vanished tenant group heals on its own.
        healthy = runtime is not None and runtime.zygote.running
        return self.phase == "ready" and healthy, doc

    async def render_metrics(self) -> tuple[bytes, str]:
        if self.invocations is not None:
            await self.invocations.refresh()
        return await self.metrics.render_async(), CONTENT_TYPE

    def _state_of(self, name: str) -> dict[str, Any] | None:
        try:
            return self.runtime.scheduler.stats(name)
        except KeyError:
            return None

    def list_functions(self) -> dict[str, Any]:
        requests: Counter[str] = Counter()
        for (fn, _status, _start), n in self.metrics.requests.items():
            requests[fn] += n
        out = []
        for name in sorted(self.records):
            record = self.records[name]
            entry = record.active_version or (record.versions[-1] if record.versions else None)
            st = self._state_of(name)
            workers = st["workers"] if st else {}
            detected = (entry.detected or {}) if entry else {}
            out.append(
                {
                    "name": name,
                    "version": record.active,
                    "tenant": entry.tenant if entry else None,
                    "kind": detected.get("kind") or (entry.kind if entry else None),
                    "attr": detected.get("attr"),
                    "state": self._function_state(name, record, st),
                    "snapshot": st["snapshot"] if st else None,
                    "workers": sum(workers.values()),
                    "busy": workers.get("busy", 0),
                    "requests": requests.get(name, 0),
                    "min_warm": self.min_warm.get(name, 0),
                    "deployed_at": entry.activated_at or entry.deployed_at if entry else None,
                }
            )
        for name, problem in sorted(self.broken.items()):
            out.append({"name": name, "state": "corrupt", "error": str(problem)})
        out.sort(key=lambda f: f["name"])
        return {"functions": out, "phase": self.phase}

    def _function_state(self, name: str, record: FunctionRecord, st: dict[str, Any] | None) -> str:
        if name in self.restore_errors and (st is None or st["state"] == "failed"):
            return "not restored"
        if st is not None:
            return str(st["state"])
        if record.active is None:
            return (
                "refused"
                if record.versions and record.versions[-1].status == "refused"
                else ("not deployed")
            )
        return "restoring" if self.phase == "starting" else "not loaded"

    def show(self, name: str) -> dict[str, Any]:
        record = self._record(name)
        st = self._state_of(name)
        active = record.active_version
        doc: dict[str, Any] = {
            "name": name,
            "active": record.active,
            "state": self._function_state(name, record, st),
            "created_at": record.created_at,
            "versions": [
                {
                    "version": v.version,
                    "active": v.version == record.active,
                    "status": v.status,
                    "error": v.error,
                    "source": v.source,
                    "module": v.module,
                    "attr": (v.detected or {}).get("attr") or v.attr,
                    "kind": (v.detected or {}).get("kind") or v.kind,
                    "tenant": v.tenant,
                    "deployed_at": v.deployed_at,
                    "activated_at": v.activated_at,
                }
                for v in reversed(record.versions)
            ],
        }
        if name in self.restore_errors:
            doc["restore_error"] = self.restore_errors[name]
        if active is not None:
            doc["tenant"] = active.tenant
            doc["code"] = str(self.runtime.codestore.path(active.code))
            doc["env"] = sorted(active.env)  # names only: values may be secrets
            doc["packages"] = active.packages
            doc["options"] = active.options
            try:
                limits = self._limits(active.options)
                doc["limits"] = dataclasses.asdict(limits.function)
                doc["min_warm"] = limits.min_warm
                doc["declared_tenant_limits"] = limits.tenant.describe() if limits.tenant else None
                with contextlib.suppress(CgroupError, OSError):  # read back from the kernel
                    doc["tenant_limits"] = self.runtime.cgroups.applied(active.tenant).describe()
            except ConfigError as exc:
                doc["limits_error"] = str(exc)
        if st is not None:
            doc["scheduler"] = st
            doc["requests"] = self.metrics.summary(name)
        if self.invocations is not None:
            doc.update(self.invocations.describe(name))
        resources = self.runtime.resources
        if resources is not None and name in self.runtime.functions:
            with contextlib.suppress(Exception):
                doc["policy"] = resources.explain(name)
        return doc

    async def stats(self) -> dict[str, Any]:
        runtime = self.runtime
        functions: dict[str, Any] = {}
        pids: dict[str, list[int]] = {}
        for (fn, _version), version in list(runtime.versions.items()):
            procs = pids.setdefault(fn, [])
            if version.handle is not None and version.handle.pid:
                procs.append(version.handle.pid)
            procs.extend(version.workers_by_pid)
        zygotes = runtime.tree.stats()
        for z in zygotes:
            if z["pid"]:
                pids[f"zygote {z['name']}"] = [z["pid"]]
        memory = await asyncio.to_thread(_pss_by_function, pids)
        for z in zygotes:
            z["memory_pss"] = memory.get(f"zygote {z['name']}", {}).get("pss")
        for name in runtime.scheduler.functions():
            st = runtime.scheduler.stats(name)
            functions[name] = {
                "tenant": st["tenant"],
                "version": st["version"],
                "state": st["state"],
                "snapshot": st["snapshot"],
                "workers": st["workers"],
                "queued": st["queued"],
                "inflight": st["inflight"],
                "starts": st["starts"],
                "rejections": st["rejections"],
                "completed": st["completed"],
                "died": st["died"],
                "timeouts": st["timeouts"],
                "last_error": st["last_error"],
                "memory_pss": memory.get(name, {}).get("pss"),
                "processes": memory.get(name, {}).get("processes", 0),
                **self.metrics.summary(name),
            }
        tenants: dict[str, Any] = {}
        for tenant in sorted({s.tenant for s in runtime.functions.values()}):
            entry: dict[str, Any] = {
                "functions": sum(1 for s in runtime.functions.values() if s.tenant == tenant)
            }
            try:
                entry.update(dataclasses.asdict(runtime.cgroups.usage(tenant)))
            except (CgroupError, OSError) as exc:
                entry["error"] = str(exc)
            entry["declared"] = runtime.effective_tenant_limits(tenant).describe()
            try:  # what the kernel enforces, read back
                entry["limits"] = runtime.cgroups.applied(tenant).describe()
            except (CgroupError, OSError) as exc:
                entry["limits"] = f"unreadable: {exc}"
            with contextlib.suppress(Exception):
                entry["uid"] = runtime.tenants.get(tenant).uid
            tenants[tenant] = entry
        host = runtime.scheduler.host_stats()
        host["cgroups"] = runtime.cgroups.describe()
        host["warnings"] = runtime.warnings
        host["uptime_s"] = round(time.monotonic() - self.started, 3)
        host["phase"] = self.phase
        if runtime.resources is not None:
            budget = runtime.resources.policy.budget()
            host["memory_budget"] = None if budget == float("inf") else int(budget)
        return {"host": host, "functions": functions, "tenants": tenants, "zygotes": zygotes}

    # ------------------------------------------------------------------ reload

    async def _reload_quietly(self) -> None:
        if self.phase == "starting":
            log.info("SIGHUP while starting: the config is re-read once ready")
            self._reload_pending = True
            return
        self._reload_pending = False
        with contextlib.suppress(ApiError):
            await self.reload()

    async def reload(self) -> dict[str, Any]:
        """Re-read the config file; apply what can change live, keep the rest (and say so)."""
        old = self.config
        if old.source is None:
            log.warning("reload: the daemon was started without --config; nothing to re-read")
            return {"reloaded": False, "reason": "no config file"}
        self.notifier.reloading()
        try:
            new = load_config(old.source, **self.overrides)
        except ConfigError as exc:
            log.error("reload refused, the running config stays: %s", exc)
            self.notifier.ready(self._status())
            raise ApiError(400, f"reload refused, the running config stays: {exc}") from None
        restart = restart_only_changes(old, new)
        new = dataclasses.replace(new, **{k: getattr(old, k) for k in restart})
        changed = [
            f.name
            for f in dataclasses.fields(Config)
            if f.name != "source" and getattr(old, f.name) != getattr(new, f.name)
        ]
        self.config = new
        setup_daemon_logging(new.log_level, new.log.format, access=new.log.access)
        self.function_logs.set_rotation(new.log.function_max_size, new.log.function_files)
        if new.domain != old.domain:
            self.router.domain = Router({}, domain=new.domain).domain
        if new.packages != old.packages:
            self.runtime.packages.installer.settings = _index_settings(new)
        if self.invocations is not None:
            self.invocations.retention = new.async_retention
            self.invocations.dead_retention = new.dead_letter_retention
        if self.runtime.resources is not None and new.memory_budget != old.memory_budget:
            self.runtime.resources.policy.set_memory_budget(new.memory_budget)
        self.runtime.settings.show_errors = new.show_errors
        if (new.tenant_defaults, new.tenants) != (old.tenant_defaults, old.tenants):
            for problem in self.runtime.set_tenant_config(new.tenant_defaults, new.tenants):
                log.error("reload: tenant limits not applied: %s", problem)
        failed: dict[str, str] = {}
        if new.defaults != old.defaults:
            failed = await self._apply_defaults()
        log.info(
            "config reloaded from %s: %s%s",
            new.source,
            f"changed {', '.join(changed)}" if changed else "nothing changed",
            f"; restart to apply {', '.join(restart)}" if restart else "",
        )
        self.notifier.ready(self._status())
        return {"reloaded": True, "changed": changed, "restart_needed": restart, "failed": failed}

    async def _apply_defaults(self) -> dict[str, str]:
        """New [defaults] reach every function that does not set its own value."""
        failed: dict[str, str] = {}
        for name, record in list(self.records.items()):
            entry = record.active_version
            current = self.runtime.functions.get(name)
            if entry is None or current is None or current.version != entry.version:
                continue
            async with self._lock(name):
                try:
                    spec = self._spec(name, entry)
                except ConfigError as exc:
                    failed[name] = str(exc)
                    log.error("%s keeps its limits: the new defaults do not fit it: %s", name, exc)
                    continue
                if (spec.limits, spec.resources) == (current.limits, current.resources):
                    continue
                try:
                    await self._runtime_deploy(spec)
                    self._serve_events(name)
                except DeployError as exc:
                    failed[name] = str(exc)
        return failed

    # ------------------------------------------------------------------ the code store

    async def _collect_garbage(self) -> None:
        """Remove stored code no version record names (removed functions, pruned versions).
        Never while a record is unreadable: it may name code we cannot see."""
        if self.broken:
            return
        keep = {v.code for r in self.records.values() for v in r.versions} | set(self._pinned)
        store = self.runtime.codestore
        async with self._store_lock:
            removed = await asyncio.to_thread(_remove_unreferenced, store.root, keep)
        if removed:
            log.info("code store: removed %d unreferenced code trees", removed)
        used = {p for r in self.records.values() for v in r.versions for p in v.packages or ()}
        gone = await asyncio.to_thread(self.runtime.packages.collect, used)
        if gone:
            log.info("package store: removed %d unused distributions", len(gone))


# ---------------------------------------------------------------------- helpers


def _url(server: asyncio.base_events.Server) -> str:
    host, port = server.sockets[0].getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def _index_settings(config: Config) -> IndexSettings:
    packages = config.packages
    return IndexSettings(
        index_url=packages.index_url,
        extra_index_urls=packages.extra_index_urls,
        find_links=packages.find_links,
        no_index=packages.no_index,
        cache_dir=packages.cache_dir or config.state_dir / "packages" / "cache",
    )


def _deploy_body(body: dict[str, Any]) -> tuple[str, str | None, dict[str, Any]]:
    path = body.get("path")
    if not isinstance(path, str) or not path.strip():
        raise ApiError(400, "path: give the function's file or directory")
    cwd = body.get("cwd")
    if cwd is not None and (not isinstance(cwd, str) or not os.path.isabs(cwd)):
        raise ApiError(400, "cwd must be an absolute path")
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "options must be an object")
    try:
        given = parse_function_options(options, "deploy")
    except ConfigError as exc:
        raise ApiError(400, str(exc)) from None
    return path, cwd, given


def prepare_deploy(
    path: str, cwd: str | None, given: dict[str, Any]
) -> tuple[Target, dict[str, Any]]:
    """Resolve the target and merge the options: hourai.toml beside the code, then the
    deploy's own (which win). Raises ConfigError or TargetError."""
    base = cwd or os.getcwd()
    options: dict[str, Any] = {}
    where = function_dir(path, base)
    if where is not None:
        toml_path = where / FUNCTION_TOML
        if toml_path.is_file():
            try:
                data = tomllib.loads(toml_path.read_text())
            except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"{toml_path}: {exc}") from None
            options = parse_function_options(data, str(toml_path))
    env = {**options.get("env", {}), **given.get("env", {})}
    options.update(given)
    if env:
        options["env"] = env
    entry = options.get("entry")
    target = resolve_target(f"{path}:{entry}" if entry else path, cwd=base)
    if options.pop("factory", False):
        target = as_factory(target)
    return target, options


def function_dir(path: str, base: str) -> Path | None:
    """The directory a deploy's hourai.toml would be in."""
    full = os.path.normpath(os.path.join(base, os.path.expanduser(path)))
    if os.path.isdir(full):
        return Path(full)
    if os.path.isfile(full):
        return Path(full).parent
    head = full.partition(":")[0] if ":" in path else ""
    if head and os.path.isdir(head):
        return Path(head)
    if head and os.path.isfile(head):
        return Path(head).parent
    return None


def _freeze(store: Any, name: str, target: Target, **kw: Any) -> FunctionSpec:
    """build_spec, then make the stored copy durable (see fsutil.sync_tree)."""
    limits: Limits = kw.pop("limits")
    spec = build_spec(store, name, target, limits=limits.function, resources=limits.tenant, **kw)
    sync_tree(Path(spec.target.root))
    return spec


def _remove_unreferenced(root: Path, keep: set[str]) -> int:
    import shutil

    removed = 0
    for entry in os.scandir(root):
        if entry.name in keep or not entry.is_dir(follow_symlinks=False):
            continue
        # ".<digest>.*" are copies a crash interrupted; the rest are whole but unused.
        shutil.rmtree(entry.path, ignore_errors=True)
        removed += 1
    return removed


def _pss_by_function(pids: dict[str, list[int]]) -> dict[str, dict[str, int]]:
    """Proportional set size of each function's processes: shared pages (the snapshot's,
    inherited by its workers) are split among the processes sharing them, so the sum is
    what the function really costs."""
    out: dict[str, dict[str, int]] = {}
    for fn, procs in pids.items():
        total = 0
        alive = 0
        for pid in procs:
            try:
                with open(f"/proc/{pid}/smaps_rollup") as f:
                    for line in f:
                        if line.startswith("Pss:"):
                            total += int(line.split()[1]) * 1024
                            alive += 1
                            break
            except (OSError, ValueError):
                continue
        out[fn] = {"pss": total, "processes": alive}
    return out


def _direct_event(body: dict[str, Any]) -> bytes:
    """A direct invocation's event, as JSON bytes: ``event_json`` exactly as the caller wrote
    it (the CLI sends a file's text), or ``event``, any JSON value."""
    raw = body.get("event_json")
    if raw is None:
        return json.dumps(body.get("event")).encode()
    if not isinstance(raw, str):
        raise ApiError(400, "event_json must be a string holding JSON")
    try:
        json.loads(raw)
    except ValueError as exc:
        raise ApiError(400, f"the event is not JSON: {exc}") from None
    return raw.encode()


def _invocation(body: dict[str, Any]) -> Request:
    """An HTTP request for the function from the invoke body: either an API Gateway HTTP
    API (2.0) event, as Lambda test events are written, or method/path/query/headers/body."""
    event = body.get("event")
    if event is not None:
        if not isinstance(event, dict):
            raise ApiError(400, "event must be a JSON object (an API Gateway 2.0 event)")
        http = (event.get("requestContext") or {}).get("http") or {}
        body = {
            "method": http.get("method") or "POST",
            "path": event.get("rawPath") or http.get("path") or "/",
            "query": event.get("rawQueryString") or "",
            "headers": event.get("headers") or {},
            "body": event.get("body") or "",
            "base64": bool(event.get("isBase64Encoded")),
        }
    method = body.get("method") or ("POST" if body.get("body") else "GET")
    if not isinstance(method, str) or method.upper() not in INVOKE_METHODS:
        raise ApiError(400, f"method must be one of {', '.join(INVOKE_METHODS)}")
    method = method.upper()
    path = body.get("path") or "/"
    query = body.get("query") or ""
    if not isinstance(path, str) or not path.startswith("/") or any(c in path for c in " \r\n"):
        raise ApiError(400, "path must start with '/' and hold no spaces or line breaks")
    if not isinstance(query, str) or any(c in query for c in " \r\n#"):
        raise ApiError(400, "query must be a string without spaces, '#' or line breaks")
    headers_in = body.get("headers") or {}
    if isinstance(headers_in, dict):
        pairs = list(headers_in.items())
    elif isinstance(headers_in, list):
        pairs = [tuple(h) for h in headers_in if isinstance(h, list | tuple) and len(h) == 2]
    else:
        raise ApiError(400, "headers must be an object or a list of [name, value]")
    headers = []
    for k, v in pairs:
        if not isinstance(k, str) or not isinstance(v, str) or "\n" in k + v or "\r" in k + v:
            raise ApiError(400, "header names and values must be strings on one line")
        headers.append((k.lower(), v))
    payload = body.get("body") or ""
    if not isinstance(payload, str):
        raise ApiError(400, "body must be a string")
    if body.get("base64"):
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "body is not valid base64") from None
    else:
        data = payload.encode()
    if data and not any(k == "content-type" for k, _ in headers):
        headers.append(("content-type", "application/json"))
    if not any(k == "host" for k, _ in headers):
        headers.append(("host", "localhost"))
    target = path + (f"?{query}" if query else "")
    return Request(
        method, target, path, query, headers, data, "1.1", ("127.0.0.1", 0), ("", 0), False
    )


async def run_daemon(config: Config, overrides: dict[str, Any]) -> int:
    return await Daemon(config, overrides).run()
