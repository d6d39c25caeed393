"""Target resolution (pure path logic) and loading (import, attribute, kind, clear errors)."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from hourai.isolate.loader import (
    AUTO_ATTRS,
    LoadError,
    Target,
    TargetError,
    load,
    resolve_target,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_sys_path() -> Iterator[None]:
    # load() puts the function's directory first on sys.path; keep other tests unaffected.
    saved = list(sys.path)
    yield
    sys.path[:] = saved


def write(path: Path, source: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    return path


def t(root: Path, module: str, attr: str | None, source: str, file: str) -> Target:
    return Target(root=str(root), module=module, attr=attr, source=source, file=file)


# -- resolve_target -----------------------------------------------------------------------------


def test_file_and_file_with_attr() -> None:
    hello = REPO / "examples" / "hello"
    source = "examples/hello/handler.py"
    assert resolve_target(source, cwd=str(REPO)) == t(hello, "handler", None, source, source)
    assert resolve_target(source + ":main", cwd=str(REPO)) == t(
        hello, "handler", "main", source + ":main", source
    )


def test_absolute_path_and_default_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fn = write(tmp_path / "fn.py")
    assert resolve_target(str(fn)).root == str(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert resolve_target("fn.py") == t(tmp_path, "fn", None, "fn.py", "fn.py")
    assert resolve_target("./fn.py:go").attr == "go"


def test_directory_uses_the_first_candidate_in_order(tmp_path: Path) -> None:
    for name in ("index.py", "lambda_function.py", "main.py", "app.py", "handler.py"):
        write(tmp_path / "fn" / name)
        assert resolve_target("fn", cwd=str(tmp_path)).module == name[:-3]


def test_directory_that_is_a_package_without_candidates(tmp_path: Path) -> None:
    write(tmp_path / "mypkg" / "__init__.py")
    assert resolve_target("mypkg", cwd=str(tmp_path)) == t(
        tmp_path, "mypkg", None, "mypkg", "mypkg/__init__.py"
    )


def test_dir_module_and_dir_module_attr(tmp_path: Path) -> None:
    write(tmp_path / "shop" / "api" / "main.py")
    cwd = str(tmp_path)
    shop = tmp_path / "shop"
    assert resolve_target("shop:api.main", cwd=cwd) == t(
        shop, "api.main", None, "shop:api.main", "shop/api/main.py"
    )
    assert resolve_target("shop:api.main:app", cwd=cwd).attr == "app"
    # MODULE.ATTR where MODULE is a file: Lambda notation inside a directory
    assert resolve_target("shop:api.main.create", cwd=cwd) == t(
        shop, "api.main", "create", "shop:api.main.create", "shop/api/main.py"
    )


def test_lambda_handler_notation(tmp_path: Path) -> None:
    write(tmp_path / "svc" / "handler.py")
    cwd = str(tmp_path)
    assert resolve_target("svc/handler.lambda_handler", cwd=cwd) == t(
        tmp_path / "svc",
        "handler",
        "lambda_handler",
        "svc/handler.lambda_handler",
        "svc/handler.py",
    )
    write(tmp_path / "lambda_function.py")
    assert resolve_target("lambda_function.lambda_handler", cwd=cwd) == t(
        tmp_path,
        "lambda_function",
        "lambda_handler",
        "lambda_function.lambda_handler",
        "lambda_function.py",
    )


def test_module_name_relative_to_cwd(tmp_path: Path) -> None:
    write(tmp_path / "pkg" / "__init__.py")
    write(tmp_path / "pkg" / "module.py")
    cwd = str(tmp_path)
    assert resolve_target("pkg.module:app", cwd=cwd) == t(
        tmp_path, "pkg.module", "app", "pkg.module:app", "pkg/module.py"
    )
    assert resolve_target("pkg.module", cwd=cwd).attr is None
    assert resolve_target("pkg.module:app.wsgi_app", cwd=cwd).attr == "app.wsgi_app"


def test_file_inside_a_package_is_imported_through_it(tmp_path: Path) -> None:
    write(tmp_path / "proj" / "app" / "__init__.py")
    write(tmp_path / "proj" / "app" / "main.py")
    target = resolve_target("proj/app/main.py", cwd=str(tmp_path))
    assert (target.root, target.module) == (str(tmp_path / "proj"), "app.main")
    assert target.file == "proj/app/main.py"


def test_resolve_never_imports(tmp_path: Path) -> None:
    marker = tmp_path / "imported"
    write(tmp_path / "fn.py", f"open({str(marker)!r}, 'w').close()\n")
    resolve_target("fn.py:handler", cwd=str(tmp_path))
    resolve_target("fn", cwd=str(tmp_path))
    assert not marker.exists()
    assert "fn" not in sys.modules


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("examples/x.py", "no such file: examples/x.py"),
        ("examples/x.py:main", "no such file: examples/x.py"),
        ("nowhere/at/all", "no such file or directory: nowhere/at/all"),
        ("nowhere/handler.main", "no such file or directory: nowhere/handler.main"),
        ("./missing", "no such file or directory: ./missing"),
        ("notes.txt", "not a Python file: notes.txt"),
        ("empty", "empty has none of handler.py, app.py, main.py, lambda_function.py, index.py"),
        ("fn.py:a:b", "too many ':'"),
        ("fn.py:not-a-name", "'not-a-name' in 'fn.py:not-a-name' is not a Python name"),
        ("my.fn.py", "a module file name cannot contain '.'"),
        ("empty:nomod", "no module 'nomod' in empty"),
        ("no_such_module:app", "no module 'no_such_module' in the current directory"),
        ("2bad:app", "neither an existing path nor a module name"),
        ("", "empty target"),
        (":app", "nothing before ':' in ':app'; write PATH:ATTR"),
        ("empty:x:y:z", "too many ':'"),
        ("pkgdir:app.py", "'app.py' in 'pkgdir:app.py' is a file name; after DIR: give the module"),
    ],
)
def test_bad_targets_say_what_to_do(tmp_path: Path, spec: str, message: str) -> None:
    write(tmp_path / "notes.txt", "hi")
    write(tmp_path / "fn.py")
    write(tmp_path / "my.fn.py")
    (tmp_path / "empty").mkdir()
    (tmp_path / "pkgdir").mkdir()
    with pytest.raises(TargetError) as info:
        resolve_target(spec, cwd=str(tmp_path))
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_directory_with_attr_points_to_dir_module_attr(tmp_path: Path) -> None:
    write(tmp_path / "fn" / "app.py")
    # "fn:app" means module app inside fn, which exists
    assert resolve_target("fn:app", cwd=str(tmp_path)).module == "app"


# -- load: import and attribute -----------------------------------------------------------------


def test_module_level_code_runs_once_per_load(tmp_path: Path) -> None:
    log = tmp_path / "log"
    write(
        tmp_path / "fn.py",
        f"""
        with open({str(log)!r}, "a") as f:
            f.write("x")

        def handler(event, context):
            return "ok"
        """,
    )
    invoker = load(resolve_target("fn.py", cwd=str(tmp_path)))
    for _ in range(3):
        invoker.invoke({"method": "GET", "path": "/", "headers": [], "function": "fn"})
    assert log.read_text() == "x"
    assert sys.path[0] == str(tmp_path)


def test_reloading_after_an_edit_gets_the_new_code(tmp_path: Path) -> None:
    write(tmp_path / "fn.py", "def handler(event):\n    return 1\n")
    assert load(resolve_target("fn.py", cwd=str(tmp_path))).invoke(_inv())["body"] == b"1"
    # a different size defeats the bytecode cache even within the same mtime second
    write(tmp_path / "fn.py", "def handler(event):\n    return 22222\n")
    assert load(resolve_target("fn.py", cwd=str(tmp_path))).invoke(_inv())["body"] == b"22222"


def test_two_functions_with_the_same_module_names_stay_apart(tmp_path: Path) -> None:
    for name in ("one", "two"):
        write(tmp_path / name / "helpers.py", f"NAME = {name!r}\n")
        write(tmp_path / name / "app.py", "import helpers\nhandler = lambda e: helpers.NAME\n")
    first = load(resolve_target("one", cwd=str(tmp_path)))
    second = load(resolve_target("two", cwd=str(tmp_path)))
    assert first.invoke(_inv())["body"] == b"one"
    assert second.invoke(_inv())["body"] == b"two"


def test_relative_imports_inside_a_package_work(tmp_path: Path) -> None:
    write(tmp_path / "proj" / "app" / "__init__.py")
    write(tmp_path / "proj" / "app" / "util.py", "VALUE = 'relative ok'\n")
    write(
        tmp_path / "proj" / "app" / "main.py",
        "from .util import VALUE\nhandler = lambda e: VALUE\n",
    )
    invoker = load(resolve_target("proj/app/main.py", cwd=str(tmp_path)))
    assert invoker.invoke(_inv())["body"] == b"relative ok"


def test_auto_attr_order(tmp_path: Path) -> None:
    assert AUTO_ATTRS == ("handler", "lambda_handler", "app", "application")
    source = "def {}(event, context):\n    return '{}'\n"
    write(tmp_path / "fn.py", "".join(source.format(n, n) for n in reversed(AUTO_ATTRS)))
    assert load(resolve_target("fn.py", cwd=str(tmp_path))).attr == "handler"


def test_named_and_dotted_attrs(tmp_path: Path) -> None:
    write(
        tmp_path / "fn.py",
        """
        class Box:
            @staticmethod
            def run(event, context):
                return "dotted"

        box = Box()

        def main(event, context):
            return "main"
        """,
    )
    assert load(resolve_target("fn.py:main", cwd=str(tmp_path))).invoke(_inv())["body"] == b"main"
    invoker = load(resolve_target("fn.py:box.run", cwd=str(tmp_path)))
    assert (invoker.attr, invoker.invoke(_inv())["body"]) == ("box.run", b"dotted")


def _inv() -> dict[str, object]:
    return {"method": "GET", "path": "/", "headers": [], "function": "fn", "deadline_ms": 1000}


# -- kind detection -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "attr", "kind", "is_async"),
    [
        ("def handler(event, context): pass", "handler", "handler", False),
        ("def handler(event): pass", "handler", "handler", False),
        ("def handler(event, context=None): pass", "handler", "handler", False),
        ("async def handler(event, context): pass", "handler", "handler", True),
        ("async def app(scope, receive, send): pass", "app", "asgi", True),
        ("def application(environ, start_response): pass", "application", "wsgi", False),
        ("def handler(environ, start_response): pass", "handler", "wsgi", False),
        ("def app(a, b): pass", "app", "wsgi", False),
        ("def lambda_handler(a, b): pass", "lambda_handler", "handler", False),
        ("def app(event, context): pass", "app", "handler", False),
        (
            "class App:\n    async def __call__(self, scope, receive, send): pass\napp = App()",
            "app",
            "asgi",
            True,
        ),
        (
            "class App:\n    def __call__(self, environ, start_response): pass\napp = App()",
            "app",
            "wsgi",
            False,
        ),
        (
            "import functools\ndef h(x, event, context): pass\nhandler = functools.partial(h, 1)",
            "handler",
            "handler",
            False,
        ),
    ],
)
def test_kind_detection(tmp_path: Path, source: str, attr: str, kind: str, is_async: bool) -> None:
    write(tmp_path / "fn.py", source + "\n")
    invoker = load(resolve_target("fn.py", cwd=str(tmp_path)))
    assert (invoker.attr, invoker.kind, invoker.is_async) == (attr, kind, is_async)


def test_frameworks_are_detected(tmp_path: Path) -> None:
    write(
        tmp_path / "fn.py",
        """
        from fastapi import FastAPI
        from flask import Flask
        from starlette.applications import Starlette

        api = FastAPI()
        web = Flask(__name__)
        star = Starlette()
        """,
    )
    kinds = {
        attr: load(resolve_target(f"fn.py:{attr}", cwd=str(tmp_path))).kind
        for attr in ("api", "web", "star")
    }
    assert kinds == {"api": "asgi", "web": "wsgi", "star": "asgi"}


def test_declared_kind_wins_over_detection(tmp_path: Path) -> None:
    write(tmp_path / "fn.py", "def app(event, context):\n    return 'as handler'\n")
    target = resolve_target("fn.py", cwd=str(tmp_path))
    assert load(target).kind == "handler"
    assert load(target, kind="wsgi").kind == "wsgi"
    assert load(target, kind="auto").kind == "handler"


def test_thread_mode_sets_wsgi_multithread(tmp_path: Path) -> None:
    write(
        tmp_path / "fn.py",
        """
        def application(environ, start_response):
            start_response("200 OK", [])
            return [str(environ["wsgi.multithread"]).encode()]
        """,
    )
    target = resolve_target("fn.py", cwd=str(tmp_path))
    assert load(target).invoke(_inv())["body"] == b"False"
    assert load(target, multithread=True).invoke(_inv())["body"] == b"True"


# -- LoadError: one line, naming the file ------------------------------------------------------


LOAD_ERRORS = [
    (
        "syntax",
        "def handler(event, context)\n    return 1\n",
        None,
        None,
        "fn.py: SyntaxError at line 1: expected ':'",
    ),
    (
        "indent",
        "def handler(event, context):\nreturn 1\n",
        None,
        None,
        "fn.py: IndentationError at line 2: expected an indented block",
    ),
    (
        "missing dependency",
        "import json\nimport no_such_dependency_xyz\n",
        None,
        None,
        "fn.py: ModuleNotFoundError at line 2: No module named 'no_such_dependency_xyz'",
    ),
    (
        "init raises",
        "X = 1\n\nraise RuntimeError('database\\nunreachable')\n",
        None,
        None,
        "fn.py: RuntimeError at line 3: database unreachable",
    ),
    (
        "sys.exit at import",
        "import sys\nsys.exit(3)\n",
        None,
        None,
        "fn.py: SystemExit at line 2: 3",
    ),
    (
        "helper raises",
        "import helper\n",
        None,
        None,
        "fn.py: ZeroDivisionError at helper.py line 2 (imported at line 1): division by zero",
    ),
    (
        "helper syntax",
        "import badhelper\n",
        None,
        None,
        "fn.py: SyntaxError in badhelper.py at line 1:",
    ),
    (
        "no entry point",
        "def something(event, context): pass\n",
        None,
        None,
        "fn.py has none of handler, lambda_handler, app, application; name one with PATH:ATTR"
        " (it defines something)",
    ),
    (
        "missing attr",
        "def handler(event, context): pass\n",
        "main",
        None,
        "fn.py has no attribute 'main' (it defines handler)",
    ),
    (
        "not callable",
        "handler = 42\n",
        None,
        None,
        "fn.py: 'handler' is a int, not a function or an app",
    ),
    (
        "a class",
        "class handler:\n    pass\n",
        None,
        None,
        "fn.py: 'handler' is a class; name an instance of it or a function",
    ),
    (
        "sync three args",
        "def app(scope, receive, send): pass\n",
        None,
        None,
        "fn.py: 'app' takes (scope, receive, send) but is not async",
    ),
    ("no args", "def handler(): pass\n", None, None, "fn.py: 'handler'() fits no kind"),
    (
        "declared asgi on a sync handler",
        "def handler(event, context): pass\n",
        None,
        "asgi",
        "fn.py: 'handler' is not an ASGI app",
    ),
    (
        "declared wsgi on async",
        "async def app(scope, receive, send): pass\n",
        None,
        "wsgi",
        "fn.py: 'app' is not a WSGI app",
    ),
    (
        "declared handler on 3 args",
        "def handler(a, b, c): pass\n",
        None,
        "handler",
        "fn.py: 'handler' is not a handler",
    ),
    (
        "unknown kind",
        "def handler(event, context): pass\n",
        None,
        "lambda",
        "fn.py: unknown kind 'lambda'; use handler, asgi or wsgi",
    ),
]


@pytest.mark.parametrize(
    ("source", "attr", "kind", "message"),
    [case[1:] for case in LOAD_ERRORS],
    ids=[case[0] for case in LOAD_ERRORS],
)
def test_load_errors_are_one_line_and_name_the_file(
    tmp_path: Path, source: str, attr: str | None, kind: str | None, message: str
) -> None:
    sub = tmp_path / "sub"
    write(sub / "helper.py", "X = 1\nY = 1 / 0\n")
    write(sub / "badhelper.py", "def broken(:\n")
    write(sub / "fn.py", source)
    spec = "sub/fn.py" + (f":{attr}" if attr else "")
    with pytest.raises(LoadError) as info:
        load(resolve_target(spec, cwd=str(tmp_path)), kind=kind)
    text = str(info.value)
    assert text.startswith("sub/fn.py")
    assert "sub/" + message in text
    assert "\n" not in text
    assert info.value.details


def test_import_error_details_keep_the_traceback(tmp_path: Path) -> None:
    write(tmp_path / "fn.py", "def boom():\n    raise ValueError('deep')\n\nboom()\n")
    with pytest.raises(LoadError) as info:
        load(resolve_target("fn.py", cwd=str(tmp_path)))
    assert str(info.value) == "fn.py: ValueError at line 2: deep"
    assert info.value.details.startswith("Traceback (most recent call last):")
    assert "ValueError: deep" in info.value.details


def test_module_name_taken_by_the_standard_library(tmp_path: Path) -> None:
    assert "json" in sys.modules and json  # imported by this test module
    write(tmp_path / "json.py", "def handler(event, context): pass\n")
    with pytest.raises(LoadError, match=r"^json.py: the module name 'json' is already taken by "):
        load(resolve_target("json.py", cwd=str(tmp_path)))


def test_module_name_taken_by_hourai(tmp_path: Path) -> None:
    write(tmp_path / "hourai.py", "def handler(event, context): pass\n")
    with pytest.raises(LoadError, match="the module name 'hourai' is hourai's own"):
        load(resolve_target("hourai.py", cwd=str(tmp_path)))


def test_file_removed_after_resolving(tmp_path: Path) -> None:
    fn = write(tmp_path / "gone.py", "def handler(e): pass\n")
    target = resolve_target("gone.py", cwd=str(tmp_path))
    os.remove(fn)
    with pytest.raises(LoadError, match=r"^gone.py: no such file"):
        load(target)


def test_load_error_for_a_directory_target_names_the_file(tmp_path: Path) -> None:
    write(tmp_path / "svc" / "app.py", "x = (\n")
    with pytest.raises(LoadError, match=r"^svc/app.py: SyntaxError at line 1"):
        load(resolve_target("svc", cwd=str(tmp_path)))
