"""Signalling and announcement validation: every bad message is refused with a reason.

No broker here: `Signalling.deliver` is fed the messages the link would hand it. The
end-to-end tests (test_stream_lesson.py) send the same forgeries through Mosquitto.
"""

from __future__ import annotations

import json
import logging

import pytest

from agent.config.models import BrokerConfig, IdentityConfig
from agent.stream import (
    MAX_MESSAGE_BYTES,
    Announcement,
    AnnouncementInvalid,
    Signalling,
    SignalRejected,
    SignalType,
    parse_signal,
)
from agent.stream.signalling import RejectionLog, encode_signal, is_attempt_id, new_attempt_id
from agent.sync import Message, MqttLink

ME = "school1.room1"
ROOM = "school1.room2"
SDP = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"


def topic(sender: str = ROOM, to: str = ME, prefix: str = "edu") -> str:
    return f"{prefix}/rtc/{sender}/{to}"


def payload(**fields: object) -> bytes:
    base: dict[str, object] = {"v": 1, "lesson_id": "abc123", "type": "offer", "sdp": SDP}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ...}).encode()


def parse(topic_: str, data: bytes, retained: bool = False) -> object:
    return parse_signal(topic_, data, prefix="edu", me=ME, retained=retained)


def test_valid_offer_answer_and_bye_parse() -> None:
    offer = parse_signal(topic(), payload(), prefix="edu", me=ME)
    assert (offer.sender, offer.recipient, offer.type, offer.sdp) == (
        ROOM,
        ME,
        SignalType.OFFER,
        SDP,
    )
    answer = parse_signal(topic(), payload(type="answer"), prefix="edu", me=ME)
    assert answer.type is SignalType.ANSWER
    bye = parse_signal(topic(), payload(type="bye", sdp=...), prefix="edu", me=ME)
    assert bye.type is SignalType.BYE
    assert bye.sdp is None
    assert encode_signal("abc123", SignalType.BYE) == {"v": 1, "lesson_id": "abc123", "type": "bye"}


@pytest.mark.parametrize(
    ("topic_", "data", "code"),
    [
        (topic(), b"x" * (MAX_MESSAGE_BYTES + 1), "oversized"),
        (topic(), payload(sdp=SDP + "a=x\r\n" * 20_000), "oversized"),
        (topic(), b"{not json", "json"),
        (topic(), b"\xff\xfe", "json"),
        (topic(), b"[1, 2]", "json"),
        (topic(), payload(extra=1), "fields"),
        (topic(), payload(v=2), "fields"),
        (topic(), payload(lesson_id="../../x"), "fields"),
        (topic(), payload(lesson_id=...), "fields"),
        (topic(), payload(type="hello"), "fields"),
        (topic(), payload(sdp=...), "fields"),
        (topic(), payload(sdp="not an sdp"), "fields"),
        (topic(), payload(type="bye"), "fields"),
        ("edu/rtc/school1.room2", payload(), "topic"),
        ("other/rtc/school1.room2/school1.room1", payload(), "topic"),
        (topic(sender="no-dot"), payload(), "topic"),
        (topic(to="school1.room9"), payload(), "topic"),
        (topic(sender=ME), payload(), "topic"),
        (topic(), payload(attempt=""), "fields"),
        (topic(), payload(attempt="x" * 33), "fields"),
        (topic(), payload(attempt="a/b"), "fields"),
        (topic(), payload(attempt=7), "fields"),
        (topic(), payload(up=True), "fields"),
        (topic(), payload(type="hand", sdp=...), "fields"),
        (topic(), payload(type="hand", sdp=..., up="yes"), "fields"),
        (topic(), payload(type="hand", sdp=..., up=1), "fields"),
        (topic(), payload(type="hand", up=True), "fields"),
    ],
)
def test_malformed_messages_are_rejected_with_a_reason(topic_: str, data: bytes, code: str) -> None:
    with pytest.raises(SignalRejected) as info:
        parse(topic_, data)
    assert info.value.code == code
    assert str(info.value)


def test_attempt_ids_and_hands_parse_and_old_messages_still_read() -> None:
    attempt = new_attempt_id()
    assert is_attempt_id(attempt)
    assert attempt != new_attempt_id()
    offer = parse_signal(topic(), payload(attempt=attempt), prefix="edu", me=ME)
    assert offer.attempt == attempt
    bye = parse_signal(topic(), payload(type="bye", sdp=..., attempt=attempt), prefix="edu", me=ME)
    assert (bye.type, bye.attempt) == (SignalType.BYE, attempt)
    # A message from an agent that predates attempt ids reads as "the current one".
    assert parse_signal(topic(), payload(), prefix="edu", me=ME).attempt is None
    hand = parse_signal(topic(), payload(type="hand", sdp=..., up=True), prefix="edu", me=ME)
    assert (hand.type, hand.up, hand.sdp) == (SignalType.HAND, True, None)
    down = parse_signal(topic(), payload(type="hand", sdp=..., up=False), prefix="edu", me=ME)
    assert down.up is False
    assert encode_signal("abc123", SignalType.HAND, up=True) == {
        "v": 1,
        "lesson_id": "abc123",
        "type": "hand",
        "up": True,
    }
    assert encode_signal("abc123", SignalType.ANSWER, SDP, attempt="a1")["attempt"] == "a1"
    for bad in (
        lambda: encode_signal("abc123", SignalType.HAND),
        lambda: encode_signal("abc123", SignalType.BYE, up=False),
        lambda: encode_signal("abc123", SignalType.HAND, SDP, up=True),
        lambda: encode_signal("abc123", SignalType.OFFER, SDP, attempt="no spaces"),
    ):
        with pytest.raises(ValueError, match=r"sdp|'up'|attempt"):
            bad()


