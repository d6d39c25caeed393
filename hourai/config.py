"""The daemon's configuration: a TOML file, checked whole before anything starts.

Every key has a default (the README's table lists them all); an unknown key or a bad value
is refused with the key named (``[defaults] timeout: must be greater than 0, got -1``), at
start and on a SIGHUP reload alike, so a typo never silently becomes a default.

Function options (timeout, memory, min_warm, ...) have one schema, :data:`FUNCTION_OPTIONS`,
shared by the config's ``[defaults]`` table, a function's ``hourai.toml``, the control API
and ``hourai deploy``'s flags: one spelling and one meaning everywhere.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import math
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hourai.cgroup import DEFAULT_TENANT_LIMITS, CgroupError, TenantLimits, is_valid_name
from hourai.registry import check_name
from hourai.scheduler.core import FunctionLimits
from hourai.tenants import DEFAULT_UID_RANGE
from hourai.tracing import PROTOCOLS, TracingSettings
from hourai.units import parse_cpus, parse_size

DEFAULT_STATE_DIR = Path("/var/lib/hourai")
SOCKET_NAME = "control.sock"
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
KINDS = ("handler", "asgi", "wsgi")
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(Exception):
    """A bad configuration; the message names the file and the key."""


def default_state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """$STATE_DIRECTORY (set by systemd's StateDirectory=) or /var/lib/hourai."""
    env = os.environ if environ is None else environ
    given = env.get("STATE_DIRECTORY", "")
    # systemd joins several StateDirectory= entries with ':'; the first is ours.
    first = given.split(":")[0]
    return Path(first) if first else DEFAULT_STATE_DIR


def default_socket(environ: Mapping[str, str] | None = None) -> Path:
    """Where clients look for the daemon: $HOURAI_SOCKET, else the default state dir's."""
    env = os.environ if environ is None else environ
    given = env.get("HOURAI_SOCKET", "")
    return Path(given) if given else default_state_dir(env) / SOCKET_NAME


# ---------------------------------------------------------------------- value checkers


def _int(low: int | None = None) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, str) and value.strip().lstrip("-").isdigit():
                value = int(value)
            else:
                raise ValueError(f"must be an integer, got {value!r}")
        if low is not None and value < low:
            raise ValueError(f"must be at least {low}, got {value}")
        return value

    return check


def _float(low: float = 0.0, *, strict: bool = True) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        if isinstance(value, bool):
            raise ValueError(f"must be a number, got {value!r}")
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"must be a number, got {value!r}") from None
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"must be a number, got {value!r}")
        if value < low or (strict and value == low):
            relation = "greater than" if strict else "at least"
            raise ValueError(f"must be {relation} {low:g}, got {value:g}")
        return float(value)

    return check


def _size(value: Any) -> int:
    n = parse_size(value)
    if n < 1:
        raise ValueError(f"must be above 0, got {value!r}")
    return n


def _cpus(value: Any) -> float:
    return parse_cpus(value)


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {value!r}")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


def _choice(*choices: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}")
        return str(value)

    return check


def _tenant(value: Any) -> str:
    return check_name(_str(value), "tenant name")


