"""A small FastAPI application with a lifespan.

Run it with ``hourai run examples/fastapi_app/app.py`` and open the URL it prints, or
``/docs`` for the generated API page. hourai finds ``app``, recognises an ASGI application and
runs its lifespan startup once, in the function's snapshot: what it prepares (here a greeting
and a small table) is already there in every worker forked from the snapshot.
"""

import asyncio
import os
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel


@asynccontextmanager
async def lifespan(app: FastAPI):
    # Expensive setup belongs here: connection pools, models, caches.
    yield {"greeting": "Hello from FastAPI", "started_in": os.getpid(), "prices": {"apple": 3}}


app = FastAPI(lifespan=lifespan)


class Item(BaseModel):
    name: str
    price: float
    tags: list[str] = []


@app.get("/")
async def index(request: Request):
    return {"message": request.state.greeting, "started_in": request.state.started_in}


@app.get("/items/{item_id}")
async def get_item(item_id: int, verbose: bool = False):
    return {"item_id": item_id, "verbose": verbose}


@app.post("/items", status_code=201)
async def create_item(item: Item, request: Request):
    known = request.state.prices.get(item.name)
    return {"item": item.model_dump(), "known_price": known}


@app.get("/prices/{name}")
def price(name: str, request: Request):
    if name not in request.state.prices:
        raise HTTPException(status_code=404, detail=f"no price for {name}")
    return {"name": name, "price": request.state.prices[name]}


@app.get("/where")
async def where(request: Request):
    return {"root_path": request.scope["root_path"], "path": request.url.path, "pid": os.getpid()}


@app.get("/stream")
async def stream():
    async def numbers():
        for i in range(3):
            await asyncio.sleep(0)  # as if each line came from a database cursor
            yield f"{i}\n"

    return StreamingResponse(numbers(), media_type="text/plain")


@app.get("/boom")
async def boom():
    raise RuntimeError("boom from FastAPI")
