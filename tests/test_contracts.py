"""The typed contracts agree with the JSON Schemas, and the one newer-than rule holds."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import time
from pathlib import Path
from typing import Any, get_type_hints, is_typeddict

import jsonschema
import numpy as np
import pytest

from agent import contracts
from agent.broker.acl import device_acl_lines
from agent.capture import AudioFormat, AudioProcessor, FarEndReference
from agent.config import AudioProcessingConfig
from agent.config.models import DEVICE_ID_PATTERN, SLUG_PATTERN, IdentityConfig
from agent.contracts import (
    Alert,
    AnnouncementInvalid,
    ContractError,
    DeviceState,
    FleetTopics,
    StateOrder,
    Topics,
    is_device_id,
)
from agent.dashboard.model import FleetModel
from agent.health.alerts import AlertEvent, Severity
from agent.stream.presence import Presence

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"
BOOT = "2026-11-24T07:00:00Z"

# Fields the agent sends that a schema does not list (schemas allow extra properties;
# each is documented in docs/contracts.md). Anything else missing on either side fails.
NOT_IN_SCHEMA = {
    "state": {"display_name"},
    "health.stream": {"reason", "received"},
}


def schema(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((SCHEMAS / f"{name}.v1.json").read_text())
    return data


def model_fields(model: type) -> tuple[set[str], set[str]]:
    """(all field names, required field names) of a dataclass or TypedDict."""
    if is_typeddict(model):
        return set(get_type_hints(model)), set(model.__required_keys__)  # type: ignore[attr-defined]
    fields = dataclasses.fields(model)
    required = {
        f.name
        for f in fields
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    return {f.name for f in fields}, required


def check(name: str, node: dict[str, Any], model: type, *, sent: set[str] | None = None) -> None:
    names, required = model_fields(model)
    extra = NOT_IN_SCHEMA.get(name, set())
    properties = set(node["properties"])
    assert properties == names - extra, f"{name}: schema and {model.__name__} differ"
    assert node.get("additionalProperties", True) is True, f"{name}: consumers must ignore extras"
    schema_required = set(node.get("required", ()))
    if is_typeddict(model):
        assert schema_required == required, f"{name}: required keys differ"
    else:
        # A dataclass: what the schema requires is in every message it writes (``sent``:
        # the keys of the smallest one), and what it cannot do without, the schema requires.
        assert sent is not None
        assert schema_required <= sent, f"{name}: {schema_required - sent} not always sent"
        assert required <= schema_required, f"{name}: {required - schema_required} optional"


def test_state_matches_its_schema() -> None:
    node = schema("state")
    birth = DeviceState("online", 1, BOOT, "a.b", "a", "b", "1.0", "virtual").to_dict()
    check("state", node, DeviceState, sent=set(birth))
    # The schema's patterns are the contracts' patterns.
    assert node["properties"]["device"]["pattern"] == DEVICE_ID_PATTERN
    assert node["properties"]["site"]["pattern"] == SLUG_PATTERN
    assert set(node["properties"]["status"]["enum"]) == set(contracts.STATUSES)


def test_alert_matches_its_schema() -> None:
    node = schema("alert")
    smallest = Alert("x1", "a.b", "camera_lost", "warning", "raised", 1.0, 2.0, "gone")
    check("alert", node, Alert, sent=set(smallest.to_dict()))
    assert set(node["properties"]["severity"]["enum"]) == set(contracts.SEVERITIES)
    event = AlertEvent("x1", "camera_lost", Severity.CRITICAL, "raised", 1.0, 2.0, "gone", {})
    message = event.to_message("school1.room1")
    assert set(message) == set(node["required"])
    assert message["severity"] == "critical"


@pytest.mark.parametrize(
    ("path", "model"),
    [
        ((), contracts.HealthMessage),
        (("system",), contracts.SystemSection),
        (("mqtt",), contracts.MqttSection),
        (("capture",), contracts.CaptureSection),
        (("agent",), contracts.AgentSection),
        (("alerts",), contracts.AlertsSection),
        (("stream",), contracts.StreamSection),
        (("profiles",), contracts.ProfilesSection),
        (("capture", "audio", "processing"), contracts.AudioProcessingSection),
        (("capture", "audio", "processing", "stages"), contracts.AudioProcessingStages),
    ],
)
def test_health_sections_match_the_schema(path: tuple[str, ...], model: type) -> None:
    node = schema("health")
    for name in path:
        node = node["properties"][name]  # "stream" is {"type": ["object", "null"], ...}
    check(".".join(("health", *path)), node, model)


def test_the_processing_section_a_stage_sends_is_valid_and_junk_is_not() -> None:
    node = schema("health")["properties"]["capture"]["properties"]["audio"]
    node = node["properties"]["processing"]
    fmt = AudioFormat(48_000, 1, 960)
    tone = (3000 * np.sin(np.arange(960) * 0.05)).astype(np.int16)[:, None]
    rooms = [  # a room that always processes, no loudspeakers; one whose speakers play
        (AudioProcessingConfig(mode="on"), None),
        (AudioProcessingConfig(mode="auto"), FarEndReference(48_000)),
    ]
    for config, reference in rooms:
        playing = reference is not None
        stage = AudioProcessor(config, reference)
        for _ in range(60):  # 1.2 s of microphone, the loudspeakers playing the tone
            now = time.monotonic_ns()
            if reference is not None:
                reference.push(tone, 48_000, now - 20_000_000)
            stage.process(tone, now, fmt)
        section = stage.stats().to_dict()
        jsonschema.validate(section, node)
        assert set(section) == set(node["required"])
        assert section["frames"] == 120
        assert section["reference"] == ("playing" if playing else "none")
        assert section["cancelling"] is playing
    # The schema is not a formality: a wrong mode, a missing stage or a positive input
    # level are refused.
    for bad in (
        {**section, "mode": "sometimes"},
        {**section, "stages": {"echo_cancellation": True}},
        {**section, "input_level_dbfs": 3.0},
        {**section, "realignments": -1},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, node)


def test_the_device_id_is_defined_once() -> None:
    tree = Path(__file__).resolve().parent.parent / "agent"
    # How the pattern's middle looks in source, in a raw string or an escaped one.
    written = re.compile(r"_-\]\{0,62\}\\{1,2}\.")
    holders = [
        path.relative_to(tree).as_posix()
        for path in tree.rglob("*.py")
        if written.search(path.read_text())
    ]
    assert holders == ["contracts.py"]
    assert is_device_id("school1.room1")
    assert not is_device_id("school1")
    assert not is_device_id("School1.room1")


# -- the newer-than rule -------------------------------------------------------------------


def state(status: str, seq: int, boot: str = BOOT) -> DeviceState:
    return DeviceState.parse({"status": status, "seq": seq, "boot_time": boot})


def test_a_late_will_after_a_newer_birth_is_stale() -> None:
    birth3 = state("online", 3)
    assert state("offline", 2).order(birth3) is StateOrder.STALE
    assert state("offline", 3).order(birth3) is StateOrder.NEWER  # its own will ends it
    # The birth of a connection that has ended is stale after its will.
    assert state("online", 3).order(state("offline", 3)) is StateOrder.STALE


def test_a_restart_resets_seq_but_has_a_newer_boot() -> None:
    later = "2026-11-24T08:00:00.250Z"
    assert state("online", 1, later).newer_than(state("offline", 9))
    assert not state("offline", 9).newer_than(state("online", 1, later))
    # Offsets and fractions are times, not strings: 09:00+02:00 is before 08:00Z.
    assert (
        state("online", 5, "2026-11-24T09:00:00+02:00").order(
            state("online", 1, "2026-11-24T08:00:00Z")
        )
        is StateOrder.STALE
    )
    assert state("online", 1, "2026-11-24T07:00:00.001Z").newer_than(state("online", 4))


def test_equal_keys() -> None:
    assert state("online", 3).order(state("online", 3)) is StateOrder.SAME
    assert state("offline", 3).order(state("offline", 3)) is StateOrder.SAME
    assert state("online", 1).order(None) is StateOrder.NEWER
    # No (or no ISO) boot_time orders before every real one.
    assert state("offline", 7, "").order(state("online", 1)) is StateOrder.STALE


def test_presence_and_dashboard_apply_the_same_rule() -> None:
    """The rule's users agree on a sequence that has every case in it."""
    sequence = [
        ("online", 3, BOOT),
        ("offline", 2, BOOT),  # late will
        ("offline", 3, BOOT),  # its own will
        ("online", 3, BOOT),  # stale copy of the ended birth
        ("online", 1, "2026-11-24T08:00:00Z"),  # restart
        ("offline", 9, BOOT),  # will of the old process
    ]
    expected = [True, True, False, False, True, True]
    presence = Presence("school1.room1")
    model = FleetModel("edu")
    for (status, seq, boot), online in zip(sequence, expected, strict=True):
        payload = json.dumps({"status": status, "seq": seq, "boot_time": boot}).encode()
        presence.update(payload)
        model.apply("edu/school1/room1/state", payload)
        view = model.room_view("school1.room1")
        assert view is not None
        assert presence.online is online, (status, seq, boot)
        assert (view["status"] == "online") is online, (status, seq, boot)


