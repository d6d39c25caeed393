"""Density: how many functions, each with its snapshot and one warm worker, fit in memory.

hourai: N copies of a small function (each its own code dir, so nothing is deduplicated but
what fork shares) are deployed to one runtime and called once, so each has a snapshot and a
warm worker; memory is the PSS (and USS) summed over the whole tree: daemon, root zygote,
snapshots, workers. Baseline: N ordinary Python processes, each importing the same function
and waiting, summed the same way. N grows in steps, measured at each.
"""

from __future__ import annotations

import asyncio
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from bench.common import BenchContext, table

FUNCTION = '''"""A small function with a module-level table, like a config or a model lookup."""

import json

TABLE = {{f"key{{i}}": i * {seed} for i in range(2000)}}


def handler(event, context):
    return json.dumps({{"value": TABLE["key7"], "path": event["rawPath"]}})
'''


def tree_memory(root_pid: int) -> dict[str, int]:
    """PSS and USS summed over a process and all its descendants."""
    pss = uss = n = 0
    root = psutil.Process(root_pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            info = proc.memory_full_info()
        except psutil.Error:
            continue
        pss += info.pss
        uss += info.uss
        n += 1
    return {"pss": pss, "uss": uss, "processes": n}


class Embedded:
    """A runtime on its own thread and event loop, driven from the benchmark's thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runtime = self.call(self._start())

    def call(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(600)

    async def _start(self):  # type: ignore[no-untyped-def]
        from hourai.cgroup import TenantLimits
        from hourai.daemon import Runtime, RuntimeSettings

        # All N functions are one tenant's: without the default tenant limits, which a
        # thousand snapshots and workers would pass.
        runtime = Runtime(RuntimeSettings(policy=None, tenant_defaults=TenantLimits()))
        await runtime.start()
        return runtime

    async def deploy_and_warm(self, name: str, path: Path) -> None:
        from hourai.ingress import Request
        from hourai.isolate.loader import resolve_target
        from hourai.registry import build_spec
        from hourai.scheduler.core import FunctionLimits

        rt = self.runtime
        spec = build_spec(
            rt.codestore,
            name,
            resolve_target(str(path)),
            limits=FunctionLimits(spares=0, keep_alive=3600),
        )
        await rt.deploy(spec)
        request = Request("GET", "/", "/", "", [], b"", "1.1", ("127.0.0.1", 1), ("", 0), True)
        response = await rt.invoke(spec, request, "", "/")
        assert response.status == 200, response.body

    def stop(self) -> None:
        self.call(self.runtime.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


def run(ctx: BenchContext) -> dict:
    steps = [5, 10] if ctx.quick else [100, 250, 500, 1000]
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # ~3 fds per function
    code_root = Path(tempfile.mkdtemp(prefix="hourai-density-"))
    for i in range(steps[-1]):
        d = code_root / f"f{i}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "handler.py").write_text(FUNCTION.format(seed=i))
    points: list[dict] = []
    hourai = Embedded()
    baseline: list[subprocess.Popen[bytes]] = []
    deployed = 0
    try:
        for n in steps:
            t0 = time.perf_counter()
            for i in range(deployed, n):
                hourai.call(hourai.deploy_and_warm(f"f{i}", code_root / f"f{i}" / "handler.py"))
            deploy_s = time.perf_counter() - t0
            deployed = n
            # The runtime lives in this process (its daemon side) and under its root zygote.
            zygote = tree_memory(hourai.runtime.zygote.pid)
            me = psutil.Process().memory_full_info()
            mem = {
                "pss": zygote["pss"] + me.pss,
                "uss": zygote["uss"] + me.uss,
                "processes": zygote["processes"] + 1,
            }
            for i in range(len(baseline), n):
                baseline.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-c",
                            "import sys; sys.path.insert(0, sys.argv[1]); import handler; "
                            "sys.stdin.read()",
                            str(code_root / f"f{i}"),
                        ],
                        stdin=subprocess.PIPE,
                    )
                )
            time.sleep(1.0 + n / 200)  # let the baseline processes finish importing
            base = {"pss": 0, "uss": 0}
            for p in baseline:
                try:
                    info = psutil.Process(p.pid).memory_full_info()
                except psutil.Error:
                    continue
                base["pss"] += info.pss
                base["uss"] += info.uss
            points.append(
                {
                    "functions": n,
                    "hourai_pss": mem["pss"],
                    "hourai_uss": mem["uss"],
                    "hourai_processes": mem["processes"],
                    "hourai_deploy_s_per_function": deploy_s
                    / max(1, n - (points[-1]["functions"] if points else 0)),
                    "baseline_pss": base["pss"],
                    "baseline_uss": base["uss"],
                }
            )
    finally:
        hourai.stop()
        for p in baseline:
            p.kill()
        for p in baseline:
            p.wait()
        shutil.rmtree(code_root, ignore_errors=True)
    rows = [
        [
            p["functions"],
            p["hourai_pss"] / 2**20,
            p["hourai_pss"] / p["functions"] / 2**20,
            p["baseline_pss"] / 2**20,
            p["baseline_pss"] / p["functions"] / 2**20,
            p["baseline_pss"] / p["hourai_pss"],
            p["hourai_deploy_s_per_function"] * 1000,
        ]
        for p in points
    ]
    print(
        table(
            [
                "functions",
                "hourai PSS MiB",
                "per fn MiB",
                "process-per-fn PSS MiB",
                "per fn MiB",
                "x denser",
                "deploy ms/fn",
            ],
            rows,
        )
    )
    _plot(points, ctx.path("density.png"))
    last = points[-1]
    result = {
        "points": points,
        "goals": {
            "functions": last["functions"],
            "total_pss_gib": last["hourai_pss"] / 2**30,
            "within_4_gib": last["hourai_pss"] <= 4 * 2**30,
            "x_denser": last["baseline_pss"] / last["hourai_pss"],
            "at_least_8x": last["baseline_pss"] >= 8 * last["hourai_pss"],
        },
    }
    ctx.path("density.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [p["functions"] for p in points]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(
        n,
        [p["hourai_pss"] / 2**30 for p in points],
        "o-",
        label="hourai (snapshot + warm worker each)",
    )
    ax.plot(
        n,
        [p["baseline_pss"] / 2**30 for p in points],
        "s-",
        label="one Python process per function",
    )
    ax.set_xlabel("functions")
    ax.set_ylabel("total PSS (GiB)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
