"""Isolation under load: tenant B's latency while tenant A burns CPU.

One embedded hourai serves two tenants: A's function spins the CPU for as long as it is
asked, B's is the hello handler. B's warm latency is measured three ways in one run: alone,
while A keeps both cores busy with no limit, and while A is held to `--cpu 0.5` (its cgroup's
CPU quota). Needs root for the quota; without it that row says why it is missing.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path

from bench.coldstart import HELLO
from bench.common import BenchContext, summarize, table
from bench.httpclient import Client

SPIN = Path(__file__).resolve().parent / "functions" / "spin.py"


class TwoTenants:
    """An embedded runtime on its own thread and loop, serving /a/ (spin) and /b/ (hello)."""

    def __init__(self, cpu_limit: float | None) -> None:
        self.cpu_limit = cpu_limit
        self.ready = threading.Event()
        self.port = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        if not self.ready.wait(60) or self.error:
            raise RuntimeError(f"isolation server did not start: {self.error}")

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # surfaced to the caller through self.error
            self.error = exc
            self.ready.set()

    async def _main(self) -> None:
        from hourai.cgroup import TenantLimits
        from hourai.daemon import Router, Runtime, RuntimeSettings, http_handler
        from hourai.ingress import serve
        from hourai.isolate.loader import resolve_target
        from hourai.registry import build_spec
        from hourai.scheduler.core import FunctionLimits

        runtime = Runtime(RuntimeSettings(policy=None))
        await runtime.start()
        limits = FunctionLimits(spares=0, max_workers=4, timeout=60)
        a_res = TenantLimits(cpu_max=self.cpu_limit) if self.cpu_limit else None
        await runtime.deploy(
            build_spec(
                runtime.codestore,
                "a",
                resolve_target(str(SPIN)),
                tenant="tenant-a",
                limits=limits,
                resources=a_res,
            )
        )
        await runtime.deploy(
            build_spec(
                runtime.codestore, "b", resolve_target(str(HELLO)), tenant="tenant-b", limits=limits
            )
        )
        server = await serve(http_handler(runtime, Router(runtime.functions)), "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self.stop = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        self.ready.set()
        await self.stop.wait()
        server.close()
        await runtime.stop()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(30)


def measure(cpu_limit: float | None, load: bool, n: int) -> list[float]:
    srv = TwoTenants(cpu_limit)
    burners: list[threading.Thread] = []
    stop = threading.Event()
    try:
        b = Client(srv.port)
        for _ in range(20):
            b.get("/b/")  # warm B up
        if load:

            def burn() -> None:
                c = Client(srv.port)
                while not stop.is_set():
                    c.get("/a/?s=0.5")
                c.close()

            burners = [threading.Thread(target=burn) for _ in range(2)]  # both cores
            for t in burners:
                t.start()
            time.sleep(1.0)  # A's workers are up and spinning
        samples = []
        for _ in range(n):
            samples.append(b.get("/b/")[3])
            time.sleep(0.01)
        b.close()
        return samples
    finally:
        stop.set()
        for t in burners:
            t.join(30)
        srv.close()


def run(ctx: BenchContext) -> dict:
    n = 30 if ctx.quick else 300
    rows = []
    result: dict[str, object] = {}
    cases = [("B alone", None, False), ("B while A burns CPU, no limit", None, True)]
    if os.geteuid() == 0:
        cases.append(("B while A burns CPU, A held to 0.5 cpu", 0.5, True))
    else:
        result["quota_skipped"] = "needs root: cgroup CPU quotas are set by a root daemon"
    for label, cpu, load in cases:
        stats = summarize(measure(cpu, load, n))
        result[label] = stats
        rows.append([label, stats["n"], stats["p50_ms"], stats["p99_ms"]])
    print(table(["case", "n", "B p50 ms", "B p99 ms"], rows))
    ctx.path("isolation.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
