"""Every use the agent makes of aiortc's and aioice's private API, in one place.

aiortc and aioice have no public way to do a few things a classroom needs (send a
keyframe from a shared encoder, read the receiver's bandwidth estimate, swap the
audio jitter buffer, gather host candidates on loopback, impair the link in tests).
Each such reach into a library's internals is one small function here, with a
docstring that says what it relies on, why it is needed and the version it was
verified on; the rest of the agent calls these functions and never touches a
private attribute or a library's internal module itself.

Each hook checks what it relies on when it is installed and raises
:class:`HookUnavailable` (naming the hook) instead of silently doing nothing, and
:func:`check_versions` (called when the stream service starts) refuses a library
version outside the range in :data:`VERIFIED`, naming the hooks that depend on it.
``pyproject.toml`` pins the same ranges; ``tests/test_stream_hooks.py`` exercises
every hook against the installed libraries.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.metadata
import inspect
import ipaddress
import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aioice.ice
import aiortc.codecs
import aiortc.rtcrtpreceiver
import aiortc.rtcrtpsender
from aiortc import RTCRtpCodecParameters, RTCRtpReceiver
from aiortc.codecs.base import Decoder, Encoder
from aiortc.codecs.opus import OpusEncoder
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtp import RTCP_PSFB_APP, RtcpPsfbPacket, RtpPacket, unpack_remb_fci

__all__ = [
    "HOOKS",
    "RED_MIME",
    "VERIFIED",
    "Decoder",
    "Encoder",
    "Hook",
    "HookUnavailable",
    "JitterBuffer",
    "JitterFrame",
    "OpusEncoder",
    "RtpPacket",
    "UnsupportedVersion",
    "check_versions",
    "guard_consent_after_close",
    "host_addresses",
    "install_red",
    "intercept_stun_datagrams",
    "jitter_frame",
    "replace_audio_jitter_buffer",
    "replace_jitter_buffer",
    "route_bitrate_estimates",
    "route_keyframe_requests",
]

log = logging.getLogger(__name__)

Version = tuple[int, int, int]

VERIFIED: Mapping[str, tuple[Version, Version]] = {
    "aiortc": ((1, 16, 0), (1, 17, 0)),
    "aioice": ((0, 13, 0), (0, 14, 0)),
}
"""Per library, the versions the hooks were verified on: ``low <= version < high``.
Keep in step with ``dependencies`` in ``pyproject.toml``."""


@dataclass(frozen=True, slots=True)
class Hook:
    """One reach into a library's internals: ``relies_on`` names what it touches."""

    name: str
    library: str
    relies_on: str


HOOKS: tuple[Hook, ...] = (
    Hook("route_keyframe_requests", "aiortc", "RTCRtpSender._send_keyframe()"),
    Hook(
        "route_bitrate_estimates",
        "aiortc",
        "RTCRtpSender._handle_rtcp_packet(), RTCRtpSender._ssrc, aiortc.rtp REMB parsing",
    ),
    Hook(
        "replace_jitter_buffer",
        "aiortc",
        "RTCRtpReceiver.__jitter_buffer and __kind (name-mangled), aiortc.jitterbuffer",
    ),
    Hook("jitter_frame", "aiortc", "RtpPacket._data set by RTCRtpReceiver, JitterFrame"),
    Hook(
        "install_red",
        "aiortc",
        "aiortc.codecs.CODECS, the get_encoder/get_decoder names in aiortc.rtcrtpsender and "
        "aiortc.rtcrtpreceiver, aiortc.codecs.base Encoder/Decoder",
    ),
    Hook("host_addresses", "aioice", "aioice.ice.get_host_addresses()"),
    Hook("guard_consent_after_close", "aioice", "Connection.query_consent(), ._closing"),
    Hook(
        "intercept_stun_datagrams",
        "aioice",
        "StunProtocol.datagram_received/send_stun/send_data, StunProtocol.transport",
    ),
)


class HookUnavailable(RuntimeError):
    """The library no longer has what a hook relies on (an upgrade): fix the hook."""


class UnsupportedVersion(RuntimeError):
    """An installed library is outside the range the hooks were verified on."""


def _range(library: str) -> str:
    low, high = VERIFIED[library]
    return f">={'.'.join(map(str, low))},<{'.'.join(map(str, high))}"


def _unavailable(hook: str, library: str, what: str) -> HookUnavailable:
    return HookUnavailable(
        f"{what} (hook {hook} in agent/stream/hooks.py, verified on {library} "
        f"{_range(library)}; check the {library} version)"
    )


