"""The adaptive policy running live in a real runtime, on a compressed clock.

One policy minute is 0.1 s here, so a pattern that takes hours on a real host plays out in
seconds; the processes, cgroups and measurements are real.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path

import psutil
import pytest
from conftest import FUNCTIONS, REPO

from hourai.daemon import Runtime, RuntimeSettings
from hourai.ingress import Request
from hourai.isolate.loader import resolve_target
from hourai.registry import build_spec
from hourai.scheduler.core import FunctionLimits
from hourai.scheduler.policy import PolicyParams

POLICY = FUNCTIONS / "policy"
SPIN = REPO / "bench" / "functions" / "spin.py"
COMPRESSED = dict(
    bin_s=0.1,
    range_s=24.0,
    linger_s=0.1,
    min_keep_alive_s=0.3,
    max_keep_alive_s=24.0,
    fallback_keep_alive_s=1.5,
    max_prewarm_s=60.0,
    tenant_resize_interval_s=0.5,
    cpu_demand_halflife_s=1.0,
)


def _request(path: str = "/") -> Request:
    return Request("GET", path, path, "", [], b"", "1.1", ("127.0.0.1", 1), ("127.0.0.1", 2), True)


async def _deploy(  # type: ignore[no-untyped-def]
    runtime: Runtime, name: str, file: Path | str, tenant: str, keep_alive: float = 0.5
):
    spec = build_spec(
        runtime.codestore,
        name,
        resolve_target(str(file)),
        tenant=tenant,
        limits=FunctionLimits(spares=0, keep_alive=keep_alive),
    )
    await runtime.deploy(spec)
    return spec


def _snapshot_pid(runtime: Runtime, name: str) -> int | None:
    for (fn, _), version in runtime.versions.items():
        if fn == name and version.handle is not None and version.handle.pid:
            return version.handle.pid
    return None


async def _until(predicate, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


def test_steady_function_stays_warm_and_a_forgotten_one_is_released() -> None:
    async def scenario() -> None:
        runtime = Runtime(RuntimeSettings(policy=PolicyParams(**COMPRESSED)))
        await runtime.start()
        try:
            steady = await _deploy(runtime, "steady", POLICY / "cheap.py", "alpha")
            once = await _deploy(runtime, "once", POLICY / "cheap.py", "beta")
            assert (await runtime.invoke(once, _request(), "", "/")).status == 200
            once_snapshot = _snapshot_pid(runtime, "once")
            starts = []
            steady_snapshot = _snapshot_pid(runtime, "steady")
            # Every 0.05 s, i.e. every 30 s at the real scale ("every few seconds" is
            # shorter still), for 3 s = 30 policy minutes.
            for _ in range(60):
                reply = await runtime.invoke(steady, _request(), "", "/")
                starts.append(dict(reply.headers)["x-hourai-start"])
                await asyncio.sleep(0.05)
            # steady: never rebuilt, the same snapshot throughout
            assert "cold" not in starts, (starts, runtime.resources.explain("steady"))
            assert _snapshot_pid(runtime, "steady") == steady_snapshot
            # once: released after its keep-alive, its process gone
            await _until(lambda: _snapshot_pid(runtime, "once") is None)
            assert once_snapshot is not None and not psutil.pid_exists(once_snapshot)
            explained = runtime.resources.explain("once")  # type: ignore[union-attr]
            assert explained["actions"].get("unloaded", 0) >= 1
            # and it comes back on demand
            reply = await runtime.invoke(once, _request(), "", "/")
            assert dict(reply.headers)["x-hourai-start"] == "cold"
        finally:
            await runtime.stop()

    asyncio.run(scenario())


def test_under_a_tight_budget_the_cheapest_to_rebuild_goes_first_then_work_is_refused() -> None:
    async def scenario() -> None:
        params = PolicyParams(**{**COMPRESSED, "fallback_keep_alive_s": 600.0})
        runtime = Runtime(RuntimeSettings(policy=params))
        resources = runtime.resources
        assert resources is not None
        await runtime.start()
        unloaded: list[str] = []
        original = runtime.unload

        def record(name: str, reason: str = "unloaded") -> None:
            unloaded.append(name)
            original(name, reason)

        runtime.unload = record  # type: ignore[method-assign]
        try:
            cheap = await _deploy(runtime, "cheap", POLICY / "cheap.py", "alpha")
            dear = await _deploy(runtime, "dear", POLICY / "dear.py", "beta")

            await _until(lambda: resources.measured("cheap") and resources.measured("dear"))
            costs = {n: resources.explain(n)["costs"] for n in ("cheap", "dear")}
            assert costs["dear"]["rebuild_s"] > costs["cheap"]["rebuild_s"]
            for spec in (cheap, dear):
                assert (await runtime.invoke(spec, _request(), "", "/")).status == 200
            # The host budget drops to 1 MiB (a config reload): neither snapshot fits; both
            # go, the cheapest to rebuild first.
            resources.policy.set_memory_budget(1 << 20)
            await _until(lambda: len(unloaded) >= 2)
            assert unloaded[:2] == ["cheap", "dear"], costs
            # with nothing left to evict, a rebuild is refused with a reason, not attempted
            reply = await runtime.invoke(cheap, _request(), "", "/")
            assert reply.status == 503
            assert b"memory" in reply.body
        finally:
            await runtime.stop()

    asyncio.run(scenario())


@pytest.fixture(autouse=True)
def _uvloop_free_policy() -> None:
    """These tests drive the runtime with asyncio.run on the default loop."""
    asyncio.set_event_loop_policy(None)


def test_what_the_policy_learned_survives_a_restart(tmp_path) -> None:
    state_dir = Path(tempfile.mkdtemp(prefix="hourai-test-"))
    state_dir.chmod(0o711)

    async def first_life() -> dict:
        runtime = Runtime(RuntimeSettings(state_dir=state_dir, policy=PolicyParams(**COMPRESSED)))
        await runtime.start()
        try:
            spec = await _deploy(runtime, "steady", POLICY / "cheap.py", "alpha")
            for _ in range(6):  # idle gaps of ~3 policy minutes, recorded in the histogram
                await runtime.invoke(spec, _request(), "", "/")
                await asyncio.sleep(0.3)
            await runtime.invoke(spec, _request(), "", "/")
            return runtime.resources.policy.export_state("steady")  # type: ignore[union-attr]
        finally:
            await runtime.stop()

    async def second_life() -> dict:
        runtime = Runtime(RuntimeSettings(state_dir=state_dir, policy=PolicyParams(**COMPRESSED)))
        await runtime.start()
        try:
            await _deploy(runtime, "steady", POLICY / "cheap.py", "alpha")
            return runtime.resources.policy.export_state("steady")  # type: ignore[union-attr]
        finally:
            await runtime.stop()

    try:
        learned = asyncio.run(first_life())
        assert learned["samples"] >= 5  # idle times it has seen
        assert asyncio.run(second_life()) == learned
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


def _cgroup_dir(pid: int | None, controller: str) -> Path:
    """The v1 cgroup directory of ``pid``'s group in ``controller``."""
    assert pid is not None
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return Path("/sys/fs/cgroup", controller) / path.lstrip("/")
    raise AssertionError(f"{pid} is in no {controller} cgroup")


