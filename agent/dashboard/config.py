"""Settings of the maintenance dashboard (``classroom-agent dashboard``)."""

from __future__ import annotations

from typing import Any, Self

from pydantic import Field, ValidationError, model_validator

from agent.config import (
    UI_LANGUAGE_DESCRIPTION,
    BrokerConfig,
    ConfigError,
    StrictModel,
    UiLanguage,
    issues_from_validation,
)

DEFAULT_BROKER_URL = "mqtt://127.0.0.1:1883"


class DashboardConfig(StrictModel):
    """Where the dashboard reads the fleet from and where it serves the page."""

    broker: BrokerConfig = Field(
        default_factory=lambda: BrokerConfig(url=DEFAULT_BROKER_URL),
        description=(
            "The fleet broker, read-only: use a 'reader' user of the fleet ACL (e.g. "
            "'dashboard'); the dashboard never publishes and sends no birth or Last Will"
        ),
    )
    bind: str = Field(
        default="127.0.0.1",
        description=(
            "Address the web page listens on. The page has no login: keep loopback (reach it "
            "through an SSH tunnel or a reverse proxy with authentication) unless a firewall "
            "limits who can connect"
        ),
    )
    port: int = Field(
        default=8480, ge=0, le=65535, description="TCP port of the page (0: any free port)"
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description=(
            "Host names the page answers to (DNS-rebinding guard). Empty: loopback names when "
            "bound to loopback, any name otherwise"
        ),
    )
    health_interval_s: float = Field(
        default=10.0,
        ge=1,
        le=3600,
        description="The fleet's health interval, used until a room's own is measured",
    )
    stale_after_intervals: float = Field(
        default=3.0,
        ge=1.5,
        le=100,
        description="An online room whose health is this many intervals late is shown stale",
    )
    push_interval_s: float = Field(
        default=0.25,
        ge=0.05,
        le=10,
        description=(
            "Least time between two live updates to the page (0.25 s: at most 4 per second; "
            "changes in between are coalesced)"
        ),
    )
    max_rooms: int = Field(
        default=5000, ge=1, le=100_000, description="Rooms tracked at most (memory bound)"
    )
    language: UiLanguage = Field(default="auto", description=UI_LANGUAGE_DESCRIPTION)
    client_id: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$",
        description="MQTT client id suffix ('dashboard.<this>'); default: random per run",
    )

    @model_validator(mode="after")
    def _usable(self) -> Self:
        if not self.broker.url:
            raise ValueError("broker.url is required: the dashboard reads the fleet's broker")
        has_password = self.broker.password is not None or self.broker.password_file is not None
        if has_password and not self.broker.username:
            raise ValueError(
                "broker.username is required with a password: the broker user the dashboard "
                "logs in as (a reader of the fleet ACL, e.g. 'dashboard')"
            )
        return self


def dashboard_config(**values: Any) -> DashboardConfig:
    """`DashboardConfig` from keyword values (CLI options); `ConfigError` names each field."""
    try:
        return DashboardConfig.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(issues_from_validation(exc, DashboardConfig)) from None
