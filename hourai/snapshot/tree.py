"""The zygote tree: package zygotes that the snapshots of functions using the same packages
fork from (SOCK's zygote tree, one per tenant).

hourai learns which third-party packages each function imports (hourai.snapshot.learn): its
snapshot says what its import left behind, its workers what their first invocations imported
on top. From that, per *group* (one tenant, one import path: the same declared distributions,
or none), the tree is planned:

- every set of packages that at least ``MIN_SHARED`` functions of the group all use is a
  candidate zygote; each function takes the largest candidate whose packages it uses (the
  deepest), never one that imported something it does not use;
- a candidate taken by fewer than ``MIN_SHARED`` functions saves nothing and is not built
  (its functions fall back to a smaller one, or the root zygote);
- a zygote's parent is the largest other zygote of the group it contains: it is forked from
  there and imports only the difference, so the packages they share are one copy of pages;
- at most ``MAX_NODES_PER_TENANT`` zygotes per tenant, the most used first. A zygote lives
  in its tenant's cgroup: its memory is the tenant's, inside the tenant's limits.

A snapshot also preloads what its function was seen importing beyond its zygote, so even a
function alone in its group has its lazy imports done before its workers fork. What is
learned is kept in the state dir, so a restart builds the tree at once.

The plan takes effect at each snapshot build; a function whose snapshot was built from
another node than the plan says (or before its lazy imports were known) is rebuilt in the
background while it has no workers at all, which costs nobody a request. A zygote that no
plan wants and no snapshot still lives in is stopped.

Isolation: a package zygote is confined exactly as a snapshot of its tenant is before it
imports anything (see hourai.snapshot.zygote.PackageZygote); the packages it imports are
the ones its tenant's functions declared and use. Tenants never share a zygote.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hourai.fsutil import atomic_write
from hourai.protocol import Message, Violation, check_zygote_message
from hourai.snapshot.learn import MAX_MODULES, check_modules
from hourai.snapshot.manager import ExitStatus, kill_pid, launch, pid_of

log = logging.getLogger("hourai.snapshot.tree")

MIN_SHARED = 2  # functions that must use a zygote's packages for it to be worth its memory
MAX_NODES_PER_TENANT = 8
MAX_CANDIDATE_SETS = 32  # distinct package sets per group looked at (the most common)
MIGRATIONS_PER_TICK = 4
# A zygote that died or broke the channel protocol is not started again for this long,
# doubled at each repeat: a package that kills or forges from its zygote costs its tenant
# the sharing, never a restart loop.
BROKEN_DELAY = 30.0
BROKEN_MAX_DELAY = 3600.0

Group = tuple[str, tuple[str, ...] | None]  # tenant, declared distributions' dirs
NodeKey = tuple[str, tuple[str, ...] | None, frozenset[str]]

_fids = itertools.count(1)


def output_name(tenant: str) -> str:
    """Where a tenant's zygotes' output goes (``logs/zygote.TENANT.log``): a name no function
    can have (no dots in function names), so it never lands in a function's log."""
    return f"zygote.{tenant}"


