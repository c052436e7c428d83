"""The maintenance dashboard: the fleet's state, live, in a web page (read-only MQTT).

`serve_dashboard(config)` serves it until cancelled: a `FleetModel` fed by a read-only
subscription to the fleet's state, health, alert, sensing and lesson topics, and an aiohttp
server with the page (``GET /``), a JSON snapshot (``GET /api/fleet``), counters
(``GET /api/stats``) and live updates over a WebSocket (``GET /api/ws``).
`DashboardConfig` holds its settings; `add_dashboard_parser` / `run_dashboard` are the
``classroom-agent dashboard`` command. `SimFleet` and `fleet_layout` simulate rooms for
tests, the benchmark (``bench/fleet.py``) and ``dashboard --simulate N``.
"""

from typing import TYPE_CHECKING, Any

from agent.dashboard.cli import add_dashboard_parser, config_from_args, run_dashboard
from agent.dashboard.config import DashboardConfig, dashboard_config
from agent.dashboard.model import Changes, FleetModel, ModelStats, lesson_quality
from agent.testkit import GroupSpec, RoomSpec, SimFleet, SimRoom, fleet_layout

if TYPE_CHECKING:
    from agent.dashboard.server import DashboardError, DashboardServer, serve_dashboard

_SERVER = frozenset({"DashboardError", "DashboardServer", "serve_dashboard"})


def __getattr__(name: str) -> Any:
    """The server's names, imported on first use: the CLI registers ``dashboard``
    without loading aiohttp for every other command."""
    if name in _SERVER:
        from agent.dashboard import server  # noqa: PLC0415

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Changes",
    "DashboardConfig",
    "DashboardError",
    "DashboardServer",
    "FleetModel",
    "GroupSpec",
    "ModelStats",
    "RoomSpec",
    "SimFleet",
    "SimRoom",
    "add_dashboard_parser",
    "config_from_args",
    "dashboard_config",
    "fleet_layout",
    "lesson_quality",
    "run_dashboard",
    "serve_dashboard",
]
