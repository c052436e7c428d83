"""Honest fakes for tests, benchmarks and the demo: never imported by the daemon.

`make_test_pki` creates throw-away TLS material; ``impair`` emulates a poor network
link in user space (delay, jitter, loss, a rate-limited bottleneck) on aioice's
datagram path; `SimFleet` / `fleet_layout` simulate rooms for the dashboard's tests,
its benchmark and ``classroom-agent dashboard --simulate N``; `make_demo_class` and
`lesson_voices` / `lesson_audio` (espeak-ng speaking a known T/S script) give the demo's
sensing room real faces and speech.
"""

from agent.testkit.acoustics import espeak_available, lesson_audio, lesson_voices
from agent.testkit.classroom import (
    DemoClass,
    FaceCrop,
    PlacedFace,
    compose,
    cut_faces,
    make_demo_class,
    photos_dir,
    recall,
)
from agent.testkit.pki import make_test_pki
from agent.testkit.simulate import GroupSpec, RoomSpec, SimFleet, SimRoom, fleet_layout

__all__ = [
    "DemoClass",
    "FaceCrop",
    "GroupSpec",
    "PlacedFace",
    "RoomSpec",
    "SimFleet",
    "SimRoom",
    "compose",
    "cut_faces",
    "espeak_available",
    "fleet_layout",
    "lesson_audio",
    "lesson_voices",
    "make_demo_class",
    "make_test_pki",
    "photos_dir",
    "recall",
]
