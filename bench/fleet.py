"""The functions `bench density` deploys: real application shapes with their own dependencies.

Five shapes, the way a fleet of small services looks: a Flask JSON API, a FastAPI app with
pydantic models, a pandas/numpy report, a jinja2-rendered page and a plain handler. Each
variant is one ``requirements.txt``; they overlap as real fleets do (jinja2 is the Flask
app's dependency too; two pandas/numpy pin sets, one of them a full ``pip freeze`` lock; some
ranges, some pins). Every function is its own directory with its own copy of the code (a
seed makes each copy differ), so nothing is shared but what hourai shares.

:data:`QUICK` is the same fleet in small: the same shapes built on tiny packages whose wheels
are made on the spot (:func:`quick_wheels`), so a quick run needs no package index.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.wheels import build_wheel


@dataclass(frozen=True)
class Variant:
    """One kind of function: a shape with one set of requirements."""

    name: str
    shape: str  # flask | fastapi | pandas | jinja2 | plain
    kind: str  # wsgi | asgi | handler: how a plain process serves it (the baseline)
    file: str  # the module file in the function's dir
    attr: str
    source: str  # "__SEED__" is replaced by the function's number
    requirements: str
    per_tenant: int  # how many of each tenant's functions are this variant

    def write(self, where: Path, seed: int) -> Path:
        """The function's own directory, readable by its tenant's uid."""
        where.mkdir(parents=True, exist_ok=True)
        where.chmod(0o755)
        (where / self.file).write_text(self.source.replace("__SEED__", str(seed)))
        (where / "requirements.txt").write_text(self.requirements)
        for f in where.iterdir():
            f.chmod(0o644)
        return where


FLASK = '''"""A Flask JSON API: a catalogue loaded at start, a few routes."""

from flask import Flask, abort, jsonify, request

SEED = __SEED__
app = Flask(__name__)
ITEMS = {i: {"id": i, "name": f"item-{i}-{SEED}", "price": i * 1.25} for i in range(500)}


@app.get("/")
def index():
    return jsonify(service=f"catalogue-{SEED}", items=len(ITEMS))


@app.get("/items/<int:item_id>")
def item(item_id):
    if item_id not in ITEMS:
        abort(404)
    return jsonify(ITEMS[item_id])


@app.post("/items")
def create():
    body = request.get_json(force=True)
    ITEMS[len(ITEMS)] = body
    return jsonify(id=len(ITEMS) - 1), 201
'''

FASTAPI = '''"""A FastAPI app: pydantic models in and out."""

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

SEED = __SEED__


class Order(BaseModel):
    id: int
    customer: str
    total: float
    paid: bool = False


app = FastAPI(title=f"orders-{SEED}")
ORDERS = {i: Order(id=i, customer=f"c{i % 37}", total=i * 3.5) for i in range(300)}


@app.get("/")
def index() -> dict:
    return {"service": f"orders-{SEED}", "orders": len(ORDERS)}


@app.get("/orders/{order_id}")
def get_order(order_id: int) -> Order:
    if order_id not in ORDERS:
        raise HTTPException(404, "no such order")
    return ORDERS[order_id]


@app.post("/orders")
def create(order: Order) -> Order:
    ORDERS[order.id] = order
    return order
'''

PANDAS = '''"""A pandas/numpy report: a year of prices loaded at start, rolling means per call."""

import numpy as np
import pandas as pd

SEED = __SEED__
rng = np.random.default_rng(SEED)
PRICES = pd.DataFrame(
    {"price": 100 + rng.standard_normal(365).cumsum(), "volume": rng.integers(1, 1000, 365)},
    index=pd.date_range("2024-01-01", periods=365, freq="D"),
)


def handler(event, context):
    params = event.get("queryStringParameters") or {}
    window = int(params.get("window", 7))
    rolling = PRICES["price"].rolling(window).mean()
    return {
        "seed": SEED,
        "last": round(float(rolling.iloc[-1]), 4),
        "best_month": str(PRICES["volume"].resample("MS").sum().idxmax().date()),
    }
'''

JINJA2 = '''"""A page rendered from jinja2 templates, compiled at start."""

from jinja2 import DictLoader, Environment, select_autoescape

SEED = __SEED__
ENV = Environment(
    loader=DictLoader(
        {
            "base.html": "<html><head><title>{% block title %}{% endblock %}</title></head>"
            "<body>{% block body %}{% endblock %}</body></html>",
            "page.html": "{% extends 'base.html' %}{% block title %}{{ title }}{% endblock %}"
            "{% block body %}<ul>{% for row in rows %}<li>{{ row.name }}: {{ row.value }}</li>"
            "{% endfor %}</ul>{% endblock %}",
        }
    ),
    autoescape=select_autoescape(),
)
PAGE = ENV.get_template("page.html")
ROWS = [{"name": f"row {i}", "value": i * SEED} for i in range(50)]


def handler(event, context):
    return {
        "statusCode": 200,
        "headers": {"content-type": "text/html"},
        "body": PAGE.render(title=f"report {SEED}", rows=ROWS),
    }
'''

PLAIN = '''"""A plain handler: the standard library only (its requirements.txt is empty)."""

import json

SEED = __SEED__
TABLE = {f"key{i}": i * SEED for i in range(2000)}


def handler(event, context):
    return json.dumps({"value": TABLE["key7"], "path": event["rawPath"]})
'''

# A full `pip freeze` of pandas 2.3.3 with numpy 2.2.6: resolved once, then never again.
PANDAS2_LOCK = """numpy==2.2.6
pandas==2.3.3
python-dateutil==2.9.0.post0
pytz==2026.4
six==1.17.0
tzdata==2026.4
"""

REAL = (
    Variant("flask", "flask", "wsgi", "app.py", "app", FLASK, "flask>=3.0\n", 4),
    Variant("fastapi", "fastapi", "asgi", "app.py", "app", FASTAPI, "fastapi==0.142.2\n", 4),
    Variant(
        "pandas3",
        "pandas",
        "handler",
        "handler.py",
        "handler",
        PANDAS,
        "pandas==3.0.6\nnumpy==2.4.6\n",
        3,
    ),
    Variant("pandas2", "pandas", "handler", "handler.py", "handler", PANDAS, PANDAS2_LOCK, 2),
    Variant("jinja2", "jinja2", "handler", "handler.py", "handler", JINJA2, "jinja2>=3.1\n", 3),
    Variant("plain", "plain", "handler", "handler.py", "handler", PLAIN, "", 4),
)

# ---------------------------------------------------------------------- the quick fleet

# Each tiny package holds a table built at import, so it has pages worth sharing.
_WEIGHT = "_TABLE = [f'{i:08d}-{VERSION}' for i in range(__ROWS__)]\n"

WEBLITE = (
    "import json\nVERSION = '1.0'\n"
    + _WEIGHT
    + """