def _read(directory: Path, name: str) -> int:
    return int((directory / name).read_text())


def _v1_cgroups() -> str | None:
    if os.geteuid() != 0:
        return "needs root: per-tenant cgroups are only made by a root daemon"
    if not Path("/sys/fs/cgroup/cpu/cpu.shares").exists():
        return "needs the cgroup v1 cpu hierarchy"
    return None


@pytest.mark.skipif(_v1_cgroups() is not None, reason=_v1_cgroups() or "")
def test_a_cpu_hog_never_lowers_a_quiet_tenants_cpu_share() -> None:
    async def scenario() -> None:
        # Snapshots stay loaded throughout: the test is about tenant limits, not keep-alive.
        params = {**COMPRESSED, "min_samples": 1000, "fallback_keep_alive_s": 600.0}
        runtime = Runtime(RuntimeSettings(policy=PolicyParams(**params)))
        await runtime.start()
        stop = asyncio.Event()
        try:
            hog = await _deploy(runtime, "hog", SPIN, "busy")
            quiet = await _deploy(runtime, "quiet", POLICY / "cheap.py", "quiet")
            hog_cpu = _cgroup_dir(_snapshot_pid(runtime, "hog"), "cpu")
            quiet_cpu = _cgroup_dir(_snapshot_pid(runtime, "quiet"), "cpu")

            async def burn() -> None:
                while not stop.is_set():
                    await runtime.invoke(hog, _request("/?s=0.3"), "", "/")

            burners = [asyncio.create_task(burn()) for _ in range(2)]  # both cores
            # 4 s is 8 resizes with the hog's demand far above the quiet tenant's.
            for _ in range(8):
                assert (await runtime.invoke(quiet, _request(), "", "/")).status == 200
                await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*burners)
            tenants = runtime.resources.policy.tenant_stats()  # type: ignore[union-attr]
            assert tenants["busy"]["cpu_demand_cores"] > 5 * tenants["quiet"]["cpu_demand_cores"]
            # What the kernel has: both at the default share (cpu.weight 100 = 1024 shares).
            assert _read(quiet_cpu, "cpu.shares") == 1024
            assert _read(hog_cpu, "cpu.shares") == 1024
        finally:
            stop.set()
            await runtime.stop()

    asyncio.run(scenario())


@pytest.mark.skipif(_v1_cgroups() is not None, reason=_v1_cgroups() or "")
def test_memory_sizing_never_sets_a_soft_limit_below_what_the_tenant_uses() -> None:
    async def scenario() -> None:
        # The real resize interval (30 s): a jump in use must not wait for it.
        params = {
            **COMPRESSED,
            "min_samples": 1000,
            "fallback_keep_alive_s": 600.0,
            "min_keep_alive_s": 20.0,
            "tenant_resize_interval_s": 30.0,
        }
        runtime = Runtime(RuntimeSettings(policy=PolicyParams(**params)))
        await runtime.start()
        try:
            leaky = f"{FUNCTIONS / 'behave.py'}:leaky"
            quiet = await _deploy(runtime, "quiet", leaky, "quiet", keep_alive=60.0)
            memory = _cgroup_dir(_snapshot_pid(runtime, "quiet"), "memory")
            await asyncio.sleep(1.0)  # a quiet history: a few MiB, read ten times a second
            for _ in range(8):  # then 24 MiB more per call
                assert (await runtime.invoke(quiet, _request(), "", "/")).status == 200
            await asyncio.sleep(0.5)  # a few policy ticks after the last reading
            soft = _read(memory, "memory.soft_limit_in_bytes")
            usage = _read(memory, "memory.usage_in_bytes")
            assert usage > 192 << 20
            tenant = runtime.resources.policy.tenant_stats()["quiet"]  # type: ignore[union-attr]
            assert soft >= usage, (soft, usage, tenant)
        finally:
            await runtime.stop()

    asyncio.run(scenario())
