"""Tracebacks that name the user's own files.

A function runs from its copy in the code store (``<state>/code/<digest>/app.py``); the user
knows it as the file they deployed (``/home/ada/shop/app.py``). Every traceback a user sees,
in an error payload or in ``hourai logs``, is shown with the deployed path. Only the text
changes: the code objects keep the real path, so ``linecache`` still finds the source lines.
"""

from __future__ import annotations

_mapping: tuple[str, str] | None = None


def show_as(stored_root: str | None, source_root: str | None) -> None:
    """From now on in this process, paths under ``stored_root`` read as ``source_root``."""
    global _mapping
    if stored_root and source_root and stored_root != source_root:
        _mapping = (stored_root.rstrip("/") + "/", source_root.rstrip("/") + "/")
    else:
        _mapping = None


def user_paths(text: str) -> str:
    if _mapping is None:
        return text
    stored, source = _mapping
    return text.replace(stored, source)
