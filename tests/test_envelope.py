"""The signed envelope and the device's book, without a broker: every refusal and its reason."""

from __future__ import annotations

import base64
import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

import pytest

from agent.sync import (
    MAX_ENVELOPE_BYTES,
    Envelope,
    KeyPair,
    Keyring,
    LayerState,
    ProfileBook,
    Reason,
    Rejected,
    Scope,
    generate_key,
    load_private_key,
    load_public_keys,
    public_key_text,
    sign,
    wave_bucket,
)

DEVICE = "school1.room1"
HEALTH = b"health:\n  interval_s: 3\n"


@pytest.fixture
def keys(tmp_path: Path) -> list[KeyPair]:
    return [generate_key(tmp_path / "keys") for _ in range(3)]


def book_for(
    tmp_path: Path, keys: list[KeyPair], groups: tuple[str, ...] = ("music",)
) -> ProfileBook:
    ring = Keyring.from_texts([public_key_text(k.public) for k in keys[:2]], 2)
    return ProfileBook(tmp_path / "profiles", device_id=DEVICE, groups=groups, site_keys=ring)


def signed(
    keys: list[KeyPair], scope: str = f"room:{DEVICE}", version: int = 1, **kw: Any
) -> Envelope:
    return sign(
        HEALTH, payload_type="config", scope=Scope.parse(scope), version=version, keys=keys, **kw
    )


def tampered(envelope: Envelope, **fields: object) -> bytes:
    document = json.loads(envelope.raw)
    document.update(fields)
    return json.dumps(document).encode()


def refusal(book: ProfileBook, layer: str, raw: bytes) -> Reason:
    with pytest.raises(Rejected) as caught:
        book.verify(layer, raw)
    assert caught.value.message  # a sentence for the journal and the dashboard
    return caught.value.reason


def test_key_files_and_round_trip(tmp_path: Path, keys: list[KeyPair]) -> None:
    key_file = tmp_path / "keys" / f"{keys[0].key_id}.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert load_private_key(key_file).key_id == keys[0].key_id
    assert set(load_public_keys([tmp_path / "keys"])) == {k.key_id for k in keys}
    book = book_for(tmp_path, keys)
    envelope = book.verify(f"room:{DEVICE}", signed(keys[:1]).raw)
    assert (envelope.version, str(envelope.scope), envelope.payload) == (
        1,
        f"room:{DEVICE}",
        HEALTH,
    )