@dataclass(eq=False)
class ZygoteNode:
    """The daemon's view of one package zygote process."""

    key: NodeKey
    parent: ZygoteNode | None
    loop: asyncio.AbstractEventLoop
    sink: Callable[[str, str], None]
    fid: str = field(default_factory=lambda: f"zygote#{next(_fids)}")
    pid: int | None = None
    channel: Any = None
    output: Any = None
    ready: asyncio.Future[dict[str, Any]] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    children: dict[str, Any] = field(default_factory=dict)  # fid -> handle or node
    loaded: list[str] = field(default_factory=list)
    on_lost: Callable[[ZygoteNode, str], None] | None = None
    stopping: bool = False

    @property
    def modules(self) -> frozenset[str]:
        return self.key[2]

    @property
    def running(self) -> bool:
        return (
            self.ready is not None
            and self.ready.done()
            and not self.ready.cancelled()
            and self.ready.exception() is None
            and self.channel is not None
            and not self.channel.closed
        )

    def launch(self, child: Any, spec: dict[str, Any], tag: str) -> None:
        if not self.running:
            raise RuntimeError(f"zygote {self.fid} is not running")
        self.children[child.fid] = child
        launch(self.loop, self.channel, child, spec, tag, self.sink)

    def spawn_handle(self, handle: Any, spec: dict[str, Any], tag: str) -> Any:
        handle.parent = self
        self.launch(handle, spec, tag)
        return handle

    def forget(self, fid: str) -> None:
        self.children.pop(fid, None)

    def stop(self) -> None:
        self.stopping = True
        if self.channel is not None and not self.channel.closed:
            self.channel.send({"t": "stop"})

    def kill(self) -> None:
        self.stopping = True
        if self.pid:
            kill_pid(self.pid)

    # -- from the zygote process (tenant packages' code ran in it: checked, never trusted)
    def _on_message(self, msg: Message, fds: list[int]) -> None:
        try:
            check_zygote_message(msg, len(fds))
        except Violation:
            for fd in fds:
                os.close(fd)
            raise  # the channel closes on it; _on_close kills the zygote
        kind = msg["t"]
        if kind == "zygote_ready":
            self.loaded = msg["loaded"]
            self.info = {**self.info, **msg}
            if msg["failed"]:
                log.warning("zygote %s: could not import %s", self.fid, ", ".join(msg["failed"]))
            if self.ready is not None and not self.ready.done():
                self.ready.set_result(msg)
        elif kind == "spawned":
            try:
                pid = pid_of(fds[0])
            finally:
                os.close(fds[0])
            child = self.children.get(msg["fid"])
            if child is not None:
                child.pid = pid
        elif kind == "exited":
            child = self.children.pop(msg["fid"], None)
            if child is not None:
                child.info["exit"] = ExitStatus(msg["code"], msg["signal"]).describe()
        elif kind == "failed" and self.ready is not None and not self.ready.done():
            self.ready.set_exception(RuntimeError(msg["error"]))

    def _on_close(self, reason: str) -> None:
        error = self.channel.error if self.channel is not None else None
        if error is not None:
            log.warning("zygote %s broke the channel protocol (%s): killed", self.fid, error)
            self.kill()
            self.stopping = False
        if self.ready is not None and not self.ready.done():
            self.ready.set_exception(RuntimeError(f"zygote ended during start ({reason})"))
            self.ready.exception()
        if not self.stopping and self.on_lost is not None:
            self.on_lost(self, reason)


def plan_group(used: dict[str, frozenset[str]]) -> dict[str, frozenset[str]]:
    """Which zygote each function of one group forks from: function -> its packages (an
    empty set: none, the root zygote). ``used``: function -> the packages it imports."""
    sets = Counter(s for s in used.values() if s)
    common = [s for s, _ in sets.most_common(MAX_CANDIDATE_SETS)]
    candidates = set(common)
    for a, b in itertools.combinations(common, 2):
        if a & b:
            candidates.add(a & b)

    def coverage(s: frozenset[str]) -> int:
        return sum(1 for u in used.values() if s <= u)

    kept = {s for s in candidates if coverage(s) >= MIN_SHARED}
    for _ in range(8):  # drop what ends up taken by too few, until it holds
        choice = {f: _deepest(u, kept) for f, u in used.items()}
        taken = Counter(c for c in choice.values() if c)
        still = {s for s in kept if taken[s] >= MIN_SHARED}
        if still == kept:
            break
        kept = still
    return {f: _deepest(u, kept) for f, u in used.items()}


def _deepest(used: frozenset[str], kept: Iterable[frozenset[str]]) -> frozenset[str]:
    best: frozenset[str] = frozenset()
    for s in kept:
        if s <= used and (len(s), sorted(s)) > (len(best), sorted(best)):
            best = s
    return best


def parent_set(node: frozenset[str], others: Iterable[frozenset[str]]) -> frozenset[str]:
    """The largest other node ``node`` contains (empty: the root zygote)."""
    return _deepest(node, [o for o in others if o < node])


