"""Every MQTT topic the agent uses, built in one place.

Layout (``{prefix}`` is ``broker.topic_prefix``, default ``edu``; a device id is
``{site}.{room}``; R = retained)::

    {prefix}/{site}/{room}/state             R  QoS 1  device: birth "online" on every
                                                      connect; Last Will "offline"
                                                      ("connection lost"); "offline"
                                                      ("shutdown") on a clean stop; all
                                                      carry the birth "seq"
    {prefix}/{site}/{room}/health               QoS 0  device: periodic metrics
    {prefix}/{site}/{room}/alert                QoS 1  device: alert raised / cleared
    {prefix}/{site}/{room}/sensing              QoS 1  device: aggregates only, no media
    {prefix}/{site}/{room}/probe                QoS 1  device: self-test round trip (own only)
    {prefix}/{site}/{room}/config/desired    R  QoS 1  IT only: signed profile
    {prefix}/{site}/{room}/config/reported   R  QoS 1  device: applied / rejected, why
    {prefix}/{site}/{room}/cmd/{name}           QoS 1  IT / panel: a command
    {prefix}/{site}/{room}/cmd/{name}/result    QoS 1  device: the command's result
    {prefix}/lesson/{group}                  R  QoS 1  the group's main room: lesson
                                                      announcement
    {prefix}/rtc/{from}/{to}                    QoS 1  WebRTC signalling, device ids

``lesson`` and ``rtc`` are therefore reserved: no site may be called that. The broker
ACL that enforces who writes what is in `agent.broker.acl`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agent.config.models import RESERVED_SITES, SLUG_PATTERN

_SLUG = re.compile(SLUG_PATTERN)
_DEVICE_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}\.[a-z0-9][a-z0-9_-]{0,62}$")


def _slug(kind: str, value: str) -> str:
    if not _SLUG.match(value):
        raise ValueError(
            f"{kind} {value!r} is not a valid topic level "
            "(lower-case letters, digits, '-' and '_', at most 63)"
        )
    return value


def _device(value: str) -> str:
    if not _DEVICE_ID.match(value):
        raise ValueError(f"device id {value!r} must look like 'site.room'")
    return value


@dataclass(frozen=True)
class Topics:
    """Topic names for one device (see the module docstring for the layout)."""

    prefix: str
    site: str
    room: str

    def __post_init__(self) -> None:
        _slug("topic prefix", self.prefix)
        _slug("site", self.site)
        _slug("room", self.room)
        if self.site in RESERVED_SITES:
            raise ValueError(
                f"site {self.site!r} is reserved: '{self.prefix}/{self.site}/...' is used by "
                "fleet-wide topics; rename the site"
            )

    @property
    def device_id(self) -> str:
        return f"{self.site}.{self.room}"

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.site}/{self.room}"

    @property
    def state(self) -> str:
        return f"{self.base}/state"

    @property
    def health(self) -> str:
        return f"{self.base}/health"

    @property
    def alert(self) -> str:
        return f"{self.base}/alert"

    @property
    def sensing(self) -> str:
        return f"{self.base}/sensing"

    @property
    def probe(self) -> str:
        """The self-test's broker round trip: the one topic a device writes and reads."""
        return f"{self.base}/probe"

    @property
    def config_desired(self) -> str:
        return f"{self.base}/config/desired"

    @property
    def config_reported(self) -> str:
        return f"{self.base}/config/reported"

    def cmd(self, name: str) -> str:
        return f"{self.base}/cmd/{_slug('command name', name)}"

    def cmd_result(self, name: str) -> str:
        return f"{self.cmd(name)}/result"

    @property
    def cmd_filter(self) -> str:
        """Subscription filter for every command addressed to this device."""
        return f"{self.base}/cmd/+"

    def lesson(self, group: str) -> str:
        return f"{self.prefix}/lesson/{_slug('lesson group', group)}"

    def rtc(self, from_device: str, to_device: str) -> str:
        return f"{self.prefix}/rtc/{_device(from_device)}/{_device(to_device)}"

    def rtc_to(self, to_device: str) -> str:
        """Subscription filter for signalling addressed to ``to_device`` (any sender)."""
        return f"{self.prefix}/rtc/+/{_device(to_device)}"

    @property
    def rtc_inbox(self) -> str:
        """Subscription filter for signalling addressed to this device."""
        return self.rtc_to(self.device_id)