def _parse(version: str) -> Version | None:
    """The release part of a PEP 440 version ("1.16.0rc1" -> (1, 16, 0)); None if none."""
    match = re.match(r"^\s*v?(\d+)(?:\.(\d+))?(?:\.(\d+))?", version)
    if match is None:
        return None
    major, minor, micro = (int(part) if part else 0 for part in match.groups())
    return major, minor, micro


def check_versions(installed: Mapping[str, str] | None = None) -> None:
    """Raise :class:`UnsupportedVersion` if aiortc or aioice is outside :data:`VERIFIED`,
    naming the library, its version, the verified range and the hooks at risk.

    ``installed`` maps library to version string (tests); default: the installed
    distributions. A private attribute can change in any release, so a version we did
    not verify fails here, at start, rather than as a frozen picture mid-lesson."""
    problems: list[str] = []
    for library in VERIFIED:
        if installed is not None and library in installed:
            version = installed[library]
        else:
            try:
                version = importlib.metadata.version(library)
            except importlib.metadata.PackageNotFoundError:
                version = "not installed"
        parsed = _parse(version)
        low, high = VERIFIED[library]
        if parsed is not None and low <= parsed < high:
            continue
        hooks = ", ".join(hook.name for hook in HOOKS if hook.library == library)
        problems.append(
            f"{library} {version} is outside the range the private-API hooks were verified "
            f"on ({library}{_range(library)}); hooks at risk: {hooks}"
        )
    if problems:
        raise UnsupportedVersion(
            "; ".join(problems) + " (see agent/stream/hooks.py; verify the hooks, then widen "
            "VERIFIED and the pin in pyproject.toml)"
        )


# -- aiortc: the sender ------------------------------------------------------------------


def route_keyframe_requests(sender: Any, request: Callable[[], None]) -> None:
    """Make ``sender``'s PLI/FIR handling call ``request()`` as well.

    Relies on ``RTCRtpSender._send_keyframe()`` (aiortc 1.16.0): its
    ``_handle_rtcp_packet`` answers a PLI or FIR with ``self._send_keyframe()``, which
    sets a flag only aiortc's own encoder reads; a track that yields pre-encoded packets
    (the shared encoder) never sees it, and the receiver's picture would stay frozen.
    We keep the original call (harmless, and right again if aiortc ever honours it for
    packets) and add ours."""
    original = getattr(sender, "_send_keyframe", None)
    if not callable(original):
        raise _unavailable(
            "route_keyframe_requests",
            "aiortc",
            "aiortc's RTCRtpSender has no _send_keyframe(): keyframe requests cannot reach "
            "the shared encoder",
        )

    def send_keyframe() -> None:
        original()
        request()

    sender._send_keyframe = send_keyframe


def route_bitrate_estimates(sender: Any, observe: Callable[[int], None]) -> None:
    """Make ``sender`` pass every receiver bandwidth estimate (REMB) for its stream to
    ``observe(bits_per_second)``.

    Relies on ``RTCRtpSender._handle_rtcp_packet()`` and ``._ssrc`` and on aiortc.rtp's
    REMB parsing (aiortc 1.16.0): aiortc reads a REMB (PSFB, fmt 15, "REMB" FCI) only
    to set ``target_bitrate`` on its own encoder, which a packet track does not have;
    the value is nowhere else, and the layer policy needs it. We wrap that coroutine,
    keep the original handling and read the same FCI. The DTLS transport looks the
    method up on the instance for each packet, so the wrapper sees every RTCP packet
    routed to this sender."""
    original = getattr(sender, "_handle_rtcp_packet", None)
    if not callable(original) or not hasattr(sender, "_ssrc"):
        raise _unavailable(
            "route_bitrate_estimates",
            "aiortc",
            "aiortc's RTCRtpSender has no _handle_rtcp_packet()/_ssrc: bandwidth estimates "
            "cannot reach the layer policy",
        )

    async def handle_rtcp_packet(packet: Any) -> None:
        await original(packet)
        if not isinstance(packet, RtcpPsfbPacket) or packet.fmt != RTCP_PSFB_APP:
            return
        try:
            bitrate, ssrcs = unpack_remb_fci(packet.fci)
        except ValueError:
            return
        if sender._ssrc in ssrcs:
            try:
                observe(bitrate)
            except Exception:  # a policy bug must not break RTCP handling
                log.exception("bandwidth estimate handler failed")

    sender._handle_rtcp_packet = handle_rtcp_packet


