"""``classroom-agent sensing talk WAV``: who talks when in a recording, and its S-T figures.

For IT and for teaching researchers checking the heuristic on a room: it runs the same
VAD and teacher-vs-class rule as the agent (agent/sensing/talk.py) on a WAV file of the
room microphone, with ``--reference`` the WAV of what the room's loudspeakers played.
Nothing is sent anywhere.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILURE = 0, 1


def add_talk_parser(actions: Any) -> None:
    talk = actions.add_parser(
        "talk", help="who talks when in a WAV of the room microphone; S-T figures and mode"
    )
    talk.add_argument("wav", type=Path, help="the room microphone (16-bit PCM WAV, any rate)")
    talk.add_argument(
        "--role",
        choices=("main", "receiving"),
        default="main",
        help="the room's part in the lesson (receiving: the teacher is on the loudspeaker)",
    )
    talk.add_argument(
        "--reference", type=Path, help="WAV of what the loudspeakers played (same start)"
    )
    talk.add_argument(
        "--interval", type=float, default=30.0, help="S-T sample interval in seconds (30)"
    )
    talk.add_argument(
        "--teacher-dbfs",
        type=float,
        help="local speech at or above this RMS level is the teacher (default -28)",
    )
    talk.add_argument("--json", action="store_true", help="one JSON object")
    talk.set_defaults(func=cmd_talk)


def cmd_talk(args: argparse.Namespace) -> int:
    from agent.sensing.models import ModelError
    from agent.sensing.st_analysis import analyse, sample
    from agent.sensing.talk import TalkSettings, analyse_talk, read_wav

    if args.interval <= 0:
        print("--interval: must be a positive number of seconds", file=sys.stderr)
        return EXIT_FAILURE
    tracks = []
    for path in [args.wav] + ([args.reference] if args.reference else []):
        try:
            tracks.append(read_wav(path))
        except ValueError as exc:
            print(f"{path}: {exc}", file=sys.stderr)
            return EXIT_FAILURE
    settings = TalkSettings()
    if args.teacher_dbfs is not None:
        settings = TalkSettings(teacher_dbfs=args.teacher_dbfs)
    (mic, rate), ref = tracks[0], (tracks[1] if len(tracks) > 1 else (None, None))
    try:
        result = analyse_talk(
            mic,
            rate,
            role=args.role,
            reference=ref[0],
            reference_rate=ref[1],
            settings=settings,
        )
    except ModelError as exc:
        print(f"model: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    st = analyse(sample(result.spans, result.duration_s, interval_s=args.interval), args.interval)
    if args.json:
        print(
            json.dumps(
                {
                    "wav": str(args.wav),
                    "role": args.role,
                    "duration_s": round(result.duration_s, 3),
                    "talk_s": {w: round(result.talk_s(w), 2) for w in ("T", "S")},
                    "vad_s": round(result.vad_s, 3),
                    "spans": [s.to_dict() for s in result.spans],
                    "st": st.to_dict(),
                },
                indent=2,
            )
        )
        return EXIT_OK
    print(
        f"{args.wav}: {result.duration_s:.1f} s, teacher talk {result.talk_s('T'):.1f} s, "
        f"class talk {result.talk_s('S'):.1f} s (VAD {result.vad_s:.2f} s)"
    )
    for span in result.spans:
        print(
            f"  {span.start_s:8.2f}-{span.end_s:8.2f} s  {span.speaker}  "
            f"{span.source:<11} {span.level_dbfs:6.1f} dBFS"
        )
    print(f"S-T samples every {args.interval:g} s: {st.samples}")
    print(f"N {st.n}  Rt {st.rt:.2f}  Ch {st.ch:.2f}  mode {st.mode}")
    return EXIT_OK
