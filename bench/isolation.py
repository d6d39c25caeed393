"""Isolation under load: a light tenant's latency beside a noisy neighbour.

One hourai serves two tenants: ``light``, whose call is a fixed amount of CPU work (~40 ms
alone), and a neighbour that is quiet, a CPU hog (spins on every core), a memory hog (holds
and rewrites 96 MiB per call on every core) or a fork bomb (forks until its pids limit, each
process spinning). Every tenant has the same explicit limits (256 MiB, 64 pids, no CPU
quota): the defaults a host would give. The light tenant's latency is measured for each
neighbour with the adaptive policy off and on, side by side in one run, and each is given as
a ratio to the light tenant alone in the same mode. The goal: p50 within 2x of alone.

With the policy on, its tenant sizing runs sped up (a resize every second, CPU demand with a
2 s half-life), so a few seconds of hogging show what hours would on a real host.

The daemon runs in a child process (``python -m bench.isolation serve ...``), so the load
generator's threads never share an interpreter lock with the runtime they measure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import parse_qs

from bench.common import BenchContext, summarize, table
from bench.httpclient import Client

FUNCTIONS = Path(__file__).resolve().parent / "functions"
REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20

# The limits every tenant gets (hourai has no defaults of its own yet).
MEMORY_MAX = 256 * MiB
PIDS_MAX = 64
LIGHT_WORK = 1_000_000  # loop iterations: ~40 ms alone on the reference 2-core VM
GOAL_RATIO = 2.0

# neighbour -> (function file, request path, how many callers: None = one per core, timeout s)
HOGS: dict[str, tuple[str, str, int | None, float] | None] = {
    "alone": None,
    "cpu hog": ("spin.py", "/hog/?s=0.5", None, 60.0),
    "memory hog": ("memhog.py", "/hog/?mb=96&s=0.5", None, 60.0),
    "fork bomb": ("forkbomb.py", "/hog/", 1, 2.0),
}
MODES = ("adaptive off", "adaptive on")


class IsolationServer:
    """The daemon of one case, as a child; stopped by closing its stdin, then by pid."""

    def __init__(self, adaptive: bool, hog: tuple[str, str, int | None, float] | None) -> None:
        args = [sys.executable, "-m", "bench.isolation", "serve"]
        if adaptive:
            args.append("--adaptive")
        if hog is not None:
            args += ["--hog", str(FUNCTIONS / hog[0]), "--hog-timeout", str(hog[3])]
        self.proc = subprocess.Popen(
            args,
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("READY"):
            self.stop()
            raise RuntimeError(f"isolation server did not start: {line!r}")
        self.port = int(line.split()[1])

    def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def measure(adaptive: bool, neighbour: str, n: int, settle: float) -> dict[str, object]:
    hog = HOGS[neighbour]
    srv = IsolationServer(adaptive, hog)
    stop = threading.Event()
    statuses: Counter[int] = Counter()
    callers: list[threading.Thread] = []
    try:
        light = Client(srv.port)
        for _ in range(10):  # warm: a worker up, its first calls behind it
            light.get(f"/light/?n={LIGHT_WORK}")
        # Alone first, in the same daemon: on a shared machine the pair is what compares.
        alone = _light_samples(light, n)
        if hog is not None:
            _, path, count, _ = hog

            def call() -> None:
                c = Client(srv.port, timeout=120)
                while not stop.is_set():
                    status = c.get(path)[0]
                    statuses[status] += 1
                    if status != 200 and status != 504:
                        time.sleep(0.05)  # refused: do not turn the bench into a flood
                c.close()

            callers = [threading.Thread(target=call) for _ in range(count or os.cpu_count() or 2)]
            for t in callers:
                t.start()
            time.sleep(settle)  # the neighbour is up, and the policy has seen it
        pids_peak = 0
        samples = []
        if hog is not None:
            for _ in range(4):
                samples += _light_samples(light, n // 4)
                pids_peak = max(pids_peak, _tenant(light, "hog")["pids"])
        result: dict[str, object] = dict(summarize(samples or alone))
        result["alone_p50_ms"] = summarize(alone)["p50_ms"]
        result["p50_ratio"] = round(result["p50_ms"] / result["alone_p50_ms"], 2)  # type: ignore[operator]
        result["light_cpu_shares"] = _tenant(light, "light")["cpu_shares"]
        if hog is not None:
            result["neighbour_statuses"] = dict(sorted(statuses.items()))
            result["neighbour_pids_peak"] = pids_peak
            result["neighbour_cpu_shares"] = _tenant(light, "hog")["cpu_shares"]
        light.close()
        return result
    finally:
        stop.set()
        for t in callers:
            t.join(60)
        srv.stop()


def _light_samples(client: Client, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        status, _headers, _body, ms = client.get(f"/light/?n={LIGHT_WORK}")
        if status != 200:
            raise RuntimeError(f"light tenant got HTTP {status}")
        samples.append(ms)
        time.sleep(0.02)
    return samples


def _tenant(client: Client, name: str) -> dict:
    status, _headers, body, _ms = client.get(f"/__bench/tenant?name={name}")
    if status != 200:
        raise RuntimeError(f"tenant stats for {name}: HTTP {status}")
    return json.loads(body)


def run(ctx: BenchContext) -> dict:
    n, settle = (4, 0.5) if ctx.quick else (40, 3.0)
    result: dict[str, object] = {
        "limits": {"memory_max": MEMORY_MAX, "pids_max": PIDS_MAX, "cpu_max": None},
        "light_work_iterations": LIGHT_WORK,
        "goal_p50_ratio": GOAL_RATIO,
    }
    for mode in MODES:
        cases = {}
        for neighbour in HOGS:
            cases[neighbour] = measure(mode == "adaptive on", neighbour, n, settle)
        result[mode] = cases
    rows = []
    for neighbour in HOGS:
        row: list[object] = [neighbour]
        for mode in MODES:
            stats = result[mode][neighbour]  # type: ignore[index]
            row += [stats["p50_ms"], f"{stats['p50_ratio']:.2f}x", stats["p99_ms"]]
        rows.append(row)
    headers = ["light tenant beside"]
    for mode in MODES:
        headers += [f"{mode}: p50 ms", "p50 / alone", "p99 ms"]
    print(table(headers, rows))
    ratios = [
        result[mode][neighbour]["p50_ratio"]  # type: ignore[index]
        for mode in MODES
        for neighbour in HOGS
    ]
    result["worst_p50_ratio"] = max(ratios)
    result["within_goal"] = max(ratios) <= GOAL_RATIO
    print(
        f"worst p50 ratio {max(ratios):.2f}x (goal <= {GOAL_RATIO:g}x); "
        f"limits per tenant: memory {MEMORY_MAX // MiB} MiB, pids {PIDS_MAX}"
    )
    ctx.path("isolation.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


# --------------------------------------------------------------------------- the daemon side


async def serve(args: argparse.Namespace) -> None:
    from hourai.cgroup import TenantLimits
    from hourai.daemon import Router, Runtime, RuntimeSettings, http_handler
    from hourai.ingress import Request, Response, serve
    from hourai.isolate.loader import resolve_target
    from hourai.registry import build_spec
    from hourai.scheduler.core import FunctionLimits
    from hourai.scheduler.policy import PolicyParams

    policy = (
        PolicyParams(tenant_resize_interval_s=1.0, cpu_demand_halflife_s=2.0)
        if args.adaptive
        else None
    )
    runtime = Runtime(RuntimeSettings(policy=policy))
    await runtime.start()
    limits = TenantLimits(memory_max=MEMORY_MAX, pids_max=PIDS_MAX)
    functions = [("light", str(FUNCTIONS / "work.py"), 60.0)]
    if args.hog:
        functions.append(("hog", args.hog, args.hog_timeout))
    for name, path, timeout in functions:
        await runtime.deploy(
            build_spec(
                runtime.codestore,
                name,
                resolve_target(path),
                tenant=name,
                limits=FunctionLimits(spares=0, max_workers=8, queue_max=1000, timeout=timeout),
                resources=limits,
            )
        )
    forward = http_handler(runtime, Router(runtime.functions, single=None))

    def cpu_shares(name: str) -> int | None:
        """The tenant's cpu.shares as the kernel has it (v1), found through one of its pids."""
        for pid in runtime.cgroups.pids(name):
            try:
                for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
                    _, controllers, path = line.split(":", 2)
                    if "cpu" in controllers.split(","):
                        return int(
                            Path("/sys/fs/cgroup/cpu", path.lstrip("/"), "cpu.shares").read_text()
                        )
            except (OSError, ValueError):
                continue
        return None

    def tenant(name: str) -> Response:
        usage = runtime.cgroups.usage(name)
        doc = {
            "pids": usage.pids,
            "memory_bytes": usage.memory_current,
            "cpu_shares": cpu_shares(name),
        }
        return Response(200, [("content-type", "application/json")], json.dumps(doc).encode())

    async def handle(request: Request) -> Response:
        if request.path == "/__bench/tenant":
            return tenant(parse_qs(request.query)["name"][-1])
        return await forward(request)

    server = await serve(handle, "127.0.0.1", 0)
    print("READY", server.sockets[0].getsockname()[1], flush=True)
    try:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    finally:
        server.close()
        await runtime.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.isolation")
    sub = parser.add_subparsers(dest="command", required=True)
    srv = sub.add_parser("serve", help="the daemon of one case (used by the benchmark)")
    srv.add_argument("--adaptive", action="store_true")
    srv.add_argument("--hog", help="the neighbour's function file")
    srv.add_argument("--hog-timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    import uvloop

    uvloop.run(serve(args))


if __name__ == "__main__":
    main()
