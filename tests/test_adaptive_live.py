"""The adaptive policy running live in a real runtime, on a compressed clock.

One policy minute is 0.1 s here, so a pattern that takes hours on a real host plays out in
seconds; the processes, cgroups and measurements are real.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import psutil
import pytest
from conftest import FUNCTIONS

from hourai.daemon import Runtime, RuntimeSettings
from hourai.ingress import Request
from hourai.isolate.loader import resolve_target
from hourai.registry import build_spec
from hourai.scheduler.core import FunctionLimits
from hourai.scheduler.policy import PolicyParams

POLICY = FUNCTIONS / "policy"
COMPRESSED = dict(
    bin_s=0.1,
    range_s=24.0,
    linger_s=0.1,
    min_keep_alive_s=0.3,
    max_keep_alive_s=24.0,
    fallback_keep_alive_s=1.5,
    max_prewarm_s=60.0,
    tenant_resize_interval_s=0.5,
)


def _request(path: str = "/") -> Request:
    return Request("GET", path, path, "", [], b"", "1.1", ("127.0.0.1", 1), ("127.0.0.1", 2), True)


async def _deploy(runtime: Runtime, name: str, file: Path, tenant: str):  # type: ignore[no-untyped-def]
    spec = build_spec(
        runtime.codestore,
        name,
        resolve_target(str(file)),
        tenant=tenant,
        limits=FunctionLimits(spares=0, keep_alive=0.5),
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