class ZygoteTree:
    """What every function was seen importing, the plan made of it, and the zygotes."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        state_file: Path | None,
        sink: Callable[[str, str], None],
    ) -> None:
        self.loop = loop
        self.state_file = state_file
        self.sink = sink
        self.used: dict[str, set[str]] = {}  # function -> packages seen imported
        self.declared: dict[str, list[str]] = {}  # function -> its own `preload`
        self.groups: dict[str, Group] = {}  # function -> its group
        self.nodes: dict[NodeKey, ZygoteNode] = {}
        self.plan: dict[str, NodeKey | None] = {}
        self.built_from: dict[str, tuple[NodeKey | None, frozenset[str]]] = {}
        self.enabled = True
        self.broken: dict[NodeKey, tuple[float, float]] = {}  # key -> (until, last delay)
        self._load()

    # -- what is known

    def _load(self) -> None:
        if self.state_file is None:
            return
        try:
            doc = json.loads(self.state_file.read_text())
            self.used = {str(f): set(check_modules(m)) for f, m in doc.items()}
        except (OSError, ValueError, TypeError, AttributeError):
            self.used = {}  # relearned: the snapshots say it again at their next build

    def _save(self) -> None:
        if self.state_file is None:
            return
        doc = {f: sorted(m) for f, m in self.used.items()}
        atomic_write(self.state_file, json.dumps(doc, sort_keys=True).encode(), mode=0o600)

    def function(self, name: str, group: Group, declared: Iterable[str] = ()) -> None:
        """A function is deployed (or restored) in ``group``; ``declared``: its preload."""
        self.groups[name] = group
        self.declared[name] = [m for m in declared][:MAX_MODULES]
        self._replan()

    def forget(self, name: str) -> None:
        self.groups.pop(name, None)
        self.declared.pop(name, None)
        self.built_from.pop(name, None)
        if self.used.pop(name, None) is not None:
            self._save()
        self._replan()

    def learn(self, name: str, modules: Iterable[str]) -> bool:
        """``name`` imports ``modules``; True if that is news."""
        if name not in self.groups:
            return False
        known = self.used.setdefault(name, set())
        new = [m for m in modules if m not in known]
        if not new or len(known) >= MAX_MODULES:
            return False
        known.update(new[: MAX_MODULES - len(known)])
        self._save()
        self._replan()
        return True

    def built(self, name: str, modules: Iterable[str]) -> None:
        """``name``'s snapshot is ready and reported ``modules`` imported: learned, and
        counted as built with them (they are loaded in it already), so a snapshot whose
        own import taught the tree its packages is not rebuilt only to import them again."""
        modules = list(modules)
        self.learn(name, modules)
        built = self.built_from.get(name)
        if built is not None:
            have = frozenset(modules) & self.uses(name)
            self.built_from[name] = (built[0], built[1] | have)

    def uses(self, name: str) -> frozenset[str]:
        return frozenset(self.used.get(name, ())) | frozenset(self.declared.get(name, ()))

    def _replan(self) -> None:
        by_group: dict[Group, dict[str, frozenset[str]]] = {}
        for name, group in self.groups.items():
            by_group.setdefault(group, {})[name] = self.uses(name)
        plan: dict[str, NodeKey | None] = {}
        for group, used in by_group.items():
            for name, modules in plan_group(used).items():
                plan[name] = (*group, modules) if modules and self.enabled else None
        # at most MAX_NODES_PER_TENANT zygotes a tenant, the most used first
        per_tenant: dict[str, Counter[NodeKey]] = {}
        for key in plan.values():
            if key is not None:
                per_tenant.setdefault(key[0], Counter())[key] += 1
        allowed = {k for c in per_tenant.values() for k, _ in c.most_common(MAX_NODES_PER_TENANT)}
        self.plan = {f: (k if k in allowed else None) for f, k in plan.items()}

    # -- the zygotes

    def parent_for(
        self,
        name: str,
        launch_root: Callable[[ZygoteNode, dict[str, Any]], None],
        node_spec: Callable[[NodeKey], dict[str, Any]],
    ) -> tuple[ZygoteNode | None, list[str]]:
        """The zygote ``name``'s snapshot forks from now (None: the root) and what the
        snapshot preloads itself. A planned zygote not running yet is started; until it is
        ready the snapshot is built from its nearest running ancestor."""
        key = self.plan.get(name)
        node = self._ensure(key, launch_root, node_spec) if key is not None else None
        while node is not None and not node.running:
            node = node.parent
        have = node.modules if node is not None else frozenset()
        preload = sorted(self.uses(name) - have)
        self.built_from[name] = (node.key if node is not None else None, self.uses(name))
        return node, preload

    def grow(
        self,
        launch_root: Callable[[ZygoteNode, dict[str, Any]], None],
        node_spec: Callable[[NodeKey], dict[str, Any]],
    ) -> None:
        """Start the zygotes the plan has and nobody asked for yet (a parent first)."""
        for key in sorted(
            {k for k in self.plan.values() if k is not None}, key=lambda k: len(k[2])
        ):
            if key not in self.nodes:
                self._ensure(key, launch_root, node_spec)

    def _ensure(
        self,
        key: NodeKey,
        launch_root: Callable[[ZygoteNode, dict[str, Any]], None],
        node_spec: Callable[[NodeKey], dict[str, Any]],
    ) -> ZygoteNode | None:
        node = self.nodes.get(key)
        if node is not None:
            return node
        if key in self.broken and self.loop.time() < self.broken[key][0]:
            return None
        siblings = [k[2] for k in set(self.plan.values()) if k is not None and k[:2] == key[:2]]
        above = parent_set(key[2], siblings)
        parent = self._ensure((*key[:2], above), launch_root, node_spec) if above else None
        if parent is not None and not parent.running:
            return None  # built once its parent is: the next build asks again
        node = ZygoteNode(key, parent, self.loop, self.sink)
        node.ready = self.loop.create_future()
        node.on_lost = self._lost
        spec = node_spec(key)
        spec["preload"] = sorted(key[2] - (parent.modules if parent is not None else set()))
        self.nodes[key] = node
        tag = output_name(key[0])
        try:
            if parent is not None:
                parent.launch(node, spec, tag)
            else:
                launch_root(node, spec)
        except RuntimeError as exc:
            log.warning("zygote for %s could not start: %s", ", ".join(sorted(key[2])), exc)
            self.nodes.pop(key, None)
            return None
        log.info(
            "tenant %s: zygote %s for %s (from %s)",
            key[0],
            node.fid,
            ", ".join(sorted(key[2])),
            parent.fid if parent is not None else "the root zygote",
        )
        return node

    def _lost(self, node: ZygoteNode, reason: str) -> None:
        _until, last = self.broken.get(node.key, (0.0, 0.0))
        delay = min(max(last * 2, BROKEN_DELAY), BROKEN_MAX_DELAY)
        self.broken[node.key] = (self.loop.time() + delay, delay)
        log.warning(
            "tenant %s: zygote %s for %s lost (%s); its snapshots are rebuilt without it, "
            "and it is not started again for %.0fs",
            node.key[0],
            node.fid,
            ", ".join(sorted(node.modules)),
            reason,
            delay,
        )
        if self.nodes.get(node.key) is node:
            del self.nodes[node.key]

    def wanted(self, name: str) -> bool:
        """Whether ``name``'s snapshot would be built differently now (another zygote, or
        packages learned since it was built)."""
        built = self.built_from.get(name)
        if built is None:
            return False
        key = self.plan.get(name)
        if key is not None and (key not in self.nodes or not self.nodes[key].running):
            return False  # its zygote first: a rebuild now would land on the same node
        return built != (key, self.uses(name))

    def collect(self) -> list[ZygoteNode]:
        """Stop zygotes no plan wants that no snapshot or zygote lives in any more."""
        wanted = {k for k in self.plan.values() if k is not None}
        for key in list(wanted):
            node = self.nodes.get(key)
            while node is not None and node.parent is not None:
                wanted.add(node.parent.key)
                node = node.parent
        stopped = []
        for key, node in list(self.nodes.items()):
            if key not in wanted and not node.children:  # (an exit or a drop forgets one)
                del self.nodes[key]
                node.stop()
                stopped.append(node)
        return stopped

    def stop_all(self) -> None:
        for node in self.nodes.values():
            node.kill()
        self.nodes.clear()

    def stats(self) -> list[dict[str, Any]]:
        users = Counter(k for k in self.plan.values() if k is not None)
        return [
            {
                "tenant": key[0],
                "packages": sorted(key[2]),
                "imported": sorted(node.loaded),
                "pid": node.pid,
                "parent": node.parent.fid if node.parent is not None else "root",
                "name": node.fid,
                "functions": users[key],
                "snapshots": len(node.children),
                "ready": node.running,
            }
            for key, node in self.nodes.items()
        ]
