"""`hourai daemon`: the long-running service, composed from its parts.

config → runtime (zygotes, scheduler, cgroups, policy) → the registry restored (every
function's active version rebuilt) → HTTP ingress on each listen address → control API on a
unix socket → READY=1 to systemd. SIGTERM drains (stop accepting, finish in-flight work up
to ``drain_timeout``, stop every process); SIGHUP re-reads the config and applies what can
change live.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from hourai import sdnotify
from hourai.cgroup import CgroupError, TenantLimits
from hourai.codestore import CodeStoreError
from hourai.config import Config, ConfigError, load_config
from hourai.control import ApiError, ControlAPI
from hourai.daemon import DeployError, Router, Runtime, RuntimeSettings, http_handler
from hourai.ingress import HttpProtocol, serve
from hourai.isolate.loader import TargetError, resolve_target
from hourai.logs import FunctionLogs
from hourai.metrics import Metrics
from hourai.registry import build_spec, check_name
from hourai.scheduler.core import FunctionLimits
from hourai.scheduler.policy import PolicyParams
from hourai.state import Registry, StateError

log = logging.getLogger("hourai.daemon")

LIMIT_KEYS = {f for f in FunctionLimits.__dataclass_fields__}


class Daemon:
    def __init__(self, config: Config, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.ready = False
        self.started = time.time()
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.registry = Registry(config.state_dir)
        self.runtime = Runtime(
            RuntimeSettings(
                state_dir=config.state_dir,
                preloads=list(config.preload),
                cgroup_backend=config.cgroup_backend,
                cgroup_subtree=config.cgroup_subtree,
                uid_range=config.uid_range,
                policy=PolicyParams(memory_budget_bytes=config.memory_budget),
            )
        )
        self.metrics = Metrics(self.runtime)
        self.function_logs = FunctionLogs(config.state_dir / "logs")
        self.runtime.observers += [self.metrics, self.function_logs]
        self.control = ControlAPI(self)
        self._servers: list[asyncio.base_events.Server] = []
        self._connections: set[HttpProtocol] = set()
        self._stop = asyncio.Event()

    # ------------------------------------------------------------------ life cycle

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload_config)
        sdnotify.notify("STATUS=starting")
        await self.runtime.start()
        for warning in self.runtime.warnings:
            log.warning("%s", warning)
        await self.restore()
        try:
            await self._listen()
        except OSError as exc:
            print(f"hourai: error: cannot listen: {exc.strerror}", file=sys.stderr)
            await self.runtime.stop()
            return 2
        self.ready = True
        addresses = ", ".join(
            f"http://{s.sockets[0].getsockname()[0]}:{s.sockets[0].getsockname()[1]}/"
            for s in self._servers[1:]
        )
        print(
            f"hourai: daemon serving {len(self.runtime.functions)} functions at {addresses} "
            f"(control socket {self.config.socket_path})",
            file=sys.stderr,
            flush=True,
        )
        sdnotify.notify(f"READY=1\nSTATUS=serving {len(self.runtime.functions)} functions")
        watchdog = None
        interval = sdnotify.watchdog_interval()
        if interval:
            watchdog = loop.create_task(self._watchdog(interval))
        await self._stop.wait()
        sdnotify.notify("STOPPING=1\nSTATUS=draining")
        log.info("stopping: draining in-flight requests (up to %.0fs)", self.config.drain_timeout)
        for server in self._servers[1:]:
            server.close()
        drained = await self.runtime.drain(self.config.drain_timeout)
        if not drained:
            log.warning("drain deadline passed with %d requests left", len(self.runtime.pending))
        for conn in list(self._connections):
            conn.shutdown()
        if watchdog is not None:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog
        self._servers[0].close()
        await self.runtime.stop()
        self.function_logs.close()
        with contextlib.suppress(FileNotFoundError):
            self.config.socket_path.unlink()
        return 0

    async def _listen(self) -> None:
        path = self.config.socket_path
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        loop = asyncio.get_running_loop()
        old = os.umask(0o177)  # the socket is born 0600: only root may drive the daemon
        try:
            control = await loop.create_unix_server(
                lambda: HttpProtocol(self.control.handle), str(path)
            )
        finally:
            os.umask(old)
        self._servers.append(control)
        handler = http_handler(
            self.runtime, Router(self.runtime.functions, domain=self.config.domain)
        )
        for host, port in self.config.listen_addresses():
            self._servers.append(await serve(handler, host, port, connections=self._connections))

    async def _watchdog(self, interval: float) -> None:
        while True:
            sdnotify.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def restore(self) -> None:
        """Rebuild every function's active version, all at once; one that fails is logged
        and stays in the registry (a later deploy or rollback fixes it), never dropped."""
        names = list(self.registry.functions)
        if not names:
            return
        sdnotify.notify(f"STATUS=restoring {len(names)} functions")

        async def one(name: str) -> None:
            try:
                await self.runtime.deploy(self.registry.active_spec(self.runtime.codestore, name))
            except (DeployError, CgroupError, KeyError, TypeError, ValueError) as exc:
                log.error("could not restore %s: %s", name, exc)

        await asyncio.gather(*(one(n) for n in names))
        log.info("restored %d functions", len(names))

    def reload_config(self) -> None:
        if self.config_path is None:
            log.info("SIGHUP: no config file to reload")
            return
        try:
            new = load_config(self.config_path, state_dir=self.config.state_dir)
        except ConfigError as exc:
            log.error("SIGHUP: config not reloaded: %s", exc)
            return
        if self.runtime.resources is not None:
            self.runtime.resources.policy.set_memory_budget(new.memory_budget)
        restart = [
            k
            for k in (
                "listen",
                "control_socket",
                "cgroup_backend",
                "cgroup_subtree",
                "uid_range",
                "preload",
                "domain",
            )
            if getattr(new, k) != getattr(self.config, k)
        ]
        self.config = new
        log.info(
            "SIGHUP: config reloaded%s",
            f"; a restart is needed for {', '.join(restart)}" if restart else "",
        )

    # ------------------------------------------------------------------ operations

    async def deploy(self, body: dict[str, Any]) -> dict[str, Any]:
        name = body["name"]
        try:
            check_name(name)
            target_spec = body["path"] + (f":{body['entry']}" if body.get("entry") else "")
            target = resolve_target(target_spec, cwd=body.get("cwd"))
            limits = self._limits(body.get("limits") or {})
            resources = _resources(body.get("resources") or {})
            spec = await asyncio.get_running_loop().run_in_executor(
                None,
                lambda: build_spec(
                    self.runtime.codestore,
                    name,
                    target,
                    kind=body.get("kind"),
                    tenant=body.get("tenant") or "default",
                    env={str(k): str(v) for k, v in (body.get("env") or {}).items()},
                    limits=limits,
                    resources=resources,
                ),
            )
        except (TargetError, CodeStoreError, ValueError, TypeError, CgroupError) as exc:
            raise ApiError(400, str(exc)) from None
        previous = self.registry.functions.get(name, {}).get("active")
        self.registry.add_version(spec)  # durable before it is built
        try:
            info = await self.runtime.deploy(spec)
        except DeployError as exc:
            if spec.version != previous:
                self.registry.drop_version(name, spec.version)
            if previous is None:
                self.runtime.remove(name)  # it never served: nothing of it stays
            raise ApiError(
                422,
                f"deploy of {name} refused: {exc}",
                details=exc.details,
                serving=previous,
            ) from None
        self.registry.activate(name, spec.version)
        return {
            "name": name,
            "version": spec.version,
            "kind": info.get("kind"),
            "attr": info.get("attr"),
            "tenant": spec.tenant,
            "init_ms": info.get("init_ms"),
            "previous": previous,
        }

    def _limits(self, given: dict[str, Any]) -> FunctionLimits:
        unknown = set(given) - LIMIT_KEYS - {"min_warm"}
        if unknown:
            raise ValueError(f"unknown limit {sorted(unknown)[0]!r}")
        d = self.config.defaults
        values: dict[str, Any] = {
            "timeout": d.timeout,
            "keep_alive": d.keep_alive,
            "spares": d.spares,
            "max_workers": d.max_workers,
            "concurrency": d.concurrency,
            "queue_max": d.queue_max,
            "queue_timeout": d.queue_timeout,
        }
        values.update({k: v for k, v in given.items() if k != "min_warm"})
        # min_warm: workers kept ready while the function is loaded; pre-forked spares are
        # exactly that, so it raises the spare count.
        if given.get("min_warm"):
            values["spares"] = max(int(values["spares"]), int(given["min_warm"]))
            values["max_workers"] = max(int(values["max_workers"]), values["spares"])
        return FunctionLimits(**values)

    def remove(self, name: str) -> None:
        self.runtime.remove(name)
        self.registry.remove(name)

    async def rollback(self, name: str, version: str | None) -> dict[str, Any]:
        entry = self.registry.functions[name]
        version = version or self.registry.previous(name)
        if version is None or version not in entry["versions"]:
            raise ApiError(404, f"{name} has no version {version!r} to roll back to")
        spec = self.registry.spec(self.runtime.codestore, name, version)
        try:
            info = await self.runtime.deploy(spec)
        except DeployError as exc:
            raise ApiError(422, f"rollback of {name} to {version} refused: {exc}") from None
        previous = entry["active"]
        self.registry.add_version(spec)
        self.registry.activate(name, version)
        return {"name": name, "version": version, "previous": previous, "kind": info.get("kind")}

    def list_functions(self) -> list[dict[str, Any]]:
        out = []
        for name, entry in sorted(self.registry.functions.items()):
            rec = entry["versions"][entry["active"]]
            try:
                st = self.runtime.scheduler.stats(name)
                state, workers = st["state"], sum(st["workers"].values())
            except KeyError:
                state, workers = "not loaded", 0
            out.append(
                {
                    "name": name,
                    "version": entry["active"],
                    "tenant": rec["tenant"],
                    "source": rec["source"],
                    "state": state,
                    "workers": workers,
                }
            )
        return out

    def show(self, name: str) -> dict[str, Any]:
        entry = self.registry.functions[name]
        doc: dict[str, Any] = {
            "name": name,
            "active": entry["active"],
            "versions": [{"version": v, **entry["versions"][v]} for v in reversed(entry["order"])],
        }
        with contextlib.suppress(KeyError):
            doc["scheduler"] = self.runtime.scheduler.stats(name)
        if self.runtime.resources is not None and name in self.runtime.functions:
            doc["policy"] = self.runtime.resources.explain(name)
        return doc

    def stats(self) -> dict[str, Any]:
        functions = {}
        for name in self.runtime.scheduler.functions():
            functions[name] = self.runtime.scheduler.stats(name)
            if self.runtime.resources is not None:
                functions[name]["policy"] = self.runtime.resources.explain(name)
        tenants = {}
        for tenant in sorted({s.tenant for s in self.runtime.functions.values()}):
            try:
                tenants[tenant] = vars(self.runtime.cgroups.usage(tenant))
            except (CgroupError, OSError) as exc:
                tenants[tenant] = {"error": str(exc)}
        return {
            "uptime_s": time.time() - self.started,
            "cgroups": self.runtime.cgroups.describe(),
            "warnings": self.runtime.warnings,
            "host": self.runtime.scheduler.host_stats(),
            "functions": functions,
            "tenants": tenants,
        }


def _resources(given: dict[str, Any]) -> TenantLimits | None:
    given = {k: v for k, v in given.items() if v is not None}
    if not given:
        return None
    unknown = set(given) - {"memory", "cpu", "pids"}
    if unknown:
        raise ValueError(f"unknown resource {sorted(unknown)[0]!r} (memory, cpu, pids)")
    return TenantLimits.parse(
        memory_max=given.get("memory"), cpu_max=given.get("cpu"), pids_max=given.get("pids")
    )


async def run_daemon(config: Config, config_path: Path | None) -> int:
    try:
        daemon = Daemon(config, config_path)
    except (StateError, RuntimeError) as exc:
        print(f"hourai: error: {exc}", file=sys.stderr)
        return 1
    return await daemon.run()
