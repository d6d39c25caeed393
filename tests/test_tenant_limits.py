"""Tenant limits are a property of the tenant: set explicitly, never dropped by a deploy,
the same after a restart, with defaults for every tenant, read back from the kernel."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from conftest import FUNCTIONS, wait_until
from hypothesis import given
from hypothesis import strategies as st

from hourai.cgroup import TenantLimits, detect, merge_declared
from hourai.client import Client
from hourai.config import ConfigError, parse_config

PROBE = str(FUNCTIONS / "tenant_probe.py")
NO_SPARES = "[defaults]\nspares = 0\n"


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root: tenant cgroups are only made by a root daemon"
    backend = detect("auto", subtree="hourai-probe")
    if backend.name == "none":
        return f"no usable cgroup hierarchy on this host: {backend.describe()}"
    return None


needs_cgroups = pytest.mark.skipif(_why_not() is not None, reason=_why_not() or "")


def _kernel(subtree: str, tenant: str) -> TenantLimits:
    """Straight from the cgroup files, not through the backend under test."""
    backend = detect("auto", subtree=subtree)
    dirs = {Path(d).parts[4]: Path(d, tenant) for d in backend.subtree_dirs()}
    memory = int((dirs["memory"] / "memory.limit_in_bytes").read_text())
    quota = int((dirs["cpu"] / "cpu.cfs_quota_us").read_text())
    pids = (dirs["pids"] / "pids.max").read_text().strip()
    return TenantLimits(
        memory_max=None if memory > 1 << 60 else memory,
        cpu_max=None if quota < 0 else quota / int((dirs["cpu"] / "cpu.cfs_period_us").read_text()),
        pids_max=None if pids == "max" else int(pids),
    )


@needs_cgroups
def test_a_deploy_that_declares_one_limit_drops_no_other(hourai_daemon) -> None:
    d = hourai_daemon(NO_SPARES)
    d.cli("deploy", "big", PROBE, "--tenant", "acme", "--memory", "128M", "--cpu", "0.5")
    d.cli("deploy", "small", PROBE, "--tenant", "acme", "--pids", "64")
    want = TenantLimits(memory_max=128 << 20, cpu_max=0.5, pids_max=64)
    assert _kernel(d.subtree, "acme") == want
    # what the user is shown is what the kernel has (with whatever the adaptive policy sized)
    for shown in (
        d.cli_json("show", "small")["tenant_limits"],
        d.cli_json("stats")["tenants"]["acme"]["limits"],
    ):
        assert {"memory 128 MiB", "cpu 0.5", "pids 64"} <= set(shown.split(", ")), shown
    # ... and it holds: the first function cannot take a GiB
    reply = d.get("/big/alloc")
    assert reply.status == 502 and b"OOM" in reply.body
    # the same after a restart, whatever order the functions are restored in
    d.stop()
    again = hourai_daemon(NO_SPARES)
    assert again.get("/small/whoami").status == 200
    assert _kernel(again.subtree, "acme") == want
    # removing the function that declared memory and cpu lowers the tenant back
    again.cli("rm", "big")
    assert _kernel(again.subtree, "acme") == TenantLimits(memory_max=2 << 30, pids_max=64)


@needs_cgroups
def test_every_tenant_has_default_limits_the_operator_can_change(hourai_daemon) -> None:
    d = hourai_daemon(NO_SPARES)
    d.cli("deploy", "plain", PROBE, "--tenant", "plain")
    assert _kernel(d.subtree, "plain") == TenantLimits(memory_max=2 << 30, pids_max=1024)
    d.stop()
    d = hourai_daemon(
        NO_SPARES + '[tenant_defaults]\npids = 100\n[tenants.vip]\nmemory = "64M"\n'
        'pids = "unlimited"\n'
    )
    d.cli("deploy", "plain", PROBE, "--tenant", "plain")
    d.cli("deploy", "vip", PROBE, "--tenant", "vip", "--memory", "512M")
    assert _kernel(d.subtree, "plain") == TenantLimits(pids_max=100)  # memory: not limited
    # the operator's word on a tenant wins over what its functions ask for
    assert _kernel(d.subtree, "vip") == TenantLimits(memory_max=64 << 20)
    # and is applied on reload
    d.config.write_text(d.config.read_text().replace('memory = "64M"', 'memory = "96M"'))
    d.proc.send_signal(signal.SIGHUP)
    d.wait_for(r"config reloaded")
    wait_until(lambda: _kernel(d.subtree, "vip").memory_max == 96 << 20)
    assert Client(d.socket).health()[0] == 200


@given(
    st.lists(
        st.builds(
            TenantLimits,
            memory_max=st.none() | st.integers(1, 1 << 40),
            cpu_max=st.none() | st.floats(0.01, 64),
            pids_max=st.none() | st.integers(1, 1 << 20),
        ),
        max_size=6,
    ),
    st.randoms(),
)
def test_what_functions_declare_together_is_order_free_and_drops_nothing(
    declared: list[TenantLimits], rnd
) -> None:  # type: ignore[no-untyped-def]
    merged = merge_declared(declared)
    shuffled = list(declared)
    rnd.shuffle(shuffled)
    assert merge_declared(shuffled) == merged
    for limits in declared:
        for name in ("memory_max", "cpu_max", "pids_max"):
            if getattr(limits, name) is not None:
                assert getattr(merged, name) >= getattr(limits, name)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[tenant_defaults]\ncolour = 1", "[tenant_defaults]: unknown key 'colour'"),
        ("[tenants.acme]\nmemory = 'lots'", "[tenants.acme] memory"),
        ("[tenants.Bad_Name]\npids = 1", "[tenants.Bad_Name]: bad tenant name"),
        ("[tenants]\nacme = 1", "[tenants.acme] must be a table"),
    ],
)
def test_bad_tenant_limits_are_refused_with_the_key_named(text: str, message: str) -> None:
    import tomllib

    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(tomllib.loads(text))
