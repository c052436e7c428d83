"""Sensing benchmark: speed per stage, memory, and accuracy on real face photos.

Run from a checkout: ``.venv/bin/python bench/sensing.py [--sections speed,memory,accuracy]
[--frames 30] [--json]``.

*speed*: classroom frames at 1280x720 composed from real face photos (faces 24-80 px in
rows, the back row smallest; ``agent.testkit.compose``) with 1, 10 and 30 faces, one
thread (``sensing.threads: 1``, i.e. per core). Per frame: detect, track, align, embed in
milliseconds; "first frame" is every track new (every face embedded), "steady" is the
service's normal case (tracks settled: detect + track only). fps per core is 1 / steady
cost. Embedding calls per second at steady state come from a simulated minute in which
the class sits still and one face in ten changes track every 10 s.

*analyses*: the per-face analyses of part 2 on the same 720p classes of 10 and 30 faces:
head pose (``cv2.solvePnP`` on the detector's five landmarks) and hand raising (MoveNet
Lightning on each face's body region, ``agent.sensing.pose``), per face and per frame
(every face), and hand raising per sample as the service runs it (at most
``sensing.hand_regions_per_sample`` regions); Silero VAD per second of 48 kHz microphone
audio (espeak-ng speech when installed, else noise), resampling included, fed as the
service feeds it (0.5 s blocks). The composed faces have no bodies under them: MoveNet
costs the same whatever it sees (a fixed 192x192 input), only the cut and scale grow
with the region.

*pipeline*: the sensing service itself (detect, track, embed, head pose, hand raising;
no talk) on a 720p video of a composed class of 30 faces at its default 5 samples a
second, in this process: CPU seconds (``time.process_time``, all threads) per wall
second with the service running, against the same video hub without it, so the
difference is sensing's share of one core.

*demo*: the same, on the demo's sensing room (``classroom-agent demo``): its class video
(``agent.testkit.make_demo_class``: 960x540, seven faces at desks and a man standing who
raises his hands once a 12 s loop) at its settings (``agent.demo.DEMO_SENSING``: 4
samples a second), with its enrolled roster, so embedding and matching are the demo's.

*memory*: this process's RSS with both models loaded and the pipeline warmed, against
the process before ``import onnxruntime`` (the agent's own RSS is that plus the rest of
the daemon).

*lesson*: bench/lesson.py's join flow (main room 720p30, one receiving room) with the
sensing service off, on at 5 and at 2 samples a second, and off again (the spread of
the two "off" runs is the machine's noise), subscribed to the main room's camera:
receiver fps,
glass-to-glass, the main process's CPU (which includes sensing's own thread).

*accuracy*: descriptor distances (Euclidean, dlib's metric) with the threshold
``sensing.match_distance``: false accepts across the distinct people of face-api's group
photos (all different people), the East-Asian faces of them counted separately (labelled
by looking at them: see EAST_ASIAN); true accepts between different photos of the same
person (face_recognition's test images) and between each face and honestly labelled
variants of its own photo (scale, blur, JPEG, lighting, small rotations).

The machine is shared (2 cores), so figures are noisy: compare within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # a script in a checkout: the package may not be installed

from agent.capture import FrameHub  # noqa: E402
from agent.config import SensingConfig  # noqa: E402
from agent.config.models import CaptureConfig, VideoConfig  # noqa: E402
from agent.demo import DEMO_SENSING  # noqa: E402
from agent.sensing import (  # noqa: E402
    DlibResnetEmbedder,
    Gallery,
    Pipeline,
    RetinaFaceDetector,
    SensingService,
    model_info,
)
from agent.sensing.hands import HandRaising  # noqa: E402
from agent.sensing.headpose import camera_matrix, head_pose  # noqa: E402
from agent.sensing.pipeline import FaceResult  # noqa: E402
from agent.sensing.pose import PoseEstimator, body_region  # noqa: E402
from agent.sensing.talk import SileroVad  # noqa: E402
from agent.sensing.talk_live import StreamResampler  # noqa: E402
from agent.sensing.track import Tracker  # noqa: E402
from agent.testkit import FaceCrop, compose, cut_faces, make_demo_class  # noqa: E402
from agent.testkit.acoustics import espeak_available, speech  # noqa: E402

FACES = ROOT / "tests" / "data" / "faces"
GROUP = sorted(FACES.glob("faceapi-sample*.jpg"))
SAME = [FACES / "fr-obama.jpg", FACES / "fr-obama2.jpg", FACES / "fr-obama3.jpg"]
OTHER = FACES / "fr-biden.jpg"
# Faces of the group photos that look East or South-East Asian, as "photo#index" in the
# detector's order (top to bottom, left to right); labelled by eye, which is all the data
# allows. All are adult women: nothing here resembles a class of children.
EAST_ASIAN = {
    "faceapi-sample5.jpg#0",
    "faceapi-sample5.jpg#1",
    "faceapi-sample5.jpg#4",
    "faceapi-sample6.jpg#3",
}
Image = Any  # a BGR uint8 array (cv2 types its results loosely)


def read(path: Path) -> Image:
    image = cv2.imread(str(path))
    if image is None:
        raise SystemExit(f"{path}: missing or not an image")
    return image


def _ms(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), result


def speed(frames: int) -> dict[str, Any]:
    config = SensingConfig(threads=1)
    detector = RetinaFaceDetector(model_info("retinaface-mnet025"), threads=1)
    embedder = DlibResnetEmbedder(model_info("dlib-resnet-v1"), threads=1)
    full = RetinaFaceDetector(model_info("retinaface-mnet025"), detect_width=None)
    crops = cut_faces([*GROUP, *SAME, OTHER], full)
    return {
        f"{count} faces": _speed_case(
            count, crops, config=config, detector=detector, embedder=embedder, frames=frames
        )
        for count in (1, 10, 30)
    }


def _speed_case(
    count: int,
    crops: list[FaceCrop],
    *,
    config: SensingConfig,
    detector: RetinaFaceDetector,
    embedder: DlibResnetEmbedder,
    frames: int,
) -> dict[str, Any]:
    gallery = Gallery({"x": [np.zeros(128, np.float32)]}, config.match_distance)
    # One face: a front-row child (60 px); a class: rows from 24 px at the back to 80 px.
    size = (24, 80) if count > 1 else (60, 60)
    frame, truth = compose(crops, count=count, face_px=size, rows=3 if count > 1 else 1)
    pipeline = Pipeline(config, detector=detector, embedder=embedder, gallery=gallery)
    detect_ms, faces = _ms(lambda: pipeline.detect(frame), frames)
    first = time.perf_counter()
    pipeline.frame(frame, 0.0)
    first_ms = (time.perf_counter() - first) * 1000
    identifiable = [f for f in faces if pipeline.identifiable(f)]
    align_ms, chips = _ms(lambda: [embedder.align(frame, f) for f in identifiable], 3)
    embed_ms, _ = _ms(lambda: embedder.embed(chips) if chips else [], 3)
    # Steady state: every track settled (votes given), so only detect + track run.
    for track in pipeline.tracker.tracks.values():
        for _ in range(config.votes_to_settle):
            track.vote("x", 0.0)
    pipeline.times.seconds.clear()
    pipeline.times.calls.clear()
    steady_ms, _ = _ms(lambda: pipeline.frame(frame, 1.0), frames)
    result = {
        "placed": len(truth),
        "found": len(faces),
        "detect_ms": round(detect_ms, 1),
        "track_ms": round(pipeline.times.mean_ms()["track"], 3),
        "align_ms_per_face": round(align_ms / max(1, len(chips)), 2),
        "embed_ms_per_face": round(embed_ms / max(1, len(chips)), 2),
        "first_frame_ms": round(first_ms, 1),
        "steady_ms": round(steady_ms, 1),
        "fps_per_core": round(1000 / steady_ms, 1),
    }
    # A simulated minute at 5 fps (300 samples): one face in ten loses its track
    # (looks away, comes back) every 10 s and is embedded again until it settles.
    pipeline.times.embeddings = 0
    churn = max(1, len(faces) // 10)
    for step in range(300):
        if step % 50 == 0:
            for track in list(pipeline.tracker.tracks.values())[:churn]:
                track.votes.clear()
                track.last_embed = None
        pipeline.frame(frame, 2.0 + step / 5)
    result["embeddings_per_s_steady"] = round(pipeline.times.embeddings / 60.0, 2)
    return result


def _class_frame(count: int, crops: list[FaceCrop]) -> Image:
    """A 1280x720 class of ``count`` real faces, rows of 24-80 px (as *speed* composes)."""
    frame, _ = compose(crops, count=count, face_px=(24, 80), rows=3)
    return frame


def analyses(frames: int) -> dict[str, Any]:
    config = SensingConfig(threads=1)
    detector = RetinaFaceDetector(model_info("retinaface-mnet025"), threads=1)
    full = RetinaFaceDetector(model_info("retinaface-mnet025"), detect_width=None)
    crops = cut_faces([*GROUP, *SAME, OTHER], full)
    estimator = PoseEstimator(threads=1)
    out: dict[str, Any] = {
        f"{count} faces": _analyses_case(
            _class_frame(count, crops), config, detector, estimator, frames
        )
        for count in (10, 30)
    }
    out["vad"] = _vad_cost()
    return out


def _analyses_case(
    frame: Image,
    config: SensingConfig,
    detector: RetinaFaceDetector,
    estimator: PoseEstimator,
    frames: int,
) -> dict[str, Any]:
    faces = detector.detect(frame)
    camera = camera_matrix(frame.shape[1], frame.shape[0])
    pose_ms, _ = _ms(lambda: [head_pose(f.landmarks, camera) for f in faces], frames)
    regions = [body_region(f.box) for f in faces]
    hands_ms, _ = _ms(lambda: [estimator.keypoints(frame, r) for r in regions], frames)
    # As the service runs it: tracked faces, at most hand_regions_per_sample a sample.
    tracker = Tracker()
    hands = HandRaising.from_config(config, estimator.keypoints)
    tick = iter(range(10**9))

    def sample() -> None:
        now = next(tick) / config.sample_fps
        tracks = tracker.update(faces, now)
        results = [FaceResult(f, None, t) for f, t in zip(faces, tracks, strict=True)]
        hands.sample(now, frame, results)

    sample_ms, _ = _ms(sample, frames)
    n = max(1, len(faces))
    return {
        "found": len(faces),
        "head_pose_ms_per_face": round(pose_ms / n, 3),
        "head_pose_ms_per_frame": round(pose_ms, 2),
        "hand_ms_per_face": round(hands_ms / n, 2),
        "hand_ms_per_frame_every_face": round(hands_ms, 1),
        "hand_ms_per_sample": round(sample_ms, 1),
        "hand_regions_per_sample": config.hand_regions_per_sample,
        "hand_read_every_s": round(n / config.hand_regions_per_sample / config.sample_fps, 2),
    }


def _vad_cost() -> dict[str, Any]:
    rate, seconds = 48_000, 20.0
    if espeak_available():
        words = "Please open your books at page twelve and read the first line aloud. "
        voice = speech(words * 3, rate=rate)
        audio = np.resize(voice, int(rate * seconds)).astype(np.float32)
        what = "espeak-ng speech"
    else:
        noise = np.random.default_rng(0).normal(0, 0.05, int(rate * seconds))
        audio = np.asarray(noise, np.float32)
        what = "noise (espeak-ng not installed)"
    vad = SileroVad(threads=1)
    block = rate // 2  # the service hands the worker 0.5 s at a time

    def run() -> None:
        stream, resampler = vad.stream(), StreamResampler(rate)
        for start in range(0, len(audio), block):
            stream.feed(resampler(audio[start : start + block]))

    started = time.process_time()
    run()
    cpu = time.process_time() - started
    return {
        "audio": what,
        "seconds": seconds,
        "cpu_ms_per_audio_s": round(1000 * cpu / seconds, 2),
        "share_of_a_core_percent": round(100 * cpu / seconds, 2),
    }


async def _hub_cpu(
    path: Path,
    seconds: float,
    sensing: SensingConfig | None,
    *,
    size: tuple[int, int] = (1280, 720),
    store_dir: Path = Path("/nonexistent-bench-store"),
) -> dict[str, Any]:
    """CPU of a video hub playing ``path``, with the sensing service (``sensing``) or
    without it (None)."""
    capture = CaptureConfig(
        video=VideoConfig(source="file", path=path, width=size[0], height=size[1], fps=10)
    )
    from agent.capture import open_video_source  # noqa: PLC0415

    hub = FrameHub(open_video_source(capture.video), capture)
    tasks = [asyncio.create_task(hub.run())]
    service = None
    if sensing is not None:
        service = SensingService(
            sensing,
            hub,
            _Discard(),
            "bench/sensing",
            device="central.room1",
            lesson=lambda: None,
            store_dir=store_dir,
        )
        tasks.append(asyncio.create_task(service.run()))
    try:
        # Warm up: models loaded, tracks settled (embedding only at first).
        await asyncio.sleep(8.0)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        samples0 = 0 if service is None else service.samples
        await asyncio.sleep(seconds)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        section = None if service is None else service.health_section()
        samples = 0 if service is None else service.samples - samples0
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    result: dict[str, Any] = {"cpu_percent_of_a_core": round(100 * cpu / wall, 1)}
    if section is not None:
        result["samples_per_s"] = round(samples / wall, 2)
        result["cpu_ms_per_sample"] = round(1000 * cpu / max(1, samples), 1)
        result["latency_ms"] = section["latency_ms"]
        hands = ("regions_per_sample", "ms_per_region", "events")
        result["hands"] = {k: section["hands"][k] for k in hands}
        result["head_count"] = section["head_count"]
    return result


def pipeline(seconds: float, tmp: Path) -> dict[str, Any]:
    """The sensing service on a 720p class of 30 faces, against the hub alone."""
    full = RetinaFaceDetector(model_info("retinaface-mnet025"), detect_width=None)
    crops = cut_faces([*GROUP, *SAME, OTHER], full)
    frame = _class_frame(30, crops)
    path = tmp / "class-720p.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 10, (1280, 720))
    for i in range(20):  # a slight wobble, as a real camera has
        writer.write(np.roll(frame, i % 3, axis=1))
    writer.release()
    hub_only = asyncio.run(_hub_cpu(path, seconds, None))
    config = SensingConfig(enabled=True, threads=1, talk_analysis=False)
    with_sensing = asyncio.run(_hub_cpu(path, seconds, config))
    return {
        "video": "1280x720 at 10 fps, 30 composed faces, sensing at 5 samples/s",
        "hub_only": hub_only,
        "with_sensing": with_sensing,
        "sensing_share_of_a_core_percent": round(
            with_sensing["cpu_percent_of_a_core"] - hub_only["cpu_percent_of_a_core"], 1
        ),
    }


def demo(seconds: float, tmp: Path) -> dict[str, Any]:
    """The sensing service on the demo's class (``make_demo_class``) at the demo's sensing
    settings, with its enrolled roster, against the same video hub alone."""
    truth = make_demo_class(FACES, tmp, tmp / "store")
    config = SensingConfig(**DEMO_SENSING, talk_analysis=False)
    hub_only = asyncio.run(_hub_cpu(truth.video, seconds, None, size=truth.size))
    with_sensing = asyncio.run(
        _hub_cpu(truth.video, seconds, config, size=truth.size, store_dir=tmp / "store")
    )
    width, height = truth.size
    return {
        "video": f"{width}x{height} at {truth.fps} fps, {truth.in_room} enrolled students and "
        f"{truth.strangers} people not enrolled, sensing at {config.sample_fps:g} samples/s",
        "hub_only": hub_only,
        "with_sensing": with_sensing,
        "sensing_share_of_a_core_percent": round(
            with_sensing["cpu_percent_of_a_core"] - hub_only["cpu_percent_of_a_core"], 1
        ),
    }


def memory() -> dict[str, Any]:
    process = psutil.Process()
    before = process.memory_info().rss
    config = SensingConfig()
    pipeline = Pipeline(config, gallery=Gallery({"x": [np.zeros(128, np.float32)]}, 0.5))
    frame = np.full((720, 1280, 3), 120, np.uint8)
    for i in range(5):
        pipeline.frame(frame, float(i))
    pipeline.still(read(SAME[0]))
    after = process.memory_info().rss
    return {
        "rss_before_models_mb": round(before / 2**20, 1),
        "rss_with_models_mb": round(after / 2**20, 1),
        "models_cost_mb": round((after - before) / 2**20, 1),
    }


def _variants(image: Image) -> dict[str, Image]:
    h, w = image.shape[:2]
    out: dict[str, Image] = {}
    for scale in (0.5, 0.3):
        out[f"scale {scale}"] = cv2.resize(
            image, (int(w * scale), int(h * scale)), interpolation=cv2.INTER_AREA
        )
    for sigma in (1.5, 3.0):
        out[f"blur {sigma}"] = cv2.GaussianBlur(image, (0, 0), sigma)
    for quality in (30, 10):
        _ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
        out[f"jpeg q{quality}"] = cv2.imdecode(data, cv2.IMREAD_COLOR)
    for gamma in (0.5, 2.0):
        table = (255 * (np.arange(256) / 255) ** gamma).astype(np.uint8)
        out[f"gamma {gamma}"] = cv2.LUT(image, table)
    for angle in (-15, 15):
        matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
        out[f"rotate {angle}"] = cv2.warpAffine(
            image, matrix, (w, h), borderMode=cv2.BORDER_REFLECT
        )
    return out


def accuracy() -> dict[str, Any]:
    threshold = SensingConfig().match_distance
    detector = RetinaFaceDetector(model_info("retinaface-mnet025"))
    embedder = DlibResnetEmbedder(model_info("dlib-resnet-v1"))

    def describe_all(image: Image) -> list[Any]:
        faces = detector.detect(image)
        return [embedder.embed([embedder.align(image, f)])[0] for f in faces]

    def describe_one(image: Image) -> Any | None:
        faces = detector.detect(image)
        if not faces:
            return None
        face = max(faces, key=lambda f: f.height)
        return embedder.embed([embedder.align(image, face)])[0]

    people: list[tuple[str, Any]] = []
    crops: list[FaceCrop] = cut_faces(GROUP, detector)
    for crop in crops:
        people.append((crop.source, describe_one(crop.image)))
    people = [(k, v) for k, v in people if v is not None]
    people.append(("fr-biden.jpg#0", describe_one(read(OTHER))))
    people.append(("fr-obama.jpg#0", describe_one(read(SAME[0]))))
    pairs, asian_pairs, asian_any = [], [], []
    for i, (name_a, a) in enumerate(people):
        for name_b, b in people[i + 1 :]:
            d = float(np.linalg.norm(a - b))
            pairs.append(d)
            if name_a in EAST_ASIAN and name_b in EAST_ASIAN:
                asian_pairs.append(d)
            if name_a in EAST_ASIAN or name_b in EAST_ASIAN:
                asian_any.append(d)

    def rate(values: list[float], accept: bool) -> str:
        if not values:
            return "n/a (no pairs)"
        hits = sum((v <= threshold) == accept for v in values)
        return f"{hits}/{len(values)} ({100 * hits / len(values):.1f} %)"

    same = [e for e in (describe_one(read(p)) for p in SAME) if e is not None]
    same_d = [float(np.linalg.norm(a - b)) for i, a in enumerate(same) for b in same[i + 1 :]]
    variants: dict[str, list[float]] = {}
    for crop in [*crops, *cut_faces([*SAME, OTHER], detector)]:
        original = describe_one(crop.image)
        if original is None:
            continue
        for name, image in _variants(crop.image).items():
            got = describe_one(image)
            variants.setdefault(name, []).append(
                float("inf") if got is None else float(np.linalg.norm(original - got))
            )
    return {
        "threshold": threshold,
        "different_people": len(people),
        "false_accept": rate(pairs, True),
        "different_median": round(statistics.median(pairs), 3),
        "different_min": round(min(pairs), 3),
        "false_accept_at_0.6": f"{sum(d <= 0.6 for d in pairs)}/{len(pairs)}",
        "false_accept_east_asian_pairs": rate(asian_pairs, True),
        "false_accept_with_an_east_asian_face": rate(asian_any, True),
        "east_asian_min": round(min(asian_pairs), 3) if asian_pairs else None,
        "east_asian_faces": len(EAST_ASIAN),
        "same_person_photos": {
            "distances": [round(d, 3) for d in same_d],
            "true_accept": rate(same_d, True),
        },
        "variants_true_accept": {
            name: {"true_accept": rate(v, True), "median": round(statistics.median(v), 3)}
            for name, v in variants.items()
        },
    }


class _Discard:
    """The sensing service's publisher in the lesson benchmark: counts, sends nothing."""

    def __init__(self) -> None:
        self.sent = 0

    async def send(self, topic: str, payload: Any, kind: Any = "event") -> Any:
        self.sent += 1


