"""The daemon's TOML config and the function options schema."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from hypothesis import given
from hypothesis import strategies as st

from hourai.config import (
    FUNCTION_OPTIONS,
    Address,
    Config,
    ConfigError,
    default_socket,
    default_state_dir,
    effective_limits,
    load_config,
    parse_config,
    parse_function_options,
    restart_only_changes,
)

FULL = """
listen = ["127.0.0.1:8080", "[::1]:9090"]
domain = "fn.example.com."
state_dir = "/srv/hourai"
socket = "/run/hourai/control.sock"
socket_group = "root"
metrics_listen = "0.0.0.0:9100"
cgroup_backend = "v1"
cgroup_subtree = "tenants"
uid_range = [70000, 70999]
preload = ["json", "email.utils"]
memory_budget = "8G"
max_host_workers = 400
adaptive = false
drain_timeout = 5
deploy_timeout = 60.5
ready_timeout = 90
keep_versions = 3

[log]
format = "json"
level = "warning"
access = false
function_max_size = "1M"
function_files = 2

[packages]
index_url = "https://pypi.example.com/simple"
extra_index_urls = ["https://more.example.com/simple"]
find_links = ["/srv/wheels"]
cache_dir = "/var/cache/hourai-uv"

[defaults]
tenant = "shared"
timeout = 10
keep_alive = 0
spares = 0
max_workers = 4
max_inflight = 6
concurrency = 2
queue_max = 16
queue_timeout = 2.5
max_requests = 1000
worker_memory = "256M"
max_response_size = "1M"
rate = 50
burst = 10
min_warm = 1
memory = "512M"
cpu = "500m"
pids = 64
tmp_size = "64M"
async_retries = 1
async_max_age = 3600
async_retry_delay = 30
async_concurrency = 2
async_timeout = 900
"""


def parse(text: str) -> Config:
    import tomllib

    return parse_config(tomllib.loads(text), "test.toml")


def test_defaults_need_no_file(monkeypatch) -> None:
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    config = load_config(None)
    assert config.listen == (Address("127.0.0.1", 8080),)
    assert config.state_dir == Path("/var/lib/hourai")
    assert config.socket_path == Path("/var/lib/hourai/control.sock")
    assert config.cgroup_backend == "auto" and config.cgroup_subtree == "hourai"
    assert config.uid_range == (61184, 65519)
    assert config.drain_timeout == 30 and config.keep_versions == 10
    assert config.function_defaults()["timeout"] == 30.0
    assert config.log.format == "text" and config.log.access


def test_systemd_and_client_environment() -> None:
    assert default_state_dir({"STATE_DIRECTORY": "/var/lib/x:/var/lib/y"}) == Path("/var/lib/x")
    assert default_socket({"STATE_DIRECTORY": "/var/lib/x"}) == Path("/var/lib/x/control.sock")
    assert default_socket({"HOURAI_SOCKET": "/tmp/s", "STATE_DIRECTORY": "/x"}) == Path("/tmp/s")
    assert default_socket({}) == Path("/var/lib/hourai/control.sock")


def test_every_key_is_read() -> None:
    config = parse(FULL)
    assert config.listen == (Address("127.0.0.1", 8080), Address("::1", 9090))
    assert str(config.listen[1]) == "[::1]:9090"
    assert config.domain == "fn.example.com"
    assert config.state_dir == Path("/srv/hourai")
    assert config.socket_path == Path("/run/hourai/control.sock")
    assert config.socket_group == "root"
    assert config.metrics_listen == Address("0.0.0.0", 9100)
    assert (config.cgroup_backend, config.cgroup_subtree) == ("v1", "tenants")
    assert config.uid_range == (70000, 70999)
    assert config.preload == ("json", "email.utils")
    assert config.memory_budget == 8 << 30 and config.max_host_workers == 400
    assert config.adaptive is False
    assert (config.drain_timeout, config.deploy_timeout, config.ready_timeout) == (5, 60.5, 90)
    assert config.keep_versions == 3
    assert config.log.format == "json" and config.log.level == "warning"
    assert config.log.access is False
    assert (config.log.function_max_size, config.log.function_files) == (1 << 20, 2)
    packages = config.packages
    assert packages.index_url == "https://pypi.example.com/simple"
    assert packages.extra_index_urls == ("https://more.example.com/simple",)
    assert packages.find_links == ("/srv/wheels",)
    assert packages.cache_dir == Path("/var/cache/hourai-uv") and packages.no_index is False
    defaults = config.function_defaults()
    assert defaults["memory"] == 512 << 20 and defaults["cpu"] == 0.5
    assert defaults["worker_memory"] == 256 << 20 and defaults["keep_alive"] == 0.0
    assert defaults["tmp_size"] == 64 << 20
    assert (defaults["async_retries"], defaults["async_timeout"]) == (1, 900.0)
    assert defaults["max_response_size"] == 1 << 20
    assert config.default_tenant == "shared"
    # every option of the schema appears in the sample, so the sample documents them all
    assert set(FUNCTION_OPTIONS) <= set(config.defaults)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("colour = 1", "unknown key 'colour'"),
        ("[log]\ncolour = 1", "[log]: unknown key 'colour'"),
        ("[packages]\nindex = 'x'", "[packages]: unknown key 'index'"),
        ("[packages]\nno_index = true", "[packages] no_index needs find_links"),
        ("[tracing]\nendpoint = 'localhost:4318'", "[tracing] endpoint: must be an http://"),
        ("[tracing]\nprotocol = 'zipkin'", "[tracing] protocol: must be one of http/protobuf"),
        ("[tracing]\nsample_ratio = 2", "[tracing] sample_ratio: must be between 0 and 1"),
        ("[tracing]\nsampling = 1", "[tracing]: unknown key 'sampling'"),
        ("[defaults]\ncolour = 1", "[defaults]: unknown key 'colour'"),
        ("[defaults]\nentry = 'app'", "[defaults]: unknown key 'entry'"),
        ("[defaults]\nenv = {A = 'b'}", "[defaults]: unknown key 'env'"),
        ("listen = ['nope']", "listen: expected HOST:PORT"),
        ("listen = ['127.0.0.1:99999']", "listen: bad port '99999'"),
        ("listen = ['::1:80']", "listen: write an IPv6 address in brackets"),
        ("listen = 8080", "listen: must be a list"),
        ("metrics_listen = 'localhost'", "metrics_listen: expected HOST:PORT"),
        ("state_dir = 'relative/dir'", "state_dir: must be an absolute path"),
        ("socket = 3", "socket: must be a string"),
        ("socket_group = 'no-such-group-here'", "socket_group: no such group"),
        ("cgroup_backend = 'v3'", "cgroup_backend: must be one of auto, v2, v1, none"),
        ("cgroup_subtree = 'a/b'", "cgroup_subtree: 'a/b' is not a valid cgroup name"),
        ("uid_range = [70000, 60000]", "uid_range: need 1 <= FIRST <= LAST"),
        ("uid_range = [1]", "uid_range: must be [FIRST, LAST]"),
        ("preload = ['not a module']", "preload: 'not a module' is not a module name"),
        ("memory_budget = 'lots'", "memory_budget: invalid size 'lots'"),
        ("max_host_workers = 0", "max_host_workers: must be at least 1"),
        ("adaptive = 'yes'", "adaptive: must be true or false"),
        ("drain_timeout = -1", "drain_timeout: must be at least 0"),
        ("deploy_timeout = 0", "deploy_timeout: must be greater than 0"),
        ("keep_versions = 0", "keep_versions: must be at least 1"),
        ("[log]\nformat = 'xml'", "[log] format: must be one of text, json"),
        ("[log]\nlevel = 'loud'", "[log] level: must be one of debug, info"),
        ("[log]\nfunction_files = 0", "[log] function_files: must be at least 1"),
        ("[defaults]\ntimeout = -1", "[defaults] timeout: must be greater than 0, got -1"),
        ("[defaults]\ntimeout = true", "[defaults] timeout: must be a number"),
        ("[defaults]\nspares = 1.5", "[defaults] spares: must be an integer"),
        ("[defaults]\nmemory = '12 parsecs'", "[defaults] memory: invalid size"),
        ("[defaults]\ncpu = '0'", "[defaults] cpu: invalid CPU amount"),
        ("[defaults]\ntenant = 'Not_OK'", "[defaults] tenant: bad tenant name"),
        ("[defaults]\nspares = 9", "[defaults]: spares (9) cannot exceed max_workers (8)"),
        ("[defaults]\nmin_warm = 9", "[defaults]: min_warm (9) cannot exceed max_workers (8)"),
        ("[defaults]\nburst = 3", "[defaults]: burst must come with a rate"),
        ("defaults = 3", "[defaults] must be a table"),
    ],
)
def test_bad_keys_and_values_are_refused_with_the_key_named(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse(text)
    assert message in str(exc.value)
    assert str(exc.value).startswith("test.toml")


def test_a_socket_path_too_long_for_unix_sockets_is_refused() -> None:
    with pytest.raises(ConfigError, match="longer than the 107 bytes"):
        parse(f"socket = '/{'x' * 120}/control.sock'")
    with pytest.raises(ConfigError, match="longer than the 107 bytes"):
        load_config(None, state_dir=Path("/" + "y" * 120))


def test_file_errors_and_flags_over_the_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("listen = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)
    good = tmp_path / "good.toml"
    good.write_text('state_dir = "/srv/a"\nlisten = ["127.0.0.1:1"]\n')
    config = load_config(
        good, state_dir=tmp_path / "s", listen=["127.0.0.1:0", "127.0.0.2:5"], socket=None
    )
    assert config.state_dir == tmp_path / "s" and config.source == good
    assert config.listen == (Address("127.0.0.1", 0), Address("127.0.0.2", 5))
    assert config.socket_path == tmp_path / "s" / "control.sock"
    with pytest.raises(ConfigError, match="--listen: expected HOST:PORT"):
        load_config(good, listen=["oops"])


def test_options_from_flags_toml_and_json_mean_the_same() -> None:
    from_flags = parse_function_options(
        {"timeout": "2.5", "spares": "0", "memory": "128M", "cpu": "500m", "pids": 10}, "deploy"
    )
    from_toml = parse_function_options(
        {"timeout": 2.5, "spares": 0, "memory": 128 << 20, "cpu": 0.5, "pids": 10}, "hourai.toml"
    )
    assert from_flags == from_toml
    assert parse_function_options({"env": {"A": "1"}, "kind": "wsgi"}, "x") == {
        "env": {"A": "1"},
        "kind": "wsgi",
    }
    with pytest.raises(ConfigError, match="env: A: the value must be a string"):
        parse_function_options({"env": {"A": 1}}, "x")
    with pytest.raises(ConfigError, match="kind: must be one of handler, asgi, wsgi"):
        parse_function_options({"kind": "cgi"}, "x")


def test_effective_limits_overlay_the_defaults() -> None:
    defaults = parse_function_options({"timeout": 10, "spares": 0, "memory": "64M"}, "d")
    limits = effective_limits(defaults, parse_function_options({"timeout": 3}, "o"))
    assert limits.function.timeout == 3.0 and limits.function.spares == 0
    assert limits.tenant is not None and limits.tenant.memory_max == 64 << 20
    # min_warm is carried out as pre-forked spares
    warm = effective_limits(defaults, {"min_warm": 3})
    assert (warm.min_warm, warm.function.spares) == (3, 3)
    assert effective_limits({}, {}).tenant is None
    with pytest.raises(ConfigError, match=r"min_warm \(9\) cannot exceed max_workers \(8\)"):
        effective_limits({}, {"min_warm": 9})


_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
)


@given(st.dictionaries(st.sampled_from([*FUNCTION_OPTIONS, "entry", "kind", "env", "x"]), _values))
def test_any_options_are_accepted_or_refused_by_name_never_crash(options: dict) -> None:
    try:
        parsed = parse_function_options(options, "fuzz")
        effective_limits({}, parsed)
    except ConfigError as exc:
        assert str(exc).startswith("fuzz") or "cannot exceed" in str(exc) or "must" in str(exc)


def test_what_a_reload_cannot_change_is_named() -> None:
    old = parse('listen = ["127.0.0.1:1"]\n[defaults]\ntimeout = 5\n')
    new = parse('listen = ["127.0.0.1:2"]\npreload = ["json"]\n[defaults]\ntimeout = 6\n')
    assert restart_only_changes(old, new) == ["listen", "preload"]


def test_hourai_daemon_refuses_a_bad_config_at_start(tmp_path) -> None:
    config = tmp_path / "hourai.toml"
    config.write_text("[defaults]\ntimeout = 0\n")
    result = subprocess.run(
        [sys.executable, "-m", "hourai", "daemon", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 2
    assert f"{config}: [defaults] timeout: must be greater than 0" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_every_key_is_documented_in_the_readme_with_its_default() -> None:
    """The README's configuration reference is the contract: no key may be missing from it."""
    from hourai.config import LOG_KEYS, PACKAGES_KEYS, TOP_KEYS, TRACING_KEYS

    readme = (REPO / "README.md").read_text()
    assert "### Configuration reference" in readme, "README.md lacks the daemon's config reference"
    section = readme[readme.index("### Configuration reference") :]
    rows = {
        line.split("|")[1].strip(): line for line in section.splitlines() if line.startswith("| `")
    }
    missing = [k for k in TOP_KEYS if f"`{k}`" not in rows]
    missing += [f"[log] {k}" for k in LOG_KEYS if f"`[log] {k}`" not in rows]
    missing += [f"[packages] {k}" for k in PACKAGES_KEYS if f"`[packages] {k}`" not in rows]
    missing += [f"[tracing] {k}" for k in TRACING_KEYS if f"`[tracing] {k}`" not in rows]
    missing += [k for k in FUNCTION_OPTIONS if f"`{k}`" not in rows]
    assert not missing, f"README.md does not document {missing}"
    assert all(len(row.split("|")) >= 4 and row.split("|")[2].strip() for row in rows.values())


def test_tracing_is_off_unless_enabled_and_read_whole() -> None:
    assert parse("").tracing.enabled is False
    tracing = parse(
        "[tracing]\nenabled = true\nendpoint = 'http://127.0.0.1:4318/v1/traces'\n"
        "protocol = 'grpc'\nsample_ratio = 0.25\nservice_name = 'edge'\ntimeout = 2\n"
        "max_queue_size = 100\n"
    ).tracing
    assert tracing.enabled and tracing.protocol == "grpc" and tracing.sample_ratio == 0.25
    assert (tracing.service_name, tracing.timeout, tracing.max_queue_size) == ("edge", 2.0, 100)