# -- aiortc: codecs ----------------------------------------------------------------------

RED_MIME = "audio/red"
RED_PAYLOAD_TYPE = 63  # Chromium's; outside 96-127, so aiortc keeps it in every answer
RED_CODEC = RTCRtpCodecParameters(
    mimeType=RED_MIME,
    clockRate=48000,
    channels=2,
    payloadType=RED_PAYLOAD_TYPE,
    parameters={"96/96": None},  # RFC 2198 fmtp: both blocks are Opus (aiortc's PT 96)
)


def install_red(packer: Callable[[], Encoder], decoder: Callable[[], Decoder]) -> None:
    """Teach aiortc the ``audio/red`` codec (RFC 2198): offered after its own audio
    codecs, sent with ``packer()`` and received with ``decoder()``. Once per process
    (later calls change nothing).

    Relies on ``aiortc.codecs.CODECS`` (the codec table offers and answers are built
    from) and on the module-level names ``get_encoder`` in ``aiortc.rtcrtpsender`` and
    ``get_decoder`` in ``aiortc.rtcrtpreceiver``, looked up when a sender encodes its first
    frame and when the decoder thread meets a new codec (aiortc 1.16.0): aiortc has no
    codec registry, and raises ``ValueError`` for a MIME type it does not know."""
    sender_module: Any = aiortc.rtcrtpsender
    receiver_module: Any = aiortc.rtcrtpreceiver
    table: Any = getattr(aiortc.codecs, "CODECS", None)
    get_encoder = getattr(sender_module, "get_encoder", None)
    get_decoder = getattr(receiver_module, "get_decoder", None)
    if not isinstance(table, dict) or not isinstance(table.get("audio"), list):
        raise _unavailable("install_red", "aiortc", "aiortc.codecs.CODECS['audio'] is gone")
    if not callable(get_encoder) or not callable(get_decoder):
        raise _unavailable(
            "install_red",
            "aiortc",
            "aiortc.rtcrtpsender.get_encoder or aiortc.rtcrtpreceiver.get_decoder is gone",
        )
    if getattr(get_encoder, _WRAPPED, False):
        return

    def red_encoder(codec: RTCRtpCodecParameters) -> Encoder:
        if codec.mimeType.lower() == RED_MIME:
            return packer()
        encoder: Encoder = get_encoder(codec)
        return encoder

    def red_decoder(codec: RTCRtpCodecParameters) -> Decoder:
        if codec.mimeType.lower() == RED_MIME:
            return decoder()
        found: Decoder = get_decoder(codec)
        return found

    setattr(red_encoder, _WRAPPED, True)
    setattr(red_decoder, _WRAPPED, True)
    if not any(c.mimeType.lower() == RED_MIME for c in table["audio"]):
        table["audio"].append(RED_CODEC)
    sender_module.get_encoder = red_encoder
    receiver_module.get_decoder = red_decoder


# -- aiortc: the receiver ----------------------------------------------------------------

_JITTER_BUFFER = "_RTCRtpReceiver__jitter_buffer"
_KIND = "_RTCRtpReceiver__kind"
B = TypeVar("B")


def replace_audio_jitter_buffer(
    receiver: RTCRtpReceiver, replacement: type[B], make: Callable[[int], B]
) -> B | None:
    """The audio receiver's buffer: :func:`replace_jitter_buffer` for ``"audio"``."""
    return replace_jitter_buffer(receiver, "audio", replacement, make)


