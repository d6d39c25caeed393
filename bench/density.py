"""Density on real apps: how much memory N functions with their own dependencies take.

The fleet (bench.fleet): Flask, FastAPI, pandas/numpy (two pin sets), jinja2 and plain
handler functions, each its own directory with its own ``requirements.txt``, spread over
tenants of ``tenant_size`` functions each with the same mix. Packages come from the index this
host is configured with (``HOURAI_BENCH_INDEX_URL``, else pip's configured local index, else
uv's default); ``--quick`` runs the same shapes on tiny wheels built on the spot, no index.

Three parts, each with runtimes of its own (embedded: a Runtime on its own loop thread):

1. deploy and true cold: one function per variant deployed on an empty uv cache and store
   (cold), on a warm cache (empty store), with its packages stored, with its group's zygote
   resident, with a declared ``preload``; then the true cold start (snapshot build to the
   first answer) of a function whose package zygote is resident, and of one alone in its
   tenant (no zygote: its snapshot imports everything itself).
2. density: at each N the fleet is deployed, its snapshots left to move onto their package
   zygotes (the tree moves a snapshot once its function has no workers), then the PSS of the
   whole tree is summed (daemon, root zygote, package zygotes, snapshots); then every
   function is called once and summed again, with its warm worker.
3. baseline, after the runtime is gone (so no page is shared with it): k plain interpreters
   per variant, each with the same code and packages (``sys.path``: its code and its
   packages' store directories), the way it runs without hourai, measured after the import
   and after one request; extrapolated per variant to N.

Sizes: N = 100, 300, 1000 (``HOURAI_DENSITY_STEPS=100,300`` to choose), the warm count up to
``HOURAI_DENSITY_WARM_UNTIL`` (default: every N); quick: one and two tenants.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from bench.common import BenchContext, summarize, table
from bench.fleet import QUICK, REAL, Variant, layout, quick_wheels, tenant_size

GIB, MIB = 2**30, 2**20
# Issue #12's goals.
GOALS = {
    "resident_gib": 4.0,
    "resident_x": 10.0,
    "warm_x": 5.0,
    "pandas_cold_ms": 30.0,
    "deploy_cached_ms": 100.0,
}
# Never fill the host (no swap here; other work runs beside): what must stay free, and a
# warm worker's cost until one is measured.
RESERVE = max(3 * GIB, psutil.virtual_memory().total // 7)
WORKER_GUESS = 25 * MIB


# ---------------------------------------------------------------------- memory


def smaps(pid: int) -> dict[str, int] | None:
    """PSS, USS and the anonymous/file split of one process (smaps_rollup: one read)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return None
    kb: dict[str, int] = {}
    for line in lines:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            kb[key] = int(parts[0]) * 1024
    return {
        "pss": kb.get("Pss", 0),
        "uss": kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0),
        "pss_anon": kb.get("Pss_Anon", 0),
        "pss_file": kb.get("Pss_File", 0),
    }


# ---------------------------------------------------------------------- the fleet's index


@dataclass
class Fleet:
    variants: tuple[Variant, ...]
    index: Any  # hourai.packages.installer.IndexSettings
    real: bool
    note: str


def choose_fleet(ctx: BenchContext, root: Path) -> Fleet:
    from hourai.packages.installer import IndexSettings, Installer, InstallError

    if ctx.quick:
        wheels = quick_wheels(root / "wheels")
        index = IndexSettings(no_index=True, find_links=(str(wheels),))
        return Fleet(QUICK, index, False, "quick: tiny wheels built on the spot, no index")
    url = os.environ.get("HOURAI_BENCH_INDEX_URL") or _pip_local_index()
    index = IndexSettings(index_url=url)
    try:
        Installer(index).resolve(["flask>=3", "pandas>=2", "fastapi", "jinja2"])
    except InstallError as exc:
        wheels = quick_wheels(root / "wheels")
        return Fleet(
            QUICK,
            IndexSettings(no_index=True, find_links=(str(wheels),)),
            False,
            f"no index with the real packages ({str(exc)[:160]}): tiny wheels instead",
        )
    source = url or "uv's default index"
    return Fleet(REAL, index, True, f"real packages from {source}")


def _pip_local_index() -> str | None:
    """The first local (file://) index pip is configured with: offline hosts have one."""
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if key.endswith(("index-url", "extra-index-url")):
            for url in value.strip("'\"").split():
                if url.startswith("file://"):
                    return url
    return None


# ---------------------------------------------------------------------- an embedded runtime


