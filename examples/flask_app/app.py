"""A small Flask application.

Run it with ``hourai run examples/flask_app/app.py`` and open the URL it prints. hourai finds
``app``, recognises a Flask application and serves it as WSGI; Flask is imported once, in the
function's snapshot, so each worker starts without paying for it.
"""

from flask import Flask, jsonify, request

app = Flask(__name__)
# Let errors reach hourai, which answers 500 with an error id and logs the traceback under that
# id. Without this Flask answers its own 500 page and logs the traceback itself.
app.config["PROPAGATE_EXCEPTIONS"] = True

ITEMS = {1: "apple", 2: "banana"}


@app.get("/")
def index():
    return "Hello from Flask!\n"


@app.get("/items/<int:item_id>")
def get_item(item_id):
    if item_id not in ITEMS:
        return jsonify(error=f"no item {item_id}"), 404
    return jsonify(id=item_id, name=ITEMS[item_id])


@app.get("/search")
def search():
    return jsonify(q=request.args.get("q", ""), tags=request.args.getlist("tag"))


@app.post("/form")
def form():
    return jsonify(name=request.form.get("name"), colours=request.form.getlist("colour"))


@app.post("/json")
def echo_json():
    return jsonify(received=request.get_json()), 201


@app.get("/where")
def where():
    return jsonify(
        script_root=request.script_root, path=request.path, url=request.url, host=request.host
    )


@app.get("/cookie")
def cookie():
    response = jsonify(seen=request.cookies.get("session"))
    response.set_cookie("visited", "yes")
    return response


@app.get("/boom")
def boom():
    raise RuntimeError("boom from Flask")