def _env(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise ValueError(f'must be a table of NAME = "value", got {value!r}')
    out = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key or "=" in key or "\0" in key:
            raise ValueError(f"bad variable name {key!r}")
        if not isinstance(item, str) or "\0" in item:
            raise ValueError(f"{key}: the value must be a string, got {item!r}")
        out[key] = item
    return out


def _int_range(low: int, high: int) -> Callable[[Any], int]:
    base = _int(low)

    def check(value: Any) -> int:
        n = base(value)
        if n > high:
            raise ValueError(f"must be at most {high}, got {n}")
        return n

    return check


def _function_name(value: Any) -> str:
    return check_name(_str(value))


def _schedule(value: Any) -> str:
    from hourai.invocations.schedule import check

    return check(_str(value))


def _trigger(value: Any) -> dict[str, Any]:
    from hourai.invocations.triggers import parse_trigger

    return parse_trigger(value)


@dataclass(frozen=True)
class Option:
    parse: Callable[[Any], Any]
    default: Any
    doc: str


# The one schema of function options. Sizes and CPU amounts are kept as given to the user
# in messages but normalised to bytes and cores here.
FUNCTION_OPTIONS: dict[str, Option] = {
    "timeout": Option(_float(), 30.0, "seconds an invocation may run; then 504 and a new worker"),
    "keep_alive": Option(_float(strict=False), 60.0, "seconds an idle worker lives"),
    "spares": Option(_int(0), 1, "pre-forked idle workers kept ready"),
    "max_workers": Option(_int(1), 8, "workers of the function at most"),
    "concurrency": Option(
        _int(1), 1, "invocations one worker runs at once (1: process mode; >1: thread mode)"
    ),
    "max_inflight": Option(
        _int(1), None, "concurrent invocations (unset: max_workers x concurrency)"
    ),
    "queue_max": Option(_int(0), 256, "requests that may wait for a worker; beyond it 503"),
    "queue_timeout": Option(_float(), 10.0, "seconds a request may wait for a worker; then 503"),
    "max_requests": Option(_int(0), 0, "recycle a worker after N invocations (0: never)"),
    "worker_memory": Option(_size, None, "recycle a worker whose resident memory passes SIZE"),
    "max_response_size": Option(
        _size, 6 * 1024 * 1024, "largest response body (SIZE); a larger one is refused with 502"
    ),
    "rate": Option(_float(), None, "token-bucket rate limit in requests per second; beyond it 429"),
    "burst": Option(_int(1), None, "token-bucket size (unset: the rate rounded up)"),
    "min_warm": Option(
        _int(0), 0, "workers kept warm (ready before the daemon reports ready after a restart)"
    ),
    "memory": Option(_size, None, "the tenant's memory limit (its cgroup's memory maximum)"),
    "cpu": Option(_cpus, None, "the tenant's CPU quota in cores"),
    "pids": Option(_int(1), None, "the tenant's limit on processes and threads"),
    "tmp_size": Option(
        _size, 512 << 20, "size of the function's private /tmp and /dev/shm (charged to its tenant)"
    ),
    # Asynchronous invocations (Lambda's names: MaximumRetryAttempts, MaximumEventAgeInSeconds).
    "async_retries": Option(_int_range(0, 2), 2, "retries of a failed async invocation (0-2)"),
    "async_max_age": Option(
        _float(), 21600.0, "seconds an async event may wait, retries included; then dead letter"
    ),
    "async_retry_delay": Option(
        _float(strict=False), 60.0, "seconds before the first retry; doubled for the next"
    ),
    "async_concurrency": Option(
        _int(1), None, "async invocations in flight at most (unset: a quarter of the capacity)"
    ),
    "async_timeout": Option(_float(), None, "seconds an async invocation may run (unset: timeout)"),
}
# What a deploy may say beyond the limits (in hourai.toml, flags and the API).
DEPLOY_KEYS: dict[str, Callable[[Any], Any]] = {
    "entry": _str,
    "factory": _bool,
    "kind": _choice(*KINDS),
    "tenant": _tenant,
    "env": _env,
    # Where async results go (Lambda's destinations): another function, invoked async.
    "on_success": _function_name,
    "on_failure": _function_name,
    "schedule": _schedule,
    "trigger": _trigger,
    # imported by its snapshot before its code (and by its zygote: hourai.snapshot.tree)
    "preload": lambda value: _modules(value),  # (defined with the daemon keys below)
    # served by its snapshot before it forks (see hourai.isolate.worker.prime)
    "warmup": lambda value: parse_warmup(value),
}


def parse_function_options(
    values: Mapping[str, Any], where: str, *, deploy_keys: bool = True
) -> dict[str, Any]:
    """Check ``values`` against the option schema; returns them normalised.

    ``where`` prefixes every message (``"hourai.toml"``, ``"[defaults]"``). Unknown keys are
    refused; ``None`` values are dropped (JSON clients may send them for "not given").
    ``deploy_keys=False`` (the config's [defaults]) allows ``tenant`` but not entry, kind
    or env, which belong to one function.
    """
    extra = DEPLOY_KEYS if deploy_keys else {"tenant": DEPLOY_KEYS["tenant"]}
    out: dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            continue
        parse = FUNCTION_OPTIONS[key].parse if key in FUNCTION_OPTIONS else extra.get(key)
        if parse is None:
            known = ", ".join(sorted([*FUNCTION_OPTIONS, *extra]))
            raise ConfigError(f"{where}: unknown key {key!r} (known: {known})")
        try:
            out[key] = parse(value)
        except (ValueError, CgroupError) as exc:
            raise ConfigError(f"{where} {key}: {exc}") from None
    return out


@dataclass(frozen=True)
class Limits:
    """What a function runs with: the scheduler's limits, its tenant's, and min_warm."""

    function: FunctionLimits
    tenant: TenantLimits | None
    min_warm: int


def effective_limits(defaults: Mapping[str, Any], options: Mapping[str, Any]) -> Limits:
    """The defaults overlaid with a function's own options (both already parsed).

    ``min_warm`` is carried out as spares: ``spares = max(spares, min_warm)`` pre-forked
    workers are kept ready while the function's snapshot is loaded, which is what a warm
    worker is. Raises ConfigError naming the conflict.
    """
    merged = {k: o.default for k, o in FUNCTION_OPTIONS.items()}
    merged.update({k: v for k, v in defaults.items() if k in FUNCTION_OPTIONS})
    merged.update({k: v for k, v in options.items() if k in FUNCTION_OPTIONS})
    min_warm = merged["min_warm"]
    spares = max(merged["spares"], min_warm)
    if spares > merged["max_workers"]:
        what = "min_warm" if min_warm > merged["spares"] else "spares"
        raise ConfigError(f"{what} ({spares}) cannot exceed max_workers ({merged['max_workers']})")
    try:
        function = FunctionLimits(
            max_workers=merged["max_workers"],
            concurrency=merged["concurrency"],
            max_inflight=merged["max_inflight"],
            queue_max=merged["queue_max"],
            queue_timeout=merged["queue_timeout"],
            timeout=merged["timeout"],
            keep_alive=merged["keep_alive"],
            spares=spares,
            max_requests=merged["max_requests"],
            max_worker_memory=merged["worker_memory"],
            max_response_size=merged["max_response_size"],
            rate=merged["rate"],
            burst=merged["burst"],
            tmp_size=merged["tmp_size"],
        )
        tenant = None
        if any(merged[k] is not None for k in ("memory", "cpu", "pids")):
            tenant = TenantLimits(
                memory_max=merged["memory"], cpu_max=merged["cpu"], pids_max=merged["pids"]
            )
    except (ValueError, CgroupError) as exc:
        raise ConfigError(str(exc)) from None
    return Limits(function, tenant, min_warm)


# ---------------------------------------------------------------------- the daemon's config


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(value: Any) -> Address:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6); port 0 picks a free one."""
    text = _str(value).strip()
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, e.g. 127.0.0.1:8080, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"write an IPv6 address in brackets, e.g. [::1]:8080, got {text!r}")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"bad port {port!r} in {text!r}: expected 0-65535")
    return Address(host, int(port))


def _addresses(value: Any) -> tuple[Address, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ValueError(f'must be a list of "HOST:PORT" strings, got {value!r}')
    return tuple(parse_address(item) for item in items)


def _optional_address(value: Any) -> Address | None:
    return parse_address(value) if _str(value).strip() else None


def _uid_range(value: Any) -> tuple[int, int]:
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise ValueError(f"must be [FIRST, LAST], two integers, got {value!r}")
    lo, hi = value
    if not 1 <= lo <= hi < 2**32 - 1:
        raise ValueError(f"need 1 <= FIRST <= LAST, got {value!r}")
    return (lo, hi)


def _modules(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"must be a list of module names, got {value!r}")
    for name in value:
        if not all(part.isidentifier() for part in name.split(".")):
            raise ValueError(f"{name!r} is not a module name")
    return tuple(value)


WARMUP_MAX = 8  # requests a snapshot serves before it forks


def parse_warmup(value: Any) -> tuple[str, ...]:
    """``["/", "POST /render"]``: requests (``[METHOD ]PATH[?QUERY]``) its snapshot serves."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f'must be a list of requests such as ["/", "POST /x"], got {value!r}')
    if len(value) > WARMUP_MAX:
        raise ValueError(f"at most {WARMUP_MAX} warm-up requests, got {len(value)}")
    for request in value:
        method, _, path = request.rpartition(" ")
        if (
            not path.startswith("/")
            or len(request) > 1024
            or not path.isprintable()
            or (method and not (method.isalpha() and method.isupper()))
        ):
            raise ValueError(
                f"{request!r} is not a request: a path such as /status, after an optional "
                "method (GET /status)"
            )
    return tuple(value)