def test_every_tampering_is_refused_with_its_reason(tmp_path: Path, keys: list[KeyPair]) -> None:
    book = book_for(tmp_path, keys)
    layer = f"room:{DEVICE}"
    good = signed(keys[:1], version=5)
    payload = bytearray(good.payload)
    payload[-2] ^= 0x01
    cases = {
        "payload byte": tampered(good, payload=base64.b64encode(bytes(payload)).decode()),
        "scope": tampered(good, scope="room:school1.room1,school1.room2"),
        "version": tampered(good, version=6),
        "expiry": tampered(good, expires_at=good.expires_at + 1),
        "wave": tampered(good, wave=50),
    }
    for name, raw in cases.items():
        assert refusal(book, layer, raw) is Reason.BAD_SIGNATURE, name

    stranger = generate_key(tmp_path / "stranger")
    forged = sign(
        HEALTH, payload_type="config", scope=Scope.parse(layer), version=5, keys=[stranger]
    )
    sig = json.loads(forged.raw)["signatures"][0]["sig"]
    claimed = tampered(forged, signatures=[{"keyid": keys[0].key_id, "sig": sig}])
    assert refusal(book, layer, claimed) is Reason.BAD_SIGNATURE
    assert refusal(book, layer, forged.raw) is Reason.UNKNOWN_KEY
    assert refusal(book, layer, signed([keys[2]]).raw) is Reason.UNKNOWN_KEY  # not pinned

    assert refusal(book, layer, b"\xff\xfe not utf-8") is Reason.MALFORMED
    assert refusal(book, layer, good.raw[: len(good.raw) // 2]) is Reason.MALFORMED
    assert refusal(book, layer, b"[1, 2]") is Reason.MALFORMED
    assert refusal(book, layer, tampered(good, extra=1)) is Reason.MALFORMED
    assert refusal(book, layer, b" " * (MAX_ENVELOPE_BYTES + 1)) is Reason.OVERSIZED
    keys_doc = sign(b"{}", payload_type="keys", scope=Scope("fleet"), version=9, keys=keys[:2])
    assert refusal(book, "fleet", keys_doc.raw) is Reason.WRONG_TYPE


def test_time_scope_topic_and_replay(tmp_path: Path, keys: list[KeyPair]) -> None:
    book = book_for(tmp_path, keys)
    layer = f"room:{DEVICE}"
    expired = signed(keys[:1], expires_in=dt.timedelta(seconds=10), now=time.time() - 60)
    assert refusal(book, layer, expired.raw) is Reason.EXPIRED
    future = signed(keys[:1], now=time.time() + 3600)
    assert refusal(book, layer, future.raw) is Reason.FUTURE
    assert book.verify(layer, signed(keys[:1], now=time.time() + 60).raw)  # within the skew

    other_room = signed(keys[:1], scope="room:school1.room2")
    assert refusal(book, layer, other_room.raw) is Reason.WRONG_SCOPE
    other_school = signed(keys[:1], scope="school:school2")
    assert refusal(book, "school:school1", other_school.raw) is Reason.WRONG_SCOPE
    room_on_school_topic = signed(keys[:1])
    assert refusal(book, "school:school1", room_on_school_topic.raw) is Reason.WRONG_TOPIC
    assert book.verify("group:music", signed(keys[:1], scope="group:music").raw)
    other_group = signed(keys[:1], scope="group:art")
    assert refusal(book, "group:music", other_group.raw) is Reason.WRONG_SCOPE
    listed = signed(keys[:1], scope=f"room:school1.room9,{DEVICE}")
    assert book.verify(layer, listed.raw)

    book.commit(layer, book.verify(layer, signed(keys[:1], version=4).raw))
    assert refusal(book, layer, signed(keys[:1], version=4).raw) is Reason.REPLAYED  # equal
    assert refusal(book, layer, signed(keys[:1], version=3).raw) is Reason.REPLAYED  # older
    assert book.verify(layer, signed(keys[:1], version=5).raw).version == 5
    # Versions survive a restart (a new book on the same directory).
    again = book_for(tmp_path, keys)
    again.load_applied()
    assert again.applied[layer].version == 4
    assert refusal(again, layer, signed(keys[:1], version=4).raw) is Reason.REPLAYED


def test_keys_rotate_only_by_threshold_and_retired_keys_are_refused(
    tmp_path: Path, keys: list[KeyPair]
) -> None:
    book = book_for(tmp_path, keys)
    layer = f"room:{DEVICE}"
    book.commit(layer, book.verify(layer, signed(keys[:1], version=1).raw))
    new_set = json.dumps(
        {"keys": [public_key_text(keys[1].public), public_key_text(keys[2].public)], "threshold": 2}
    ).encode()
    one = sign(new_set, payload_type="keys", scope=Scope("fleet"), version=1, keys=keys[:1])
    with pytest.raises(Rejected) as caught:
        book.accept_keys(one.raw)
    assert caught.value.reason is Reason.THRESHOLD
    single_key_set = json.dumps({"keys": [public_key_text(keys[2].public)], "threshold": 1})
    weak = sign(
        single_key_set.encode(), payload_type="keys", scope=Scope("fleet"), version=1, keys=keys[:2]
    )
    with pytest.raises(Rejected) as caught:
        book.accept_keys(weak.raw)
    assert caught.value.reason is Reason.MALFORMED

    two = sign(new_set, payload_type="keys", scope=Scope("fleet"), version=1, keys=keys[:2])
    ring = book.accept_keys(two.raw)
    assert set(ring.keys) == {keys[1].key_id, keys[2].key_id}
    assert ring.retired == {keys[0].key_id}
    assert book.verify(layer, signed([keys[2]], version=2).raw)  # the new key
    assert refusal(book, layer, signed([keys[0]], version=3).raw) is Reason.RETIRED_KEY
    with pytest.raises(Rejected) as caught:
        book.accept_keys(two.raw)  # the same document again: one signer is retired now
    assert caught.value.reason in {Reason.THRESHOLD, Reason.REPLAYED}
    # The applied profile signed by the retired key is dropped at the next check...
    assert book.recheck() == [layer]
    assert layer not in book.applied
    assert book.reports[layer].state is LayerState.DROPPED
    # ...and the rotated set survives a restart.
    again = book_for(tmp_path, keys)
    assert set(again.keyring.keys) == {keys[1].key_id, keys[2].key_id}


def test_an_applied_profile_expires_and_its_layer_is_dropped(
    tmp_path: Path, keys: list[KeyPair]
) -> None:
    book = book_for(tmp_path, keys)
    layer = f"room:{DEVICE}"
    short = signed(keys[:1], expires_in=dt.timedelta(seconds=30))
    book.commit(layer, book.verify(layer, short.raw))
    assert book.next_expiry() == short.expires_at
    assert book.recheck(now=short.expires_at - 1) == []
    assert book.recheck(now=short.expires_at + 1) == [layer]
    assert book.reports[layer].state is LayerState.EXPIRED


def test_waves_are_deterministic_and_widening_keeps_the_first_devices() -> None:
    scope = Scope.parse("school:school1")
    devices = [f"school1.room{n}" for n in range(400)]
    buckets = [wave_bucket(d, scope) for d in devices]
    assert buckets == [wave_bucket(d, scope) for d in devices]
    in_10 = {d for d, b in zip(devices, buckets, strict=True) if b < 10}
    in_50 = {d for d, b in zip(devices, buckets, strict=True) if b < 50}
    assert in_10 <= in_50
    assert 20 <= len(in_10) <= 60  # about 10 %
    assert 160 <= len(in_50) <= 240  # about 50 %


def test_an_interrupted_apply_is_a_rollback_never_retried(
    tmp_path: Path, keys: list[KeyPair]
) -> None:
    book = book_for(tmp_path, keys)
    layer = f"room:{DEVICE}"
    book.commit(layer, book.verify(layer, signed(keys[:1], version=1).raw))
    trying = book.verify(layer, signed(keys[:1], version=2).raw)
    book.begin_trial(layer, trying)
    # The agent dies here; the next start finds the marker.
    again = book_for(tmp_path, keys)
    again.load_applied()
    assert again.applied[layer].version == 1
    assert again.reports[layer].state is LayerState.ROLLED_BACK
    assert refusal(again, layer, trying.raw) is Reason.REPLAYED
    assert [e["state"] for e in again.read_history()][-1] == "rolled-back"


def test_scope_parsing_names_the_fix() -> None:
    for bad in ("", "room", "school:", "room:nodot", "planet:x", "school:Big School"):
        with pytest.raises(ValueError, match="scope"):
            Scope.parse(bad)
    assert str(Scope.parse("room:b.b,a.a")) == "room:a.a,b.b"
