"""IT's offline tools: keygen, sign, verify and plan, with their exit codes and messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from agent.cli import main
from agent.sync import MAX_ENVELOPE_BYTES

SITE = {
    "identity": {
        "site": "school1",
        "room": "room1",
        "groups": [{"group": "music", "role": "receiving"}],
    },
    "hardware": {"profile": "virtual"},
    "broker": {"url": "mqtt://127.0.0.1:1883"},
}


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["profile", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> list[Path]:
    ids = []
    for _ in range(2):
        code, out, _ = run(capsys, "keygen", "--out", str(tmp_path / "keys"))
        assert code == 0
        ids.append(out.splitlines()[0])
    return [tmp_path / "keys" / f"{key_id}.key" for key_id in ids]


def site_file(tmp_path: Path, keys: list[Path]) -> Path:
    pinned = [key.with_suffix(".pub").read_text().strip() for key in keys]
    config = {
        **SITE,
        "profiles": {"trusted_keys": pinned},
        "supervisor": {"state_dir": str(tmp_path / "state")},
    }
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_keygen_sign_verify(
    tmp_path: Path, keys: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert keys[0].stat().st_mode & 0o777 == 0o600
    assert keys[0].with_suffix(".pub").read_text().startswith("ed25519:")
    profile = tmp_path / "p.yaml"
    profile.write_text("health:\n  interval_s: 3\ncapture:\n  video:\n    fps: 20\n")
    signed = tmp_path / "p.json"
    code, out, err = run(
        capsys,
        "sign",
        str(profile),
        "--key",
        str(keys[0]),
        "--scope",
        "school:school1",
        "--version",
        "4",
        "--expires",
        "2d",
        "--wave",
        "30",
        "--out",
        str(signed),
    )
    assert code == 0, err
    assert "school:school1 v4, wave 30%" in out
    code, out, err = run(capsys, "verify", str(signed), "--trust", str(tmp_path / "keys"))
    assert code == 0, err
    assert "scope:    school:school1" in out
    assert "version:  4" in out
    assert "wave:     30%" in out
    assert "payload:  health.interval_s, capture.video.fps" in out


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda d: d.update(version=5), "bad-signature"),
        (lambda d: d.update(scope="fleet"), "bad-signature"),
        (lambda d: d["signatures"][0].update(keyid="0" * 16), "unknown-key"),
        (lambda d: d.pop("payload"), "malformed"),
        (lambda d: d.update(payload="x" * (MAX_ENVELOPE_BYTES + 10)), "oversized"),
    ],
)
def test_verify_refuses_with_the_reason(
    tmp_path: Path, keys: list[Path], capsys: pytest.CaptureFixture[str], edit: object, reason: str
) -> None:
    profile = tmp_path / "p.yaml"
    profile.write_text("health:\n  interval_s: 3\n")
    signed = tmp_path / "p.json"
    assert (
        run(
            capsys,
            "sign",
            str(profile),
            "--key",
            str(keys[0]),
            "--scope",
            "room:school1.room1",
            "--version",
            "4",
            "--out",
            str(signed),
        )[0]
        == 0
    )
    document = json.loads(signed.read_text())
    edit(document)  # type: ignore[operator]
    signed.write_text(json.dumps(document))
    code, _, err = run(capsys, "verify", str(signed), "--trust", str(tmp_path / "keys"))
    assert code == 2
    assert f"refused: {reason}:" in err


def test_verify_refuses_an_expired_one_and_sign_refuses_what_devices_would(
    tmp_path: Path, keys: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    profile = tmp_path / "p.yaml"
    profile.write_text("health:\n  interval_s: 3\n")
    signed = tmp_path / "p.json"
    assert (
        run(
            capsys,
            "sign",
            str(profile),
            "--key",
            str(keys[0]),
            "--scope",
            "fleet",
            "--version",
            "1",
            "--expires",
            "0s",
            "--out",
            str(signed),
        )[0]
        == 0
    )
    code, _, err = run(capsys, "verify", str(signed), "--trust", str(tmp_path / "keys"))
    assert code == 2
    assert "refused: expired:" in err
    profile.write_text("identity:\n  room: other\n")
    code, _, err = run(
        capsys,
        "sign",
        str(profile),
        "--key",
        str(keys[0]),
        "--scope",
        "fleet",
        "--version",
        "1",
        "--out",
        str(signed),
    )
    assert code == 2
    assert "identity" in err
    assert "may not set" in err
    profile.write_text("health:\n  interval_s: 0\n")
    code, _, err = run(
        capsys,
        "sign",
        str(profile),
        "--key",
        str(keys[0]),
        "--scope",
        "fleet",
        "--version",
        "1",
        "--out",
        str(signed),
    )
    assert code == 2
    assert "interval_s" in err
    code, _, err = run(
        capsys,
        "sign",
        str(profile),
        "--key",
        str(keys[0]),
        "--scope",
        "planet:x",
        "--version",
        "1",
        "--out",
        str(signed),
    )
    assert code == 2
    assert "scope" in err


def test_plan_shows_the_diff_the_services_and_the_lesson(
    tmp_path: Path, keys: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    site = site_file(tmp_path, keys)
    profile = tmp_path / "p.yaml"
    signed = tmp_path / "p.json"
    profile.write_text("health:\n  interval_s: 3\n")
    assert (
        run(
            capsys,
            "sign",
            str(profile),
            "--key",
            str(keys[1]),
            "--scope",
            "group:music",
            "--version",
            "1",
            "--out",
            str(signed),
        )[0]
        == 0
    )
    code, out, err = run(capsys, "plan", str(signed), "-c", str(site))
    assert code == 0, err
    assert "health.interval_s: 10.0 -> 3.0" in out
    assert "reconfigure" in out
    assert "health" in out
    assert "a live lesson would not delay it" in out

    profile.write_text("capture:\n  video:\n    fps: 12\n")
    assert (
        run(
            capsys,
            "sign",
            str(profile),
            "--key",
            str(keys[1]),
            "--scope",
            "room:school1.room1",
            "--version",
            "1",
            "--out",
            str(signed),
        )[0]
        == 0
    )
    code, out, err = run(capsys, "plan", str(signed), "-c", str(site))
    assert code == 0, err
    assert "capture.video.fps: 30.0 -> 12.0" in out
    assert "restart capture" in out
    assert "a live lesson would delay it" in out

    assert (
        run(
            capsys,
            "sign",
            str(profile),
            "--key",
            str(keys[1]),
            "--scope",
            "room:school1.room2",
            "--version",
            "1",
            "--out",
            str(signed),
        )[0]
        == 0
    )
    code, _, err = run(capsys, "plan", str(signed), "-c", str(site))
    assert code == 2
    assert "does not include this device" in err


def test_history_on_a_device_that_has_had_none(
    tmp_path: Path, keys: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "history", "-c", str(site_file(tmp_path, keys)))
    assert code == 0
    assert "no pushed profile" in out
