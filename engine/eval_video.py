"""``fpengine eval-video``: how well a generated video follows the joints that guided it.

A pose model (``fpengine detect``'s code: MediaPipe, or an ONNX model such as the shipped judge)
finds the person in every frame; its joints are compared with the guiding joints (``video_2d``
of ``--save-poses``, in the video's pixels, exactly where the heatmaps were drawn) on the twelve
limb joints both layouts name alike (shoulders, elbows, wrists, hips, knees, ankles):
- PCK@0.1: the share of joints within 10% of the figure's size (the larger side of the guiding
  skeleton's box in that frame; its height for an upright person); a joint the model misses is
  a miss;
- the mean joint error in pixels over the joints it found;
- jitter: mean |second difference| of the detected joints against that of the guiding joints;
- for renderer-style prompts ("a person in a red shirt and black trousers ..."), the shirt and
  trouser colours read at the guiding torso and thighs, against the prompt.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from finephys.errors import InputError
from finephys.files import read_npz
from finephys.training.judge import COCO_FROM_H36M, JUDGE_ONNX
from finephys.training.scene import SHIRTS, TROUSERS, parse_caption

LIMBS = tuple(range(5, 17))  # COCO-17 shoulders .. ankles
PCK_FRACTION = 0.1
JUDGE_MIN_SCORE = 0.1
MAX_GUIDE_PX = 1e6  # guiding joints beyond this are no pixels of any video


def figure_size(guide: np.ndarray) -> np.ndarray:
    """(T,) the larger side of each frame's box around the guiding joints (T,J,2)."""
    return (guide.max(axis=1) - guide.min(axis=1)).max(axis=-1)


def pose_metrics(detected: np.ndarray, scores: np.ndarray, guide: np.ndarray) -> dict:
    """detected (T,17,2) COCO-17 + scores (T,17) against guide (T,17,2) H36M-17, video pixels."""
    ref = guide[:, [COCO_FROM_H36M[k] for k in LIMBS]]
    det, found = detected[:, LIMBS], scores[:, LIMBS] > 0
    err = np.linalg.norm(det - ref, axis=-1)
    size = figure_size(guide)[:, None]
    hit = found & (err <= PCK_FRACTION * size)
    out = {"pck": float(hit.mean()), "joint_error_px": float(err[found].mean()) if found.any() else float("nan"),
           "found": float(found.mean()), "figure_size_px": float(size.mean())}
    if len(det) >= 3:
        ok = found[2:] & found[1:-1] & found[:-2]
        acc = lambda x: np.linalg.norm(x[2:] - 2 * x[1:-1] + x[:-2], axis=-1)  # noqa: E731
        if ok.any():
            out["jitter_px"] = float(acc(det)[ok].mean())
            out["guide_jitter_px"] = float(acc(ref)[ok].mean())
            out["jitter_ratio"] = out["jitter_px"] / max(out["guide_jitter_px"], 1e-6)
    return out


