"""Finding a function: from the target string a user gives to an :class:`Invoker`.

:func:`resolve_target` is pure path logic (the daemon calls it to refuse bad input before
anything is spawned); :func:`load` imports the module in the snapshot, picks the attribute,
detects its kind and wraps it.

Target grammar, tried in this order:

====================================  ====================================================
``examples/hello/handler.py``         a file; the attribute is found automatically
``examples/hello/handler.py:main``    a file and the attribute to call
``examples/hello``                    a directory: the first of handler.py, app.py, main.py,
                                      lambda_function.py, index.py in it (or the directory
                                      itself when it is a package with none of them)
``examples/shop:api.main``            DIR:MODULE — a dotted module inside DIR, which is the
``examples/shop:api.main:app``        import root; DIR:MODULE:ATTR names the attribute too
``examples/hello/handler.handler``    Lambda's handler notation: FILE.ATTR, where FILE.py
                                      exists in that directory
``pkg.module:app`` / ``pkg.module``   a module importable from the current directory
``handler.lambda_handler``            Lambda notation relative to the current directory
``app.py:create_app()``               an application factory (gunicorn's notation; literal
                                      arguments allowed): called once, in the snapshot
====================================  ====================================================

Wherever a MODULE is expected, ``MODULE.ATTR`` is accepted when MODULE is a file and
``MODULE/ATTR`` is not (so ``examples/shop:handler.main`` is handler.py's ``main``). ATTR may
be dotted (``app.wsgi_app``). A file inside a package (its directory has ``__init__.py``) is
imported as part of that package, so its relative imports work.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import inspect
import os
import re
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType, TracebackType
from typing import Any

from hourai.isolate.adapters import (
    LIFESPAN_TIMEOUT,
    AsgiInvoker,
    HandlerInvoker,
    Invoker,
    WsgiInvoker,
)

AUTO_ATTRS = ("handler", "lambda_handler", "app", "application")
DIR_CANDIDATES = ("handler.py", "app.py", "main.py", "lambda_function.py", "index.py")
KINDS = ("handler", "asgi", "wsgi")


@dataclass(frozen=True)
class Target:
    """Where a function lives; produced by :func:`resolve_target`, consumed by :func:`load`."""

    root: str  # directory put first on sys.path (absolute)
    module: str  # module name to import, e.g. "handler" or "pkg.app"
    attr: str | None  # attribute, None = auto-detect
    source: str  # the target as the user gave it, for messages
    file: str | None = None  # the module's file, spelled as the user would (for messages)


class TargetError(Exception):
    """The target string names nothing importable; the message says what to do instead."""


class LoadError(Exception):
    """The function could not be imported or wrapped.

    ``str()`` is one line naming the file, for the user; ``details`` is the full traceback,
    for the log.
    """

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details or message


# ---------------------------------------------------------------------------------------------
# resolve_target: path logic only, never an import


def resolve_target(spec: str, cwd: str | None = None) -> Target:
    """Parse a target string (see the module docstring) relative to ``cwd``."""
    base = os.path.abspath(cwd or os.getcwd())
    text = spec.strip()
    if not text:
        raise TargetError("empty target: give a file (app.py), a directory, or MODULE:ATTR")

    def absolute(path: str) -> str:
        return os.path.normpath(os.path.join(base, os.path.expanduser(path)))

    whole = absolute(text)
    if os.path.exists(whole):
        return _from_path(whole, text, None, spec, base)

    head, colon, rest = text.partition(":")
    if colon:
        head_abs = absolute(head) if head else ""
        if head and os.path.isdir(head_abs):
            module, _, attr = rest.partition(":")
            _check_no_colon(attr, spec)
            return _from_module(head_abs, module, attr or None, spec, base)
        _check_no_colon(rest, spec)
        if head and os.path.isfile(head_abs):
            return _from_path(head_abs, head, rest or None, spec, base)
        if not head:
            raise TargetError(f"nothing before ':' in {spec!r}; write PATH:ATTR, e.g. app.py:app")
        if _looks_like_path(head):
            raise TargetError(_missing(head))
        return _from_module(base, head, rest or None, spec, base)

    if _looks_like_path(text):
        parent, name = os.path.split(whole)
        found = _dotted(parent, name) if os.path.isdir(parent) and "." in name else None
        if found is None:
            raise TargetError(_missing(text))
        return _target(parent, found[0], found[1], spec, base)
    return _from_module(base, text, None, spec, base)


def _looks_like_path(text: str) -> bool:
    return "/" in text or text.startswith(("~", ".")) or text.endswith(".py")


def _missing(path: str) -> str:
    what = "file" if path.endswith(".py") else "file or directory"
    return f"no such {what}: {path}"


def _check_no_colon(rest: str, spec: str) -> None:
    if ":" in rest:
        raise TargetError(f"too many ':' in {spec!r}; use PATH:ATTR or DIR:MODULE:ATTR")


def _check_attr(attr: str | None, spec: str) -> None:
    if attr is None:
        return
    name, _call = split_call(attr, spec)
    if not all(part.isidentifier() for part in name.split(".")):
        raise TargetError(f"{attr!r} in {spec!r} is not a Python name; ATTR looks like main or app")


_CALL = re.compile(r"(?s)([^()]*)\((.*)\)")


Call = tuple[tuple[Any, ...], dict[str, Any]]


def split_call(attr: str, spec: str = "") -> tuple[str, Call | None]:
    """``create_app()`` or ``create_app("prod", debug=False)`` (gunicorn's factory notation):
    the name and the literal arguments to call it with; a plain name has no call."""
    m = _CALL.fullmatch(attr.strip())
    if m is None:
        return attr, None
    name, inside = m.group(1).strip(), m.group(2)
    try:
        call = ast.parse(f"f({inside})", mode="eval").body
        assert isinstance(call, ast.Call)
        args = tuple(ast.literal_eval(a) for a in call.args)
        kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg}
        if len(kwargs) != len(call.keywords):
            raise ValueError("**kwargs")
    except (SyntaxError, ValueError, AssertionError):
        raise TargetError(
            f"{attr!r} in {spec!r}: a factory's arguments must be literals, "
            "e.g. create_app() or create_app('production', debug=False)"
        ) from None
    return name, (args, kwargs)


def as_factory(target: Target) -> Target:
    """``--factory`` (uvicorn's flag): the attribute is a factory, called once, no arguments."""
    attr = target.attr or "create_app"
    if split_call(attr)[1] is None:
        attr += "()"
    return dataclasses.replace(target, attr=attr)


def _from_path(path: str, shown: str, attr: str | None, spec: str, base: str) -> Target:
    if os.path.isdir(path):
        if attr is not None:
            raise TargetError(
                f"{shown} is a directory; to name a module in it use {shown}:MODULE:{attr}"
            )
        for name in DIR_CANDIDATES:
            if os.path.isfile(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            if os.path.isfile(os.path.join(path, "__init__.py")):
                parent, package = os.path.split(path)
                return _target(parent, package, None, spec, base, walk=True)
            raise TargetError(
                f"{shown} has none of {', '.join(DIR_CANDIDATES)}; "
                f"name the file, e.g. {os.path.join(shown, 'myfunction.py')}"
            )
    if not path.endswith(".py"):
        raise TargetError(
            f"not a Python file: {shown}; give a .py file, a directory or MODULE:ATTR"
        )
    directory, filename = os.path.split(path)
    stem = filename[:-3]
    if not stem or "." in stem:
        raise TargetError(f"{shown}: a module file name cannot contain '.'; rename the file")
    return _target(directory, stem, attr, spec, base, walk=True)


def _from_module(root: str, dotted: str, attr: str | None, spec: str, base: str) -> Target:
    if dotted.endswith(".py"):
        raise TargetError(
            f"{dotted!r} in {spec!r} is a file name; after DIR: give the module, {dotted[:-3]!r}"
        )
    if not dotted or not all(part.isidentifier() for part in dotted.split(".")):
        raise TargetError(
            f"{dotted!r} in {spec!r} is neither an existing path nor a module name like pkg.app"
        )
    if _module_file(root, dotted) is not None:
        return _target(root, dotted, attr, spec, base)
    found = _dotted(root, dotted) if attr is None else None
    if found is not None:
        return _target(root, found[0], found[1], spec, base)
    where = os.path.relpath(root, base) if root != base else "the current directory"
    looked = dotted.replace(".", "/")
    raise TargetError(
        f"no module {dotted!r} in {where} (looked for {looked}.py and {looked}/); "
        "an attribute of a file is named with FILE.py:ATTR"
    )


def _dotted(root: str, dotted: str) -> tuple[str, str] | None:
    """Lambda notation: ``module.attr`` where ``module`` is a file and ``module/attr`` is not."""
    module, _, attr = dotted.rpartition(".")
    if module and attr.isidentifier() and _module_file(root, module) is not None:
        return module, attr
    return None


def _module_file(root: str, dotted: str) -> str | None:
    path = os.path.join(root, *dotted.split("."))
    for candidate in (path + ".py", os.path.join(path, "__init__.py")):
        if os.path.isfile(candidate):
            return candidate
    return None


def _target(
    root: str, module: str, attr: str | None, spec: str, base: str, *, walk: bool = False
) -> Target:
    _check_attr(attr, spec)
    if walk:
        # A file inside a package is imported through the package, so relative imports work.
        while os.path.isfile(os.path.join(root, "__init__.py")):
            parent, package = os.path.split(root)
            if not package.isidentifier() or parent == root:
                break
            root, module = parent, f"{package}.{module}"
    file = _module_file(root, module) or os.path.join(root, *module.split(".")) + ".py"
    shown = os.path.relpath(file, base)
    if shown.startswith(".."):
        shown = file
    return Target(root=root, module=module, attr=attr, source=spec, file=shown)


# ---------------------------------------------------------------------------------------------
# load: import, pick, detect, wrap

# Modules imported by earlier load() calls in this process. A snapshot loads exactly once; a
# local run or a test loads again, and must not be handed the previous function's modules
# (two functions can both have an app.py).
_loaded_modules: set[str] = set()
_inserted_root: list[str] = []


def load(
    target: Target,
    kind: str | None = None,
    *,
    multithread: bool = False,
    memory_limit_mb: int | None = None,
    lifespan_timeout: float = LIFESPAN_TIMEOUT,
) -> Invoker:
    """Import the target's module and wrap its function in the invoker for its kind.

    ``kind`` is "handler", "asgi" or "wsgi", or None to detect it. ``multithread`` is True in
    ``thread`` isolation (it sets ``wsgi.multithread``). ``memory_limit_mb`` is what a handler's
    ``context.memory_limit_in_mb`` reports. Raises :class:`LoadError`.
    """
    file = target.file or target.source
    if kind in (None, "", "auto"):
        kind = None
    elif kind not in KINDS:
        raise LoadError(f"{file}: unknown kind {kind!r}; use handler, asgi or wsgi")
    module = _import(target, file)
    obj, attr = _pick_attr(module, target, file)
    if kind is None:
        kind = _detect_kind(obj, attr, file)
    else:
        _check_kind(obj, attr, kind, file)
    if kind == "asgi":
        return AsgiInvoker(obj, attr, lifespan_timeout=lifespan_timeout)
    if kind == "wsgi":
        return WsgiInvoker(obj, attr, multithread=multithread)
    sig = _signature(obj)
    return HandlerInvoker(
        obj,
        attr,
        is_async=_is_async_callable(obj),
        takes_context=sig is None or _binds(sig, 2),
        memory_limit_mb=memory_limit_mb,
    )


def _import(target: Target, file: str) -> ModuleType:
    for name in _loaded_modules:
        sys.modules.pop(name, None)
    _loaded_modules.clear()

    top = target.module.split(".")[0]
    if top == __name__.split(".")[0]:
        raise LoadError(f"{file}: the module name {top!r} is hourai's own; rename the file")
    existing = sys.modules.get(top)
    if existing is not None:
        origin = getattr(existing, "__file__", None)
        origins = [origin] if origin else list(getattr(existing, "__path__", ()))
        if not any(_is_under(o, target.root) for o in origins):
            where = origins[0] if origins else "a built-in module"
            raise LoadError(
                f"{file}: the module name {top!r} is already taken by {where}; rename the file"
            )
        for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
            del sys.modules[name]

    for old in _inserted_root:
        if old in sys.path:
            sys.path.remove(old)
    _inserted_root[:] = [target.root]
    if target.root in sys.path:
        sys.path.remove(target.root)
    sys.path.insert(0, target.root)
    importlib.invalidate_caches()

    before = set(sys.modules)
    try:
        return importlib.import_module(target.module)
    except SyntaxError as exc:  # also IndentationError, TabError
        where = _syntax_location(exc, target)
        raise LoadError(
            _one_line(f"{file}: {type(exc).__name__} {where}: {exc.msg}"), traceback.format_exc()
        ) from None
    except (Exception, SystemExit) as exc:
        missing = isinstance(exc, ModuleNotFoundError) and exc.name in _prefixes(target.module)
        if missing and _module_file(target.root, target.module) is None:
            details = traceback.format_exc()
            raise LoadError(f"{file}: no such file (was it moved?)", details) from None
        where = _traceback_location(exc.__traceback__, target)
        raise LoadError(
            _one_line(f"{file}: {type(exc).__name__}{where}: {exc}"), traceback.format_exc()
        ) from None
    finally:
        for name in set(sys.modules) - before:
            origin = getattr(sys.modules[name], "__file__", None)
            if origin is not None and _is_under(origin, target.root):
                _loaded_modules.add(name)
        _loaded_modules.update(n for n in _prefixes(target.module) if n in sys.modules)


def _prefixes(dotted: str) -> list[str]:
    parts = dotted.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _is_under(path: str, root: str) -> bool:
    return os.path.abspath(path).startswith(root.rstrip(os.sep) + os.sep)


def _one_line(text: str, limit: int = 400) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _module_path(target: Target) -> str:
    found = _module_file(target.root, target.module)
    return os.path.realpath(found) if found else ""


def _shown(path: str, target: Target) -> str:
    return os.path.relpath(path, target.root) if _is_under(path, target.root) else path


def _syntax_location(exc: SyntaxError, target: Target) -> str:
    line = f"at line {exc.lineno}" if exc.lineno else "at an unknown line"
    if exc.filename and os.path.realpath(exc.filename) != _module_path(target):
        return f"in {_shown(exc.filename, target)} {line}"
    return line


def _traceback_location(tb: TracebackType | None, target: Target) -> str:
    """Where the user's code raised: the innermost frame in the module, else in its directory."""
    main = _module_path(target)
    in_main: int | None = None
    in_root: tuple[str, int] | None = None
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if os.path.realpath(filename) == main:
            in_main = tb.tb_lineno
        elif _is_under(filename, target.root):
            in_root = (filename, tb.tb_lineno)
        tb = tb.tb_next
    if in_root is not None and in_main is not None:
        return f" at {_shown(in_root[0], target)} line {in_root[1]} (imported at line {in_main})"
    if in_main is not None:
        return f" at line {in_main}"
    if in_root is not None:
        return f" at {_shown(in_root[0], target)} line {in_root[1]}"
    return ""


def _pick_attr(module: ModuleType, target: Target, file: str) -> tuple[Any, str]:
    if target.attr is not None:
        name, call = split_call(target.attr)
        obj: Any = module
        for part in name.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                raise LoadError(f"{file} has no attribute {name!r}{_defines(module)}") from None
        if call is not None:
            # An application factory: called once, here in the snapshot; its app is shared
            # by every worker.
            args, kwargs = call
            try:
                obj = obj(*args, **kwargs)
            except Exception as exc:
                raise LoadError(
                    f"{file}: the factory {target.attr} raised {type(exc).__name__}: "
                    f"{_one_line(str(exc))}",
                    traceback.format_exc(),
                ) from None
            if obj is None:
                raise LoadError(f"{file}: the factory {target.attr} returned None, not an app")
        return obj, target.attr
    for name in AUTO_ATTRS:
        if hasattr(module, name):
            return getattr(module, name), name
    raise LoadError(
        f"{file} has none of {', '.join(AUTO_ATTRS)}; name one with PATH:ATTR{_defines(module)}"
    )


def _defines(module: ModuleType) -> str:
    own = [
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and callable(value)
        and not inspect.isclass(value)
        and getattr(value, "__module__", module.__name__) == module.__name__
    ]
    if not own:
        return ""
    shown = ", ".join(own[:8]) + (", …" if len(own) > 8 else "")
    return f" (it defines {shown})"


# -- kind detection ----------------------------------------------------------------------------

_ASGI_FRAMEWORKS = ("starlette.", "fastapi.", "quart.", "django.core.handlers.asgi")
_WSGI_PARAM_NAMES = ({"environ", "env", "environment"}, {"start_response", "start"})
_HANDLER_PARAM_NAMES = ({"event", "evt", "ev"}, {"context", "ctx", "lambda_context"})
_HANDLER_NAMES = {"handler", "lambda_handler"}


def _signature(obj: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(obj)
    except (TypeError, ValueError):  # some builtins and C extensions have none
        return None


def _binds(sig: inspect.Signature, n: int) -> bool:
    try:
        sig.bind(*([None] * n))
    except TypeError:
        return False
    return True


def _is_async_callable(obj: Any) -> bool:
    while isinstance(obj, functools.partial):
        obj = obj.func
    if inspect.iscoroutinefunction(obj):
        return True
    call = getattr(obj, "__call__", None)  # noqa: B004 - the attribute itself is inspected
    return not inspect.isfunction(obj) and inspect.iscoroutinefunction(call)


def _from_framework(obj: Any, name: str) -> bool:
    return any(
        (cls.__module__ + ".").startswith(name) for cls in type(obj).__mro__ if cls is not object
    )


def _shape(obj: Any, attr: str, file: str) -> str:
    if inspect.isclass(obj):
        return f"{file}: {attr!r} is a class; name an instance of it or a function"
    if not callable(obj):
        return f"{file}: {attr!r} is a {type(obj).__name__}, not a function or an app"
    return ""


def _detect_kind(obj: Any, attr: str, file: str) -> str:
    problem = _shape(obj, attr, file)
    if problem:
        raise LoadError(problem)
    is_async = _is_async_callable(obj)
    if any(_from_framework(obj, name) for name in _ASGI_FRAMEWORKS) and is_async:
        return "asgi"
    if not is_async and callable(getattr(obj, "wsgi_app", None)):
        return "wsgi"  # Flask and other werkzeug applications
    sig = _signature(obj)
    if sig is None:
        return "asgi" if is_async else "wsgi" if attr in ("app", "application") else "handler"
    params = [
        p.name
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    takes = {n: _binds(sig, n) for n in (0, 1, 2, 3)}
    if takes[0] and attr.split(".")[-1] not in _HANDLER_NAMES:
        # Nothing it needs: not a handler (an event always comes), most likely an app
        # factory such as Flask's create_app(test_config=None). Deployed as a handler, every
        # request would get the factory's return value, or a 500.
        raise LoadError(
            f"{file}: {attr!r}{sig} needs no argument, so it is no handler and no app: if it "
            f"is an application factory, deploy {file}:{attr}() (or pass --factory) and it is "
            "called once in the snapshot; a handler takes (event, context)"
        )
    if is_async:
        if takes[3] and not takes[2]:
            return "asgi"
        if takes[3] and attr in ("app", "application"):
            return "asgi"
        if takes[1] or takes[2]:
            return "handler"
    else:
        if takes[2]:
            return _sync_pair_kind(params, attr)
        if takes[1]:
            return "handler"
        if takes[3]:
            raise LoadError(
                f"{file}: {attr!r} takes (scope, receive, send) but is not async; "
                "an ASGI app must be an async function or have an async __call__"
            )
    raise LoadError(
        f"{file}: {attr!r}{sig} fits no kind: a handler takes (event, context), "
        "a WSGI app (environ, start_response), an ASGI app async (scope, receive, send)"
    )


def _sync_pair_kind(params: list[str], attr: str) -> str:
    """handler(event, context) or wsgi(environ, start_response): the names decide, else attr."""
    first, second = [*params, "", ""][:2]
    if first in _WSGI_PARAM_NAMES[0] or second in _WSGI_PARAM_NAMES[1]:
        return "wsgi"
    if first in _HANDLER_PARAM_NAMES[0] or second in _HANDLER_PARAM_NAMES[1]:
        return "handler"
    return "wsgi" if attr in ("app", "application") else "handler"


def _check_kind(obj: Any, attr: str, kind: str, file: str) -> None:
    problem = _shape(obj, attr, file)
    if problem:
        raise LoadError(problem)
    sig = _signature(obj)
    arity: Callable[[int], bool] = (lambda n: True) if sig is None else (lambda n: _binds(sig, n))
    if kind == "asgi":
        if not arity(3):
            raise LoadError(
                f"{file}: {attr!r} is not an ASGI app: it does not take (scope, receive, send)"
            )
        if not _is_async_callable(obj) and inspect.isfunction(obj):
            raise LoadError(f"{file}: {attr!r} is not an ASGI app: it is not async")
    elif kind == "wsgi":
        if _is_async_callable(obj) or not arity(2):
            raise LoadError(
                f"{file}: {attr!r} is not a WSGI app: it must be a plain function or object "
                "taking (environ, start_response)"
            )
    elif not (arity(1) or arity(2)):
        raise LoadError(
            f"{file}: {attr!r} is not a handler: it must take (event, context) or (event)"
        )
