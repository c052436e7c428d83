"""The agent as a user installs it: the wheel in a fresh virtualenv, and the Debian package.

The wheel is built from this checkout and installed into a virtualenv outside it; every
command then runs from an empty working directory, so nothing is found through the
checkout by accident. Third-party dependencies come from the project's own virtualenv
(a ``.pth`` line), which keeps the test fast and offline.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import pwd
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.brokers import BrokerUnderTest
from tests.sensing_data import OBAMA
from tests.test_daemon import Daemon, site_config

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# What the agent reads at run time, as (folder in the checkout, place in the wheel).
RUNTIME_DATA = [
    (REPO / "firmware-profiles", "agent/shipped/firmware-profiles"),
    (REPO / "schemas", "agent/shipped/schemas"),
    (REPO / "broker", "agent/shipped/broker"),
    (REPO / "agent/panel/static", "agent/panel/static"),
    (REPO / "agent/dashboard/static", "agent/dashboard/static"),
]

# Never part of a build: local environments, caches, earlier build output, test artefacts.
NOT_SOURCE = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*_cache", "artifacts")


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    cwd: Path  # empty, outside the checkout

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.venv / "bin" / "classroom-agent"), *args],
            cwd=self.cwd,
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def clean_env() -> dict[str, str]:
    """The environment without anything that would point Python or the agent at the checkout."""
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "CLASSROOM_AGENT_PROFILES")
    return {key: value for key, value in os.environ.items() if key not in drop}


def build_wheel(out: Path) -> Path:
    """``pip wheel`` of a clean copy of this checkout with the installed setuptools.

    A copy, because setuptools reuses an existing ``build/`` folder: files dropped from the
    package data would still reach the wheel from an earlier build. No index, no download.
    """
    backend = importlib.metadata.version("setuptools")
    assert int(backend.split(".")[0]) >= 77, (
        f"setuptools {backend} cannot build this project ([build-system] asks for >=77): "
        "run scripts/setup.sh, which installs the dev extra"
    )
    source = out / "source"
    shutil.copytree(REPO, source, symlinks=True, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--quiet",
            "--wheel-dir",
            str(out),
            str(source),
        ],
        check=True,
        timeout=180,
        cwd=out,
    )
    (wheel,) = out.glob("classroom_edge_agent-*.whl")
    return wheel


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("wheel")
    assert not root.is_relative_to(REPO)
    wheel = build_wheel(root)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(
        subprocess.run(
            [
                str(venv / "bin" / "python"),
                "-c",
                "import sysconfig; print(sysconfig.get_path('purelib'))",
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    # The dependencies, from the project's virtualenv: a path line only, so that its
    # editable-install hook for `agent` (itself a .pth there) is never run.
    deps = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (site / "project-deps.pth").write_text("".join(f"{path}\n" for path in sorted(deps)))
    subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "--quiet",
            str(wheel),
        ],
        check=True,
        timeout=120,
        env=clean_env(),
    )
    cwd = root / "elsewhere"
    cwd.mkdir()
    return Installed(wheel=wheel, venv=venv, cwd=cwd)


def test_the_wheel_carries_every_file_the_agent_reads_at_run_time(installed: Installed) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    for folder, inside in RUNTIME_DATA:
        files = [p for p in folder.iterdir() if p.is_file() and p.suffix != ".py"]
        assert files, folder
        missing = [p.name for p in files if f"{inside}/{p.name}" not in names]
        assert not missing, f"{folder.relative_to(REPO)}: not in the wheel: {missing}"


def test_the_installed_agent_lists_and_checks_the_shipped_profiles(installed: Installed) -> None:
    probe = subprocess.run(
        [str(installed.python), "-c", "import agent; print(agent.__file__)"],
        cwd=installed.cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    imported = Path(probe.stdout.strip())
    assert imported.is_relative_to(installed.venv), imported
    assert not imported.resolve().is_relative_to(REPO)

    listed = installed.run("profiles")
    assert listed.returncode == 0, listed.stderr
    assert listed.stderr == ""
    names = {
        line.lstrip("* ").split()[0]
        for line in listed.stdout.splitlines()
        if line.strip() and not line.startswith("this machine")
    }
    shipped = {path.stem for path in (REPO / "firmware-profiles").glob("*.yaml")}
    assert names == shipped, listed.stdout

    profile = imported.parent / "shipped" / "firmware-profiles" / "virtual.yaml"
    checked = installed.run("config", "check", str(profile))
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.strip() == f"{profile}: ok (hardware profile virtual)"

    # The fleet broker's config template comes with the package too.
    broker = installed.run("broker", "config", "--port", "18883")
    assert broker.returncode == 0, broker.stderr
    assert "require_certificate true" in broker.stdout
    assert "listener 18883" in broker.stdout


def fetch(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.headers.get("Content-Type", ""), response.read()


async def test_the_installed_agent_runs_and_its_panel_serves_its_page(
    installed: Installed,
    mosquitto: BrokerUnderTest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("PYTHONPATH", "PYTHONHOME", "CLASSROOM_AGENT_PROFILES"):
        monkeypatch.delenv(name, raising=False)  # the daemon inherits the environment
    main_room = {"groups": [{"group": "music", "role": "main", "receivers": ["school1.room2"]}]}
    config: dict[str, Any] = site_config(mosquitto, tmp_path, identity=main_room)
    daemon = Daemon(tmp_path, config, python=str(installed.python), cwd=installed.cwd)
    try:
        await daemon.start()
        await daemon.wait_notified("READY=1", within=60)
        await daemon.wait_log("teacher panel at ")
        found = re.search(r"teacher panel at (http://[0-9.:]+/)", daemon.log())
        assert found is not None, daemon.log()
        url = found.group(1)

        status, kind, page = await asyncio.to_thread(fetch, url)
        assert status == 200
        assert kind.startswith("text/html")
        assert b"/static/panel.js" in page

        status, kind, body = await asyncio.to_thread(fetch, f"{url}static/panel.css")
        assert status == 200
        assert kind.startswith("text/css")
        installed_css = next(installed.venv.rglob("agent/panel/static/panel.css"))
        assert body == installed_css.read_bytes()
    finally:
        await daemon.close()
    assert "Traceback" not in daemon.log()


# -- the Debian package ----------------------------------------------------------------

DEB_PACKAGE = "classroom-agent"
INSTALLED_UNIT = Path("/lib/systemd/system/classroom-agent.service")
SITE_FILE = Path("/etc/classroom-agent/agent.yaml")


def _installed_already() -> bool:
    probe = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", DEB_PACKAGE],
        capture_output=True,
        text=True,
        check=False,
    )
    return "installed" in probe.stdout


def _deb_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "installing a .deb needs root (CI runs the tests as root)"
    for tool in ("dpkg-deb", "dpkg", "systemd-analyze"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (a Debian machine has it)"
    if _installed_already():
        return f"{DEB_PACKAGE} is installed on this machine: the test would replace it"
    return None


def sh(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args),
        cwd=cwd,
        env={**clean_env(), "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "SYSTEMD_LOG_COLOR": "0"},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def installed_deb(tmp_path: Path) -> Iterator[Path]:
    """The package built by scripts/build-deb.sh, installed with dpkg -i, purged after."""
    reason = _deb_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    built = sh(
        str(REPO / "scripts" / "build-deb.sh"), str(tmp_path / "dist"), cwd=tmp_path, timeout=300
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (deb,) = (tmp_path / "dist").glob("classroom-agent_*.deb")
    account_existed = sh("getent", "passwd", DEB_PACKAGE, cwd=tmp_path).returncode == 0
    try:
        done = sh("dpkg", "-i", str(deb), cwd=tmp_path)
        if done.returncode != 0 and "dependency problems" in done.stderr:
            done = sh("apt-get", "install", "-f", "-y", "-q", cwd=tmp_path, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        # Without systemd as PID 1 the maintainer scripts leave systemctl alone.
        assert "systemctl" not in done.stdout + done.stderr, done.stdout + done.stderr
        yield deb
    finally:
        purged = sh("dpkg", "--purge", DEB_PACKAGE, cwd=tmp_path)
        if not account_existed:  # Debian keeps system accounts on purge; the test does not
            sh("userdel", DEB_PACKAGE, cwd=tmp_path)
            sh("groupdel", DEB_PACKAGE, cwd=tmp_path)
    assert purged.returncode == 0, purged.stdout + purged.stderr
    for left in ("/opt/classroom-agent", "/etc/classroom-agent", "/var/lib/classroom-agent"):
        assert not Path(left).exists(), f"{left} is left after dpkg --purge"
    assert not INSTALLED_UNIT.exists()


def test_the_deb_installs_an_agent_that_checks_its_site_file_and_a_unit_that_verifies(
    installed_deb: Path, tmp_path: Path
) -> None:
    # Postinst ran without systemd as PID 1 (this machine, CI) and made the account.
    account = sh("id", DEB_PACKAGE, cwd=tmp_path)
    assert account.returncode == 0, account.stderr
    assert "(video)" in account.stdout, account.stdout
    assert "(audio)" in account.stdout, account.stdout
    state = Path("/var/lib/classroom-agent").stat()
    assert (state.st_mode & 0o777, state.st_uid) == (0o700, _uid(DEB_PACKAGE))

    checked = sh("classroom-agent", "config", "check", str(SITE_FILE), cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "ok (room central-school.room-101" in checked.stdout

    # The kits are found in /usr/share/classroom-agent, and every shipped kit is listed.
    found = sh(
        "/opt/classroom-agent/.venv/bin/python",
        "-c",
        "from agent.config.profiles import available_profiles as a; "
        "print('\\n'.join(str(p) for p in a().values()))",
        cwd=tmp_path,
    )
    assert found.returncode == 0, found.stderr
    shipped = sorted(p.name for p in (REPO / "firmware-profiles").glob("*.yaml"))
    assert sorted(Path(line).name for line in found.stdout.split()) == shipped
    assert {str(Path(line).parent) for line in found.stdout.split()} == {
        "/usr/share/classroom-agent/firmware-profiles"
    }
    listed = sh("classroom-agent", "profiles", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    for name in shipped:
        assert Path(name).stem in listed.stdout

    # Every Exec*= binary of the installed unit exists, so verify checks it unmodified.
    for line in INSTALLED_UNIT.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^Exec\w+=[-@:+!]*(\S+)", line)
        if match:
            assert os.access(match.group(1), os.X_OK), line
    verified = sh(
        "systemd-analyze",
        "verify",
        "--man=no",
        "--generators=no",
        str(INSTALLED_UNIT),
        cwd=tmp_path,
    )
    assert verified.stderr == "", verified.stderr
    assert verified.returncode == 0, verified.stdout
    assert Path("/usr/lib/systemd/user/classroom-kiosk.service").is_file()


def _uid(name: str) -> int:
    return pwd.getpwnam(name).pw_uid


CREDENTIAL = Path("/etc/classroom-agent/sensing-key.cred")
POSTINST = Path("/var/lib/dpkg/info/classroom-agent.postinst")


def test_the_records_key_is_an_encrypted_credential_only_the_admin_tool_opens(
    installed_deb: Path, tmp_path: Path
) -> None:
    """Rosters, attendance and reports are sealed with a key the package keeps as a
    systemd encrypted credential (root 0600), never beside the store; root's
    classroom-agent-admin runs a sensing command as the service's account with it."""
    if shutil.which("systemd-creds") is None:
        pytest.skip("systemd-creds is not installed (a Debian machine with systemd has it)")
    made = CREDENTIAL.stat()
    assert (made.st_mode & 0o777, made.st_uid) == (0o600, 0)
    assert len(_decrypted_key()) == 32  # fresh random bytes
    assert "sensing-key" in INSTALLED_UNIT.read_text(encoding="utf-8")

    # An upgrade from a version that kept the key beside the store seals that key (the
    # store stays readable) and removes the plain copy.
    store = Path("/var/lib/classroom-agent/sensing")
    store.mkdir(mode=0o700, exist_ok=True)
    old_key = store / "store.key"
    old_key.write_text("ab" * 32 + "\n")
    CREDENTIAL.unlink()
    upgraded = sh(str(POSTINST), "configure", "0.0.9", cwd=tmp_path)
    assert upgraded.returncode == 0, upgraded.stderr
    assert not old_key.exists()
    assert _decrypted_key() == b"ab" * 32 + b"\n"
    shutil.chown(store, DEB_PACKAGE, DEB_PACKAGE)

    # Enrolment through the admin tool: as the service's account, with that key.
    photos = Path(tempfile.mkdtemp(prefix="enrol-", dir="/tmp"))
    try:
        (photos / "s-obama").mkdir()
        shutil.copy(OBAMA[0], photos / "s-obama" / "1.jpg")
        roster = photos / "roster.yaml"
        roster.write_text(
            "class: g3\nstudents:\n  - {id: s-obama, name: 欧巴马, consent: true}\n",
            encoding="utf-8",
        )
        for path in (photos, photos / "s-obama", photos / "s-obama" / "1.jpg", roster):
            path.chmod(0o755 if path.is_dir() else 0o644)
        enrolled = sh(
            "classroom-agent-admin",
            "roster",
            "enroll",
            "--roster",
            str(roster),
            "--photos",
            str(photos),
            cwd=tmp_path,
            timeout=300,
        )
        assert enrolled.returncode == 0, enrolled.stdout + enrolled.stderr
    finally:
        shutil.rmtree(photos)
    sealed = store / "roster.enc"
    assert sealed.stat().st_uid == _uid(DEB_PACKAGE)  # the service can open what it wrote
    assert not old_key.exists()  # the key came from the credential, none was made
    listed = sh("classroom-agent-admin", "roster", "list", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "s-obama" in listed.stdout
    assert not list(Path("/run").glob("classroom-agent-admin.*"))  # the key is gone again
    # Without the tool even root finds no key: the state directory holds none.
    direct = sh("classroom-agent", "roster", "list", cwd=tmp_path)
    assert direct.returncode != 0
    assert "key missing" in direct.stdout + direct.stderr
    refused = sh(
        "setpriv", "--reuid=nobody", "classroom-agent-admin", "roster", "list", cwd=tmp_path
    )
    assert refused.returncode == 2
    assert "sudo" in refused.stderr


def _decrypted_key() -> bytes:
    done = subprocess.run(
        ["systemd-creds", "decrypt", "--name=sensing-key", str(CREDENTIAL), "-"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout
