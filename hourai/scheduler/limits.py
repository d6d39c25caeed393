"""Per-function and per-tenant limits, and the token bucket behind the rate limits.

Limits are frozen values: the scheduler swaps the whole object on a redeploy, so a reader
never sees half of an update. They are checked when built, because a limit that makes no
sense (zero workers, a negative timeout) should fail the deploy with a message, not turn
into a function that silently queues forever.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class FunctionLimits:
    """How much of the host one function may take, and how its workers live and die."""

    max_workers: int = 8  # workers (any state) of one function, all versions counted
    concurrency: int = 1  # invocations at once per worker (1: "process" mode; >1: "thread")
    max_inflight: int | None = None  # concurrent invocations (None: max_workers * concurrency)
    queue_max: int = 256  # requests waiting for a worker; beyond: 503 "queue full"
    queue_timeout: float = 10.0  # seconds a request may wait for a worker; then 503
    timeout: float = 30.0  # invocation timeout; the worker is killed and the request gets 504
    keep_alive: float = 60.0  # an idle worker lives this long (scale to zero; the snapshot stays)
    spares: int = 1  # pre-forked never-used workers kept while the snapshot is ready
    max_requests: int = 0  # recycle a worker after this many invocations (0: never)
    max_worker_memory: int | None = None  # bytes; a worker above it is recycled once idle
    # bytes of one response body; a larger one is refused (502) unread and its worker killed.
    # 6 MiB is AWS Lambda's limit for a synchronous invocation's response.
    max_response_size: int = 6 * 1024 * 1024
    rate: float | None = None  # token bucket: requests per second (None: unlimited)
    burst: int | None = None  # bucket size (None: max(1, ceil(rate)))
    tmp_size: int = 512 << 20  # bytes of the function's private /tmp (and /dev/shm) tmpfs

    def __post_init__(self) -> None:
        _at_least("max_workers", self.max_workers, 1)
        _at_least("tmp_size", self.tmp_size, 1 << 20)
        _at_least("concurrency", self.concurrency, 1)
        if self.max_inflight is not None:
            _at_least("max_inflight", self.max_inflight, 1)
        _at_least("queue_max", self.queue_max, 0)
        _positive("queue_timeout", self.queue_timeout)
        _positive("timeout", self.timeout)
        _at_least("keep_alive", self.keep_alive, 0)
        _at_least("spares", self.spares, 0)
        if self.spares > self.max_workers:
            raise ValueError(
                f"spares ({self.spares}) cannot exceed max_workers ({self.max_workers})"
            )
        _at_least("max_requests", self.max_requests, 0)
        if self.max_worker_memory is not None:
            _positive("max_worker_memory", self.max_worker_memory)
        _positive("max_response_size", self.max_response_size)
        _check_rate(self.rate, self.burst)

    @property
    def inflight_cap(self) -> int:
        """Concurrent invocations allowed, with the default filled in."""
        if self.max_inflight is not None:
            return self.max_inflight
        return self.max_workers * self.concurrency


@dataclass(frozen=True)
class TenantLimits:
    """Caps shared by all of one tenant's functions."""

    max_inflight: int | None = None
    rate: float | None = None
    burst: int | None = None

    def __post_init__(self) -> None:
        if self.max_inflight is not None:
            _at_least("max_inflight", self.max_inflight, 1)
        _check_rate(self.rate, self.burst)


class TokenBucket:
    """A token bucket: ``rate`` tokens per second, at most ``burst`` saved up, one per request.

    Asking (:meth:`wait`) and taking (:meth:`take`) are separate so that a request that
    passes one bucket but not the next (function, then tenant) spends nothing.
    """

    __slots__ = ("burst", "rate", "stamp", "tokens")

    # A client told to come back in exactly retry_after seconds must then get its token,
    # whatever the float rounding of rate * elapsed did.
    _SLACK = 1e-9

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now

    @classmethod
    def create(cls, rate: float | None, burst: int | None, now: float) -> TokenBucket | None:
        """The bucket for these limits, or None when there is no rate limit."""
        if rate is None:
            return None
        return cls(rate, burst if burst is not None else max(1, math.ceil(rate)), now)

    def wait(self, now: float) -> float:
        """Seconds until a token is available: 0.0 when one is available now."""
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        if self.tokens >= 1.0 - self._SLACK:
            return 0.0
        return (1.0 - self.tokens) / self.rate

    def take(self) -> None:
        """Spend one token; call only after :meth:`wait` returned 0.0 at the same instant."""
        self.tokens -= 1.0


def _at_least(name: str, value: float, low: float) -> None:
    if value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}")


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be greater than 0, got {value}")


def _check_rate(rate: float | None, burst: int | None) -> None:
    if rate is not None:
        _positive("rate", rate)
    if burst is not None:
        if rate is None:
            raise ValueError("burst must come with a rate (requests per second)")
        _at_least("burst", burst, 1)