async def _lesson_run(sample_fps: float, hold_s: float, starts: int) -> dict[str, Any]:
    """One lesson benchmark run; ``sample_fps`` 0: sensing off."""
    sensing = sample_fps > 0
    sys.path.insert(0, str(ROOT / "bench"))
    import lesson as lesson_bench  # noqa: PLC0415  (bench/lesson.py, a script beside this)

    tasks: list[asyncio.Task[None]] = []
    services: list[SensingService] = []

    class Tapped(FrameHub):
        """The main room's camera hub, with the sensing service subscribed to it."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if sensing:
                service = SensingService(
                    SensingConfig(enabled=True, threads=1, sample_fps=sample_fps),
                    self,
                    _Discard(),
                    "bench/sensing",
                    device="central.room1",
                    lesson=lambda: None,
                    store_dir=Path("/nonexistent-bench-store"),
                )
                services.append(service)
                tasks.append(asyncio.get_running_loop().create_task(service.run()))

    original = getattr(lesson_bench, "FrameHub")  # noqa: B009  (not in its __all__)
    setattr(lesson_bench, "FrameHub", Tapped)  # noqa: B010  (the main room's hub, tapped)
    try:
        capture = CaptureConfig(video=VideoConfig(width=1280, height=720, fps=30))
        row = await lesson_bench.measure_joins(1, capture, starts, hold_s, 1)
    finally:
        setattr(lesson_bench, "FrameHub", original)  # noqa: B010
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    g2g = sorted(row.g2g_ms)
    result: dict[str, Any] = {
        "sensing": f"on at {sample_fps:g} fps" if sensing else "off",
        "receiver_fps": round(statistics.mean(row.fps), 1) if row.fps else None,
        "g2g_median_ms": round(statistics.median(g2g), 1) if g2g else None,
        "g2g_p95_ms": round(g2g[int(0.95 * (len(g2g) - 1))], 1) if g2g else None,
        "main_process_cpu_percent": round(row.cpu_percent, 1),
        "join_median_s": round(statistics.median(row.joins_s), 2) if row.joins_s else None,
    }
    if services:
        section = services[0].health_section() or {}
        result["sensing_fps"] = section.get("fps")
        result["sensing_samples"] = section.get("samples")
        result["sensing_latency_ms"] = section.get("latency_ms")
    return result


def lesson(hold_s: float, starts: int) -> dict[str, Any]:
    """The lesson benchmark's join flow (bench/lesson.py, one receiving room, 720p30
    synthetic stamped camera) with sensing off and on, side by side. The synthetic picture
    has no faces, so sensing costs what detection and tracking cost (the steady state:
    embedding is rare once tracks settle, see *speed*)."""
    runs = [("off", 0.0), ("on", 5.0), ("on, 2 fps", 2.0), ("off again", 0.0)]
    return {label: asyncio.run(_lesson_run(fps, hold_s, starts)) for label, fps in runs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sections", default="speed,analyses,pipeline,demo,memory,accuracy,lesson")
    parser.add_argument("--seconds", type=float, default=20.0, help="pipeline, demo: measured s")
    parser.add_argument("--hold", type=float, default=10.0, help="lesson: measured window")
    parser.add_argument("--starts", type=int, default=2, help="lesson: lessons started")
    parser.add_argument("--frames", type=int, default=20, help="repeats per timing")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    results: dict[str, Any] = {}
    if "memory" in sections:  # first: before anything else loads the models
        results["memory"] = memory()
    if "speed" in sections:
        results["speed"] = speed(args.frames)
    if "analyses" in sections:
        results["analyses"] = analyses(args.frames)
    if "pipeline" in sections:
        with tempfile.TemporaryDirectory() as tmp:
            results["pipeline"] = pipeline(args.seconds, Path(tmp))
    if "demo" in sections:
        with tempfile.TemporaryDirectory() as tmp:
            results["demo"] = demo(args.seconds, Path(tmp))
    if "accuracy" in sections:
        results["accuracy"] = accuracy()
    if "lesson" in sections:
        results["lesson"] = lesson(args.hold, args.starts)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for section, body in results.items():
        print(f"== {section}")
        print(json.dumps(body, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