def test_junk_state_is_refused_with_a_reason() -> None:
    junk: list[tuple[dict[str, Any], str]] = [
        ({"status": "up", "seq": 1}, "status must be"),
        ({"status": "online"}, "seq must be"),
        ({"status": "online", "seq": True}, "seq must be"),
        ({"status": "online", "seq": -1}, "seq must be"),
    ]
    for data, reason in junk:
        with pytest.raises(ContractError, match=reason):
            DeviceState.parse(data)
    # Presence never refused a birth without seq; optional fields of the wrong type drop.
    tolerant = DeviceState.parse({"status": "online", "version": 5}, lenient_seq=True)
    assert (tolerant.seq, tolerant.version) == (0, None)
    with pytest.raises(ContractError, match="not UTF-8 JSON"):
        contracts.decode_object(b"\xff{")
    with pytest.raises(ContractError, match="not a JSON object"):
        contracts.decode_object(b"[1]")


def test_the_link_birth_round_trips() -> None:
    boot = dt.datetime(2026, 11, 24, 7, 0, 0, 123456, tzinfo=dt.UTC)
    text = contracts.iso_time(boot)
    assert text == "2026-11-24T07:00:00.123Z"
    born = DeviceState("online", 2, text, "a.b", "a", "b", "1", "p", connected_at=text)
    assert DeviceState.parse(born.to_dict()) == born
    assert list(born.to_dict())[-1] == "seq"


