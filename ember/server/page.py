"""The chat page at `/` of `ember serve` (static files in ember/server/ui/, no build step).

The page is public, like any static file: it holds nothing. Everything it shows comes from the API
endpoints, which keep asking for the API key (the page asks the user for it on a 401). Model output is
untrusted: the page renders it through a sanitiser, and the Content-Security-Policy below forbids inline
and foreign scripts, so a reply that slipped past the sanitiser could still run nothing.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

UI = Path(__file__).with_name("ui")
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
# no-cache: revalidated each time (ETag), so an upgraded ember never runs yesterday's scripts
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-cache"}
mimetypes.add_type("text/javascript", ".js")  # some systems' tables say text/plain: browsers refuse modules


class UIFiles(StaticFiles):
    """The page's files, with the page's headers."""

    def file_response(self, *args: Any, **kwargs: Any) -> Any:
        response = super().file_response(*args, **kwargs)
        response.headers.update(HEADERS)
        return response


def mount_page(app: FastAPI) -> None:
    """GET / (the page) and /ui/* (its scripts, styles and vendored libraries)."""

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(UI / "index.html", media_type="text/html", headers=HEADERS)

    app.mount("/ui", UIFiles(directory=UI), name="ui")
