"""Prometheus metrics on ``http://127.0.0.1:<port>/metrics`` (off by default).

For schools that already run Prometheus (node_exporter next to the agent, a central
Prometheus scraping through a VPN or a local agent): the same figures as the health
topic, from the same snapshot, so MQTT dashboards and Grafana never disagree. The
exposition is the Prometheus text format, version 0.0.4, written here in a few lines
rather than pulling in ``prometheus_client`` with its global registry.

Every series carries ``device``, ``site`` and ``room`` labels. A field missing from the
snapshot (or ``null``, like the temperature of a machine without sensors) is left out
rather than exported as a made-up value. Units follow Prometheus conventions where
they are not part of the name (``_seconds``, ``_bytes``, ``_total`` for counters).

Bound to loopback by default: the page has no authentication, and telemetry of a
classroom is nobody else's business.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from agent.config import IdentityConfig

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_PORT = 9464
DEVICE_STATES = ("starting", "ok", "degraded", "lost", "stopped")

Snapshot = Callable[[], Mapping[str, Any] | None]
Labels = Mapping[str, str]
Sample = tuple[Labels, float]


def escape_label_value(value: str) -> str:
    """A label value as the text format wants it: backslash, quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{key}="{escape_label_value(str(value))}"' for key, value in labels.items())
    return "{" + inner + "}"


def _number(value: Any) -> float | None:
    """A sample value, or None for what is not a finite number (null, text)."""
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def _format(value: float) -> str:
    return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


def _get(snapshot: Mapping[str, Any], path: str) -> Any:
    node: Any = snapshot
    for part in path.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return node


@dataclass(frozen=True)
class _Metric:
    name: str
    kind: str  # gauge | counter
    help: str
    samples: Callable[[Mapping[str, Any]], Iterator[Sample]]


def _field(path: str, scale: float = 1.0) -> Callable[[Mapping[str, Any]], Iterator[Sample]]:
    def samples(snapshot: Mapping[str, Any]) -> Iterator[Sample]:
        value = _number(_get(snapshot, path))
        if value is not None:
            yield {}, value * scale

    return samples


def _equals(path: str, wanted: str) -> Callable[[Mapping[str, Any]], Iterator[Sample]]:
    def samples(snapshot: Mapping[str, Any]) -> Iterator[Sample]:
        value = _get(snapshot, path)
        if isinstance(value, str):
            yield {}, 1.0 if value == wanted else 0.0

    return samples


def _state_set(path: str) -> Callable[[Mapping[str, Any]], Iterator[Sample]]:
    """One series per possible state, 1 for the current one (Prometheus' StateSet idiom)."""

    def samples(snapshot: Mapping[str, Any]) -> Iterator[Sample]:
        value = _get(snapshot, path)
        if isinstance(value, str):
            for state in DEVICE_STATES:
                yield {"state": state}, 1.0 if value == state else 0.0

    return samples


def _alerts_active(snapshot: Mapping[str, Any]) -> Iterator[Sample]:
    active = _get(snapshot, "alerts.active")
    if isinstance(active, list):
        yield {}, float(len(active))


def _alert_series(snapshot: Mapping[str, Any]) -> Iterator[Sample]:
    active = _get(snapshot, "alerts.active")
    if not isinstance(active, list):
        return
    for alert in active:
        if isinstance(alert, Mapping) and isinstance(alert.get("rule"), str):
            since = _number(alert.get("since"))
            labels = {"rule": alert["rule"], "severity": str(alert.get("severity", ""))}
            yield labels, since if since is not None else 0.0


def _services(snapshot: Mapping[str, Any]) -> Iterator[Sample]:
    services = _get(snapshot, "agent.services")
    if isinstance(services, Mapping):
        for name, state in sorted(services.items()):
            yield {"service": str(name)}, 1.0 if state == "running" else 0.0


