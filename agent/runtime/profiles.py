"""Profiles pushed by IT, on the device: received, verified, applied on trial, answered.

``ProfileListener`` (the ``profiles`` part, rebuilt with the link) subscribes to the
desired topic of every layer the device belongs to and to the fleet's keys topic, hands
what arrives to the `ProfileManager`, and publishes the manager's retained answer on
``config/reported`` whenever it changes.

``ProfileManager`` (owned by the daemon, never rebuilt by a reload, since a reload is
what it asks for) checks each document (`agent.sync.ProfileBook`: signature, scope,
version, time), builds the candidate config with the new layer (schema, forbidden keys),
applies it through the daemon's one reconfigure path, checks what the change touched
(the camera delivers frames, the microphone opens, the link is connected, every restarted
service runs) within the profile's ``check_s``, and rolls back to the last-known-good
layers when that check fails. A live lesson delays a change that would restart what it
runs on; the device reports ``waiting`` meanwhile. Every layer that waits is kept (one
per scope, the newest): when the lesson ends they are applied one by one in layer order
(fleet < school < group < room), each on top of those applied before it, each checked,
answered and rolled back on its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from agent.config import (
    ConfigError,
    ConfigSources,
    ForbiddenProfileKeys,
    Layer,
    LoadedConfig,
    profile_layer,
)
from agent.contracts import FleetTopics, ProfilesSection
from agent.sync import (
    Envelope,
    Keyring,
    LayerReport,
    LayerState,
    LinkError,
    MqttLink,
    ProfileBook,
    Reason,
    Rejected,
    parse_envelope,
    profiles_directory,
)

log = logging.getLogger(__name__)

INBOX_SIZE = 64
RETRY_S = 1.0  # how soon a change delayed by a live lesson is tried again
MAX_IDLE_S = 60.0  # expiries are checked at least this often


class Outcome(StrEnum):
    APPLIED = "applied"
    WAITING = "waiting"
    FAILED = "failed"  # tried, and put back
    REJECTED = "rejected"  # refused before anything changed


@dataclass(frozen=True)
class ApplyResult:
    outcome: Outcome
    reason: str = ""
    restarted: tuple[str, ...] = ()  # parts rebuilt by the change
    touched: tuple[str, ...] = ()  # parts rebuilt or reconfigured


class ConfigTarget(Protocol):
    """What the manager needs from the daemon."""

    def load_with(self, pushed: tuple[Layer, ...]) -> LoadedConfig: ...

    async def apply_config(
        self, candidate: LoadedConfig, *, origin: str, lesson_may_delay: bool = True
    ) -> ApplyResult: ...

    async def check_applied(self, result: ApplyResult, timeout_s: float) -> str | None: ...

    def set_pushed(self, pushed: tuple[Layer, ...]) -> None: ...


def open_book(loaded: LoadedConfig) -> ProfileBook:
    """The device's profile book, from the site files' config (identity, trust, state)."""
    config = loaded.config
    trust = config.profiles
    return ProfileBook(
        profiles_directory(config.supervisor.state_dir),
        device_id=config.identity.device_id,
        groups=[m.group for m in config.identity.groups],
        site_keys=Keyring.from_texts(trust.trusted_keys, trust.keys_threshold),
        max_skew_s=trust.max_clock_skew_s,
        history_size=trust.history_size,
    )


def pushed_layers(
    book: ProfileBook, layer: str | None = None, envelope: Envelope | None = None
) -> tuple[Layer, ...]:
    """The applied profiles as config layers, in scope order; with ``envelope`` standing
    in for ``layer``'s (the candidate a new profile would make)."""
    layers = []
    for name in book.layers:
        chosen = envelope if name == layer else book.applied.get(name)
        if chosen is not None:
            layers.append(profile_layer(book.layer_name(chosen), chosen.payload))
    return tuple(layers)


def load_with_profiles(sources: ConfigSources) -> tuple[LoadedConfig, ConfigSources, ProfileBook]:
    """The effective config at boot: the site files plus every persisted profile that still
    verifies (pinned key, scope, expiry) and still validates against the site files; one
    that no longer does is dropped from the top (room first) and reported."""
    base = sources.load()
    book = open_book(base)
    book.load_applied()
    while True:
        layers = pushed_layers(book)
        candidate = dataclasses.replace(sources, pushed=layers)
        try:
            return candidate.load(), candidate, book
        except ConfigError as exc:
            top = max(book.applied, key=book.layers.index)
            envelope = book.applied[top]
            reason = "no longer valid with this site file: " + "; ".join(map(str, exc.issues))
            book.commit(top, None)
            book.report(
                top,
                LayerReport(
                    LayerState.DROPPED,
                    envelope.version,
                    str(envelope.scope),
                    reason,
                    "schema-invalid",
                ),
            )
            book.history(top, LayerState.DROPPED, envelope.version, reason)
            log.error("dropped the pushed profile %s: %s", envelope.describe(), reason)


def _version(payload: bytes) -> int | None:
    try:
        return parse_envelope(payload).version
    except Rejected:
        return None


class ProfileManager:
    """Applies pushed profiles one at a time (a supervisor service; see the module doc)."""

    name = "profile-manager"

    def __init__(self, book: ProfileBook, target: ConfigTarget, topics: FleetTopics) -> None:
        self.book = book
        self.target = target
        self.topics = topics
        self.inbox: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(INBOX_SIZE)
        self.changed = asyncio.Event()
        self.changed.set()  # publish the report once the link is up
        self.dropped_messages = 0
        # The layers that wait for a live lesson's end: the newest envelope per layer.
        self._deferred: dict[str, Envelope] = {}
        self._last: dict[str, bytes] = {}  # the last payload handled per layer
        self.applied_count = 0

    def offer(self, topic: str, payload: bytes) -> None:
        """From the listener: newest kept when the manager falls behind."""
        if self.inbox.full():
            self.inbox.get_nowait()
            self.dropped_messages += 1
        self.inbox.put_nowait((topic, payload))

    async def run(self) -> None:
        while True:
            timeout = self._idle_timeout()
            try:
                async with asyncio.timeout(timeout):
                    topic, payload = await self.inbox.get()
            except TimeoutError:
                await self._tick()
                continue
            try:
                await self._handle(topic, payload)
            except Exception:
                log.exception("handling a pushed profile on %s failed", topic)

    def _idle_timeout(self) -> float:
        if self._deferred:
            return RETRY_S
        expiry = self.book.next_expiry()
        if expiry is None:
            return MAX_IDLE_S
        return max(0.05, min(MAX_IDLE_S, expiry - time.time() + 0.05))

    async def _tick(self) -> None:
        if self._deferred:
            await self._retry_deferred()
            return
        dropped = self.book.recheck()
        if dropped:
            await self._fall_back(dropped)

    # -- one message ---------------------------------------------------------------------------

    async def _handle(self, topic: str, payload: bytes) -> None:
        if topic == self.topics.config_keys:
            await self._keys(payload)
            return
        layer = self.topics.layer_of_desired(topic)
        if layer is None or layer not in self.book.layers:
            log.debug("ignoring %s: not one of this device's layers", topic)
            return
        applied = self.book.applied.get(layer)
        if payload == self._last.get(layer) or (applied is not None and applied.raw == payload):
            return  # a retained message delivered again (reconnect, resubscribe)
        self._last[layer] = payload
        if not payload:
            # Anyone who can publish can send an empty retained message: it clears nothing.
            # IT clears a layer with a signed empty profile (`profile clear`).
            log.warning("ignored an unsigned empty message on %s (use 'profile clear')", topic)
            return
        try:
            envelope = self.book.verify(layer, payload)
        except Rejected as exc:
            report = self.book.reports.get(layer)
            if exc.reason is Reason.REPLAYED and report and report.version == _version(payload):
                return  # the one this device already answered, delivered again after a restart
            self._refuse(layer, None, exc.reason.value, exc.message, version=_version(payload))
            return
        # A newer document for the layer replaces the one that waited (applied, refused,
        # or waiting in its stead); the older one is never applied after it.
        self._deferred.pop(layer, None)
        if not self.book.in_wave(envelope):
            self._report(
                layer,
                envelope,
                LayerState.WAITING,
                f"not in the {envelope.wave}% rollout wave yet",
                "wave",
            )
            return
        await self._apply(layer, envelope)

    async def _keys(self, payload: bytes) -> None:
        if not payload:
            return
        try:
            ring = self.book.accept_keys(payload)
        except Rejected as exc:
            log.warning(
                "refused a keys document: %s", exc, extra={"fields": {"code": exc.reason.value}}
            )
            self.book.report(
                "keys",
                LayerReport(LayerState.REJECTED, None, "fleet", exc.message, exc.reason.value),
            )
            self.changed.set()
            return
        log.warning(
            "the pinned IT keys were replaced (keys v%d, threshold %d): %s",
            ring.version,
            ring.threshold,
            ", ".join(sorted(ring.keys)),
        )
        self.book.report("keys", LayerReport(LayerState.APPLIED, ring.version, "fleet"))
        dropped = self.book.recheck()
        if dropped:
            await self._fall_back(dropped)
        self.changed.set()

    # -- applying ------------------------------------------------------------------------------

    async def _retry_deferred(self) -> None:
        """Try the waiting layers again, lowest first, each on top of those applied before
        it. While the first still waits (the lesson goes on) the others are not tried: one
        candidate, so the part applied during the lesson stays put."""
        for layer in sorted(self._deferred, key=self.book.layers.index):
            envelope = self._deferred.pop(layer)
            await self._apply(layer, envelope, retry=True)
            if layer in self._deferred:  # waits again
                return

    async def _apply(self, layer: str, envelope: Envelope, *, retry: bool = False) -> None:
        what = envelope.describe()
        try:
            layers = pushed_layers(self.book, layer, envelope)
            # Reading the site files and validating is pydantic and YAML work: off the loop.
            candidate = await asyncio.to_thread(self.target.load_with, layers)
        except ConfigError as exc:
            self.book.seen(layer, envelope.version)  # signed, and wrong: never again
            code = "forbidden-key" if isinstance(exc, ForbiddenProfileKeys) else "schema-invalid"
            self._refuse(layer, envelope, code, "; ".join(str(i) for i in exc.issues))
            return
        if not retry:
            self._report(layer, envelope, LayerState.PENDING, "applying")
        self.book.begin_trial(layer, envelope)
        result = await self.target.apply_config(candidate, origin=what)
        if result.outcome is Outcome.WAITING:
            self.book.end_trial()
            self._deferred[layer] = envelope
            if not retry:
                self._report(layer, envelope, LayerState.WAITING, result.reason, "lesson")
            return
        if result.outcome is Outcome.REJECTED:
            self.book.end_trial()
            self.book.seen(layer, envelope.version)
            self._refuse(layer, envelope, "media-file", result.reason)
            return
        if result.outcome is Outcome.FAILED:
            await self._rolled_back(layer, envelope, result.reason, reapply=False)
            return
        problem = await self.target.check_applied(result, envelope.check_s)
        if problem is not None:
            await self._rolled_back(layer, envelope, problem, reapply=True)
            return
        self.book.commit(layer, envelope)
        self.target.set_pushed(pushed_layers(self.book))
        self.applied_count += 1
        if not envelope.payload.strip(b"{} \n"):
            self._report(layer, envelope, LayerState.CLEARED, "IT cleared this layer's profile")
            self.book.history(layer, LayerState.CLEARED, envelope.version, "cleared by IT")
        else:
            self._report(layer, envelope, LayerState.APPLIED, "")
            self.book.history(
                layer,
                LayerState.APPLIED,
                envelope.version,
                f"signed by {', '.join(envelope.key_ids)}",
            )
        log.info(
            "applied %s (%s)",
            what,
            ", ".join(result.touched) or "nothing to restart",
            extra={"fields": {"layer": layer, "version": envelope.version}},
        )

    async def _rolled_back(
        self, layer: str, envelope: Envelope, reason: str, *, reapply: bool
    ) -> None:
        if reapply:
            lkg = pushed_layers(self.book)
            back = await self.target.apply_config(
                self.target.load_with(lkg), origin="rollback", lesson_may_delay=False
            )
            if back.outcome is not Outcome.APPLIED:
                log.error("rolling back to the last-known-good profiles failed: %s", back.reason)
        self.book.end_trial()
        self.book.seen(layer, envelope.version)
        log.error(
            "rolled back %s: %s",
            envelope.describe(),
            reason,
            extra={"fields": {"layer": layer}},
        )
        self._report(layer, envelope, LayerState.ROLLED_BACK, reason, "check-failed")
        self.book.history(layer, LayerState.ROLLED_BACK, envelope.version, reason)

    async def _fall_back(self, dropped: list[str]) -> None:
        """Layers dropped by expiry or a retired key: run on the remaining ones."""
        layers = pushed_layers(self.book)
        self.target.set_pushed(layers)
        result = await self.target.apply_config(
            self.target.load_with(layers), origin=f"dropping {', '.join(dropped)}"
        )
        if result.outcome is Outcome.WAITING:
            log.warning("dropped profile layers apply when the lesson ends: %s", result.reason)
        self.changed.set()

    # -- answers -------------------------------------------------------------------------------

    def _refuse(
        self,
        layer: str,
        envelope: Envelope | None,
        code: str,
        message: str,
        *,
        version: int | None = None,
    ) -> None:
        log.warning(
            "refused a profile for %s: %s: %s",
            layer,
            code,
            message,
            extra={"fields": {"layer": layer, "code": code}},
        )
        version = envelope.version if envelope else version
        self._report(layer, envelope, LayerState.REJECTED, message, code, version=version)
        self.book.history(layer, LayerState.REJECTED, version, f"{code}: {message}")

    def _report(
        self,
        layer: str,
        envelope: Envelope | None,
        state: LayerState,
        reason: str,
        code: str = "",
        *,
        version: int | None = None,
    ) -> None:
        self.book.report(
            layer,
            LayerReport(
                state,
                envelope.version if envelope else version,
                str(envelope.scope) if envelope else None,
                reason,
                code,
                wave=envelope.wave if envelope else None,
            ),
        )
        self.changed.set()

    def health_section(self) -> ProfilesSection:
        document = self.book.reported_document()
        return {
            "effective": document["effective"],
            "keys_version": self.book.keyring.version,
            "applied": self.applied_count,
            "dropped_messages": self.dropped_messages,
        }