def _subtree(value: Any) -> str:
    name = _str(value)
    if not is_valid_name(name):
        raise ValueError(
            f"{name!r} is not a valid cgroup name: 1-63 of a-z, 0-9, '_', '.', '-', "
            "starting with a letter or digit"
        )
    return name


def _group(value: Any) -> str:
    name = _str(value)
    if name:
        import grp

        try:
            grp.getgrnam(name)
        except KeyError:
            raise ValueError(f"no such group {name!r}") from None
    return name


def _path(value: Any) -> Path | None:
    text = _str(value)
    if not text:
        return None
    path = Path(text)
    if not path.is_absolute():
        raise ValueError(f"must be an absolute path, got {text!r}")
    return path


def _optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if isinstance(value, str) and not value:
            return None
        return parse(value)

    return check


@dataclass(frozen=True)
class LogConfig:
    format: str = "text"
    level: str = "info"
    access: bool = True
    function_max_size: int = 10 << 20
    function_files: int = 5


@dataclass(frozen=True)
class PackagesConfig:
    """Where functions' declared dependencies come from (see hourai.packages)."""

    index_url: str | None = None  # None: uv's own default (its config, UV_INDEX_URL, PyPI)
    extra_index_urls: tuple[str, ...] = ()
    find_links: tuple[str, ...] = ()
    no_index: bool = False
    cache_dir: Path | None = None  # None: <state_dir>/packages/cache


