"""From raw per-frame detections to a clean clip: threshold, gap filling, lost-frame report.

Rules (what ``fpengine detect`` documents):
- a joint whose confidence is below ``min_score`` is missing: score 0, coordinates 0;
- a missing stretch of one joint of at most ``max_gap`` frames, with the joint found on both
  sides, is filled by linear interpolation of x and y; the filled frames get the smaller of the
  two bounding scores. Longer gaps and gaps at the start or end of the clip stay missing;
- a frame where the person was not found at all (no detection, or the pose model saw nobody in
  the tracked region) is "lost"; lost frames are reported as ranges, and only their joints that
  the gap rule fills come back.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DEFAULT_MIN_SCORE = 0.3
DEFAULT_MAX_GAP = 5


@dataclass(frozen=True)
class Cleaned:
    keypoints: np.ndarray  # (T, J, 2) float32, 0 where missing
    scores: np.ndarray  # (T, J) float32, 0 where missing
    filled: np.ndarray  # (T, J) bool: the joint was interpolated
    below: int  # joint-frames dropped by the threshold (of frames where the person was found)


def threshold(keypoints, scores, min_score: float):
    """Scores below ``min_score`` (and non-finite points) become 0; coordinates of those become 0."""
    kp = np.asarray(keypoints, np.float32)
    sc = np.clip(np.nan_to_num(np.asarray(scores, np.float32), nan=0.0), 0.0, 1.0)
    keep = (sc >= min_score) & (sc > 0) & np.isfinite(kp).all(axis=-1)
    sc = np.where(keep, sc, 0).astype(np.float32)
    kp = np.where(keep[..., None], np.nan_to_num(kp), 0).astype(np.float32)
    return kp, sc


def fill_gaps(keypoints, scores, max_gap: int):
    """Linear interpolation over missing stretches of at most ``max_gap`` frames, per joint.

    Returns (keypoints, scores, filled); inputs are not modified.
    """
    kp = np.array(keypoints, np.float32, copy=True)
    sc = np.array(scores, np.float32, copy=True)
    filled = np.zeros(sc.shape, bool)
    if max_gap <= 0:
        return kp, sc, filled
    for j in range(sc.shape[1]):
        found = np.flatnonzero(sc[:, j] > 0)
        for a, b in zip(found[:-1], found[1:]):
            gap = b - a - 1
            if gap == 0 or gap > max_gap:
                continue
            w = (np.arange(1, gap + 1, dtype=np.float32) / (gap + 1))[:, None]
            kp[a + 1:b, j] = (1 - w) * kp[a, j] + w * kp[b, j]
            sc[a + 1:b, j] = min(sc[a, j], sc[b, j])
            filled[a + 1:b, j] = True
    return kp, sc, filled


def clean(keypoints, scores, found, min_score: float = DEFAULT_MIN_SCORE,
          max_gap: int = DEFAULT_MAX_GAP) -> Cleaned:
    """Threshold, then fill short gaps; ``found`` (T,) marks frames where the person was seen."""
    found = np.asarray(found, bool)
    sc_in = np.where(found[:, None], np.asarray(scores, np.float32), 0)
    kp, sc = threshold(keypoints, sc_in, min_score)
    below = int(((sc_in > 0) & (sc == 0)).sum())
    kp, sc, filled = fill_gaps(kp, sc, max_gap)
    return Cleaned(kp, sc, filled, below)


def ranges(frames) -> list[tuple[int, int]]:
    """Sorted frame indices as inclusive (first, last) runs: [3,4,5,9] -> [(3,5),(9,9)]."""
    out: list[tuple[int, int]] = []
    for f in sorted(int(x) for x in frames):
        if out and f == out[-1][1] + 1:
            out[-1] = (out[-1][0], f)
        else:
            out.append((f, f))
    return out


def format_ranges(runs, limit: int = 8) -> str:
    parts = [f"{a}" if a == b else f"{a}-{b}" for a, b in runs[:limit]]
    if len(runs) > limit:
        parts.append(f"... ({len(runs) - limit} more)")
    return ", ".join(parts)


@dataclass(frozen=True)
class LostReport:
    """Which frames lost the person, and how much of them the gap rule filled back."""

    num_frames: int
    lost: list[int] = field(default_factory=list)  # frames where the person was not found
    filled_frames: list[int] = field(default_factory=list)  # lost frames with >= 1 filled joint
    below_threshold: int = 0  # joint-frames dropped by --min-score
    filled_joints: int = 0  # joint-frames interpolated
    missing_joints: int = 0  # joint-frames with score 0 in the final clip

    def lines(self, min_score: float, max_gap: int) -> list[str]:
        t = self.num_frames
        out = []
        if self.lost:
            out.append(f"person lost in {len(self.lost)} of {t} frames: "
                       f"{format_ranges(ranges(self.lost))}"
                       + (f" ({len(self.filled_frames)} of them filled by interpolation over gaps "
                          f"of at most {max_gap} frames)" if self.filled_frames else ""))
        else:
            out.append(f"person found in all {t} frames")
        out.append(f"joints: {self.below_threshold} joint-frames below --min-score {min_score:g}, "
                   f"{self.filled_joints} interpolated (gaps of at most {max_gap} frames), "
                   f"{self.missing_joints} missing in the clip")
        return out

    def to_dict(self) -> dict:
        return {
            "num_frames": self.num_frames,
            "lost_frames": list(self.lost),
            "lost_ranges": [list(r) for r in ranges(self.lost)],
            "lost_frames_filled": list(self.filled_frames),
            "joint_frames_below_threshold": self.below_threshold,
            "joint_frames_interpolated": self.filled_joints,
            "joint_frames_missing": self.missing_joints,
        }


def report(found, cleaned: Cleaned) -> LostReport:
    found = np.asarray(found, bool)
    lost = np.flatnonzero(~found)
    filled_frames = [int(f) for f in lost if cleaned.filled[f].any()]
    return LostReport(
        num_frames=int(found.size), lost=[int(f) for f in lost], filled_frames=filled_frames,
        below_threshold=cleaned.below, filled_joints=int(cleaned.filled.sum()),
        missing_joints=int((cleaned.scores == 0).sum()))
