"""The pages' message catalogues, checked without a browser.

Every key the pages' JavaScript and HTML use must be in every catalogue, the catalogues
must hold the same keys with the same ``{placeholders}``, no key may be dead, no text in
an HTML page may bypass the catalogue, and the servers must inline the catalogues and
serve the lookup script under the pages' CSP.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from pydantic import ValidationError

from agent import locales
from agent.config.models import AgentConfig, UiConfig
from agent.dashboard import DashboardConfig, DashboardServer
from agent.dashboard.cli import add_dashboard_parser, config_from_args
from agent.web import CSP

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "agent/panel/static", REPO / "agent/dashboard/static"]
SCRIPTS = [p for d in PAGES for p in sorted(d.glob("*.js"))] + [locales.SCRIPT]
# Pages rendered on the device (the lesson report) name their keys in Python.
RENDERERS = [REPO / "agent/sensing/report.py"]
HTML_PAGES = [p for d in PAGES for p in sorted(d.glob("*.html"))]
NAMESPACES = ("common", "panel", "kiosk", "watch", "dash", "report")
# A quoted string that is a catalogue key: t("..."), tn("..."), and key maps like
# RULES = { camera_lost: "dash.rule.camera_lost" } (the pages write keys out in full).
KEY_LITERAL = re.compile(r"""["'`]((?:NS)\.[a-z0-9_.]+)["'`]""".replace("NS", "|".join(NAMESPACES)))
PLURAL_CALL = re.compile(r"""\btn\(\s*["']([a-z0-9_.]+)["']""")
BUILT_KEY = re.compile(r"""\btn?\(\s*(?:`|["'][^"']*["']\s*\+)""")
I18N_ATTRIBUTE = re.compile(r"""data-i18n(?:-[a-z-]+)?="([^"]+)\"""")
PLACEHOLDER = re.compile(r"\{(\w+)\}")
# The same word in both languages, on purpose.
SAME_IN_BOTH = {"dash.col.cpu"}


def catalogues() -> dict[str, dict[str, str]]:
    return {language: locales.catalogue(language) for language in locales.LANGUAGES}


def used_keys() -> set[str]:
    """Every key the sources name; a plural base counts as its .one and .other forms."""
    keys: set[str] = set()
    for path in SCRIPTS + RENDERERS:
        source = path.read_text(encoding="utf-8")
        plural = set(PLURAL_CALL.findall(source))
        for key in KEY_LITERAL.findall(source):
            keys |= {f"{key}.one", f"{key}.other"} if key in plural else {key}
    for path in HTML_PAGES:
        keys |= set(I18N_ATTRIBUTE.findall(path.read_text(encoding="utf-8")))
    return keys


def test_every_key_used_is_in_every_catalogue() -> None:
    used = used_keys()
    assert len(used) > 150  # the parser found the pages' keys, not nothing
    for language, messages in catalogues().items():
        missing = sorted(used - messages.keys())
        assert not missing, f"{language}.json lacks {missing}"


def test_the_catalogues_hold_the_same_keys_and_placeholders() -> None:
    all_catalogues = catalogues()
    reference = all_catalogues[locales.FALLBACK]
    for language, messages in all_catalogues.items():
        assert messages.keys() == reference.keys(), (
            f"{language}.json: missing {sorted(reference.keys() - messages.keys())}, "
            f"extra {sorted(messages.keys() - reference.keys())}"
        )
        for key, text in messages.items():
            assert set(PLACEHOLDER.findall(text)) == set(PLACEHOLDER.findall(reference[key])), (
                f"{language}.json {key}: {text!r} has other placeholders than {reference[key]!r}"
            )


def test_no_key_is_dead() -> None:
    dead = sorted(catalogues()[locales.FALLBACK].keys() - used_keys())
    assert not dead, f"keys no page uses (a key built at run time is invisible here): {dead}"


def test_every_lookup_names_its_key_in_full() -> None:
    # t("dash.status." + state) or t(`...`) would hide its keys from the checks above.
    for path in SCRIPTS:
        if path == locales.SCRIPT:
            continue  # the lookup itself
        source = path.read_text(encoding="utf-8")
        built = BUILT_KEY.findall(source)
        assert not built, f"{path.name}: keys built at run time: {built}"


def test_chinese_is_really_chinese() -> None:
    zh = catalogues()["zh-CN"]
    en = catalogues()["en"]
    untranslated = sorted(
        k for k in zh if zh[k] == en[k] and k not in SAME_IN_BOTH and PLACEHOLDER.sub("", zh[k])
    )
    assert not untranslated, f"zh-CN.json copies the English text of {untranslated}"
    # The kiosk's slates, as a teacher at a rural teaching point reads them.
    assert zh["kiosk.waiting"] == "等待上课"
    assert zh["kiosk.joining"].startswith("正在加入")
    assert zh["kiosk.reconnecting"].startswith("正在重新连接")
    assert zh["kiosk.main_offline"] == "主讲教室离线"
    assert (zh["panel.start_lesson"], zh["panel.end_lesson"]) == ("开始上课", "下课")
    assert zh["kiosk.raise_hand"] == "举手"


class _TextFinder(HTMLParser):
    """Text and labelled attributes in an HTML page that no data-i18n attribute covers."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[dict[str, str | None]] = []
        self.bare: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        for name in ("placeholder", "title", "aria-label"):
            if attributes.get(name) and f"data-i18n-{name}" not in attributes:
                self.bare.append(f"<{tag} {name}={attributes[name]!r}>")
        if tag not in {"meta", "link", "input", "br", "img", "col", "rect", "path"}:
            self.stack.append({"tag": tag, **attributes})

    def handle_endtag(self, tag: str) -> None:
        while self.stack:
            if self.stack.pop()["tag"] == tag:
                break

    def handle_data(self, data: str) -> None:
        if not re.search(r"[^\W\d_]", data):  # punctuation, numbers, dashes: no words
            return
        inner = self.stack[-1] if self.stack else {}
        if inner.get("tag") in {"script", "style"} or "data-i18n" in inner:
            return
        self.bare.append(f"<{inner.get('tag')}>{data.strip()!r}")


@pytest.mark.parametrize("page", HTML_PAGES, ids=lambda p: p.name)
def test_no_page_text_bypasses_the_catalogue(page: Path) -> None:
    source = page.read_text(encoding="utf-8")
    finder = _TextFinder()
    finder.feed(source)
    assert not finder.bare, f"{page.name}: text without data-i18n: {finder.bare}"
    # The lookup runs before the page's own script, which finds its text translated.
    scripts = re.findall(r'<script src="([^"]+)" defer>', source)
    assert scripts[0] == locales.SCRIPT_URL, scripts


def test_the_data_block_cannot_be_closed_by_a_text() -> None:
    page = locales.localized_html(REPO / "agent/panel/static/watch.html", "zh-CN")
    block = re.search(r'<script type="application/json" id="i18n-data"[^>]*>(.*?)</script>', page)
    assert block is not None
    assert "<" not in block.group(1)
    data = json.loads(block.group(1))
    assert data["setting"] == "zh-CN"
    assert data["catalogues"]["zh-CN"]["watch.title"] == "观看课堂"
    assert data["fallback"] == "en"


def test_ui_language_setting() -> None:
    assert UiConfig().language == "auto"
    assert AgentConfig.model_validate({"identity": {"site": "s", "room": "r"}}).ui.language == (
        "auto"
    )
    assert UiConfig(language="zh-CN").language == "zh-CN"
    with pytest.raises(ValidationError, match="language"):
        UiConfig.model_validate({"language": "zh"})
    with pytest.raises(ValidationError, match="Extra inputs"):
        UiConfig.model_validate({"language": "en", "font": "x"})
    with pytest.raises(ValidationError):
        UiConfig().language = "en"  # type: ignore[misc]  # frozen like every section


def test_dashboard_language_option() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_dashboard_parser(parser.add_subparsers())
    assert config_from_args(parser.parse_args(["dashboard"])).language == "auto"
    chosen = config_from_args(parser.parse_args(["dashboard", "--language", "zh-CN"]))
    assert chosen.language == "zh-CN"
    with pytest.raises(SystemExit):
        parser.parse_args(["dashboard", "--language", "fr"])


async def test_the_dashboard_serves_its_language_and_the_lookup() -> None:
    server = DashboardServer(DashboardConfig(port=0, language="zh-CN"))
    async with TestClient(TestServer(server._app())) as client:
        page = await client.get("/")
        assert page.status == 200
        assert page.headers["Content-Security-Policy"] == CSP
        text = await page.text()
        assert 'data-setting="zh-CN"' in text
        assert '"dash.heading":"教室设备监控"' in text
        script = await client.get(locales.SCRIPT_URL)
        assert script.status == 200
        assert script.headers["Content-Type"].startswith("text/javascript")
        assert script.headers["Content-Security-Policy"] == CSP
        assert "const I18N" in await script.text()


def test_the_daemon_gives_the_panel_its_language() -> None:
    from agent.runtime.composition import PARTS

    [panel] = [part for part in PARTS if part.name == "panel"]
    assert "ui" in panel.reads  # a reload that changes ui.language rebuilds the panel