class ProfileListener:
    """The ``profiles`` part: the manager's ears and mouth on the current link."""

    name = "profiles"
    health_section_name = "profiles"

    def __init__(self, link: MqttLink, manager: ProfileManager) -> None:
        self.link = link
        self.manager = manager

    def topic_filters(self) -> list[str]:
        topics = self.link.topics
        return [
            *(topics.config_desired_for(layer) for layer in self.manager.book.layers),
            topics.config_keys,
        ]

    def health_section(self) -> dict[str, Any]:
        return dict(self.manager.health_section())

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            for topic_filter in self.topic_filters():
                group.create_task(self._forward(topic_filter), name=f"profiles:{topic_filter}")
            group.create_task(self._answer(), name="profiles:reported")

    async def _forward(self, topic_filter: str) -> None:
        async with self.link.subscribe(topic_filter, qos=1) as messages:
            async for message in messages:
                self.manager.offer(message.topic, message.payload)

    async def _answer(self) -> None:
        while True:
            await self.manager.changed.wait()
            await self.link.wait_connected()
            self.manager.changed.clear()
            document = self.manager.book.reported_document()
            try:
                await self.link.publish(
                    self.link.topics.config_reported, document, qos=1, retain=True
                )
            except LinkError as exc:
                log.debug("config/reported not sent (%s); sending again when connected", exc)
                self.manager.changed.set()
                await asyncio.sleep(RETRY_S)