@dataclass(frozen=True)
class Config:
    listen: tuple[Address, ...] = (Address("127.0.0.1", 8080),)
    domain: str | None = None
    state_dir: Path = field(default_factory=default_state_dir)
    socket: Path | None = None  # None: <state_dir>/control.sock
    socket_group: str = ""
    metrics_listen: Address | None = None
    lambda_listen: Address | None = None
    show_errors: bool = True
    cgroup_backend: str = "auto"
    cgroup_subtree: str = "hourai"
    uid_range: tuple[int, int] = DEFAULT_UID_RANGE
    preload: tuple[str, ...] = ()
    memory_budget: int | None = None
    max_host_workers: int | None = None
    adaptive: bool = True
    zygote_tree: bool = True
    drain_timeout: float = 30.0
    deploy_timeout: float = 120.0
    ready_timeout: float = 300.0
    keep_versions: int = 10
    async_retention: float = 86400.0
    dead_letter_retention: float = 14 * 86400.0
    log: LogConfig = field(default_factory=LogConfig)
    packages: PackagesConfig = field(default_factory=PackagesConfig)
    tracing: TracingSettings = field(default_factory=TracingSettings)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    # Tenants' cgroup limits: every tenant's unless said otherwise, and per tenant.
    tenant_defaults: TenantLimits = DEFAULT_TENANT_LIMITS
    tenants: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # field -> value
    source: Path | None = None  # the file it came from

    @property
    def socket_path(self) -> Path:
        return self.socket or self.state_dir / SOCKET_NAME

    @property
    def log_level(self) -> int:
        return int(logging.getLevelName(self.log.level.upper()))

    def function_defaults(self) -> dict[str, Any]:
        """Every function option with its value here (the schema's default where unset)."""
        out = {k: o.default for k, o in FUNCTION_OPTIONS.items()}
        out.update(self.defaults)
        return out

    @property
    def default_tenant(self) -> str:
        return str(self.defaults.get("tenant", "default"))


# key -> (parser, documentation); the README's reference table follows this order.
TOP_KEYS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "listen": (_addresses, "HTTP addresses for function traffic"),
    "domain": (_optional(lambda v: _str(v).strip(".").lower()), "route NAME.DOMAIN to NAME"),
    "state_dir": (_path, "registry, code store, logs"),
    "socket": (_path, "control API socket"),
    "socket_group": (_group, "group allowed to use the control socket"),
    "metrics_listen": (_optional_address, "extra TCP address serving /metrics and /healthz"),
    "lambda_listen": (_optional_address, "TCP address serving the Lambda Invoke API"),
    "show_errors": (_bool, "a function's 500 names the exception's type and message"),
    "cgroup_backend": (_choice("auto", "v2", "v1", "none"), "cgroup backend"),
    "cgroup_subtree": (_subtree, "directory under the daemon's cgroup that holds tenant groups"),
    "uid_range": (_uid_range, "uids given to tenants when running as root"),
    "preload": (_modules, "modules the root zygote imports once for every snapshot"),
    "memory_budget": (_optional(_size), "memory for snapshots and workers"),
    "max_host_workers": (_int(1), "workers over all functions at most"),
    "adaptive": (_bool, "run the adaptive keep-alive / eviction policy"),
    "zygote_tree": (_bool, "package zygotes for functions that import the same packages"),
    "drain_timeout": (_float(strict=False), "seconds SIGTERM waits for in-flight requests"),
    "deploy_timeout": (_float(), "seconds a snapshot may take to build before a deploy fails"),
    "ready_timeout": (_float(), "seconds start may spend restoring before reporting ready"),
    "keep_versions": (_int(1), "versions of each function kept for rollback"),
    "async_retention": (_float(), "seconds results of async invocations are kept"),
    "dead_letter_retention": (_float(), "seconds dead-lettered async invocations are kept"),
}
LOG_KEYS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "format": (_choice("text", "json"), "daemon log format"),
    "level": (_choice(*LOG_LEVELS), "daemon log level"),
    "access": (_bool, "one log line per request"),
    "function_max_size": (_size, "size at which a function's log file is rotated"),
    "function_files": (_int(1), "rotated log files kept per function"),
}