class App:
    def __init__(self):
        self.routes = {}

    def route(self, path):
        def add(fn):
            self.routes[path] = fn
            return fn
        return add

    def __call__(self, environ, start_response):
        fn = self.routes.get(environ.get("PATH_INFO") or "/")
        if fn is None:
            start_response("404 Not Found", [("content-type", "text/plain")])
            return [b"not found"]
        start_response("200 OK", [("content-type", "application/json")])
        return [json.dumps(fn(environ)).encode()]
"""
)

ASGILITE = (
    "import json\nVERSION = '1.0'\n"
    + _WEIGHT
    + """
class App:
    def __init__(self, view):
        self.view = view

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = json.dumps(self.view(scope)).encode()
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
"""
)

FRAMELITE = (
    "import numlite\nVERSION = '__VERSION__'\n"
    + _WEIGHT
    + """
class Frame:
    def __init__(self, columns):
        self.columns = {k: numlite.Array(v) for k, v in columns.items()}

    def total(self, name):
        return self.columns[name].sum()
"""
)

NUMLITE = (
    "VERSION = '__VERSION__'\n"
    + _WEIGHT
    + """
class Array(list):
    def sum(self):
        return float(sum(self))
"""
)

TEMPLITE = (
    "VERSION = '1.0'\n"
    + _WEIGHT
    + """