def _sample(frames: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Median RGB (0..1) of 3x3 pixels around points (T,P,2) over every frame and point."""
    t, h, w, _ = frames.shape
    vals = []
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            x = np.clip(np.round(points[..., 0]).astype(int) + dx, 0, w - 1)
            y = np.clip(np.round(points[..., 1]).astype(int) + dy, 0, h - 1)
            vals.append(frames[np.arange(t)[:, None], y, x])
    return np.median(np.concatenate([v.reshape(-1, 3) for v in vals]), axis=0) / 255.0


def nearest_colour(rgb: np.ndarray, palette: dict) -> str:
    """The palette name nearest ``rgb`` after the renderer's mean shading (about 0.85)."""
    return min(palette, key=lambda k: float(np.sum((np.asarray(palette[k]) * 0.85 - rgb) ** 2)))


def colour_metrics(frames: np.ndarray, guide: np.ndarray, prompt: str | None) -> dict:
    """Shirt and trouser colours read where the guiding joints put the torso and the thighs."""
    wanted = parse_caption(prompt or "")
    if wanted is None:
        return {}
    g = guide.astype(np.float64)
    shoulders, hips = (g[:, 11] + g[:, 14]) / 2, (g[:, 1] + g[:, 4]) / 2
    torso = np.stack([hips + a * (shoulders - hips) for a in (0.4, 0.55, 0.7)], 1)
    thighs = np.stack([g[:, h] + a * (g[:, k] - g[:, h]) for h, k in ((1, 2), (4, 5)) for a in (0.3, 0.5)], 1)
    shirt = nearest_colour(_sample(frames, torso), SHIRTS)
    trousers = nearest_colour(_sample(frames, thighs), TROUSERS)
    return {"shirt_wanted": wanted[0], "shirt_seen": shirt, "shirt_ok": shirt == wanted[0],
            "trousers_wanted": wanted[1], "trousers_seen": trousers, "trousers_ok": trousers == wanted[1]}


def detect_joints(frames: np.ndarray, fps: float, pose_model: Path | None, norm: str, min_score: float = 0.3):
    """COCO-17 joints (T,17,2) and scores (T,17) of the person in frames (T,H,W,3) uint8."""
    from engine.detect.run import DetectOptions, detect_frames

    if pose_model is None:
        opts = DetectOptions(min_score=min_score)
    else:
        opts = DetectOptions(pose_model=pose_model, pose_model_norm=norm, person_detector="none", min_score=min_score)
    try:
        result = detect_frames(frames, fps, opts, where="video")
    except InputError as exc:
        if "no person found" not in str(exc) and "no joint reaches" not in str(exc):
            raise
        return np.zeros((len(frames), 17, 2)), np.zeros((len(frames), 17))  # nobody there: every joint missed
    return result.coco_keypoints, result.coco_scores


def standard_error(values) -> float:
    """The standard error of the mean of per-clip ``values`` (nan for fewer than two): how far a
    mean over this many clips may sit from the mean over all clips."""
    values = np.asarray(values, np.float64)
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")


def evaluate(frames: np.ndarray, guide: np.ndarray, fps: float, prompt: str | None = None,
             pose_model: Path | None = JUDGE_ONNX, norm: str = "unit") -> dict:
    """All of the module's measures for frames (T,H,W,3) uint8 guided by ``guide`` (T,17,2)."""
    if guide.ndim != 3 or guide.shape[1:] != (17, 2):
        raise InputError(f"guiding joints have shape {guide.shape}, expected (T, 17, 2) H36M-17 pixels")
    if len(frames) != len(guide):
        raise InputError(f"the video has {len(frames)} frames but video_2d has {len(guide)}, expected the same")
    # an ONNX judge's heatmap peaks run lower than MediaPipe's visibilities: its joints count from 0.1
    kp, sc = detect_joints(frames, fps, pose_model, norm, min_score=0.3 if pose_model is None else JUDGE_MIN_SCORE)
    return {"frames": int(len(frames)), **pose_metrics(kp, sc, guide), **colour_metrics(frames, guide, prompt)}


def read_guide(path: Path) -> np.ndarray:
    """``video_2d`` of a ``--save-poses`` file."""
    path = Path(path)
    data = read_npz(path, "the stages.npz of generate --save-poses")
    if "video_2d" not in data:
        raise InputError(f"--poses {path}: no key 'video_2d', expected a stages.npz written by "
                         f"generate --save-poses (keys found: {', '.join(sorted(data))})")
    guide = data["video_2d"]
    if guide.dtype.kind not in "fiu":
        raise InputError(f"--poses {path}: video_2d has dtype {guide.dtype}, expected numbers (T, 17, 2) pixels")
    guide = np.asarray(guide, np.float64)
    if guide.ndim != 3 or guide.shape[1:] != (17, 2):
        raise InputError(f"--poses {path}: video_2d has shape {guide.shape}, expected finite (T, 17, 2)")
    if not np.isfinite(guide).all():
        raise InputError(f"--poses {path}: video_2d holds NaN or inf, expected finite pixel coordinates")
    if np.abs(guide).max(initial=0.0) > MAX_GUIDE_PX:
        raise InputError(f"--poses {path}: video_2d reaches {np.abs(guide).max():.3g} px, expected pixel "
                         f"coordinates |x| <= {MAX_GUIDE_PX:,.0f}")
    return guide
