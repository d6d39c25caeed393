"""The registry survives restarts exactly, and a damaged file is an error, not an empty one."""

from __future__ import annotations

import pytest
from conftest import EXAMPLES

from hourai.cgroup import TenantLimits
from hourai.codestore import CodeStore
from hourai.isolate.loader import resolve_target
from hourai.registry import build_spec
from hourai.scheduler.core import FunctionLimits
from hourai.state import Registry, StateError


def test_versions_round_trip_through_the_file(tmp_path) -> None:
    store = CodeStore(tmp_path / "code")
    spec = build_spec(
        store,
        "hello",
        resolve_target(str(EXAMPLES / "hello" / "handler.py")),
        tenant="acme",
        env={"A": "1"},
        limits=FunctionLimits(spares=0, timeout=5),
        resources=TenantLimits(memory_max=128 << 20),
    )
    reg = Registry(tmp_path)
    reg.add_version(spec)
    reg.activate("hello", spec.version)
    again = Registry(tmp_path)  # a restart
    assert again.active_spec(store, "hello") == spec


def test_a_refused_first_version_leaves_nothing(tmp_path) -> None:
    store = CodeStore(tmp_path / "code")
    spec = build_spec(store, "hello", resolve_target(str(EXAMPLES / "hello" / "handler.py")))
    reg = Registry(tmp_path)
    reg.add_version(spec)
    reg.drop_version("hello", spec.version)
    assert Registry(tmp_path).functions == {}


@pytest.mark.parametrize(
    "content", ['{"schema": 1, "functions": {', "", '{"schema": 99, "functions": {}}', "[]"]
)
def test_a_damaged_registry_is_reported_not_dropped(tmp_path, content: str) -> None:
    (tmp_path / "registry.json").write_text(content)
    with pytest.raises(StateError, match=r"registry\.json"):
        Registry(tmp_path)
