"""The room's local web panel: the one button, live tiles, the kiosk and the watch page.

:class:`PanelServer` is a supervisor service serving the page and its small local
HTTP API (``agent/panel/server.py`` lists the routes); :class:`Viewers` connects the
browsers as WebRTC viewers. ``classroom-agent lesson start|end|status`` uses the same
API (``agent/panel/client.py``).
"""

from agent.panel.cli import add_lesson_parser
from agent.panel.client import PanelClient, PanelUnavailable
from agent.panel.server import PanelError, PanelServer, load_or_create_token, token_path
from agent.panel.viewers import LatestFrameTrack, Picture, ViewerRefused, Viewers

__all__ = [
    "LatestFrameTrack",
    "PanelClient",
    "PanelError",
    "PanelServer",
    "PanelUnavailable",
    "Picture",
    "ViewerRefused",
    "Viewers",
    "add_lesson_parser",
    "load_or_create_token",
    "token_path",
]
