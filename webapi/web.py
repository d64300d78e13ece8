"""The web page: ``GET /`` serves a single page (plain HTML, CSS and JavaScript under
``webapi/static/ui``, no build step) that talks to the same JSON API as every other client.

The page and its files are public; everything it shows comes from API calls that carry the key
the user signs in with, which the page keeps in the browser's session storage only. A strict
Content-Security-Policy allows scripts, styles and connections to this origin alone.
"""

from __future__ import annotations

from importlib import resources

from flask import Blueprint, Response

from webapi.errors import ApiError

bp = Blueprint("web", __name__)

ASSETS = {"app.js": "text/javascript", "app.css": "text/css", "icon.svg": "image/svg+xml"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _read(name: str) -> bytes:
    return resources.files("webapi").joinpath("static/ui", name).read_bytes()


@bp.get("/")
def index() -> Response:
    """The web page."""
    return Response(_read("index.html"), mimetype="text/html",
                    headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"})


@bp.get("/ui/<name>")
def asset(name: str) -> Response:
    """A file of the web page."""
    if name not in ASSETS:
        raise ApiError(404, "not_found", f"no such file {name!r}")
    return Response(_read(name), mimetype=ASSETS[name], headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"})
