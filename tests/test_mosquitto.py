"""MosquittoBroker (the child process), the ACL/password files and the test PKI."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import os
import socket
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from agent.broker import BrokerError, MosquittoBroker, render_acl
from agent.broker.acl import hash_password
from agent.config.models import IdentityConfig
from agent.testkit import make_test_pki
from tests.brokers import DEVICE_1, BrokerUnderTest, MqttObserver, eventually


async def _accepts(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def test_start_stop_restart_on_the_same_port() -> None:
    broker = MosquittoBroker()
    try:
        await broker.start()
        port, url, first_pid = broker.port, broker.url, broker.pid
        assert url == f"mqtt://127.0.0.1:{port}"
        assert await _accepts(port)
        work_dir = broker.work_dir
        assert work_dir is not None
        assert work_dir.is_dir()
        await broker.stop()
        assert not broker.is_running
        assert not work_dir.exists()  # nothing left behind in /tmp
        assert not await _accepts(port)
        assert "running" in broker.log_tail()  # the last run's log survives the cleanup
        await broker.start()
        assert (broker.port, broker.url) == (port, url)
        assert broker.pid != first_pid
        assert await _accepts(port)
        await broker.kill()
        assert not await _accepts(port)
        await broker.start()
        assert broker.starts == 3
    finally:
        await broker.stop()
    await broker.stop()  # idempotent


async def test_missing_binary_says_how_to_install(tmp_path: Path) -> None:
    broker = MosquittoBroker(binary=str(tmp_path / "no-mosquitto"))
    with pytest.raises(BrokerError, match=r"mosquitto not found: apt-get install mosquitto"):
        await broker.start()


async def test_failed_start_reports_the_log_tail() -> None:
    broker = MosquittoBroker(extra_config=["no_such_option 1"])
    with pytest.raises(BrokerError) as caught:
        await broker.start()
    text = str(caught.value)
    assert "exited during start" in text
    assert "no_such_option" in text  # Mosquitto's own complaint, from its log
    assert not broker.is_running


async def test_port_taken_by_someone_else_is_an_error_when_fixed() -> None:
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        broker = MosquittoBroker(port=port, start_timeout_s=5)
        with pytest.raises(BrokerError, match=r"Address already in use"):
            await broker.start()


async def test_run_raises_when_mosquitto_dies_and_stops_on_cancel() -> None:
    broker = MosquittoBroker()
    task = asyncio.create_task(broker.run(), name="broker-service")
    try:
        await eventually(lambda: broker.starts >= 1, what="broker ready")
        pid = broker.pid
        assert pid is not None
        os.kill(pid, 9)
        with pytest.raises(BrokerError, match=r"exited unexpectedly"):
            await asyncio.wait_for(task, 10)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, BrokerError):
            await task

    task = asyncio.create_task(broker.run(), name="broker-service")
    await eventually(lambda: broker.starts >= 2, what="broker ready again")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not broker.is_running


async def test_root_hands_files_to_the_mosquitto_user(mosquitto: BrokerUnderTest) -> None:
    pid = mosquitto.pid
    assert pid is not None
    assert mosquitto.work_dir is not None
    status = await asyncio.to_thread(Path(f"/proc/{pid}/status").read_text)
    uid = int(status.split("Uid:")[1].split()[0])
    if os.geteuid() != 0:
        assert uid == os.geteuid()
        return
    assert uid != 0, "mosquitto should drop root"
    work = mosquitto.work_dir.stat()
    assert work.st_uid == uid
    assert (work.st_mode & 0o077) == 0  # nobody else may read the password hashes


async def test_fixture_password_file_and_acl_are_enforced(mosquitto: BrokerUnderTest) -> None:
    # a user from the password file logs in; a wrong password is refused
    good = MqttObserver(mosquitto.url, username=DEVICE_1, password=mosquitto.password(DEVICE_1))
    await good.start()
    await good.stop()
    bad = MqttObserver(mosquitto.url, username=DEVICE_1, password="wrong")
    with pytest.raises(ConnectionError, match=r"Not authorized|Bad user name"):
        await bad.start()
    await bad.stop()


def test_password_hash_matches_mosquitto_passwd_format() -> None:
    # the line mosquitto_passwd -b wrote for alice/secret with this salt
    salt = bytes.fromhex("46d98733e7b8210c05627222")
    expected = (
        "$7$101$RtmHM+e4IQwFYnIi$kiXWfReAgL4EF1xe1EEcsMHoOcTdcFL7K8J1HZvossEZRt1QA1k2KWfR8qBO"
        "dJwxvZbzN58DjM9Gp6wXDL5KFg=="
    )
    assert hash_password("secret", salt=salt) == expected


def test_acl_scheme() -> None:
    main = IdentityConfig(
        site="s1", room="r1", groups=[{"group": "music", "role": "main", "receivers": ["s2.r9"]}]
    )
    receiving = IdentityConfig(
        site="s2", room="r9", groups=[{"group": "music", "role": "receiving"}]
    )
    text = render_acl([main, receiving], prefix="edu", admins=["it"], readers=["dash"])
    lines = text.splitlines()
    block = lines[lines.index("user s1.r1") : lines.index("user s2.r9")]
    assert "topic write edu/s1/r1/state" in block
    assert "topic read edu/s1/r1/config/desired" in block
    assert "topic write edu/s1/r1/config/desired" not in block
    assert "topic readwrite edu/lesson/music" in block
    assert "topic read edu/lesson/music" in lines[lines.index("user s2.r9") :]
    assert "pattern write edu/rtc/%u/+" in lines
    assert "pattern read edu/rtc/+/%u" in lines
    assert lines.index("user s1.r1") > 0
    assert not any(line.startswith("topic") for line in lines[:2])
    with pytest.raises(ValueError, match=r"user name"):
        render_acl([], admins=["bad name"])


def test_make_test_pki(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path, device_ids=("s1.r1",))
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(pki.server.cert.read_bytes())
    client = x509.load_pem_x509_certificate(pki.client("s1.r1").cert.read_bytes())
    assert pki.expired_client is not None
    assert pki.rogue_client is not None
    expired = x509.load_pem_x509_certificate(pki.expired_client.cert.read_bytes())
    rogue = x509.load_pem_x509_certificate(pki.rogue_client.cert.read_bytes())

    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "s1.r1"
    assert client.issuer == ca.subject
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert expired.not_valid_after_utc < dt.datetime.now(dt.UTC)
    assert rogue.issuer != ca.subject
    assert (pki.client("s1.r1").key.stat().st_mode & 0o777) == 0o600
    with pytest.raises(KeyError, match=r"have: s1\.r1"):
        pki.client("nobody")
