"""ICE without surprises: only the STUN/TURN servers the config names, and host addresses
chosen by the config (the loopback address for tests).

Two aiortc/aioice defaults are wrong for classrooms and tests:

* With no ICE servers aiortc uses Google's public STUN server. Every peer connection
  here is built by :func:`new_peer_connection` with ``RTCConfiguration(iceServers=...)``
  from ``stream.ice_servers``, empty meaning host candidates only: nothing leaves the
  school network unless the config says so.
* aioice gathers host candidates from every interface *except* 127.0.0.1
  (``aioice.ice.get_host_addresses``), so two peers on one machine without a network
  cannot connect, and a test would send to the machine's real interfaces. aioice has
  no per-connection option for this, so :func:`gather` wraps that one module function
  (:func:`agent.stream.hooks.host_addresses`), once per process, and the wrapper
  answers from a context variable that :func:`gather` sets only around this agent's
  own ``setLocalDescription`` (where aiortc gathers). Outside that call, and when no
  addresses are configured, aioice's own answer stands. Candidate gathering runs in
  tasks aiortc creates inside that call, which inherit the context, so concurrent
  peers with different settings do not interfere.

One aioice race is closed here too: if a peer connection is closed while ICE is just
completing, ``Connection.connect()`` resumes after ``close()`` and starts the consent
freshness task on the closed connection, where it runs (every 5 s, forever) with no
owner. The wrapped ``query_consent`` returns at once on a connection that is closing
(:func:`agent.stream.hooks.guard_consent_after_close`).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from typing import Any

from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription

from agent.config import IceServerConfig
from agent.stream import hooks

log = logging.getLogger(__name__)


def check_host_addresses(addresses: Sequence[str]) -> tuple[str, ...]:
    """Validate literal IP addresses (``ValueError`` names the bad one)."""
    for address in addresses:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise ValueError(f"ICE host address {address!r} is not an IP address") from None
    return tuple(addresses)


def ice_servers(servers: Sequence[IceServerConfig]) -> list[RTCIceServer]:
    return [
        RTCIceServer(
            urls=list(server.urls),
            username=server.username,
            credential=None if server.credential is None else server.credential.get_secret_value(),
        )
        for server in servers
    ]


def new_peer_connection(servers: Sequence[IceServerConfig]) -> RTCPeerConnection:
    """A peer connection that contacts only ``servers`` (none: host candidates only)."""
    return RTCPeerConnection(RTCConfiguration(iceServers=ice_servers(servers)))


async def gather(
    pc: RTCPeerConnection, description: RTCSessionDescription, host_addresses: Sequence[str]
) -> Any:
    """``pc.setLocalDescription(description)`` (which gathers every candidate, so the
    SDP it leaves in ``pc.localDescription`` is complete: no trickle needed), with host
    candidates on ``host_addresses`` only; empty: aioice's choice (every interface but
    loopback)."""
    hooks.guard_consent_after_close()
    with hooks.host_addresses(host_addresses):
        return await pc.setLocalDescription(description)
