"""Fleet health: what a room tells maintenance staff about itself.

`HealthReporter` publishes periodic telemetry over the link (``health`` topic), built
from `SystemMetrics` / `ProcessMetrics` and the sections the services contribute;
`AlertEngine` turns observations into raised/cleared alerts with hysteresis (the rules
are in ``alerts.py``: black camera, silent microphone, disk, temperature, ...);
`HomeAssistantDiscovery` announces the room to a stock Home Assistant; `MetricsServer`
serves the same figures to Prometheus; ``selftest`` is the pre-class check.
"""

from agent.health.alerts import (
    ActiveAlert,
    AlertEngine,
    AlertEvent,
    Observation,
    Rule,
    Severity,
    default_rules,
)
from agent.health.discovery import (
    HA_COMPONENTS,
    HA_DISCOVERY_PREFIX,
    HomeAssistantDiscovery,
    ha_node_id,
)
from agent.health.prometheus import MetricsServer
from agent.health.reporter import HealthReporter
from agent.health.selftest import SelftestThresholds, run_selftest_cli, selftest_handler
from agent.health.system import ProcessMetrics, SystemMetrics

__all__ = [
    "HA_COMPONENTS",
    "HA_DISCOVERY_PREFIX",
    "ActiveAlert",
    "AlertEngine",
    "AlertEvent",
    "HealthReporter",
    "HomeAssistantDiscovery",
    "MetricsServer",
    "Observation",
    "ProcessMetrics",
    "Rule",
    "SelftestThresholds",
    "Severity",
    "SystemMetrics",
    "default_rules",
    "ha_node_id",
    "run_selftest_cli",
    "selftest_handler",
]