def _strings(value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) and v.strip() for v in items):
        raise ValueError(f"must be a list of strings, got {value!r}")
    return tuple(v.strip() for v in items)


PACKAGES_KEYS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "index_url": (
        _optional(lambda v: _str(v).strip()),
        "package index functions' requirements are resolved from",
    ),
    "extra_index_urls": (_strings, "more indexes to resolve from"),
    "find_links": (_strings, "directories or pages of wheels to resolve from (an offline host's)"),
    "no_index": (_bool, "use find_links only, never an index"),
    "cache_dir": (_path, "uv's download and build cache"),
}


def _ratio(value: Any) -> float:
    ratio = _float(strict=False)(value)
    if ratio > 1:
        raise ValueError(f"must be between 0 and 1, got {ratio:g}")
    return ratio


def _endpoint(value: Any) -> str:
    url = _str(value).strip()
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
    return url


TRACING_KEYS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "enabled": (_bool, "record OpenTelemetry traces of invocations"),
    "endpoint": (_endpoint, "OTLP collector URL (http/protobuf: its /v1/traces)"),
    "protocol": (_choice(*PROTOCOLS), "OTLP transport (grpc needs its exporter installed)"),
    "sample_ratio": (_ratio, "share of new traces recorded (a caller's decision is kept)"),
    "service_name": (lambda v: _str(v).strip() or "hourai", "service.name of hourai's spans"),
    "timeout": (_float(), "seconds one export may take"),
    "max_queue_size": (_int(1), "spans waiting for export at most; more are dropped, counted"),
}


def _parse_tracing(raw: Any, source: str) -> TracingSettings:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: [tracing] must be a table")
    values = {}
    for key, value in raw.items():
        if key not in TRACING_KEYS:
            raise ConfigError(
                f"{source}: [tracing]: unknown key {key!r} (known: {', '.join(TRACING_KEYS)})"
            )
        try:
            values[key] = TRACING_KEYS[key][0](value)
        except ValueError as exc:
            raise ConfigError(f"{source}: [tracing] {key}: {exc}") from None
    return TracingSettings(**values)


def parse_config(data: Mapping[str, Any], source: str = "config") -> Config:
    """A Config from parsed TOML; ConfigError names the first bad or unknown key."""
    values: dict[str, Any] = {}
    for key, raw in data.items():
        if key == "log":
            values["log"] = _parse_log(raw, source)
        elif key == "tenant_defaults":
            # replaces the built-in defaults: what it leaves out is unlimited
            values["tenant_defaults"] = TenantLimits(
                **_parse_tenant_limits(raw, f"{source}: [tenant_defaults]")
            )
        elif key == "tenants":
            if not isinstance(raw, Mapping):
                raise ConfigError(f"{source}: [tenants] must hold one table per tenant")
            tenants = {}
            for name, table in raw.items():
                try:
                    check_name(str(name), "tenant name")
                except ValueError as exc:
                    raise ConfigError(f"{source}: [tenants.{name}]: {exc}") from None
                tenants[str(name)] = _parse_tenant_limits(table, f"{source}: [tenants.{name}]")
            values["tenants"] = tenants
        elif key == "packages":
            values["packages"] = _parse_packages(raw, source)
        elif key == "tracing":
            values["tracing"] = _parse_tracing(raw, source)
        elif key == "defaults":
            if not isinstance(raw, Mapping):
                raise ConfigError(f"{source}: [defaults] must be a table")
            parsed = parse_function_options(raw, f"{source}: [defaults]", deploy_keys=False)
            try:
                effective_limits(parsed, {})
            except ConfigError as exc:
                raise ConfigError(f"{source}: [defaults]: {exc}") from None
            values["defaults"] = parsed
        elif key in TOP_KEYS:
            parse = TOP_KEYS[key][0]
            try:
                value = parse(raw)
            except (ValueError, CgroupError) as exc:
                raise ConfigError(f"{source}: {key}: {exc}") from None
            if value is not None:
                values[key] = value
        else:
            tables = [
                "[log]",
                "[packages]",
                "[tracing]",
                "[defaults]",
                "[tenant_defaults]",
                "[tenants]",
            ]
            known = ", ".join([*TOP_KEYS, *tables])
            raise ConfigError(f"{source}: unknown key {key!r} (known: {known})")
    config = Config(**values)
    check_socket_path(config.socket_path, source)
    return config


