"""``classroom-agent lesson start|end|status``: the panel's API from a shell.

Talks to the agent on this machine (no token needed on loopback); ``--token-file``
for a panel elsewhere. Blocking HTTP on purpose: this is a one-shot command.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


class PanelUnavailable(RuntimeError):
    """No agent answers at the URL; the text says what to check."""


class PanelClient:
    def __init__(self, url: str, token: str | None = None, timeout_s: float = 20.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                result: dict[str, Any] = json.loads(response.read())
                return result
        except urllib.error.HTTPError as exc:
            try:
                error: dict[str, Any] = json.loads(exc.read())
            except ValueError:
                error = {"ok": False, "error": f"HTTP {exc.code}"}
            error.setdefault("ok", False)
            return error
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise PanelUnavailable(
                f"no agent panel at {self.url} ({reason}): is classroom-agent running, and "
                "is stream.panel_port the port it uses?"
            ) from None

    def status(self) -> dict[str, Any]:
        return self._call("GET", "/api/status")

    def start(self, group: str | None = None, subject: str = "") -> dict[str, Any]:
        body: dict[str, Any] = {"subject": subject}
        if group:
            body["group"] = group
        return self._call("POST", "/api/lesson/start", body)

    def end(self, group: str | None = None) -> dict[str, Any]:
        return self._call("POST", "/api/lesson/end", {"group": group} if group else {})
