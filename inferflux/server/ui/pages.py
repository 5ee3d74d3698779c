"""The static files of the local pages (/debug, /admin) and the `/admin` page route.

Plain HTML, CSS and a little JavaScript from `static/`, no build step. The pages hold no data: their
scripts call the JSON routes (`/debug/api/*`, `/admin/*`) with an admin key the user pastes, kept in
the tab's sessionStorage only (never a cookie: nothing is sent unless the script sends it, so another
site cannot ride on it).
"""

from __future__ import annotations

from pathlib import Path

from quart import Blueprint, Response

from inferflux.server.errors import APIError
from inferflux.server.openapi import documented

STATIC = Path(__file__).parent / "static"
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8"}
ASSETS = ("ui.css", "ui.js", "debug.js", "admin.js")
# The pages load only their own files: no inline script, no other origin.
CSP = "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"

assets_bp = Blueprint("ui", __name__)
admin_page_bp = Blueprint("adminui", __name__)


def page(name: str) -> Response:
    """A file of `static/` with its content type, uncached (the pages change with the server)."""
    path = STATIC / name
    response = Response(path.read_bytes(), content_type=TYPES[path.suffix])
    response.headers["Cache-Control"] = "no-store"
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


@assets_bp.get("/ui/<name>")
@documented(summary="A static file of the /debug and /admin pages (CSS, JavaScript)", content="text/plain")
async def asset(name: str) -> Response:
    if name not in ASSETS:
        raise APIError(404, f"no file {name!r}", type="invalid_request_error", code="not_found")
    return page(name)


@admin_page_bp.get("/admin")
@documented(summary="The admin page (HTML): API keys, tenants, limits, policies", content="text/html")
async def admin_page() -> Response:
    return page("admin.html")