class Template:
    def __init__(self, text):
        self.text = text

    def render(self, **values):
        return self.text.format(**values)
"""
)

QUICK_WEB = """from weblite import App

SEED = __SEED__
app = App()
ITEMS = {i: f"item-{i}-{SEED}" for i in range(500)}


@app.route("/")
def index(environ):
    return {"service": SEED, "items": len(ITEMS)}
"""

QUICK_ASGI = """from asgilite import App

SEED = __SEED__
ORDERS = {i: {"id": i, "total": i * 3.5} for i in range(300)}
app = App(lambda scope: {"service": SEED, "orders": len(ORDERS)})
"""

QUICK_FRAME = """import framelite

SEED = __SEED__
PRICES = framelite.Frame({"price": [100.0 + i * SEED for i in range(365)]})


def handler(event, context):
    return {"seed": SEED, "total": PRICES.total("price")}
"""

QUICK_TEMPL = """from templite import Template

SEED = __SEED__
PAGE = Template("<html><body><h1>{title}</h1>{rows}</body></html>")


def handler(event, context):
    rows = "".join(f"<li>{i}</li>" for i in range(50))
    return {"statusCode": 200, "headers": {"content-type": "text/html"},
            "body": PAGE.render(title=f"report {SEED}", rows=rows)}
"""

QUICK = (
    Variant("weblite", "flask", "wsgi", "app.py", "app", QUICK_WEB, "weblite>=1\n", 2),
    Variant("asgilite", "fastapi", "asgi", "app.py", "app", QUICK_ASGI, "asgilite==1.0\n", 2),
    Variant(
        "framelite1", "pandas", "handler", "handler.py", "handler", QUICK_FRAME, "framelite<2\n", 2
    ),
    Variant(
        "framelite2",
        "pandas",
        "handler",
        "handler.py",
        "handler",
        QUICK_FRAME,
        "framelite==2.0\nnumlite==2.0\n",
        2,
    ),
    Variant("templite", "jinja2", "handler", "handler.py", "handler", QUICK_TEMPL, "templite\n", 1),
    Variant("plain", "plain", "handler", "handler.py", "handler", PLAIN, "", 1),
)


def quick_wheels(out: Path, rows: int = 20000) -> Path:
    """The quick fleet's packages, as wheels in ``out`` (an index for ``--find-links``)."""

    def source(text: str, version: str) -> str:
        return text.replace("__VERSION__", version).replace("__ROWS__", str(rows))

    build_wheel(
        out, "weblite", "1.0", {"weblite/__init__.py": source(WEBLITE, "1.0")}, ("templite>=1",)
    )
    build_wheel(out, "asgilite", "1.0", {"asgilite/__init__.py": source(ASGILITE, "1.0")})
    build_wheel(out, "templite", "1.0", {"templite/__init__.py": source(TEMPLITE, "1.0")})
    for version, needs in (("1.0", "numlite<2"), ("2.0", "numlite>=2")):
        build_wheel(
            out,
            "framelite",
            version,
            {"framelite/__init__.py": source(FRAMELITE, version)},
            (needs,),
        )
        build_wheel(out, "numlite", version, {"numlite/__init__.py": source(NUMLITE, version)})
    return out


def layout(variants: tuple[Variant, ...], n: int) -> list[tuple[str, str, Variant]]:
    """The first ``n`` functions of the fleet: (name, tenant, variant). Tenants fill up one
    after the other, each with the same mix (``per_tenant`` of each variant, interleaved)."""
    slots = [v for v in variants for _ in range(v.per_tenant)]
    # interleaved, so a partly filled tenant still has every shape
    order = sorted(range(len(slots)), key=lambda i: (slots[: i + 1].count(slots[i]), i))
    mix = [slots[i] for i in order]
    out = []
    for i in range(n):
        tenant, slot = divmod(i, len(mix))
        out.append((f"f{i}", f"t{tenant}", mix[slot]))
    return out


def tenant_size(variants: tuple[Variant, ...]) -> int:
    return sum(v.per_tenant for v in variants)
