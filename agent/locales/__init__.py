"""The pages' message catalogues: one flat JSON file per language, editable without code.

``zh-CN.json`` and ``en.json`` map a key (``panel.start_lesson``) to its text, with
``{name}`` placeholders the page fills in. Both web servers (the teacher panel and the
maintenance dashboard) serve ``i18n.js``, the one lookup function, from here and inline
the catalogues into each page they serve, so a page never fetches text from elsewhere
and shows the right language on its first paint.
"""

from __future__ import annotations

import functools
import html
import json
from pathlib import Path
from typing import Literal, get_args

from aiohttp import web

LOCALES_DIR = Path(__file__).resolve().parent
Language = Literal["zh-CN", "en"]
LANGUAGES: tuple[Language, ...] = get_args(Language)
FALLBACK: Language = "en"  # what a key missing from a catalogue falls back to
SCRIPT = LOCALES_DIR / "i18n.js"
SCRIPT_URL = "/i18n/i18n.js"
DATA_ID = "i18n-data"


@functools.cache
def catalogue(language: Language) -> dict[str, str]:
    """One language's messages, read once (a translator's edit needs a restart)."""
    path = LOCALES_DIR / f"{language}.json"
    messages = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(messages, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in messages.items()
    ):
        raise ValueError(f"{path}: must be one JSON object of key -> text")
    return messages


def page_data(setting: str) -> str:
    """The JSON the page's ``i18n.js`` reads: the setting and every catalogue.

    Every catalogue goes in (a few kilobytes each) because ``auto`` is decided in the
    browser, from ``navigator.languages``, and English fills any key a translation
    lacks. ``<`` is escaped so no text can close the data block."""
    data = {
        "setting": setting,
        "fallback": FALLBACK,
        "catalogues": {language: catalogue(language) for language in LANGUAGES},
    }
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")


def localized_html(path: Path, setting: str) -> str:
    """``path``'s page with the catalogues inlined before ``</head>``.

    A ``type="application/json"`` block is data, not script: the CSP's ``script-src
    'self'`` still holds."""
    text = path.read_text(encoding="utf-8")
    block = (
        f'<script type="application/json" id="{DATA_ID}" '
        f'data-setting="{html.escape(setting)}">{page_data(setting)}</script>\n'
    )
    head_end = text.index("</head>")
    return text[:head_end] + block + text[head_end:]


def page_response(path: Path, setting: str) -> web.Response:
    """The localized page as an HTML response."""
    return web.Response(text=localized_html(path, setting), content_type="text/html")


async def script_response(request: web.Request) -> web.FileResponse:
    """``GET /i18n/i18n.js``: the pages' lookup function."""
    return web.FileResponse(SCRIPT, headers={"Content-Type": "text/javascript; charset=utf-8"})


def add_routes(app: web.Application) -> None:
    """Serve ``i18n.js`` from ``app`` (both servers call this)."""
    app.router.add_get(SCRIPT_URL, script_response)