def replace_jitter_buffer(
    receiver: RTCRtpReceiver, kind: str, replacement: type[B], make: Callable[[int], B]
) -> B | None:
    """Give a ``kind`` ("audio", "video") ``receiver`` the buffer ``make(capacity)``
    builds (returned; the one it already has if that is a ``replacement``); receivers of
    the other kind: None, untouched.

    Relies on the name-mangled ``RTCRtpReceiver.__jitter_buffer`` and ``__kind``
    (aiortc 1.16.0, which gives audio ``JitterBuffer(capacity=16, prefetch=4)`` and video
    ``JitterBuffer(capacity=512, is_video=True)``): aiortc has no way to choose a
    receiver's jitter buffer, its audio buffer stalls on every loss and its video buffer
    waits seconds for a packet that never comes (agent/stream/jitter.py).
    A replacement's ``add(packet)`` is called with every RTP packet, as aiortc's. The
    video replacement subclasses ``aiortc.jitterbuffer.JitterBuffer`` and also relies on
    its ``_origin``, ``_packets``, ``_capacity``, ``_remove_frame()`` and ``remove()``
    (tests/test_stream_jitter.py drives it with real packets)."""
    private: Any = receiver
    receiver_kind = getattr(private, _KIND, None)
    current = getattr(private, _JITTER_BUFFER, None)
    if receiver_kind is None or current is None:
        missing = _KIND if receiver_kind is None else _JITTER_BUFFER
        raise _unavailable(
            "replace_jitter_buffer",
            "aiortc",
            f"aiortc's RTCRtpReceiver has no {missing}: the {kind} jitter buffer cannot be "
            "replaced",
        )
    if receiver_kind != kind:
        return None
    if isinstance(current, replacement):
        return current
    if not isinstance(current, JitterBuffer):
        raise _unavailable(
            "replace_jitter_buffer",
            "aiortc",
            f"aiortc's {kind} receiver has a {type(current).__name__}, not a JitterBuffer",
        )
    buffer = make(current.capacity)
    setattr(private, _JITTER_BUFFER, buffer)
    return buffer


def jitter_frame(packet: RtpPacket) -> JitterFrame:
    """The frame aiortc's decoder expects for one received packet.

    Relies on ``RtpPacket._data`` (the depayloaded payload ``RTCRtpReceiver`` sets
    before handing the packet to its jitter buffer) and ``JitterFrame(data,
    timestamp)`` (aiortc 1.16.0): a replacement buffer must hand over what aiortc's
    own would. Falls back to the raw payload, which is the same bytes for Opus."""
    data: bytes = getattr(packet, "_data", packet.payload)
    return JitterFrame(data=data, timestamp=packet.timestamp)


# -- aioice: candidates and consent ------------------------------------------------------

_WRAPPED = "_agent_stream_wrapped"
_host_addresses: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
    "agent_stream_host_addresses", default=None
)


@contextlib.contextmanager
def host_addresses(addresses: Sequence[str]) -> Iterator[None]:
    """While the block runs, aioice gathers host candidates on ``addresses`` only
    (empty: aioice's own choice, every interface but loopback), in this context and in
    the tasks started from it; concurrent blocks with other addresses do not interfere.

    Relies on the module function ``aioice.ice.get_host_addresses(use_ipv4,
    use_ipv6)``, looked up by ``Connection.gather_candidates`` at each call (aioice
    0.13.0), which this wraps once per process (outside a block it answers as aioice
    does): aioice skips 127.0.0.1 and has no per-connection option, so two peers on one
    machine without a network could not connect, and tests would use the real
    interfaces."""
    _wrap_get_host_addresses()
    token = _host_addresses.set(tuple(addresses) if addresses else None)
    try:
        yield
    finally:
        _host_addresses.reset(token)


def _wrap_get_host_addresses() -> None:
    original: Any = getattr(aioice.ice, "get_host_addresses", None)
    if original is None or not callable(original):
        raise _unavailable("host_addresses", "aioice", "aioice.ice.get_host_addresses() is gone")
    if getattr(original, _WRAPPED, False):
        return
    params = tuple(inspect.signature(original).parameters)
    if params != ("use_ipv4", "use_ipv6"):
        raise _unavailable(
            "host_addresses",
            "aioice",
            f"aioice.ice.get_host_addresses{params} is not (use_ipv4, use_ipv6)",
        )

    def get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        chosen = _host_addresses.get()
        if chosen is None:
            result: list[str] = original(use_ipv4=use_ipv4, use_ipv6=use_ipv6)
            return result
        return [
            address
            for address in chosen
            if (use_ipv6 if ipaddress.ip_address(address).version == 6 else use_ipv4)
        ]

    setattr(get_host_addresses, _WRAPPED, True)
    aioice.ice.get_host_addresses = get_host_addresses


def guard_consent_after_close() -> None:
    """Make ``Connection.query_consent`` return at once on a closing connection.
    Installed once per process.

    Relies on ``aioice.ice.Connection.query_consent()`` and ``Connection._closing``
    (aioice 0.13.0): if a peer connection is closed while ICE is just completing,
    ``Connection.connect()`` resumes after ``close()`` and starts the consent task on
    the closed connection, where it runs every 5 s, forever, with no owner."""
    connection: Any = aioice.ice.Connection
    original = connection.__dict__.get("query_consent")
    if original is None or not inspect.iscoroutinefunction(original):
        raise _unavailable(
            "guard_consent_after_close",
            "aioice",
            "aioice.ice.Connection.query_consent() is gone or no longer a coroutine",
        )
    if getattr(original, _WRAPPED, False):
        return

    async def query_consent_unless_closing(self: Any) -> None:
        if getattr(self, "_closing", False):
            return
        await original(self)

    setattr(query_consent_unless_closing, _WRAPPED, True)
    connection.query_consent = query_consent_unless_closing