def _info(snapshot: Mapping[str, Any]) -> Iterator[Sample]:
    version, profile = _get(snapshot, "agent.version"), _get(snapshot, "agent.profile")
    if isinstance(version, str):
        yield {"version": version, "profile": str(profile or "")}, 1.0


def _age(snapshot: Mapping[str, Any]) -> Iterator[Sample]:
    ts = _number(snapshot.get("ts"))
    if ts is not None:
        yield {}, max(0.0, time.time() - ts)


_MB = 2.0**20
METRICS: tuple[_Metric, ...] = (
    _Metric("classroom_agent_info", "gauge", "Agent version and hardware profile", _info),
    _Metric("classroom_health_age_seconds", "gauge", "Age of the health snapshot served", _age),
    _Metric(
        "classroom_camera_up",
        "gauge",
        "1 when the camera delivers frames (state ok)",
        _equals("capture.video.state", "ok"),
    ),
    _Metric(
        "classroom_camera_state",
        "gauge",
        "Camera state (1 for the current one)",
        _state_set("capture.video.state"),
    ),
    _Metric(
        "classroom_video_fps",
        "gauge",
        "Measured camera frames per second",
        _field("capture.video.fps"),
    ),
    _Metric(
        "classroom_video_frames_total",
        "counter",
        "Frames read since the hub started",
        _field("capture.video.frames_read"),
    ),
    _Metric(
        "classroom_video_read_errors_total",
        "counter",
        "Camera read errors",
        _field("capture.video.read_errors"),
    ),
    _Metric(
        "classroom_video_mean_luma",
        "gauge",
        "Mean picture brightness (0-255)",
        _field("capture.video.mean_luma"),
    ),
    _Metric(
        "classroom_mic_up",
        "gauge",
        "1 when the microphone delivers audio (state ok)",
        _equals("capture.audio.state", "ok"),
    ),
    _Metric(
        "classroom_mic_state",
        "gauge",
        "Microphone state (1 for the current one)",
        _state_set("capture.audio.state"),
    ),
    _Metric(
        "classroom_mic_level_dbfs",
        "gauge",
        "Microphone RMS level over the last second",
        _field("capture.audio.level_dbfs"),
    ),
    _Metric(
        "classroom_mic_peak_dbfs",
        "gauge",
        "Microphone peak level over the last second",
        _field("capture.audio.peak_dbfs"),
    ),
    _Metric(
        "classroom_mic_clipping",
        "gauge",
        "1 when a sample hit full scale in the last second",
        _field("capture.audio.clipping"),
    ),
    _Metric("classroom_cpu_percent", "gauge", "Host CPU use", _field("system.cpu_percent")),
    _Metric("classroom_load1", "gauge", "Host load average, 1 minute", _field("system.load1")),
    _Metric(
        "classroom_memory_percent", "gauge", "Host memory use", _field("system.memory_percent")
    ),
    _Metric(
        "classroom_disk_percent",
        "gauge",
        "Disk use of the state directory's file system",
        _field("system.disk_percent"),
    ),
    _Metric(
        "classroom_disk_free_bytes",
        "gauge",
        "Free space of the state directory's file system",
        _field("system.disk_free_mb", _MB),
    ),
    _Metric(
        "classroom_temperature_celsius",
        "gauge",
        "CPU temperature",
        _field("system.temperature_c"),
    ),
    _Metric("classroom_uptime_seconds", "gauge", "Host uptime", _field("system.uptime_s")),
    _Metric(
        "classroom_clock_synced",
        "gauge",
        "1 when the kernel clock is NTP-synchronised",
        _field("system.clock_synced"),
    ),
    _Metric(
        "classroom_broker_connected",
        "gauge",
        "1 while connected to the MQTT broker",
        _field("mqtt.connected"),
    ),
    _Metric(
        "classroom_broker_publish_rtt_seconds",
        "gauge",
        "Last QoS 1 publish to PUBACK time",
        _field("mqtt.publish_rtt_ms", 0.001),
    ),
    _Metric(
        "classroom_broker_ping_rtt_seconds",
        "gauge",
        "Last MQTT PINGREQ to PINGRESP time",
        _field("mqtt.ping_rtt_ms", 0.001),
    ),
    _Metric(
        "classroom_broker_connects_total",
        "counter",
        "Successful broker connections",
        _field("mqtt.connects"),
    ),
    _Metric(
        "classroom_broker_queued",
        "gauge",
        "Messages waiting in the store-and-forward queue",
        _field("mqtt.queued"),
    ),
    _Metric("classroom_alerts_active", "gauge", "Number of active alerts", _alerts_active),
    _Metric(
        "classroom_alert_since_seconds",
        "gauge",
        "One series per active alert: when its condition began (epoch seconds)",
        _alert_series,
    ),
    _Metric(
        "classroom_agent_cpu_percent",
        "gauge",
        "CPU use of the agent process",
        _field("agent.cpu_percent"),
    ),
    _Metric(
        "classroom_agent_resident_bytes",
        "gauge",
        "Resident memory of the agent process",
        _field("agent.rss_mb", _MB),
    ),
    _Metric("classroom_service_up", "gauge", "1 while the agent's service runs", _services),
)