def test_retained_signalling_is_rejected() -> None:
    with pytest.raises(SignalRejected) as info:
        parse(topic(), payload(), retained=True)
    assert info.value.code == "retained"


def link() -> MqttLink:
    return MqttLink(
        BrokerConfig(url="mqtt://127.0.0.1:1", topic_prefix="edu"),
        IdentityConfig(site="school1", room="room1"),
        software_version="0",
        profile_name="test",
    )


def test_signalling_routes_only_open_lessons_from_expected_peers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    signalling = Signalling(link())
    inbox = signalling.open("abc123", [ROOM])
    caplog.set_level(logging.WARNING, logger="agent.stream.signalling")

    accepted = signalling.deliver(Message(topic(), payload(), False, 1))
    assert accepted is not None
    assert accepted.sender == ROOM
    # A room outside the lesson's group, writing as itself (the ACL allows that).
    assert signalling.deliver(Message(topic(sender="school9.room9"), payload(), False, 1)) is None
    # A stale or guessed lesson id.
    assert signalling.deliver(Message(topic(), payload(lesson_id="zzz999"), False, 1)) is None
    assert signalling.deliver(Message(topic(), b"garbage", False, 1)) is None
    assert signalling.rejected == {"foreign": 1, "lesson": 1, "json": 1}
    assert signalling.accepted == 1
    # One warning per (sender, reason): ROOM's two different faults both show.
    assert caplog.text.count("rejected signalling message") == 3
    assert "school9.room9 is not an expected peer" in caplog.text

    inbox.close()
    assert signalling.deliver(Message(topic(), payload(), False, 1)) is None
    with pytest.raises(ValueError, match="not valid"):
        signalling.open("bad id!", [ROOM])


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_flood_of_rejections_logs_once_per_sender_and_reason_then_a_summary(
    caplog: pytest.LogCaptureFixture,
) -> None:
    signalling = Signalling(link())
    clock = FakeClock()
    signalling.rejections.clock = clock
    caplog.set_level(logging.WARNING, logger="agent.stream.signalling")
    flooder = "school9.room9"
    for _ in range(38):
        assert signalling.deliver(Message(topic(sender=flooder), b"garbage", False, 1)) is None
    # A different reason from the same sender, and another sender, still show at once.
    signalling.deliver(Message(topic(sender=flooder), payload(lesson_id="zzz999"), False, 1))
    signalling.deliver(Message(topic(), b"garbage", False, 1))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3
    assert sum(flooder in w and "not UTF-8 JSON" in w for w in warnings) == 1
    assert signalling.rejected["json"] == 39
    assert signalling.rejected_from[flooder] == 39
    stats = signalling.stats()
    assert (stats["rejections_logged"], stats["rejections_suppressed"]) == (3, 37)

    # Inside the window nothing is summarised yet; after it, once.
    clock.now += 30
    signalling.rejections.flush()
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 3
    clock.now += 31
    signalling.rejections.flush()
    summaries = [r.getMessage() for r in caplog.records if "more rejected" in r.getMessage()]
    assert summaries == [
        f"... and 37 more rejected signalling messages (json) from {flooder} in the last 60 s"
    ]
    signalling.rejections.flush()
    assert len([r for r in caplog.records if "more rejected" in r.getMessage()]) == 1
    # The window is over: the next one is logged again.
    signalling.deliver(Message(topic(sender=flooder), b"garbage", False, 1))
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 5


def test_rejection_log_summarises_with_the_next_rejection_and_bounds_its_keys(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("tests.rejections")
    caplog.set_level(logging.WARNING, logger="tests.rejections")
    clock = FakeClock()
    rejections = RejectionLog(logger, "thing", window_s=10, max_keys=3, clock=clock)
    assert rejections.note("a.b", "x", "bad")
    assert not rejections.note("a.b", "x", "bad")
    clock.now += 11
    assert rejections.note("a.b", "x", "bad again")
    assert "... and 1 more things (x) from a.b in the last 10 s" in caplog.text
    for sender in ("c.d", "e.f", "g.h", "i.j"):
        rejections.note(sender, "x", "bad")
        rejections.note(sender, "x", "bad")
    assert len(rejections._windows) == 3  # the oldest was summarised and dropped
    assert "... and 1 more things (x) from c.d" in caplog.text


def announcement(**fields: object) -> bytes:
    base: dict[str, object] = {
        "v": 1,
        "lesson_id": "abc123",
        "group": "music",
        "subject": "Music",
        "main": ME,
        "expected": [ROOM],
        "joined": [],
        "started_at": 1.5,
        "state": "live",
    }
    base.update(fields)
    return json.dumps(base).encode()


def test_announcement_round_trip_and_clear() -> None:
    lesson = Announcement.parse("music", announcement())
    assert lesson is not None
    assert (lesson.main, lesson.expected, lesson.subject) == (ME, (ROOM,), "Music")
    assert Announcement.parse("music", json.dumps(lesson.to_dict()).encode()) == lesson
    assert Announcement.parse("music", b"") is None


@pytest.mark.parametrize(
    "data",
    [
        b"x" * 20_000,
        b"nope",
        announcement(v=2),
        announcement(group="art"),
        announcement(main="not a device"),
        announcement(expected="school1.room2"),
        announcement(expected=["bad"]),
        announcement(lesson_id=7),
        announcement(started_at="now"),
    ],
)
def test_invalid_announcements_are_refused(data: bytes) -> None:
    with pytest.raises(AnnouncementInvalid):
        Announcement.parse("music", data)
