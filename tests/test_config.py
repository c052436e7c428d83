"""Configuration: layers, provenance, hardware profiles, and errors people can act on."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import ConfigError, HostFacts, available_profiles, load_config
from agent.config.loader import Layer, build_config
from agent.config.profiles import check_profile_file, detect_profile, load_profile_file

REPO = Path(__file__).resolve().parents[1]
IDENTITY = "identity:\n  site: central-school\n  room: room-101\n"


def write(tmp_path: Path, text: str, name: str = "agent.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )


@pytest.mark.parametrize("path", sorted((REPO / "firmware-profiles").glob("*.yaml")), ids=str)
def test_every_shipped_profile_is_valid(path: Path) -> None:
    profile = check_profile_file(path)
    assert profile.name == path.stem
    assert profile.description


def test_shipped_profiles_cover_the_supported_kits() -> None:
    names = set(available_profiles())
    assert {"virtual", "intel-n100-uvc1080", "celeron-720p", "generic-uvc"} <= names


def test_layers_later_wins_and_every_value_knows_its_source(tmp_path: Path) -> None:
    site = write(
        tmp_path,
        IDENTITY + "hardware:\n  profile: celeron-720p\ncapture:\n  video:\n    fps: 15\n",
    )
    pushed = Layer("pushed profile v7", {"capture": {"video": {"fps": 10}}})
    loaded = load_config([site], pushed=[pushed])
    video = loaded.config.capture.video
    assert (video.source, video.width, video.fps) == ("camera", 1280, 10)
    assert loaded.source_of("capture.video.fps") == "pushed profile v7"
    assert loaded.source_of("capture.video.width") == "hardware profile celeron-720p"
    assert loaded.source_of("identity.room") == f"site file {site}"
    assert loaded.source_of("logging.level") == "default"
    assert loaded.profile == "celeron-720p"

    without_push = load_config([site])
    assert without_push.config.capture.video.fps == 15
    assert without_push.source_of("capture.video.fps") == f"site file {site}"


def test_later_site_file_overrides_earlier(tmp_path: Path) -> None:
    first = write(tmp_path, IDENTITY + "logging: {level: debug}\n", "a.yaml")
    second = write(tmp_path, "logging: {format: json}\n", "b.yaml")
    config = load_config([first, second], profile="virtual").config
    assert (config.logging.level, config.logging.format) == ("debug", "json")


def test_out_of_range_value_names_field_limit_and_line(tmp_path: Path) -> None:
    site = write(tmp_path, IDENTITY + "capture:\n  video:\n    fps: 120\n")
    with pytest.raises(ConfigError) as caught:
        load_config([site], profile="virtual")
    assert str(caught.value) == "capture.video.fps: must be <= 60, got 120 (agent.yaml line 6)"


def test_unknown_key_suggests_the_right_one(tmp_path: Path) -> None:
    site = write(tmp_path, IDENTITY + "capture:\n  vidoe:\n    fps: 10\n")
    with pytest.raises(ConfigError) as caught:
        load_config([site], profile="virtual")
    [issue] = caught.value.issues
    assert issue.path == "capture.vidoe"
    assert "did you mean 'video'" in issue.message
    assert issue.where == "agent.yaml line 5"


def test_missing_identity_is_reported(tmp_path: Path) -> None:
    site = write(tmp_path, "identity:\n  site: s1\n")
    with pytest.raises(
        ConfigError, match=r"identity.room: required, but missing \(agent.yaml line 1\)"
    ):
        load_config([site], profile="virtual")


def test_cross_field_rules(tmp_path: Path) -> None:
    site = write(
        tmp_path,
        IDENTITY
        + "  groups:\n    - {group: g1, role: main, receivers: [s.r]}\n"
        + "    - {group: g1, role: receiving}\n"
        + "broker:\n  url: mqtts://broker.example:8883\n",
    )
    with pytest.raises(ConfigError) as caught:
        load_config([site], profile="virtual")
    text = str(caught.value)
    assert "identity: group 'g1' is listed twice" in text
    assert "broker: mqtts:// needs a 'tls' section" in text


def test_broker_url_is_parsed() -> None:
    loaded = build_config(
        [
            Layer(
                "t",
                {"identity": {"site": "s", "room": "r"}, "broker": {"url": "mqtt://[::1]:1884"}},
            )
        ]
    )
    assert (loaded.config.broker.host, loaded.config.broker.port) == ("::1", 1884)


def test_unknown_profile_lists_the_known_ones(tmp_path: Path) -> None:
    site = write(tmp_path, IDENTITY + "hardware: {profile: raspberry}\n")
    with pytest.raises(
        ConfigError, match=r"hardware.profile: unknown profile 'raspberry' \(available: .*virtual"
    ):
        load_config([site])


def fake_sysfs(root: Path, product: str, usb: list[str], camera: bool) -> HostFacts:
    """A sysfs/dev tree as a kit would present it (fake hardware, real parsing)."""
    (root / "sys/class/dmi/id").mkdir(parents=True)
    (root / "sys/class/dmi/id/product_name").write_text(product + "\n")
    for index, usb_id in enumerate(usb):
        vid, pid = usb_id.split(":")
        device = root / f"sys/bus/usb/devices/1-{index}"
        device.mkdir(parents=True)
        (device / "idVendor").write_text(vid + "\n")
        (device / "idProduct").write_text(pid + "\n")
    (root / "dev").mkdir()
    if camera:
        (root / "dev/video0").touch()
    return HostFacts.read(sys_root=root / "sys", dev_root=root / "dev")


@pytest.mark.parametrize(
    ("product", "usb", "camera", "expected"),
    [
        ("NUC N100 Mini PC", ["046d:085e", "1d6b:0002"], True, "intel-n100-uvc1080"),
        ("Celeron N4020 Box", ["046d:0825"], True, "celeron-720p"),
        ("NUC N100 Mini PC", [], True, "generic-uvc"),  # right PC, unknown camera
        ("Some Desktop", ["dead:beef"], True, "generic-uvc"),
        ("Some Desktop", [], False, "virtual"),
    ],
)
def test_detection_by_dmi_and_usb(
    tmp_path: Path, product: str, usb: list[str], camera: bool, expected: str
) -> None:
    facts = fake_sysfs(tmp_path, product, usb, camera)
    profiles = [load_profile_file(p).profile for p in available_profiles().values()]
    detection = detect_profile(facts, profiles)
    assert detection.name == expected, detection.reason
    assert detection.reason


def test_auto_profile_uses_detection(tmp_path: Path) -> None:
    facts = fake_sysfs(tmp_path / "hw", "Celeron J4125", ["046d:0825"], True)
    site = write(tmp_path, IDENTITY)
    loaded = load_config([site], facts=facts)
    assert loaded.profile == "celeron-720p"
    assert "auto-detected" in loaded.profile_reason


def test_cli_config_check_reports_errors_without_traceback(tmp_path: Path) -> None:
    bad = write(tmp_path, IDENTITY + "capture:\n  video:\n    fps: 120\n", "bad.yaml")
    broken = write(tmp_path, "identity: [\n", "broken.yaml")
    good = write(tmp_path, IDENTITY + "hardware: {profile: virtual}\n", "good.yaml")
    result = cli("config", "check", str(good), str(bad), str(broken), str(tmp_path / "none.yaml"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"{good}: ok (room central-school.room-101, hardware profile virtual)" in result.stdout
    assert "capture.video.fps: must be <= 60, got 120 (bad.yaml line 6)" in result.stderr
    assert "invalid YAML" in result.stderr
    assert "broken.yaml line 2" in result.stderr
    assert "file not found" in result.stderr


def test_cli_config_check_accepts_profiles() -> None:
    result = cli("config", "check", *map(str, sorted((REPO / "firmware-profiles").glob("*.yaml"))))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(": ok (hardware profile") == len(available_profiles())


def test_cli_config_show_masks_secrets_and_names_sources(tmp_path: Path) -> None:
    site = write(tmp_path, IDENTITY + "broker:\n  password: hunter2\n")
    result = cli("config", "show", "--profile", "virtual", "-c", str(site))
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout
    lines = {
        line.split()[0]: line for line in result.stdout.splitlines() if line and line[0] != "#"
    }
    assert "********" in lines["broker.password"]
    assert lines["capture.video.source"].endswith("[hardware profile virtual]")
    assert lines["identity.room"].endswith(f"[site file {site}]")
    assert lines["stream.panel_port"].endswith("[default]")


def test_example_site_file_is_valid() -> None:
    loaded = load_config([REPO / "examples/agent.yaml"], profile="virtual")
    assert loaded.config.identity.device_id == "central-school.room-101"
    assert loaded.config.broker.port == 8883


def test_reserved_site_names_are_refused(tmp_path: Path) -> None:
    site = write(tmp_path, "identity: {site: lesson, room: r1}\n")
    with pytest.raises(ConfigError, match=r"identity\.site: 'lesson' is reserved"):
        load_config([site], profile="virtual")


@pytest.mark.parametrize(
    ("membership", "message"),
    [
        ("{group: g1, role: main}", "role 'main' needs 'receivers'"),
        ("{group: g1, role: receiving, receivers: [a.b]}", "only the main room lists"),
        ("{group: g1, role: main, receivers: [village-a]}", "identity.groups.0.receivers.0"),
    ],
)
def test_group_receivers_rules(tmp_path: Path, membership: str, message: str) -> None:
    site = write(tmp_path, IDENTITY + f"  groups:\n    - {membership}\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config([site], profile="virtual")


def test_ice_host_addresses_must_be_ip_literals(tmp_path: Path) -> None:
    site = write(tmp_path, IDENTITY + "stream: {ice_host_addresses: [localhost]}\n")
    with pytest.raises(ConfigError, match="must be IP addresses, got 'localhost'"):
        load_config([site], profile="virtual")