def check_socket_path(path: Path, source: str = "config") -> None:
    if len(os.fsencode(str(path))) > MAX_SOCKET_PATH:
        raise ConfigError(
            f"{source}: socket: {path} is longer than the {MAX_SOCKET_PATH} bytes a unix "
            "socket path may have; set socket to a shorter path"
        )


# A tenant's cgroup limits in the config: the same names and units as the function options
# (--memory, --cpu, --pids) that may also declare them.
TENANT_LIMIT_KEYS: dict[str, tuple[str, str]] = {
    "memory": ("memory_max", "the tenant's memory limit (its cgroup's memory maximum)"),
    "cpu": ("cpu_max", "the tenant's CPU quota in cores"),
    "pids": ("pids_max", "the tenant's limit on processes and threads"),
}


def _parse_tenant_limits(raw: Any, where: str) -> dict[str, Any]:
    """``memory``/``cpu``/``pids`` as TenantLimits fields; ``"unlimited"`` is None, which
    lifts a default."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a table")
    given: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in TENANT_LIMIT_KEYS:
            raise ConfigError(
                f"{where}: unknown key {key!r} (known: {', '.join(TENANT_LIMIT_KEYS)})"
            )
        try:
            parsed = None if value == "unlimited" else FUNCTION_OPTIONS[key].parse(value)
        except (ValueError, CgroupError) as exc:
            raise ConfigError(f"{where} {key}: {exc}") from None
        given[TENANT_LIMIT_KEYS[key][0]] = parsed
    try:
        TenantLimits(**given)
    except CgroupError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return given


def _parse_log(raw: Any, source: str) -> LogConfig:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: [log] must be a table")
    values = {}
    for key, value in raw.items():
        if key not in LOG_KEYS:
            raise ConfigError(
                f"{source}: [log]: unknown key {key!r} (known: {', '.join(LOG_KEYS)})"
            )
        try:
            values[key] = LOG_KEYS[key][0](value)
        except ValueError as exc:
            raise ConfigError(f"{source}: [log] {key}: {exc}") from None
    return LogConfig(**values)


def _parse_packages(raw: Any, source: str) -> PackagesConfig:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: [packages] must be a table")
    values = {}
    for key, value in raw.items():
        if key not in PACKAGES_KEYS:
            raise ConfigError(
                f"{source}: [packages]: unknown key {key!r} (known: {', '.join(PACKAGES_KEYS)})"
            )
        try:
            values[key] = PACKAGES_KEYS[key][0](value)
        except ValueError as exc:
            raise ConfigError(f"{source}: [packages] {key}: {exc}") from None
    config = PackagesConfig(**values)
    if config.no_index and not config.find_links:
        raise ConfigError(f"{source}: [packages] no_index needs find_links to install from")
    return config


def load_config(
    path: Path | None,
    *,
    state_dir: Path | None = None,
    listen: list[str] | None = None,
    socket: Path | None = None,
) -> Config:
    """Read the TOML file (None: defaults only) and apply command-line overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    config = parse_config(data, source)
    changes: dict[str, Any] = {"source": path}
    if state_dir is not None:
        changes["state_dir"] = state_dir.absolute()
    if listen:
        try:
            changes["listen"] = _addresses(listen)
        except ValueError as exc:
            raise ConfigError(f"--listen: {exc}") from None
    if socket is not None:
        changes["socket"] = socket.absolute()
    config = dataclasses.replace(config, **changes)
    check_socket_path(config.socket_path, "--socket" if socket else source)
    return config


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """Keys whose new value only a restart applies (a reload keeps the old one)."""
    keys = [
        "listen",
        "state_dir",
        "socket",
        "socket_group",
        "metrics_listen",
        "lambda_listen",
        "cgroup_backend",
        "cgroup_subtree",
        "uid_range",
        "preload",
        "max_host_workers",
        "adaptive",
        "zygote_tree",
        "tracing",
    ]
    return [k for k in keys if getattr(old, k) != getattr(new, k)]
