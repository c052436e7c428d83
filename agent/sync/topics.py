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

The builders live in `agent.contracts` so that every layer (the dashboard, the broker
tools, the demo) names topics the same way: `Topics` for one device, `FleetTopics` for
the fleet-wide filters (``state_all``, ``health_all``, ``alert_all``, ``lesson_all``,
``config_desired_all``, ``config_reported_all``) and signalling (``rtc_to``,
``rtc_from``, the ACL's ``%u`` patterns).
"""

from agent.contracts import FleetTopics, Topics

__all__ = ["FleetTopics", "Topics"]