def render_metrics(snapshot: Mapping[str, Any] | None, labels: Labels) -> str:
    """The text exposition of ``snapshot`` (a health message), every series with ``labels``."""
    lines: list[str] = []
    available = snapshot is not None
    lines += [
        "# HELP classroom_health_available 1 when the agent has a health snapshot to serve",
        "# TYPE classroom_health_available gauge",
        f"classroom_health_available{_labels(labels)} {1 if available else 0}",
    ]
    if snapshot is not None:
        for metric in METRICS:
            samples = list(metric.samples(snapshot))
            if not samples:
                continue
            lines.append(f"# HELP {metric.name} {metric.help}")
            lines.append(f"# TYPE {metric.name} {metric.kind}")
            for extra, value in samples:
                lines.append(f"{metric.name}{_labels({**labels, **extra})} {_format(value)}")
    return "\n".join(lines) + "\n"


class MetricsServer:
    """A supervisor service serving ``GET /metrics`` (aiohttp, on the agent's loop).

    ``snapshot`` returns the latest health message (or None before the first one): pass
    the reporter's cached message rather than a callable that measures, so a scrape
    never disturbs CPU-use readings that are differences between two calls.
    """

    name = "metrics"

    def __init__(
        self,
        snapshot: Snapshot,
        identity: IdentityConfig,
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
    ) -> None:
        self._snapshot = snapshot
        self.host = host
        self.port = port
        self.labels = {"device": identity.device_id, "site": identity.site, "room": identity.room}
        self._bound: int | None = None
        self._ready = asyncio.Event()
        self.scrapes = 0

    @property
    def bound_port(self) -> int | None:
        """The port actually listened on (``port=0`` picks a free one), while running."""
        return self._bound

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._bound or self.port}/metrics"

    async def wait_ready(self) -> None:
        await self._ready.wait()

    async def _handle(self, request: web.Request) -> web.Response:
        try:
            text = render_metrics(self._snapshot(), self.labels)
        except Exception:
            log.exception("metrics: building the exposition failed")
            return web.Response(status=500, text="metrics unavailable; see the agent's log\n")
        self.scrapes += 1
        return web.Response(body=text.encode("utf-8"), headers={"Content-Type": CONTENT_TYPE})

    async def run(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            try:
                await site.start()
            except OSError as exc:
                raise OSError(
                    exc.errno,
                    f"health.metrics_port: cannot listen on {self.host}:{self.port} "
                    f"({exc.strerror or exc})",
                ) from exc
            address = runner.addresses[0]
            self._bound = int(address[1])
            log.info("serving Prometheus metrics on %s", self.url)
            self._ready.set()
            await asyncio.Event().wait()  # until cancelled
        finally:
            self._ready.clear()
            self._bound = None
            await runner.cleanup()
