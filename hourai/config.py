"""The daemon's configuration: a TOML file, checked key by key, with flags on top.

Every key has a default (the README's configuration table lists them); an unknown key or a
bad value is refused at start with the key named, so a typo never silently falls back to a
default.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hourai.tenants import DEFAULT_UID_RANGE
from hourai.units import parse_size

DEFAULT_STATE_DIR = Path("/var/lib/hourai")


class ConfigError(Exception):
    """A configuration problem; the message names the key and what is accepted."""


@dataclass(frozen=True)
class FunctionDefaults:
    """Limits a deploy gets unless it says otherwise."""

    timeout: float = 30.0
    keep_alive: float = 60.0
    spares: int = 1
    max_workers: int = 8
    concurrency: int = 1
    queue_max: int = 256
    queue_timeout: float = 10.0


@dataclass(frozen=True)
class Config:
    listen: tuple[str, ...] = ("127.0.0.1:8080",)
    state_dir: Path = DEFAULT_STATE_DIR
    control_socket: Path | None = None  # None: <state_dir>/control.sock
    cgroup_backend: str = "auto"
    cgroup_subtree: str = "hourai"
    uid_range: tuple[int, int] = DEFAULT_UID_RANGE
    preload: tuple[str, ...] = ()
    memory_budget: int | None = None
    domain: str | None = None
    log_format: str = "text"
    drain_timeout: float = 30.0
    defaults: FunctionDefaults = field(default_factory=FunctionDefaults)

    @property
    def socket_path(self) -> Path:
        return self.control_socket or self.state_dir / "control.sock"

    def listen_addresses(self) -> list[tuple[str, int]]:
        return [parse_listen(a) for a in self.listen]


def default_state_dir() -> Path:
    # systemd's StateDirectory= hands us our dir in $STATE_DIRECTORY.
    env = os.environ.get("STATE_DIRECTORY")
    return Path(env.split(":")[0]) if env else DEFAULT_STATE_DIR


def default_socket() -> Path:
    env = os.environ.get("HOURAI_SOCKET")
    return Path(env) if env else default_state_dir() / "control.sock"


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"listen: {value!r} is not HOST:PORT (e.g. 127.0.0.1:8080)")
    return host.strip("[]"), int(port)


def load_config(path: Path | None, **overrides: Any) -> Config:
    """The file's settings (or the defaults), then every override that is not None."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
    config = _from_table(raw)
    if "state_dir" not in raw and overrides.get("state_dir") is None:
        config = dataclasses.replace(config, state_dir=default_state_dir())
    changes = {k: v for k, v in overrides.items() if v is not None}
    if "listen" in changes:
        changes["listen"] = tuple(changes["listen"])
        for a in changes["listen"]:
            parse_listen(a)
    return dataclasses.replace(config, **changes)


_TYPES: dict[str, type | tuple[type, ...]] = {
    "listen": list,
    "state_dir": str,
    "control_socket": str,
    "cgroup_backend": str,
    "cgroup_subtree": str,
    "uid_range": list,
    "preload": list,
    "memory_budget": (str, int),
    "domain": str,
    "log_format": str,
    "drain_timeout": (int, float),
    "defaults": dict,
}


def _from_table(raw: dict[str, Any]) -> Config:
    unknown = sorted(set(raw) - set(_TYPES))
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r}; known keys: {', '.join(sorted(_TYPES))}")
    for key, value in raw.items():
        if not isinstance(value, _TYPES[key]) or isinstance(value, bool):
            raise ConfigError(f"{key}: {value!r} has the wrong type")
    kw: dict[str, Any] = {}
    if "listen" in raw:
        kw["listen"] = tuple(str(a) for a in raw["listen"])
        for a in kw["listen"]:
            parse_listen(a)
        if not kw["listen"]:
            raise ConfigError("listen: give at least one HOST:PORT")
    for key in ("state_dir", "control_socket"):
        if key in raw:
            kw[key] = Path(raw[key])
    if "cgroup_backend" in raw:
        if raw["cgroup_backend"] not in ("auto", "v2", "v1", "none"):
            raise ConfigError("cgroup_backend: choose auto, v2, v1 or none")
        kw["cgroup_backend"] = raw["cgroup_backend"]
    if "cgroup_subtree" in raw:
        kw["cgroup_subtree"] = raw["cgroup_subtree"]
    if "uid_range" in raw:
        r = raw["uid_range"]
        if len(r) != 2 or not all(isinstance(x, int) for x in r) or not 0 < r[0] <= r[1]:
            raise ConfigError("uid_range: give [FIRST, LAST] with 0 < FIRST <= LAST")
        kw["uid_range"] = (r[0], r[1])
    if "preload" in raw:
        kw["preload"] = tuple(str(m) for m in raw["preload"])
    if "memory_budget" in raw:
        try:
            kw["memory_budget"] = parse_size(raw["memory_budget"])
        except ValueError as exc:
            raise ConfigError(f"memory_budget: {exc}") from None
    if "domain" in raw:
        kw["domain"] = raw["domain"]
    if "log_format" in raw:
        if raw["log_format"] not in ("text", "json"):
            raise ConfigError("log_format: choose text or json")
        kw["log_format"] = raw["log_format"]
    if "drain_timeout" in raw:
        if raw["drain_timeout"] < 0:
            raise ConfigError("drain_timeout: must be >= 0 seconds")
        kw["drain_timeout"] = float(raw["drain_timeout"])
    if "defaults" in raw:
        kw["defaults"] = _defaults(raw["defaults"])
    return Config(**kw)


def _defaults(table: dict[str, Any]) -> FunctionDefaults:
    fields = {f.name: f.type for f in dataclasses.fields(FunctionDefaults)}
    for key, value in table.items():
        if key not in fields:
            raise ConfigError(f"unknown key 'defaults.{key}'; known: {', '.join(fields)}")
        want = int if fields[key] in ("int", int) else (int, float)
        if isinstance(value, bool) or not isinstance(value, want) or value < 0:
            raise ConfigError(f"defaults.{key}: {value!r} must be a non-negative number")
    return FunctionDefaults(**table)