# -- aioice: the datagram path (tests' impairment shim) ------------------------------------

_STUN_METHODS = {
    "datagram_received": ("self", "data", "addr"),
    "send_stun": ("self", "message", "addr"),
    "send_data": ("self", "data", "addr"),
}

Offer = Callable[[int, Callable[[], None]], None]
"""Called with a datagram's size and a callable that delivers it (now or later)."""


def _stun_methods() -> dict[str, Any]:
    """StunProtocol's datagram methods, after checking they still look as expected."""
    hook = "intercept_stun_datagrams"
    protocol = getattr(aioice.ice, "StunProtocol", None)
    if protocol is None:
        raise _unavailable(hook, "aioice", "aioice.ice.StunProtocol is gone")
    originals: dict[str, Any] = {}
    for name, params in _STUN_METHODS.items():
        method = protocol.__dict__.get(name)
        if method is None or not callable(method):
            raise _unavailable(hook, "aioice", f"aioice.ice.StunProtocol.{name} is gone")
        found = tuple(inspect.signature(method).parameters)
        if found != params:
            raise _unavailable(
                hook, "aioice", f"aioice.ice.StunProtocol.{name}{found} is not {params}"
            )
        originals[name] = method
    try:
        body = inspect.getsource(originals["send_data"])
    except (OSError, TypeError):
        body = ""
    if "self.transport.sendto(data, addr)" not in body:
        raise _unavailable(
            hook,
            "aioice",
            "aioice.ice.StunProtocol.send_data no longer just calls transport.sendto",
        )
    return originals


def _closing(protocol: Any) -> bool:
    """Whether the protocol's socket is closing (a datagram in flight is then dropped,
    as the kernel would). aioice's TURN transport has no ``is_closing``: never."""
    is_closing = getattr(protocol.transport, "is_closing", None)
    return bool(is_closing()) if is_closing is not None else False


@contextlib.contextmanager
def intercept_stun_datagrams(received: Offer, sent: Offer) -> Iterator[None]:
    """While the block runs, pass every ICE/DTLS/SRTP datagram of this process through
    ``received`` or ``sent`` (size, deliver) instead of delivering it; on exit aioice's
    own methods are back. A ``deliver`` called later (after the block, too) still
    works, and drops the datagram if its socket is closing by then.

    Relies on ``aioice.ice.StunProtocol.datagram_received(data, addr)``,
    ``send_stun(message, addr)`` and ``send_data(data, addr)`` (which only calls
    ``self.transport.sendto``), replaced on the class so sockets opened before the
    block are covered (aioice 0.13.0): every candidate pair, host or relayed, talks
    through one, and there is no other place to see each datagram. Checked by name,
    signature and (``send_data``) body before anything is replaced."""
    originals = _stun_methods()
    protocol: Any = aioice.ice.StunProtocol
    datagram_received = originals["datagram_received"]
    send_stun = originals["send_stun"]

    def send_to(proto: Any, data: bytes, addr: tuple[str, int]) -> None:
        if not _closing(proto):
            proto.transport.sendto(data, addr)

    def intercepted_datagram_received(self: Any, data: bytes | str, addr: tuple[Any, ...]) -> None:
        def deliver() -> None:
            if not _closing(self):
                datagram_received(self, data, addr)

        received(len(data), deliver)

    def intercepted_send_stun(self: Any, message: Any, addr: tuple[str, int]) -> None:
        def deliver() -> None:
            if not _closing(self):
                send_stun(self, message, addr)

        sent(len(bytes(message)), deliver)

    async def intercepted_send_data(self: Any, data: bytes, addr: tuple[str, int]) -> None:
        sent(len(data), lambda: send_to(self, data, addr))

    protocol.datagram_received = intercepted_datagram_received
    protocol.send_stun = intercepted_send_stun
    protocol.send_data = intercepted_send_data
    try:
        yield
    finally:
        for name, method in originals.items():
            setattr(protocol, name, method)
