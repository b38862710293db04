"""The dashboard: plain static files (scheduler/static) served by the scheduler at `/`.

No build step and nothing fetched from elsewhere: the page polls the JSON API under /api and draws
its charts as inline SVG. index.html names its script and stylesheet with a hash of their content
(`?v=`), so a browser never mixes an old script with a new page after an upgrade.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.requests import Request
from starlette.routing import Route

STATIC_DIR = Path(__file__).with_name("static")

# The page loads only its own files and talks only to this API; job names, paths and errors are
# shown as text, and this keeps any that slipped through from running or loading anything.
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
                               "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _index() -> str:
    digest = hashlib.sha256()
    for name in ("app.js", "style.css"):
        digest.update((STATIC_DIR / name).read_bytes())
    return (STATIC_DIR / "index.html").read_text(encoding="utf-8").replace("__VERSION__", digest.hexdigest()[:12])


def _dashboard(request: Request) -> HTMLResponse:
    return HTMLResponse(_index(), headers=HEADERS)


def list_files(roots: list[Path], limit: int = 500, depth: int = 4) -> list[str]:
    """Candidate list files (*.txt) under the data roots, a few folders deep, sorted; at most `limit`."""
    found: list[str] = []
    for root in roots:
        root = root.resolve()
        for folder, dirs, files in os.walk(root):
            if len(Path(folder).relative_to(root).parts) >= depth:
                dirs.clear()
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found += [str(Path(folder) / f) for f in sorted(files) if f.endswith(".txt")]
            if len(found) >= limit:
                return found[:limit]
    return found


def mount_dashboard(api: FastAPI) -> None:
    """Serve the dashboard at `/` and its files under `/static/`.

    Both are plain Starlette routes, outside the API's dependencies: the page holds no job data, so
    it loads even where reads need the token (RELAY_API_TOKEN_READS); it then asks for the token.
    """
    api.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    api.router.routes.append(Route("/", _dashboard, methods=["GET", "HEAD"], include_in_schema=False))
