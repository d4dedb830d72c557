"""Person regions and following one person through a video.

A region is a square around the body: centre (usually mid-hip), half side, rotation (radians,
0 = upright, positive turns the image content clockwise into the upright crop).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from finephys.errors import InputError


@dataclass(frozen=True)
class Box:
    cx: float
    cy: float
    half: float  # half the side of the square region, pixels
    rotation: float = 0.0

    @property
    def area(self) -> float:
        return 4.0 * self.half * self.half

    def iou(self, other: "Box") -> float:
        """Intersection over union of the axis-aligned squares (rotation ignored)."""
        ix = min(self.cx + self.half, other.cx + other.half) - max(self.cx - self.half, other.cx - other.half)
        iy = min(self.cy + self.half, other.cy + other.half) - max(self.cy - self.half, other.cy - other.half)
        inter = max(ix, 0.0) * max(iy, 0.0)
        union = self.area + other.area - inter
        return inter / union if union > 0 else 0.0

    def distance(self, other: "Box") -> float:
        return math.hypot(self.cx - other.cx, self.cy - other.cy)


@dataclass(frozen=True)
class Candidate:
    """One person found by a person detector in one frame."""

    box: Box
    score: float


def box_from_points(p_center, p_scale, scale: float) -> Box:
    """The region MediaPipe derives from two alignment points: centre, and a point whose distance
    gives the size and whose direction gives the rotation (pointing up when upright)."""
    dx, dy = p_scale[0] - p_center[0], p_scale[1] - p_center[1]
    radius = math.hypot(dx, dy)
    rotation = math.pi / 2 - math.atan2(-dy, dx)
    rotation -= 2 * math.pi * math.floor((rotation + math.pi) / (2 * math.pi))
    return Box(float(p_center[0]), float(p_center[1]), radius * scale, rotation)


def box_from_keypoints(keypoints, scores, min_score: float, padding: float = 1.25) -> Box | None:
    """Square around the confident keypoints, its side ``padding`` x their extent; None if < 2."""
    kp, sc = np.asarray(keypoints, np.float64), np.asarray(scores, np.float64)
    ok = (sc >= min_score) & (sc > 0) & np.isfinite(kp).all(axis=1)
    if ok.sum() < 2:
        return None
    lo, hi = kp[ok].min(axis=0), kp[ok].max(axis=0)
    half = max(hi[0] - lo[0], hi[1] - lo[1]) * padding / 2
    if half <= 0:
        return None
    return Box(float((lo[0] + hi[0]) / 2), float((lo[1] + hi[1]) / 2), float(half))


def parse_person(value) -> str | int:
    """``--person``: 'largest' or a non-negative integer ID."""
    if isinstance(value, int) and not isinstance(value, bool):
        person = value
    else:
        text = str(value).strip().lower()
        if text == "largest":
            return "largest"
        try:
            person = int(text)
        except ValueError:
            raise InputError(f"--person {value!r}: expected 'largest' or a person ID (0, 1, ...: "
                             f"people numbered left to right where first seen)") from None
    if person < 0:
        raise InputError(f"--person {value}: expected 'largest' or an ID >= 0")
    return person


class Tracker:
    """Picks the region to look at in each frame and keeps to one person.

    Start: in the first frame where the detector finds anyone, ``largest`` takes the largest
    region, an integer ID takes that person counting from the left (by region centre).
    While tracked: the detection that overlaps the last region most (IoU >= ``match_iou``) gives
    the next region; with none, the region predicted from the last pose (pose models return it).
    After a lost frame: the detection nearest the last region's centre, within two region
    half-sides; with ``largest`` and nothing near, the largest detection.
    """

    def __init__(self, person: str | int = "largest", match_iou: float = 0.3):
        self.person = parse_person(person)
        self.match_iou = match_iou
        self.started = False
        self.last: Box | None = None  # region of the last frame the person was found in
        self.predicted: Box | None = None  # region the pose model predicts for the next frame
        self.start_frame: int | None = None
        self.start_count = 0

    def choose(self, frame_index: int, candidates: list[Candidate]) -> Box | None:
        if not self.started:
            if not candidates:
                return None
            if self.person == "largest":
                pick = max(candidates, key=lambda c: (c.box.area, c.score))
            else:
                ordered = sorted(candidates, key=lambda c: c.box.cx)
                if self.person >= len(ordered):
                    raise InputError(
                        f"--person {self.person}: frame {frame_index}, the first where anyone is "
                        f"found, has {len(ordered)} {'person' if len(ordered) == 1 else 'people'} "
                        f"(IDs 0-{len(ordered) - 1}, left to right)")
                pick = ordered[self.person]
            self.started, self.start_frame, self.start_count = True, frame_index, len(candidates)
            return pick.box
        if self.predicted is not None:
            best = max(candidates, key=lambda c: c.box.iou(self.predicted), default=None)
            if best is not None and best.box.iou(self.predicted) >= self.match_iou:
                return best.box
            return self.predicted
        if self.last is not None and candidates:
            near = min(candidates, key=lambda c: c.box.distance(self.last))
            if near.box.distance(self.last) <= 2 * self.last.half:
                return near.box
            if self.person == "largest":
                return max(candidates, key=lambda c: (c.box.area, c.score)).box
        return None

    def update(self, found: bool, region: Box | None, predicted: Box | None) -> None:
        """After the pose model ran on ``region``: what it found and its region for next frame."""
        if found:
            self.last = predicted or region
            self.predicted = predicted or region
        else:
            self.predicted = None
            if self.last is None:  # the pick was never confirmed: pick again next frame
                self.started = False
