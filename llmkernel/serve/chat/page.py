"""The page at GET /: a chat for decoders, a form per route for encoders, classifiers and NER models.

The files next to this module are the page: `index.html` (the frame and the key field), one panel per
route (`chat.html`, `embed.html`, `classify.html`, `ner.html`), `chat.js` and `chat.css`, shipped in the
package (no CDN, no outside URL; the Content-Security-Policy below lets the page load and call this server
only). The server renders the panels of the routes its model serves, and a small JSON config the script
reads: the task, the routes, whether a key is needed and the server's --max_tokens. The page and its two
files are open to anyone (gate.py): they hold no data and the model's answers need the key, which the page
keeps in the browser tab's sessionStorage and sends as `Authorization: Bearer KEY`.
"""

from __future__ import annotations

import functools
import hashlib
import json
from importlib import resources
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

if TYPE_CHECKING:
    from llmkernel.serve.state import Services

PAGE_PATHS = ("/", "/chat.js", "/chat.css")  # answered without a key (gate.py)
# The panel of each route, in the order of state.ROUTES; /v1/completions has none (the chat covers it).
PANELS = {
    "/v1/chat/completions": "chat.html",
    "/v1/classify": "classify.html",
    "/v1/embeddings": "embed.html",
    "/v1/ner": "ner.html",
}
# The page may load its own script and style and call this server, nothing else.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Cache-Control": "no-cache",  # small, and it carries the server's config
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
# The page links chat.js?v=HASH, so a new version is fetched at once and an old one may be kept a day.
ASSET_HEADERS = {"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"}
MEDIA_TYPES = {"chat.js": "text/javascript", "chat.css": "text/css"}  # Starlette adds charset=utf-8


@functools.cache
def read(name: str) -> str:
    """The text of one of the page's files (read once per process)."""
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


@functools.cache
def version(name: str) -> str:
    """A short hash of a file, the `?v=` of its URL."""
    return hashlib.sha256(read(name).encode()).hexdigest()[:12]


def render(services: Services) -> str:
    """The page for this server: the panels of the routes its model serves, and the script's config."""
    config = {
        "task": services.task,
        "routes": services.routes,
        "key_required": services.keys is not None,
        "max_tokens": services.config.max_tokens,
    }
    # "<" escaped: no string in the config can close the <script> element that holds it
    config_json = json.dumps(config).replace("<", "\\u003c")
    panels = "\n".join(read(PANELS[route]) for route in services.routes if route in PANELS)
    replacements = {
        "{{config}}": config_json,
        "{{panels}}": panels,
        "{{key_hidden}}": "" if services.keys is not None else "hidden",
        "{{js_version}}": version("chat.js"),
        "{{css_version}}": version("chat.css"),
    }
    page = read("index.html")
    for placeholder, value in replacements.items():
        page = page.replace(placeholder, value)
    return page


router = APIRouter(include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
async def chat_page(request: Request) -> HTMLResponse:
    """The page (no key needed: the calls it makes send one)."""
    return HTMLResponse(render(request.app.state.services), headers=PAGE_HEADERS)


@router.get("/chat.js")
async def chat_script() -> Response:
    return Response(read("chat.js"), media_type=MEDIA_TYPES["chat.js"], headers=ASSET_HEADERS)


@router.get("/chat.css")
async def chat_style() -> Response:
    return Response(read("chat.css"), media_type=MEDIA_TYPES["chat.css"], headers=ASSET_HEADERS)
