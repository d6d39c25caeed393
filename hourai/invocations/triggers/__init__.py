"""Queue triggers (Lambda's event source mappings): a consumer in the daemon reads a queue,
delivers batches to a function, acknowledges what succeeded. :mod:`.base` is the part every
queue shares; :mod:`.redis_stream` is the Redis implementation (Kafka would be a second
:class:`~hourai.invocations.triggers.base.Source`)."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hourai.invocations.triggers.base import Source

# type -> "module:class" of its Source, imported when a function uses it (a Kafka trigger
# would be one more line here, its keys one more table below).
SOURCES = {"redis-stream": "hourai.invocations.triggers.redis_stream:RedisStreamSource"}
TYPES = tuple(SOURCES)


def make_source(function: str, config: dict[str, Any]) -> Source:
    """The Source for a checked trigger table (see :func:`parse_trigger`)."""
    module, _, cls = SOURCES[config["type"]].partition(":")
    source: Source = getattr(importlib.import_module(module), cls)(function, config)
    return source


# key -> (check, default); one table for every trigger type, plus the type's own keys.
COMMON: dict[str, tuple[type | tuple[type, ...], Any]] = {
    "batch_size": (int, 10),
    "batch_window": ((int, float), 0.5),
    "max_deliveries": (int, 3),
    "visibility_timeout": ((int, float), 30.0),
    "concurrency": (int, None),
}
REDIS_STREAM: dict[str, tuple[type | tuple[type, ...], Any]] = {
    "url": (str, None),
    "stream": (str, None),
    "group": (str, "hourai"),
    "dead_letter": (str, None),  # default: "<stream>:dead"
    "start": (str, "earliest"),  # earliest: what the stream holds already; latest: new only
}


def parse_trigger(value: Any) -> dict[str, Any]:
    """A trigger table from hourai.toml or a deploy, checked and with its defaults filled;
    ValueError says what is wrong."""
    if not isinstance(value, Mapping):
        raise ValueError(f'must be a table, e.g. {{type = "redis-stream", ...}}, got {value!r}')
    kind = value.get("type")
    if kind not in TYPES:
        raise ValueError(f"type must be one of {', '.join(TYPES)}, got {kind!r}")
    keys = {**COMMON, **REDIS_STREAM}
    out: dict[str, Any] = {"type": kind}
    for key, item in value.items():
        if key == "type":
            continue
        if key not in keys:
            raise ValueError(f"unknown key {key!r} (known: type, {', '.join(keys)})")
        want = keys[key][0]
        if isinstance(item, bool) or not isinstance(item, want):
            raise ValueError(f"{key}: wrong type {type(item).__name__}")
        out[key] = item
    for key, (_, default) in keys.items():
        out.setdefault(key, default)
    for key in ("url", "stream"):
        if not out[key]:
            raise ValueError(f"{key} is required for a {kind} trigger")
    if not out["url"].startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"url must be redis://, rediss:// or unix://, got {out['url']!r}")
    if not 1 <= out["batch_size"] <= 10000:
        raise ValueError(f"batch_size must be 1-10000, got {out['batch_size']}")
    if not 0 <= out["batch_window"] <= 300:
        raise ValueError(f"batch_window must be 0-300 seconds, got {out['batch_window']}")
    if out["max_deliveries"] < 1:
        raise ValueError("max_deliveries must be at least 1")
    if out["visibility_timeout"] <= 0:
        raise ValueError("visibility_timeout must be above 0")
    if out["concurrency"] is not None and out["concurrency"] < 1:
        raise ValueError("concurrency must be at least 1")
    if out["start"] not in ("earliest", "latest"):
        raise ValueError(f"start must be earliest or latest, got {out['start']!r}")
    out["dead_letter"] = out["dead_letter"] or f"{out['stream']}:dead"
    out["batch_window"] = float(out["batch_window"])
    out["visibility_timeout"] = float(out["visibility_timeout"])
    return out
