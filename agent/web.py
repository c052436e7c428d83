"""What every local web page of the agent shares: who may ask, and the headers it gets.

The maintenance dashboard and the teacher panel are small aiohttp apps that usually
listen on loopback and have no login of their own. Three rules keep them safe:

* ``Host`` must be a name we expect (DNS rebinding: a web page on the internet whose
  name resolves to 127.0.0.1 must not read or drive the panel);
* state-changing requests must come from the page's own origin (another site open in
  the kiosk browser must not press "start" with a cross-site form or fetch);
* pages are self-contained: a strict CSP, nothing fetched from outside.

Anyone who can reach the port can send a malformed request (no or an empty ``Host``, a
garbage request line): aiohttp answers 400 and would log an ERROR with a traceback for
each. :func:`request_logger` turns those into one rate-limited warning line per client
(`agent.logs.RejectionLog`, as for signalling), and :func:`guard` notes refused ``Host``
names there too; a handler's own crash still logs its traceback.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable, Collection, MutableMapping
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.log import server_logger
from aiohttp.typedefs import Middleware

from agent.logs import RejectionLog

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "media-src 'self' blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (the safe default to listen on)."""
    host = host.strip("[]")
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(host: str) -> str:
    """``Host`` without the port (``[::1]:8480`` -> ``::1``)."""
    host = host.lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def expected_hosts(bind: str, allowed: Collection[str] = ()) -> frozenset[str] | None:
    """The ``Host`` names a server bound to ``bind`` answers (None: any)."""
    if allowed:
        return frozenset(h.lower() for h in allowed)
    if is_loopback(bind):
        return LOOPBACK_NAMES
    return None


def same_origin(request: web.Request) -> bool:
    """False when a browser says the request comes from another site's page."""
    origin = request.headers.get("Origin")
    return origin is None or origin.split("://", 1)[-1].lower() == request.host.lower()


class _RequestLogger(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's server logger, with malformed requests noted as rejections."""

    def __init__(self, rejections: RejectionLog) -> None:
        super().__init__(server_logger, {})
        self.rejections = rejections

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        if isinstance(exc, HttpProcessingError):
            # aiohttp logs these as "Error handling request from %s", remote.
            sender = str(args[0]) if args else "unknown"
            reason = (str(exc.message).strip().splitlines() or [""])[0]
            self.rejections.note(sender, "bad-request", f"{exc.code}: {reason}")
            return
        kwargs.setdefault("stacklevel", 2)  # the record names aiohttp's line, not this one
        super().log(level, msg, *args, **kwargs)

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        return msg, kwargs


def request_logger(rejections: RejectionLog) -> logging.LoggerAdapter[logging.Logger]:
    """The ``logger=`` for an `aiohttp.web.AppRunner` whose bad requests go to
    ``rejections`` (one warning per client and window, no traceback)."""
    return _RequestLogger(rejections)


def guard(hosts: frozenset[str] | None, rejections: RejectionLog | None = None) -> Middleware:
    """Middleware: refuse unexpected ``Host`` names (noted in ``rejections``); set the
    self-contained headers."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if hosts is not None and host_name(request.host) not in hosts:
            if rejections is not None:
                rejections.note(
                    request.remote or "unknown",
                    "bad-request",
                    f"421: unexpected Host header {request.host[:100]!r}",
                )
            return web.Response(status=421, text="unexpected Host header\n")
        response = await handler(request)
        if not response.prepared:
            response.headers["Content-Security-Policy"] = CSP
            response.headers["X-Content-Type-Options"] = "nosniff"
            response.headers["Referrer-Policy"] = "no-referrer"
            response.headers["X-Frame-Options"] = "DENY"
            response.headers.setdefault("Cache-Control", "no-cache")
        return response

    return middleware