class Embedded:
    """A runtime on its own thread and event loop, driven from the benchmark's thread."""

    def __init__(self, state_dir: Path, index: Any) -> None:
        self.state_dir = state_dir
        self.index = index
        self.specs: dict[str, Any] = {}
        self.variant_of: dict[str, str] = {}  # function -> its variant, for the census
        self.moves = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._counter = _MoveCounter(self)
        self._log = logging.getLogger("hourai")
        self._log_level = self._log.level
        # the moves are logged at INFO (nothing prints it: no handler but the counter's)
        self._log.setLevel(logging.INFO)
        self._log.addHandler(self._counter)
        self.runtime = self.call(self._start())

    def call(self, coro, timeout: float = 900):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self):  # type: ignore[no-untyped-def]
        from hourai.cgroup import TenantLimits
        from hourai.daemon import Runtime, RuntimeSettings

        # Without the default tenant limits, which hundreds of snapshots and workers would
        # pass; without the adaptive policy, which would unload idle snapshots mid-count.
        runtime = Runtime(
            RuntimeSettings(
                state_dir=self.state_dir,
                policy=None,
                tenant_defaults=TenantLimits(),
                packages=self.index,
            )
        )
        await runtime.start()
        return runtime

    async def deploy(
        self, name: str, tenant: str, where: Path, variant: Variant, preload: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        """What the control API does for a deploy, timed by part: packages (uv), code
        store, snapshot build."""
        from hourai.isolate.loader import resolve_target
        from hourai.registry import build_spec
        from hourai.scheduler.core import FunctionLimits

        rt = self.runtime
        t0 = time.perf_counter()
        packages = await asyncio.to_thread(rt.packages.provide_for, where)
        t1 = time.perf_counter()
        try:
            spec = await asyncio.to_thread(
                build_spec,
                rt.codestore,
                name,
                resolve_target(str(where / variant.file)),
                tenant=tenant,
                packages=packages,
                preload=preload,
                limits=FunctionLimits(spares=0, keep_alive=24 * 3600),
            )
            t2 = time.perf_counter()
            await rt.deploy(spec)
        finally:
            rt.packages.release(packages or ())
        t3 = time.perf_counter()
        self.specs[name] = spec
        self.variant_of.setdefault(repr(spec.packages), variant.name)
        return {
            "variant": variant.name,
            "total_ms": (t3 - t0) * 1e3,
            "packages_ms": (t1 - t0) * 1e3,
            "code_ms": (t2 - t1) * 1e3,
            "build_ms": (t3 - t2) * 1e3,
        }

    async def invoke(self, name: str) -> tuple[int, str, float]:
        from hourai.ingress import Request

        headers = [("host", "localhost")]
        request = Request("GET", "/", "/", "", headers, b"", "1.1", ("127.0.0.1", 1), ("", 0), True)
        t0 = time.perf_counter()
        response = await self.runtime.invoke(self.specs[name], request, "", "/")
        ms = (time.perf_counter() - t0) * 1e3
        start = dict(response.headers).get("x-hourai-start", "?")
        if response.status != 200:
            raise RuntimeError(f"{name}: {response.status} {response.body[:300]!r}")
        return response.status, start, ms

    async def cold(self, name: str) -> dict[str, Any]:
        """One true cold start: the snapshot stopped, then a request (build, fork, answer):
        its start path and time, the snapshot's own build time (import and init), whether it
        was built on a package zygote; then a warm request, for what the call itself takes."""
        rt = self.runtime
        rt.evict_idle(name, 10**6, "bench: cold start")
        rt.unload(name, "bench: cold start")
        for _ in range(200):
            if rt.scheduler.stats(name)["snapshot"] != "ready":
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # the old snapshot's exit is not part of the next start
        _status, start, ms = await self.invoke(name)
        spec = self.specs[name]
        version = rt.versions[(name, spec.version)]
        assert version.built is not None
        init_ms = version.built.result()["init_ms"]
        _status, _start, warm_ms = await self.invoke(name)
        on = self._on_zygote(name)
        return {"start": start, "ms": ms, "init_ms": init_ms, "warm_ms": warm_ms, "on": on}

    def _on_zygote(self, name: str) -> bool:
        spec = self.specs[name]
        version = self.runtime.versions.get((name, spec.version))
        from hourai.snapshot.tree import ZygoteNode

        handle = version.handle if version is not None else None
        return handle is not None and isinstance(handle.parent, ZygoteNode)

    async def drop_workers(self) -> None:
        for name in self.specs:
            self.runtime.evict_idle(name, 10**6, "bench: snapshot-resident count")

    async def unsettled(self) -> dict[str, int]:
        """What the tree still has to do: snapshots not ready or to be moved, planned
        zygotes not running, workers alive."""
        rt, tree = self.runtime, self.runtime.tree
        waiting = sum(
            1
            for name in self.specs
            if rt.scheduler.stats(name)["snapshot"] != "ready" or tree.wanted(name)
        )
        planned = {k for k in tree.plan.values() if k is not None}
        missing = sum(1 for k in planned if k not in tree.nodes or not tree.nodes[k].running)
        return {"snapshots": waiting, "zygotes": missing, "workers": len(rt.workers)}

    async def census(self) -> dict[int, tuple[str, str]]:
        """Every process the runtime knows: pid -> (role, variant or tenant)."""
        rt = self.runtime
        roles: dict[int, tuple[str, str]] = {os.getpid(): ("daemon", "")}
        if rt.zygote.pid:
            roles[rt.zygote.pid] = ("root zygote", "")
        variant = self.variant_of
        for node in rt.tree.nodes.values():
            if node.pid:
                # a zygote serves one group: its tenant's functions with the same packages
                roles[node.pid] = ("package zygotes", variant.get(repr(node.key[1]), "?"))
        for (name, _version), v in rt.versions.items():
            if v.handle is not None and v.handle.pid:
                roles[v.handle.pid] = ("snapshots", variant.get(name, name))
        for w in rt.workers.values():
            if w.pid:
                roles[w.pid] = ("workers", variant.get(w.function, w.function))
        return roles

    async def tree_facts(self) -> dict[str, Any]:
        rt = self.runtime
        zygotes = rt.tree.stats()
        return {
            "zygotes": len(zygotes),
            "zygote_packages": sorted(
                Counter(",".join(z["packages"]) for z in zygotes).items(), key=lambda kv: -kv[1]
            ),
            "snapshots_on_zygotes": sum(1 for name in self.specs if self._on_zygote(name)),
        }

    async def uses(self, name: str) -> tuple[str, ...]:
        return tuple(sorted(self.runtime.tree.uses(name)))

    def stop(self) -> None:
        self.call(self.runtime.stop())
        self.runtime.tenants.release()  # the bench removes the state dir: nothing stays held
        self._log.removeHandler(self._counter)
        self._log.setLevel(self._log_level)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


class _MoveCounter(logging.Handler):
    """Counts the tree's background moves of snapshots onto their zygotes (the daemon logs
    each one)."""

    def __init__(self, owner: Embedded) -> None:
        super().__init__(logging.INFO)
        self.owner = owner

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().endswith("rebuilding its snapshot on its zygote"):
            self.owner.moves += 1


def wait_settled(hourai: Embedded, timeout: float, what: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    left: dict[str, int] = {}
    while time.perf_counter() - t0 < timeout:
        left = hourai.call(hourai.unsettled())
        if not any(left.values()):
            return {"settled": True, "settle_s": time.perf_counter() - t0}
        time.sleep(0.5)
    print(f"  {what}: not settled after {timeout:.0f}s: {left}", flush=True)
    return {"settled": False, "settle_s": time.perf_counter() - t0, "left": left}


def measure(hourai: Embedded) -> dict[str, Any]:
    """PSS and USS of the whole tree, by role, and per variant for snapshots and workers."""
    time.sleep(1.0)  # let the last forks and frees land
    roles = hourai.call(hourai.census())
    pids = [os.getpid(), hourai.runtime.zygote.pid]
    try:
        pids += [p.pid for p in psutil.Process(hourai.runtime.zygote.pid).children(recursive=True)]
    except psutil.Error:
        pass
    by_role: dict[str, dict[str, int]] = {}
    per: dict[tuple[str, str], list[int]] = {}
    total = {"pss": 0, "uss": 0, "pss_anon": 0, "pss_file": 0, "processes": 0}
    for pid in pids:
        got = smaps(pid)
        if got is None:
            continue
        role, what = roles.get(pid, ("other", ""))
        r = by_role.setdefault(role, {"pss": 0, "uss": 0, "processes": 0})
        r["pss"] += got["pss"]
        r["uss"] += got["uss"]
        r["processes"] += 1
        for k in ("pss", "uss", "pss_anon", "pss_file"):
            total[k] += got[k]
        total["processes"] += 1
        if role in ("snapshots", "workers", "package zygotes"):
            per.setdefault((role, what), []).append(got)
    by_variant: dict[str, dict[str, float]] = {}
    for (role, variant), values in per.items():
        one = {"snapshots": "snapshot", "workers": "worker", "package zygotes": "zygote"}[role]
        mine = by_variant.setdefault(variant, {})
        mine[f"{one}_pss_mean"] = statistics.fmean(m["pss"] for m in values)
        mine[f"{one}_uss_mean"] = statistics.fmean(m["uss"] for m in values)
        mine[f"{one}s"] = len(values)
    return {**total, "host_used": host_used(), "by_role": by_role, "by_variant": by_variant}


def host_used() -> int:
    """The host's memory in use (MemTotal - MemAvailable): a check on the PSS sums that also
    sees the kernel's share (page tables, namespaces), and everything else on the host."""
    with open("/proc/meminfo") as f:
        kb = {line.split(":")[0]: int(line.split()[1]) for line in f}
    return (kb["MemTotal"] - kb["MemAvailable"]) * 1024


def host_available() -> int:
    return psutil.virtual_memory().available


# ---------------------------------------------------------------------- part 1: deploys, cold


def deploys_and_cold(fleet: Fleet, root: Path, cache: Path, repeats: int) -> dict[str, Any]:
    index = dataclasses.replace(fleet.index, cache_dir=cache)
    rows: list[dict[str, Any]] = []
    src = root / "deploy-src"

    def fn(name: str, v: Variant) -> Path:
        return v.write(src / name, seed=zlib.crc32(name.encode()) % 997 + 1)

    print("deploys: cold uv cache, empty store", flush=True)
    r1 = Embedded(root / "state-cold", index)
    try:
        for v in fleet.variants:
            got = r1.call(r1.deploy(f"c-{v.name}", "d", fn(f"c-{v.name}", v), v))
            rows.append({"case": "cold cache", **got})
    finally:
        r1.stop()
        shutil.rmtree(root / "state-cold", ignore_errors=True)
    print("deploys: warm cache; stored; zygote resident; declared preload", flush=True)
    r2 = Embedded(root / "state-warm", index)
    cold: dict[str, dict[str, Any]] = {}
    try:
        for v in fleet.variants:
            got = r2.call(r2.deploy(f"z1-{v.name}", "z", fn(f"z1-{v.name}", v), v))
            rows.append({"case": "warm cache, empty store", **got})
        for v in fleet.variants:
            got = r2.call(r2.deploy(f"z2-{v.name}", "z", fn(f"z2-{v.name}", v), v))
            rows.append({"case": "packages stored", **got})
            got = r2.call(r2.deploy(f"s-{v.name}", "s", fn(f"s-{v.name}", v), v))
            rows.append({"case": "packages stored", **got})
        wait_settled(r2, 300, "deploy runtime")
        for v in fleet.variants:
            # a new function: the tree does not know yet what it imports
            got = r2.call(r2.deploy(f"z3-{v.name}", "z", fn(f"z3-{v.name}", v), v))
            rows.append({"case": "stored, its zygote resident", **got})
            # the same, declaring what it imports (preload in its hourai.toml)
            uses = r2.call(r2.uses(f"z1-{v.name}"))
            got = r2.call(r2.deploy(f"z4-{v.name}", "z", fn(f"z4-{v.name}", v), v, preload=uses))
            rows.append({"case": "stored, zygote resident, preload declared", **got})
        wait_settled(r2, 300, "deploy runtime")
        print("true cold starts, with and without the package zygote", flush=True)
        for v in fleet.variants:
            for label, name in (("with zygote", f"z1-{v.name}"), ("no zygote", f"s-{v.name}")):
                got = [r2.call(r2.cold(name)) for _ in range(repeats)]
                cold.setdefault(v.name, {})[label] = {
                    **summarize([g["ms"] for g in got]),
                    "starts": dict(Counter(g["start"] for g in got)),
                    "built_on_zygote": sum(1 for g in got if g["on"]),
                    "init_ms_p50": statistics.median(g["init_ms"] for g in got),
                    "warm_request_ms_p50": statistics.median(g["warm_ms"] for g in got),
                }
    finally:
        r2.stop()
        shutil.rmtree(root / "state-warm", ignore_errors=True)
    return {"deploys": rows, "cold": cold}


# ---------------------------------------------------------------------- part 2: density


def density(
    fleet: Fleet, root: Path, cache: Path, steps: list[int], warm_until: int
) -> tuple[list[dict[str, Any]], dict[str, Any], list[dict[str, Any]]]:
    """The memory points; what the baseline needs (function dirs and package dirs per
    variant); every deploy's timing."""
    index = dataclasses.replace(fleet.index, cache_dir=cache)
    fleet_layout = layout(fleet.variants, steps[-1])
    src = root / "fleet"
    hourai = Embedded(root / "state", index)
    hourai.variant_of = {name: v.name for name, _t, v in fleet_layout}
    points: list[dict[str, Any]] = []
    deploys: list[dict[str, Any]] = []
    dirs: dict[str, list[Path]] = {}
    packages: dict[str, list[str]] = {}
    deployed = 0
    worker_cost = WORKER_GUESS
    try:
        for n in steps:
            t0 = time.perf_counter()
            moves0 = hourai.moves
            hourai.call(hourai.drop_workers())
            for i in range(deployed, n):
                if host_available() < RESERVE:
                    break  # the host is nearly full: measure what is there, go no further
                name, tenant, v = fleet_layout[i]
                where = v.write(src / name, seed=i + 1)
                got = hourai.call(hourai.deploy(name, tenant, where, v))
                deploys.append({"functions_before": i, **got})
                dirs.setdefault(v.name, []).append(where)
                spec = hourai.specs[name]
                packages.setdefault(
                    v.name, [str(hourai.runtime.packages.path(p)) for p in spec.packages or ()]
                )
                if (i + 1) % 50 == 0:
                    print(f"  deployed {i + 1}/{n} ({time.perf_counter() - t0:.0f}s)", flush=True)
            deploy_s = time.perf_counter() - t0
            stopped = len(hourai.specs) < n
            deployed = n = len(hourai.specs)
            if stopped:
                print(f"  host memory nearly full: stopped at N={n}", flush=True)
            settle = wait_settled(hourai, 120 + 2 * n, f"N={n}")
            facts = hourai.call(hourai.tree_facts())
            resident = measure(hourai)
            point: dict[str, Any] = {
                "functions": n,
                "stopped_by_memory": stopped,
                "tenants": len({t for _n, t, _v in fleet_layout[:n]}),
                "deploy_s": deploy_s,
                **settle,
                "moved": hourai.moves - moves0,
                **facts,
                "resident": resident,
            }
            print(
                f"N={n}: resident {resident['pss'] / GIB:.2f} GiB PSS, {facts['zygotes']} "
                f"zygotes, {facts['snapshots_on_zygotes']} snapshots on them, "
                f"{point['moved']} moved",
                flush=True,
            )
            room = host_available() - RESERVE
            if n <= warm_until and n * worker_cost > room:
                print(
                    f"N={n}: no warm count: {n} workers of ~{worker_cost / MIB:.0f} MiB would "
                    f"not fit in the {room / GIB:.1f} GiB left",
                    flush=True,
                )
                point["warm_skipped"] = f"{n * worker_cost / GIB:.1f} GiB needed"
            elif n <= warm_until:
                starts: Counter[str] = Counter()
                first: dict[str, list[float]] = {}
                for name, _tenant, v in fleet_layout[:n]:
                    _status, start, ms = hourai.call(hourai.invoke(name))
                    starts[start] += 1
                    first.setdefault(v.name, []).append(ms)
                time.sleep(1.0)  # workers report what their first call imported
                point["warm"] = measure(hourai)
                point["warm"]["starts"] = dict(starts)
                point["warm"]["first_request_ms_p50"] = {
                    k: statistics.median(s) for k, s in first.items()
                }
                print(f"N={n}: warm {point['warm']['pss'] / GIB:.2f} GiB PSS", flush=True)
                worker_cost = max(1, point["warm"]["pss"] - resident["pss"]) // n
            points.append(point)
            if stopped:
                break
    finally:
        hourai.stop()
    return points, {"dirs": dirs, "packages": packages}, deploys


# ---------------------------------------------------------------------- part 3: baseline

# A plain process per function: its code and packages on sys.path (no site-packages: -S),
# imported, then one request served in-process (no web server: a lower bound of what it
# would take behind gunicorn or uvicorn), then waiting.
DRIVER = r"""
import sys, site
code, module, attr, kind = sys.argv[1:5]
dists = sys.argv[5:]
sys.path[:0] = [code, *dists]
for d in dists:
    site.addsitedir(d)  # its .pth files, as an installed environment would
app = getattr(__import__(module), attr)
print("imported", flush=True)
sys.stdin.readline()
if kind == "wsgi":
    from wsgiref.util import setup_testing_defaults
    environ = {}
    setup_testing_defaults(environ)
    body = b"".join(app(environ, lambda status, headers, exc_info=None: None))
elif kind == "asgi":
    import asyncio
    sent = []
    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}
    async def send(message):
        sent.append(message)
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "GET", "scheme": "http", "path": "/", "raw_path": b"/",
             "query_string": b"", "root_path": "", "headers": [(b"host", b"localhost")],
             "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1)}
    asyncio.run(app(scope, receive, send))
else:
    event = {"version": "2.0", "rawPath": "/", "rawQueryString": "", "headers": {},
             "requestContext": {"http": {"method": "GET", "path": "/"}}, "body": "",
             "isBase64Encoded": False}
    app(event, None)
print("served", flush=True)
sys.stdin.read()
"""


def baseline(fleet: Fleet, found: dict[str, Any], k: int) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    procs: list[subprocess.Popen[str]] = []
    try:
        started: dict[str, list[tuple[subprocess.Popen[str], float]]] = {}
        for v in fleet.variants:
            dirs = found["dirs"].get(v.name, [])
            for where in (dirs * k)[:k]:  # its own functions' dirs (repeated if fewer than k)
                module = v.file.removesuffix(".py")
                t0 = time.perf_counter()
                p = subprocess.Popen(
                    [
                        sys.executable,
                        "-S",
                        "-c",
                        DRIVER,
                        str(where),
                        module,
                        v.attr,
                        v.kind,
                        *found["packages"].get(v.name, []),
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                procs.append(p)
                # one at a time: the start time is a fresh interpreter's, uncontended
                _expect(p, "imported")
                started.setdefault(v.name, []).append((p, (time.perf_counter() - t0) * 1e3))
        time.sleep(1.0)
        idle = {name: [smaps(p.pid) for p, _ in ps] for name, ps in started.items()}
        first: dict[str, list[float]] = {}
        for name, ps in started.items():
            for p, _ in ps:
                t0 = time.perf_counter()
                assert p.stdin is not None
                p.stdin.write("\n")
                p.stdin.flush()
                _expect(p, "served")
                first.setdefault(name, []).append((time.perf_counter() - t0) * 1e3)
        time.sleep(1.0)
        served = {name: [smaps(p.pid) for p, _ in ps] for name, ps in started.items()}
        for name, ps in started.items():
            a = [m for m in idle[name] if m]
            b = [m for m in served[name] if m]
            out[name] = {
                "k": len(ps),
                "idle": _means(a),
                "served": _means(b),
                "import_ms_p50": statistics.median(ms for _, ms in ps),
                "first_request_ms_p50": statistics.median(first[name]),
                "cold_ms_p50": statistics.median(ms for _, ms in ps)
                + statistics.median(first[name]),
            }
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
    return out


def _expect(p: subprocess.Popen[str], word: str) -> None:
    assert p.stdout is not None
    line = p.stdout.readline().strip()
    if line != word:
        p.kill()
        raise RuntimeError(f"baseline process: expected {word!r}, got {line!r}")


def _means(samples: list[dict[str, int]]) -> dict[str, float]:
    return {
        "pss_mean": statistics.fmean(m["pss"] for m in samples),
        "uss_mean": statistics.fmean(m["uss"] for m in samples),
        # the pages these k processes share, counted once (they exist once however many)
        "shared_total": float(sum(m["pss"] - m["uss"] for m in samples)),
    }


def extrapolate(
    fleet: Fleet, base: dict[str, dict[str, Any]], n: int, state: str
) -> dict[str, float]:
    """A process per function for the first ``n`` functions of the fleet, per variant from
    its k measured processes: ``linear`` scales their mean PSS; ``floor`` scales only their
    private memory (USS) and counts their shared pages once (at N processes each shared page
    is divided among more of them): the smaller figure, the one the goals are judged on."""
    counts = Counter(v.name for _n, _t, v in layout(fleet.variants, n))
    linear = floor = 0.0
    for name, count in counts.items():
        m = base[name][state]
        linear += count * m["pss_mean"]
        # (fewer than the k measured: their share of those pages, as PSS counts it)
        floor += count * m["uss_mean"] + m["shared_total"] * min(1.0, count / base[name]["k"])
    return {"linear": linear, "floor": floor}


# ---------------------------------------------------------------------- the run


def run(ctx: BenchContext) -> dict[str, Any]:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # ~4 fds per snapshot or worker
    # /var/tmp, not a tmpfs /tmp: the package store and uv's cache are disk-sized
    root = Path(tempfile.mkdtemp(prefix="hourai-density-", dir="/var/tmp"))
    root.chmod(0o711)  # tenants' uids pass through to their code and packages
    logging.getLogger("hourai.function").propagate = False  # 1000 functions' output
    try:
        return _run(ctx, root)
    finally:
        logging.getLogger("hourai.function").propagate = True
        shutil.rmtree(root, ignore_errors=True)


def _run(ctx: BenchContext, root: Path) -> dict[str, Any]:
    t_start = time.perf_counter()
    fleet = choose_fleet(ctx, root)
    size = tenant_size(fleet.variants)
    steps = [size, 2 * size] if ctx.quick else _steps(ctx)
    warm_until = int(os.environ.get("HOURAI_DENSITY_WARM_UNTIL") or steps[-1])
    k = 2 if ctx.quick else 10
    repeats = 1 if ctx.quick else 5
    print(f"fleet: {fleet.note}", flush=True)
    print(
        f"tenants of {size} functions each, the same mix in each: "
        + ", ".join(f"{v.per_tenant} {v.name}" for v in fleet.variants),
        flush=True,
    )
    cache = root / "uv-cache"
    part1 = deploys_and_cold(fleet, root, cache, repeats)
    points, found, deploys = density(fleet, root, cache, steps, warm_until)
    print(f"baseline: {k} plain processes per variant", flush=True)
    base = baseline(fleet, found, k)
    for p in points:
        p["baseline"] = {
            "idle": extrapolate(fleet, base, p["functions"], "idle"),
            "served": extrapolate(fleet, base, p["functions"], "served"),
        }
    result = _report(fleet, size, part1, points, base, deploys, k)
    result["wall_s"] = time.perf_counter() - t_start
    _plot(points, ctx.path("density.png"))
    ctx.path("density.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _steps(ctx: BenchContext) -> list[int]:
    given = os.environ.get("HOURAI_DENSITY_STEPS")
    return [int(s) for s in given.split(",")] if given else [100, 300, 1000]


def _report(
    fleet: Fleet,
    size: int,
    part1: dict[str, Any],
    points: list[dict[str, Any]],
    base: dict[str, dict[str, Any]],
    deploys: list[dict[str, Any]],
    k: int,
) -> dict[str, Any]:
    rows = []
    for p in points:
        res, b = p["resident"], p["baseline"]
        row = [
            p["functions"],
            p["tenants"],
            p["zygotes"],
            f"{p['snapshots_on_zygotes']} ({p['moved']})",
            res["pss"] / GIB,
            b["idle"]["floor"] / GIB,
            b["idle"]["floor"] / res["pss"],
        ]
        if "warm" in p:
            warm = p["warm"]
            row += [
                warm["pss"] / GIB,
                b["served"]["floor"] / GIB,
                b["served"]["floor"] / warm["pss"],
            ]
        else:
            row += ["-", "-", "-"]
        rows.append(row)
    print()
    print(
        table(
            [
                "functions",
                "tenants",
                "zygotes",
                "on zygotes (moved)",
                "resident GiB",
                "process/fn GiB",
                "x denser",
                "warm GiB",
                "process/fn GiB",
                "x denser",
            ],
            rows,
        )
    )
    last = points[-1]
    print(f"\nby role at N={last['functions']} (PSS MiB, processes):")
    for state in ("resident", "warm"):
        if state in last:
            roles = last[state]["by_role"]
            print(
                f"  {state}: "
                + ", ".join(
                    f"{r} {m['pss'] / MIB:.0f} ({m['processes']})" for r, m in roles.items()
                )
            )
    warm_points = [p for p in points if "warm" in p]
    at = warm_points[-1] if warm_points else last
    variant_rows = []
    for v in fleet.variants:
        mem = at["resident"]["by_variant"].get(v.name, {})
        warm = at.get("warm", {}).get("by_variant", {}).get(v.name, {})
        b = base[v.name]
        variant_rows.append(
            [
                v.name,
                mem.get("zygote_pss_mean", 0) / MIB,
                mem.get("zygotes", 0),
                mem.get("snapshot_pss_mean", 0) / MIB,
                mem.get("snapshot_uss_mean", 0) / MIB,
                warm.get("worker_uss_mean", 0) / MIB,
                b["idle"]["pss_mean"] / MIB,
                b["idle"]["uss_mean"] / MIB,
                b["served"]["uss_mean"] / MIB,
            ]
        )
    print(f"\nper process at N={at['functions']}, MiB (baseline: {k} processes per variant)")
    print(
        table(
            [
                "variant",
                "zygote PSS",
                "zygotes",
                "snapshot PSS",
                "snapshot USS",
                "worker USS",
                "process PSS",
                "process USS",
                "USS served",
            ],
            variant_rows,
        )
    )
    deploy_rows, by_case = _deploy_table(fleet, part1["deploys"], deploys)
    print("\ndeploy, ms (total = packages + code + snapshot build)")
    print(
        table(
            ["case", *[v.name for v in fleet.variants]],
            deploy_rows,
        )
    )
    cold_rows = []
    for v in fleet.variants:
        c = part1["cold"].get(v.name, {})
        with_zygote = c.get("with zygote", {})
        cold_rows.append(
            [
                v.name,
                # (a function without packages has no zygote: its snapshot forks from the root)
                with_zygote.get("p50_ms", 0.0) if with_zygote.get("built_on_zygote") else "-",
                with_zygote.get("p99_ms", 0.0) if with_zygote.get("built_on_zygote") else "-",
                with_zygote.get("init_ms_p50", 0.0) if with_zygote.get("built_on_zygote") else "-",
                c.get("no zygote", {}).get("p50_ms", 0.0),
                c.get("no zygote", {}).get("init_ms_p50", 0.0),
                c.get("no zygote", {}).get("warm_request_ms_p50", 0.0),
                base[v.name]["cold_ms_p50"],
            ]
        )
    print("\ntrue cold start (snapshot build to first answer), ms")
    print(
        table(
            [
                "variant",
                "zygote resident p50",
                "p99",
                "its init",
                "no zygote p50",
                "its init",
                "warm request",
                "fresh interpreter p50",
            ],
            cold_rows,
        )
    )
    goals = _goals(fleet, points, part1, by_case)
    print("\ngoals:")
    for name, g in goals.items():
        verdict = "met" if g["met"] else "NOT met"
        print(f"  {name}: {g['value']:.3g} (goal {g['goal']}) -> {verdict}")
    return {
        "fleet": fleet.note,
        "real_packages": fleet.real,
        "variants": {
            v.name: {"shape": v.shape, "requirements": v.requirements, "per_tenant": v.per_tenant}
            for v in fleet.variants
        },
        "tenant_size": size,
        "assumption": (
            f"tenants of {size} functions with the same mix each (N/{size} tenants); tenants "
            "never share a zygote. Baseline: k plain interpreters per variant, extrapolated per "
            "variant (floor: their USS times the count, their shared pages once)"
        ),
        "baseline_k": k,
        "points": points,
        "baseline": base,
        "deploys": part1["deploys"],
        "deploy_summary": by_case,
        "fleet_deploys": deploys,
        "cold": part1["cold"],
        "goals": goals,
    }


def _deploy_table(
    fleet: Fleet, rows: list[dict[str, Any]], fleet_deploys: list[dict[str, Any]]
) -> tuple[list[list[object]], dict[str, dict[str, dict[str, float]]]]:
    by_case: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in rows:
        by_case.setdefault(r["case"], {}).setdefault(r["variant"], []).append(r)
    seen: set[str] = set()
    for r in fleet_deploys:
        # the fleet's own deploys: the first of each variant installs (warm cache), the
        # rest find their packages stored, their group's zygote resident or not yet
        case = "fleet: packages stored" if r["variant"] in seen else "fleet: first of a variant"
        seen.add(r["variant"])
        by_case.setdefault(case, {}).setdefault(r["variant"], []).append(r)
    summary: dict[str, dict[str, dict[str, float]]] = {}
    table_rows: list[list[object]] = []
    for case, per in by_case.items():
        summary[case] = {}
        cells: list[object] = [case]
        for v in fleet.variants:
            samples = per.get(v.name, [])
            if not samples:
                cells.append("-")
                continue
            s = {
                key: statistics.median(r[key] for r in samples)
                for key in ("total_ms", "packages_ms", "build_ms")
            }
            s["n"] = len(samples)
            summary[case][v.name] = s
            cells.append(f"{s['total_ms']:.0f} ({s['packages_ms']:.0f}+{s['build_ms']:.0f})")
        table_rows.append(cells)
    return table_rows, summary


def _goals(
    fleet: Fleet,
    points: list[dict[str, Any]],
    part1: dict[str, Any],
    by_case: dict[str, dict[str, dict[str, float]]],
) -> dict[str, dict[str, Any]]:
    last = points[-1]
    n = last["functions"]
    res = last["resident"]["pss"]
    goals: dict[str, dict[str, Any]] = {
        f"{n} functions snapshot-resident, GiB PSS": {
            "value": res / GIB,
            "goal": f"<= {GOALS['resident_gib']:g}",
            "met": res <= GOALS["resident_gib"] * GIB,
        },
        "snapshot-resident, x denser than a process per function": {
            "value": last["baseline"]["idle"]["floor"] / res,
            "goal": f">= {GOALS['resident_x']:g}",
            "met": last["baseline"]["idle"]["floor"] >= GOALS["resident_x"] * res,
        },
    }
    warm_points = [p for p in points if "warm" in p]
    if warm_points:
        w = warm_points[-1]
        x = w["baseline"]["served"]["floor"] / w["warm"]["pss"]
        goals[f"{w['functions']} functions with a warm worker each, x denser"] = {
            "value": x,
            "goal": f">= {GOALS['warm_x']:g}",
            "met": x >= GOALS["warm_x"],
        }
    pandas = [v.name for v in fleet.variants if v.shape == "pandas"]
    colds = [part1["cold"][v]["with zygote"]["p50_ms"] for v in pandas if v in part1["cold"]]
    if colds:
        goals["pandas true cold with its zygote, p50 ms (worst pin set)"] = {
            "value": max(colds),
            "goal": f"<= {GOALS['pandas_cold_ms']:g}",
            "met": max(colds) <= GOALS["pandas_cold_ms"],
        }
    stored = by_case.get("packages stored", {})
    if stored:
        worst = max(s["total_ms"] for s in stored.values())
        goals["deploy with cached packages, p50 ms (worst variant)"] = {
            "value": worst,
            "goal": f"<= {GOALS['deploy_cached_ms']:g}",
            "met": worst <= GOALS["deploy_cached_ms"],
        }
    return goals


def _plot(points: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter, ScalarFormatter

    n = [p["functions"] for p in points]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    series: list[tuple[str, str, Callable[[dict[str, Any]], float | None]]] = [
        ("o-", "hourai, snapshot-resident", lambda p: p["resident"]["pss"]),
        ("o--", "hourai, a warm worker each", lambda p: p.get("warm", {}).get("pss")),
        ("s-", "process per function (floor)", lambda p: p["baseline"]["idle"]["floor"]),
        ("s--", "process per function, served once", lambda p: p["baseline"]["served"]["floor"]),
    ]
    for style, label, get in series:
        xs = [x for x, p in zip(n, points, strict=True) if get(p) is not None]
        ys = [get(p) / GIB for p in points if get(p) is not None]  # type: ignore[operator]
        ax.plot(xs, ys, style, label=label)
    ax.axhline(GOALS["resident_gib"], color="grey", lw=0.8, ls=":", label="4 GiB goal")
    ax.set_xlabel("functions")
    ax.set_ylabel("total PSS (GiB)")
    # log-log: N grows tenfold and memory with it; plain numbers on the ticks
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(n)
    low, high = ax.get_ylim()
    ax.set_yticks([t for t in (0.125 * 2**i for i in range(12)) if low <= t <= high])
    ax.set_ylim(low, high)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        axis.set_minor_formatter(NullFormatter())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    bx.plot(
        n,
        [p["baseline"]["idle"]["floor"] / p["resident"]["pss"] for p in points],
        "o-",
        label="snapshot-resident",
    )
    warm = [p for p in points if "warm" in p]
    bx.plot(
        [p["functions"] for p in warm],
        [p["baseline"]["served"]["floor"] / p["warm"]["pss"] for p in warm],
        "o--",
        label="a warm worker each",
    )
    bx.axhline(GOALS["resident_x"], color="C0", lw=0.8, ls=":", label="goal, resident")
    bx.axhline(GOALS["warm_x"], color="C1", lw=0.8, ls=":", label="goal, warm")
    bx.set_xscale("log")
    bx.set_xticks(n)
    bx.xaxis.set_major_formatter(ScalarFormatter())
    bx.xaxis.set_minor_formatter(NullFormatter())
    bx.set_xlabel("functions")
    bx.set_ylabel("x denser than a process per function")
    bx.set_ylim(bottom=0)
    bx.grid(alpha=0.3)
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
