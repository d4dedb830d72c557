"""Detection's steps for one video: read frames, find and follow one person, estimate the pose,
clean up the track, and the overlay of what was found."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from finephys.poses.clip import FPS_RANGE, PoseClip, to_layout
from finephys.errors import InputError
from finephys.poses.layouts import LAYOUTS

from engine.detect.backend import EXTRA_HINT, WholeFrame, mediapipe_available, quiet_native_stderr
from engine.detect.postprocess import DEFAULT_MAX_GAP, DEFAULT_MIN_SCORE, LostReport, clean, report
from engine.detect.track import Tracker, parse_person
from engine.detect.video_in import VideoReader

PERSON_DETECTORS = ("auto", "blazepose", "none")


@dataclass(frozen=True)
class DetectOptions:
    person: str | int = "largest"  # 'largest' or an ID (left to right where first seen)
    layout: str = "coco17"  # layout of the written clip
    min_score: float = DEFAULT_MIN_SCORE  # joints below are missing (score 0)
    max_gap: int = DEFAULT_MAX_GAP  # longest missing stretch (frames) that is interpolated
    min_detection: float = 0.5  # person detector threshold
    pose_model: Path | None = None  # ONNX top-down pose model instead of BlazePose
    pose_model_norm: str = "imagenet"
    fps: float | None = None  # override the video's frame rate
    person_detector: str = "auto"  # 'blazepose', 'none' (whole frame), 'auto' (blazepose if installed)

    def checked(self) -> "DetectOptions":
        if self.layout not in LAYOUTS:
            raise InputError(f"--layout {self.layout!r}: expected one of {sorted(LAYOUTS)}")
        for name, v in (("--min-score", self.min_score), ("--min-detection", self.min_detection)):
            if not np.isfinite(v) or not 0 <= v <= 1:
                raise InputError(f"{name} {v}: expected a number in [0, 1]")
        if self.person_detector not in PERSON_DETECTORS:
            raise InputError(f"--person-detector {self.person_detector!r}: expected one of "
                             f"{', '.join(PERSON_DETECTORS)}")
        if self.person_detector == "none" and self.pose_model is None:
            raise InputError("--person-detector none goes with --pose-model (BlazePose needs its "
                             "own detector)")
        if int(self.max_gap) != self.max_gap or self.max_gap < 0:
            raise InputError(f"--max-gap {self.max_gap}: expected a whole number of frames >= 0")
        if self.fps is not None and not FPS_RANGE[0] <= self.fps <= FPS_RANGE[1]:
            raise InputError(f"--fps {self.fps:g}: expected a frame rate from {FPS_RANGE[0]:g} to {FPS_RANGE[1]:g}")
        return replace(self, person=parse_person(self.person), max_gap=int(self.max_gap))


@dataclass(frozen=True)
class DetectResult:
    clip: PoseClip  # in options.layout
    coco_keypoints: np.ndarray  # (T, 17, 2) the same clip in COCO-17 (for drawing)
    coco_scores: np.ndarray  # (T, 17)
    found: np.ndarray  # (T,) bool: the person was found in the frame
    regions: list  # Box | None per frame: where the pose model looked
    report: LostReport
    backend: str
    options: DetectOptions

    def summary(self) -> list[str]:
        c = self.clip
        lines = [f"detected with {self.backend}: {c.num_frames} frames of "
                 f"{c.image_size[0]}x{c.image_size[1]} at {c.fps:g} fps"]
        return lines + self.report.lines(self.options.min_score, self.options.max_gap)

    def report_dict(self) -> dict:
        d = {"backend": self.backend, "image_size": list(self.clip.image_size),
             "fps": self.clip.fps, "layout": self.clip.layout,
             "person": self.options.person, "min_score": self.options.min_score,
             "max_gap": self.options.max_gap, "min_detection": self.options.min_detection}
        d.update(self.report.to_dict())
        d["regions"] = [None if b is None else [round(b.cx, 2), round(b.cy, 2), round(b.half, 2),
                                               round(b.rotation, 4)] for b in self.regions]
        return d


def make_backends(opts: DetectOptions):
    """(person detector, pose model, description) for the options."""
    if opts.pose_model is None:
        if not mediapipe_available():
            raise InputError(f"fpengine detect needs mediapipe for its default BlazePose detector "
                             f"(or pass --pose-model MODEL.onnx); {EXTRA_HINT}")
        from engine.detect.mediapipe_pose import BlazePoseDetector, BlazePoseLandmarks

        detector = BlazePoseDetector(opts.min_detection)
        try:
            model = BlazePoseLandmarks()
        except BaseException:
            detector.close()
            raise
        return detector, model, f"MediaPipe {model.version} BlazePose (full)"
    from engine.detect.onnx_pose import OnnxPose

    model = OnnxPose(opts.pose_model, opts.pose_model_norm, opts.min_score)
    if opts.person_detector == "blazepose" and not mediapipe_available():
        raise InputError(f"--person-detector blazepose needs mediapipe; {EXTRA_HINT}")
    if opts.person_detector != "none" and mediapipe_available():
        from engine.detect.mediapipe_pose import BlazePoseDetector

        detector = BlazePoseDetector(opts.min_detection)
        where = f"BlazePose person detector (MediaPipe {detector.version})"
    else:
        if opts.person not in ("largest", 0):
            need = ("--person-detector blazepose" if opts.person_detector == "none"
                    else f"the BlazePose person detector; {EXTRA_HINT}")
            raise InputError(f"--person {opts.person} needs a person detector to tell people "
                             f"apart: {need}")
        detector, where = WholeFrame(), "whole-frame regions (no person detector)"
    return detector, model, (f"ONNX model {Path(opts.pose_model).name} ({model.kind}, "
                             f"{model.height}x{model.width}) on {where}")


def detect_video(path, options: DetectOptions | None = None) -> DetectResult:
    """Detect and follow one person through the video at ``path``; InputError on bad input."""
    opts = (options or DetectOptions()).checked()
    reader = VideoReader(path, opts.fps)
    info = reader.info
    return _detect(reader, info.height, info.width, info.fps, str(info.path), opts)


def detect_frames(frames, fps: float, options: DetectOptions | None = None,
                  where: str = "frames") -> DetectResult:
    """The same on in-memory frames: (T, H, W, 3) uint8 RGB."""
    opts = (options or DetectOptions()).checked()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[3] != 3 or frames.dtype != np.uint8:
        raise InputError(f"{where}: frames have shape {frames.shape} and dtype {frames.dtype}, "
                         f"expected (T, H, W, 3) uint8")
    return _detect(frames, frames.shape[1], frames.shape[2], float(fps), where, opts)


def _detect(frames, height: int, width: int, fps: float, where: str, opts: DetectOptions):
    with quiet_native_stderr():
        return _finish(*_track(frames, height, width, where, opts), height, width, fps, where, opts)


def _track(frames, height: int, width: int, where: str, opts: DetectOptions):
    """Run the backends over the frames: per-frame COCO-17 keypoints, scores, found, regions."""
    detector, model, backend = make_backends(opts)
    # one whole-frame region per frame: the only person there is is the largest
    tracker = Tracker("largest" if isinstance(detector, WholeFrame) else opts.person)
    kps, scs, found, regions = [], [], [], []
    try:
        for t, frame in enumerate(frames):
            if frame.shape[:2] != (height, width):
                raise InputError(f"{where}: frame {t} is {frame.shape[1]}x{frame.shape[0]}, "
                                 f"expected {width}x{height} like the first")
            box = tracker.choose(t, detector.detect(frame))
            pose = model.estimate(frame, box) if box is not None else None
            tracker.update(pose is not None, box, None if pose is None else pose.predicted)
            regions.append(box)
            found.append(pose is not None)
            kps.append(np.zeros((17, 2), np.float32) if pose is None else pose.keypoints)
            scs.append(np.zeros(17, np.float32) if pose is None else pose.scores)
    finally:
        detector.close()
        model.close()
    return kps, scs, found, regions, backend


def _finish(kps, scs, found, regions, backend, height, width, fps, where, opts) -> "DetectResult":
    num = len(found)
    if num == 0:
        raise InputError(f"{where}: holds no frames, expected a video")
    if not any(found):
        raise InputError(f"{where}: no person found in any of its {num} frames "
                         f"({backend}, --min-detection {opts.min_detection:g})")
    if num < 3:
        raise InputError(f"{where}: has {num} frames, expected at least 3")
    found_arr = np.array(found)
    cleaned = clean(np.stack(kps), np.stack(scs), found_arr, opts.min_score, opts.max_gap)
    if not (cleaned.scores > 0).any():
        raise InputError(f"{where}: a person was found but no joint reaches --min-score "
                         f"{opts.min_score:g}")
    coco = PoseClip(cleaned.keypoints, cleaned.scores, "coco17", (height, width), fps)
    clip = coco if opts.layout == "coco17" else to_layout(coco, opts.layout)
    return DetectResult(clip, coco.keypoints, coco.scores, found_arr, regions,
                        report(found_arr, cleaned), backend, opts)


def render_overlay(path, result: DetectResult, out, overwrite: bool = False, fps: float | None = None):
    """The video with the detected COCO-17 skeleton drawn over it (lost frames are labelled)."""
    from PIL import Image, ImageDraw

    from finephys.poses.draw import draw_skeleton

    from engine.video import VideoWriter

    reader = VideoReader(path, fps if fps is not None else result.clip.fps)
    height, width = result.clip.image_size
    size = min(height, width)
    radius, thickness = max(1.5, size / 110), max(1.5, size / 140)
    with VideoWriter(out, result.clip.fps, overwrite=overwrite) as writer:
        for t, frame in enumerate(reader):
            if t >= len(result.found):
                break
            img = np.array(frame, np.uint8, copy=True)
            draw_skeleton(img, result.coco_keypoints[t], result.coco_scores[t], "coco17",
                          radius=radius, thickness=thickness)
            if not result.found[t]:
                pil = Image.fromarray(img)
                ImageDraw.Draw(pil).text((4, 2), f"frame {t}: person lost", fill=(255, 64, 64))
                img = np.asarray(pil)
            writer.append(img)
    return Path(out)
