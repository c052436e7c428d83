"""Hardware kit profiles (``firmware-profiles/*.yaml``) and their auto-detection.

A profile describes one supported kit (mini-PC + camera + microphone): how to recognise
it (DMI product name, USB VID:PID of its camera or speakerphone) and the settings that
suit it (camera mode, encoder, thermal thresholds). Its ``config`` is a partial agent
config, merged above the defaults and below the site file.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from agent.config.base import StrictModel
from agent.config.errors import ConfigError, ConfigIssue, issues_from_validation
from agent.config.loader import Layer, build_config, read_yaml_file
from agent.resources import shipped

PROFILES_ENV = "CLASSROOM_AGENT_PROFILES"
SYSTEM_PROFILES = Path("/usr/share/classroom-agent/firmware-profiles")
FALLBACK_WITH_CAMERA = "generic-uvc"
FALLBACK_WITHOUT_CAMERA = "virtual"


class ProfileMatch(StrictModel):
    dmi_product_names: list[str] = Field(
        default_factory=list,
        description="Shell-style patterns for /sys/class/dmi/id/product_name (case-insensitive)",
    )
    usb_ids: list[str] = Field(
        default_factory=list,
        description="USB 'vvvv:pppp' ids (hex) of the kit's camera or audio device",
    )


class HardwareProfile(StrictModel):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$", description="Equals the file name stem")
    description: str = Field(description="The kit, in words maintenance staff recognise")
    match: ProfileMatch = Field(default_factory=ProfileMatch, description="How to detect the kit")
    config: dict[str, Any] = Field(
        default_factory=dict, description="Agent settings for this kit (same keys as agent.yaml)"
    )


@dataclass(frozen=True)
class LoadedProfile:
    profile: HardwareProfile
    path: Path
    lines: dict[str, str]

    def layer(self) -> Layer:
        """The profile's settings as a config layer, keeping YAML lines for error messages."""
        lines = {
            path.removeprefix("config."): where
            for path, where in self.lines.items()
            if path.startswith("config.")
        }
        return Layer(
            name=f"hardware profile {self.profile.name}", data=self.profile.config, lines=lines
        )


def profile_dirs() -> list[Path]:
    """Where profiles live: $CLASSROOM_AGENT_PROFILES, the system path, then the package's own.

    The Debian package installs its kits to ``SYSTEM_PROFILES``; the profiles shipped with
    the Python package (a wheel or a source checkout) come last, so every install finds them.
    """
    dirs = []
    if os.environ.get(PROFILES_ENV):
        dirs.append(Path(os.environ[PROFILES_ENV]))
    dirs.append(SYSTEM_PROFILES)
    dirs.append(shipped("firmware-profiles"))
    return dirs


def load_profile_file(path: Path) -> LoadedProfile:
    data, lines = read_yaml_file(path)
    try:
        profile = HardwareProfile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(issues_from_validation(exc, HardwareProfile, lines)) from None
    if profile.name != path.stem:
        raise ConfigError(
            [
                ConfigIssue(
                    "name",
                    f"must equal the file name {path.stem!r}, got {profile.name!r}",
                    lines.get("name", path.name),
                )
            ]
        )
    for usb_id in profile.match.usb_ids:
        vid, _, pid = usb_id.partition(":")
        if not (len(vid) == 4 and len(pid) == 4 and _is_hex(vid) and _is_hex(pid)):
            raise ConfigError(
                [
                    ConfigIssue(
                        "match.usb_ids",
                        f"must be 'vvvv:pppp' in hex, got {usb_id!r}",
                        lines.get("match.usb_ids", path.name),
                    )
                ]
            )
    return LoadedProfile(profile=profile, path=path, lines=lines)


def check_profile_file(path: Path) -> HardwareProfile:
    """Validate a profile file, and that its settings make a valid agent config."""
    loaded = load_profile_file(path)
    placeholder = Layer("placeholder identity", {"identity": {"site": "check", "room": "check"}})
    build_config([loaded.layer(), placeholder])
    return loaded.profile


def _is_hex(text: str) -> bool:
    try:
        int(text, 16)
    except ValueError:
        return False
    return True


def available_profiles(dirs: Iterable[Path] | None = None) -> dict[str, Path]:
    """Profile name -> file; the first directory that has a name wins."""
    found: dict[str, Path] = {}
    for directory in dirs if dirs is not None else profile_dirs():
        if not directory.is_dir():
            continue
        for path in sorted(directory.glob("*.yaml")):
            found.setdefault(path.stem, path)
    return found


def load_profile(name: str, dirs: Iterable[Path] | None = None) -> LoadedProfile:
    profiles = available_profiles(dirs)
    if name not in profiles:
        known = ", ".join(sorted(profiles)) or "none found"
        raise ConfigError(
            [ConfigIssue("hardware.profile", f"unknown profile {name!r} (available: {known})")]
        )
    return load_profile_file(profiles[name])


@dataclass(frozen=True)
class HostFacts:
    """What the machine tells us about its hardware, read from sysfs and /dev."""

    product_name: str
    usb_ids: frozenset[str]
    has_camera: bool

    @classmethod
    def read(cls, sys_root: Path = Path("/sys"), dev_root: Path = Path("/dev")) -> HostFacts:
        product = ""
        with contextlib.suppress(OSError):
            product = (sys_root / "class/dmi/id/product_name").read_text().strip()
        usb_ids = set()
        usb_root = sys_root / "bus/usb/devices"
        if usb_root.is_dir():
            for device in usb_root.iterdir():
                try:
                    vid = (device / "idVendor").read_text().strip().lower()
                    pid = (device / "idProduct").read_text().strip().lower()
                except OSError:
                    continue
                usb_ids.add(f"{vid}:{pid}")
        has_camera = any(dev_root.glob("video*"))
        return cls(product_name=product, usb_ids=frozenset(usb_ids), has_camera=has_camera)


@dataclass(frozen=True)
class Detection:
    name: str
    reason: str


def detect_profile(facts: HostFacts, profiles: Iterable[HardwareProfile]) -> Detection:
    """Pick the kit whose DMI product name and USB ids match best; explain the choice."""
    best: tuple[int, str, str] | None = None
    for profile in profiles:
        rules = profile.match
        if not rules.dmi_product_names and not rules.usb_ids:
            continue
        score = 0
        why = []
        if rules.dmi_product_names:
            product = facts.product_name.lower()
            if not any(fnmatch.fnmatch(product, p.lower()) for p in rules.dmi_product_names):
                continue
            score += 2
            why.append(f"DMI product {facts.product_name!r}")
        if rules.usb_ids:
            present = sorted(facts.usb_ids & {u.lower() for u in rules.usb_ids})
            if not present:
                continue
            score += len(present)
            why.append(f"USB {', '.join(present)}")
        if best is None or score > best[0]:
            best = (score, profile.name, " and ".join(why))
    if best is not None:
        return Detection(best[1], f"matched {best[2]}")
    if facts.has_camera:
        return Detection(FALLBACK_WITH_CAMERA, "no kit matched; a camera is present")
    return Detection(FALLBACK_WITHOUT_CAMERA, "no kit matched and no camera: synthetic media")
