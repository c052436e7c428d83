"""``classroom-agent lesson start|end|status|watch-url``: the panel's button from a shell."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from agent.config import AgentConfig, ConfigSources, add_config_options
from agent.panel.client import PanelClient, PanelUnavailable
from agent.panel.server import panel_url, token_path


def describe_status(status: dict[str, Any]) -> str:
    """``classroom-agent lesson status`` for people."""
    controls = status.get("controls", {})
    camera = "off" if controls.get("camera_muted") else "on"
    microphone = "off" if controls.get("microphone_muted") else "on"
    lines = [f"{status['name']} ({status['device']}): camera {camera}, microphone {microphone}"]
    now = time.time()
    for host in status.get("hosting", []):
        lesson = host.get("lesson")
        if lesson is None:
            lines.append(
                f"group {host['group']}: no lesson (receivers: {', '.join(host['expected'])})"
            )
            continue
        minutes = (now - lesson["started_at"]) / 60
        subject = f" - {lesson['subject']}" if lesson.get("subject") else ""
        lines.append(
            f"group {host['group']}: lesson {lesson['lesson_id']} "
            f"live for {minutes:.0f} min{subject}"
        )
        for room, info in sorted(host.get("rooms", {}).items()):
            hand = "  hand up" if info.get("hand_up") else ""
            lines.append(f"  {room:<28} {info['state']:<13}{hand}")
    join = status.get("joining")
    if join is not None:
        lesson = join.get("lesson")
        origin = "" if lesson is None else f" (lesson {lesson['lesson_id']} from {lesson['main']})"
        reason = f": {join['reason']}" if join.get("reason") else ""
        hand = ", hand up" if join.get("hand_up") else ""
        lines.append(f"receiving: {join['state']}{origin}{reason}{hand}")
    return "\n".join(lines)


def add_lesson_parser(sub: Any) -> None:
    lesson = sub.add_parser(
        "lesson", help="start or end this room's lesson (the panel's button), or show it"
    )
    add_config_options(lesson)
    lesson.add_argument("--url", help="panel URL (default: from stream.panel_bind/panel_port)")
    lesson.add_argument("--token-file", type=Path, help="token for a panel on another host")
    lesson.add_argument("--json", action="store_true", help="print the API's JSON answer")
    actions = lesson.add_subparsers(dest="lesson_command", required=True)
    start = actions.add_parser("start", help="start a lesson: receiving rooms join by themselves")
    start.add_argument("--group", help="lesson group (needed when this room hosts several)")
    start.add_argument("--subject", default="", help="what the lesson is about")
    end = actions.add_parser("end", help="end the live lesson")
    end.add_argument("--group")
    actions.add_parser("status", help="the lesson, its rooms and their states")
    actions.add_parser("watch-url", help="the authorised URL of this room's watch page")
    lesson.set_defaults(func=cmd_lesson)


def cmd_lesson(args: Any) -> int:
    token: str | None = None
    url = args.url
    config: AgentConfig | None = None
    if url is None or args.lesson_command == "watch-url":
        config = ConfigSources.from_args(args).load().config
        url = url or panel_url(config.stream.panel_bind, config.stream.panel_port)
    if args.token_file is not None:
        token = args.token_file.read_text(encoding="utf-8").strip()
    client = PanelClient(url, token)
    if args.lesson_command == "watch-url":
        assert config is not None
        path = args.token_file or token_path(config)
        try:
            secret = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            print(f"cannot read the panel token {path}: {exc.strerror}", file=sys.stderr)
            return 1
        print(f"{client.url}/watch#token={secret}")
        return 0
    try:
        if args.lesson_command == "start":
            result = client.start(args.group, args.subject)
        elif args.lesson_command == "end":
            result = client.end(args.group)
        else:
            result = client.status()
    except PanelUnavailable as exc:
        print(str(exc), file=sys.stderr)
        return 1
    refused = result.get("ok") is False
    if args.json:
        print(json.dumps(result, indent=2))
    elif refused:
        pass  # said on stderr below
    elif args.lesson_command == "start":
        print(f"lesson {result['lesson_id']} of group {result['group']} started")
    elif args.lesson_command == "end":
        print(f"lesson of group {result['group']} ended")
    else:
        print(describe_status(result))
    if refused:
        print(f"refused: {result.get('error')}", file=sys.stderr)
        return 2
    return 0