# -- other messages --------------------------------------------------------------------


def test_command_result_payload() -> None:
    ok = contracts.CommandResult("r1", "ping", True, {"x": 1}, "ignored", at=1.23456).to_dict()
    assert ok == {
        "v": 1,
        "id": "r1",
        "command": "ping",
        "ok": True,
        "result": {"x": 1},
        "error": None,
        "at": 1.235,
    }
    bad = contracts.CommandResult(None, "ping", False, {"x": 1}, "no id").to_dict()
    assert (bad["id"], bad["result"], bad["error"]) == (None, None, "no id")


def test_announcement_is_the_contract_type() -> None:
    from agent.stream import Announcement

    assert Announcement is contracts.Announcement
    with pytest.raises(AnnouncementInvalid, match="main is not a device id"):
        Announcement.parse(
            "g", json.dumps({"v": 1, "lesson_id": "l1", "main": "x", "group": "g"}).encode()
        )
    with pytest.raises(ValueError, match="not UTF-8 JSON"):
        Announcement.parse("g", b"{")


# -- topics --------------------------------------------------------------------------------


def test_fleet_topics() -> None:
    fleet = FleetTopics("edu")
    assert fleet.state_all == "edu/+/+/state"
    assert fleet.health_all == "edu/+/+/health"
    assert fleet.alert_all == "edu/+/+/alert"
    assert fleet.lesson_all == "edu/lesson/+"
    assert fleet.config_desired_all == "edu/+/+/config/desired"
    assert fleet.config_reported_all == "edu/+/+/config/reported"
    assert fleet.rtc_to("a.b") == "edu/rtc/+/a.b"
    assert fleet.rtc_from("a.b") == "edu/rtc/a.b/+"
    assert fleet.device("a.b") == Topics("edu", "a", "b")
    room = Topics("edu", "school1", "room1")
    assert room.rtc_outbox == "edu/rtc/school1.room1/+"
    assert room.rtc_inbox == "edu/rtc/+/school1.room1"
    assert room.cmd_result_filter == "edu/school1/room1/cmd/+/result"
    assert room.state_all == fleet.state_all
    for bad in ("lesson", "a/b", "+", ""):
        with pytest.raises(ValueError, match="site"):
            Topics("edu", bad, "room1")
    with pytest.raises(ValueError, match=r"site\.room"):
        fleet.rtc_to("a/b")


def test_the_acl_is_built_from_the_topics() -> None:
    identity = IdentityConfig.model_validate(
        {
            "site": "school1",
            "room": "room1",
            "groups": [{"group": "music", "role": "main", "receivers": ["school2.room1"]}],
        }
    )
    topics = Topics("edu", "school1", "room1")
    lines = device_acl_lines(identity, "edu", discovery_prefix=None)
    assert lines == [
        "user school1.room1",
        f"topic write {topics.state}",
        f"topic write {topics.health}",
        f"topic write {topics.alert}",
        f"topic write {topics.sensing}",
        f"topic write {topics.config_reported}",
        f"topic write {topics.cmd_result_filter}",
        f"topic read {topics.config_desired}",
        f"topic read {topics.config_desired_for('fleet')}",
        f"topic read {topics.config_desired_for('school:school1')}",
        f"topic read {topics.config_keys}",
        f"topic read {topics.cmd_filter}",
        f"topic readwrite {topics.probe}",
        f"topic readwrite {topics.lesson('music')}",
        f"topic read {topics.config_desired_for('group:music')}",
        f"topic read {topics.state_all}",
    ]
    # Every profile layer's topic maps back to its layer; nothing else does.
    for layer in ("fleet", "school:school1", "group:music", "room:school1.room1"):
        assert topics.layer_of_desired(topics.config_desired_for(layer)) == layer
    for other in (
        "edu/fleet/config/keys",
        "edu/lesson/music",
        "edu/fleet/x/y/config/desired",
        "edu/rtc/a.b/config/desired",
        "other/fleet/config/desired",
    ):
        assert topics.layer_of_desired(other) is None
