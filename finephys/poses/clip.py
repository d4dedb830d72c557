"""The ``clip.npz`` v1 format: 2D keypoints, scores and metadata of one pose clip.

Keys: ``keypoints`` float32 (T,J,2) pixels (origin top-left) or (T,J,3) = x, y, score;
``scores`` float32 (T,J) in [0,1], 0 = missing; ``layout`` str; ``image_size`` int (2,) =
(height, width); ``fps`` float; ``format_version`` = 1; optional ``camera_matrix`` (3,3) and
``dist_coeffs`` (4,), (5,) or (8,) (OpenCV order k1, k2, p1, p2, k3, ...).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from finephys.errors import InputError
from finephys.files import atomic_path, read_npz
from finephys.poses.layouts import LAYOUTS, convert_keypoints, get_layout

log = logging.getLogger(__name__)
SCORE_MARGIN = 1.1  # heatmap detectors' maxima run a little over 1 (HRNet: 1.06); up to this is clipped to 1

FORMAT_VERSION = 1
MIN_FRAMES = 3
FPS_RANGE = (0.1, 1000.0)  # frames per second a clip may declare
IMAGE_SIDE = (16, 32768)  # pixels a clip's image may have on a side
KEYS = ("keypoints", "scores", "layout", "image_size", "fps", "format_version",
        "camera_matrix", "dist_coeffs")
_NUMERIC = "fiu"


@dataclass(frozen=True, eq=False)
class PoseClip:
    """One validated pose clip; construction checks every field (InputError on bad input)."""

    keypoints: np.ndarray  # (T, J, 2) float32 pixels
    scores: np.ndarray  # (T, J) float32 in [0, 1]
    layout: str
    image_size: tuple[int, int]  # (height, width)
    fps: float
    camera_matrix: np.ndarray | None = None  # (3, 3)
    dist_coeffs: np.ndarray | None = None  # (4,), (5,) or (8,)

    def __post_init__(self):
        fields = _check_fields(
            "PoseClip", self.keypoints, self.scores, self.layout, self.image_size, self.fps,
            self.camera_matrix, self.dist_coeffs, kind="field")
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    @property
    def num_frames(self) -> int:
        return int(self.keypoints.shape[0])

    @property
    def num_joints(self) -> int:
        return int(self.keypoints.shape[1])


def _array(where, kind, name, value, dtype_kinds=_NUMERIC, what="a number array"):
    arr = np.asarray(value)
    if arr.dtype.kind not in dtype_kinds:
        raise InputError(f"{where}: {kind} '{name}' has dtype {arr.dtype}, expected {what}")
    return arr


def _scalar(where, kind, name, value) -> float:
    arr = _array(where, kind, name, value)
    if arr.size != 1:
        raise InputError(f"{where}: {kind} '{name}' has shape {arr.shape}, expected a scalar")
    return float(arr.reshape(()))


def _check_fields(where, keypoints, scores, layout, image_size, fps, camera_matrix,
                  dist_coeffs, kind="key") -> dict:
    """Validate and normalise the fields of a clip; returns them as a dict of clean values."""
    if isinstance(layout, np.ndarray):
        if layout.dtype.kind not in "US" or layout.size != 1:
            raise InputError(f"{where}: {kind} 'layout' has dtype {layout.dtype} and shape "
                             f"{layout.shape}, expected a string such as 'h36m17'")
        layout = layout.reshape(()).item()
        layout = layout.decode("ascii", "replace") if isinstance(layout, bytes) else layout
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise InputError(f"{where}: {kind} 'layout' is {layout!r}, expected one of {sorted(LAYOUTS)}")
    num_j = get_layout(layout).num_joints

    kp = _array(where, kind, "keypoints", keypoints, what="float pixel coordinates")
    if kp.ndim != 3 or kp.shape[2] != 2:
        raise InputError(f"{where}: {kind} 'keypoints' has shape {kp.shape}, expected (T, J, 2)")
    t = kp.shape[0]
    sc = _array(where, kind, "scores", scores, what="float scores in [0, 1]")
    if sc.shape != (t, num_j) or kp.shape[1] != num_j:
        bad, shape, want = ("scores", sc.shape, f"(T, J) = ({t}, {num_j})") \
            if kp.shape[1] == num_j else ("keypoints", kp.shape, f"(T, J, 2) = ({t}, {num_j}, 2)")
        raise InputError(f"{where}: {kind} '{bad}' has shape {shape}, expected {want} "
                         f"for layout {layout}")
    if t < MIN_FRAMES:
        raise InputError(f"{where}: {kind} 'keypoints' has {t} frames, expected at least "
                         f"{MIN_FRAMES} frames")
    sc = sc.astype(np.float32)
    bad = ~np.isfinite(sc)
    if bad.any():
        f, j = np.argwhere(bad)[0]
        raise InputError(f"{where}: {kind} 'scores' is {sc[f, j]} at frame {f}, joint {j}, "
                         f"expected finite values in [0, 1]")
    if sc.min() < 0 or sc.max() > SCORE_MARGIN:
        f, j = np.argwhere((sc < 0) | (sc > SCORE_MARGIN))[0]
        raise InputError(f"{where}: {kind} 'scores' is {sc[f, j]:g} at frame {f}, joint {j}, "
                         f"expected values in [0, 1] (up to {SCORE_MARGIN:g} is read as 1)")
    if sc.max() > 1:
        log.warning("%s: scores up to %.3g (a detector's heatmap maxima) were clipped to 1", where, sc.max())
        sc = np.minimum(sc, np.float32(1))
    if not (sc > 0).any():
        raise InputError(f"{where}: {kind} 'scores' are all 0, expected at least one visible joint")
    kp = kp.astype(np.float32)
    visible = sc > 0
    bad = ~np.isfinite(kp).all(axis=-1) & visible
    if bad.any():
        f, j = np.argwhere(bad)[0]
        raise InputError(f"{where}: {kind} 'keypoints' is {kp[f, j].tolist()} at frame {f}, "
                         f"joint {j} (score {sc[f, j]:g}), expected finite coordinates")
    kp = np.where(visible[..., None], kp, np.float32(0))

    size = _array(where, kind, "image_size", image_size, "iu", "integers (height, width)")
    if size.shape != (2,) or (size < IMAGE_SIDE[0]).any() or (size > IMAGE_SIDE[1]).any():
        raise InputError(f"{where}: {kind} 'image_size' is {size.tolist()}, expected (height, width) "
                         f"of two integers from {IMAGE_SIDE[0]} to {IMAGE_SIDE[1]}")
    wh = np.array([size[1], size[0]], np.float64)
    far = visible & ((kp < -wh).any(axis=-1) | (kp > 2 * wh).any(axis=-1))
    if far.any():  # off the frame by more than the frame itself: not a pixel coordinate of this image
        f, j = np.argwhere(far)[0]
        raise InputError(f"{where}: {kind} 'keypoints' is ({kp[f, j, 0]:g}, {kp[f, j, 1]:g}) at frame {f}, "
                         f"joint {j}, expected pixel coordinates of the {int(size[1])}x{int(size[0])} image (at most one "
                         "image width or height beyond its edges)")
    fps = _scalar(where, kind, "fps", fps)
    if not np.isfinite(fps) or fps <= 0:
        raise InputError(f"{where}: {kind} 'fps' is {fps}, expected a finite number > 0")
    if not FPS_RANGE[0] <= fps <= FPS_RANGE[1]:  # 1e-308 fps would overflow every frame count made from it
        raise InputError(f"{where}: {kind} 'fps' is {fps:g}, expected a frame rate from {FPS_RANGE[0]:g} "
                         f"to {FPS_RANGE[1]:g}")

    out = {"keypoints": kp, "scores": sc, "layout": layout,
           "image_size": (int(size[0]), int(size[1])), "fps": fps,
           "camera_matrix": None, "dist_coeffs": None}
    if camera_matrix is not None:
        cam = _array(where, kind, "camera_matrix", camera_matrix).astype(np.float64)
        if cam.shape != (3, 3) or not np.isfinite(cam).all() or cam[0, 0] <= 0 or cam[1, 1] <= 0 \
                or not np.allclose(cam[2], (0, 0, 1)):
            raise InputError(f"{where}: {kind} 'camera_matrix' is {np.round(cam, 3).tolist()}, expected "
                             f"a finite (3, 3) intrinsic matrix with fx, fy > 0 and last row (0, 0, 1)")
        out["camera_matrix"] = cam
    if dist_coeffs is not None:
        dist = _array(where, kind, "dist_coeffs", dist_coeffs).astype(np.float64)
        if dist.shape not in ((4,), (5,), (8,)) or not np.isfinite(dist).all():
            raise InputError(f"{where}: {kind} 'dist_coeffs' has shape {dist.shape}, expected "
                             f"finite (4,), (5,) or (8,) OpenCV coefficients")
        out["dist_coeffs"] = dist
    return out


def load_clip(path) -> PoseClip:
    """Read and validate a clip.npz file; InputError names the first problem found."""
    path = Path(path)
    data = read_npz(path, "a clip.npz file")
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise InputError(f"{path}: unknown key '{unknown[0]}', expected only {list(KEYS)}")
    for key in ("keypoints", "layout", "image_size", "fps"):
        if key not in data:
            raise InputError(f"{path}: missing key '{key}', expected the clip.npz v1 keys "
                             f"keypoints, scores, layout, image_size, fps")
    if "format_version" in data:
        version = _scalar(path, "key", "format_version", data["format_version"])
        if version != FORMAT_VERSION:
            raise InputError(f"{path}: key 'format_version' is {version:g}, expected "
                             f"{FORMAT_VERSION}")
    kp = _array(path, "key", "keypoints", data["keypoints"], what="float pixel coordinates")
    if kp.ndim == 3 and kp.shape[2] == 3:
        if "scores" in data:
            raise InputError(f"{path}: key 'scores' is present but 'keypoints' has shape "
                             f"{kp.shape} (x, y, score); expected (T, J, 2) with scores, or "
                             f"(T, J, 3) without")
        kp, scores = kp[..., :2], kp[..., 2]
    elif kp.ndim == 3 and kp.shape[2] == 2:
        if "scores" not in data:
            raise InputError(f"{path}: missing key 'scores', expected (T, J) scores beside "
                             f"keypoints of shape {kp.shape}")
        scores = data["scores"]
    else:
        raise InputError(f"{path}: key 'keypoints' has shape {kp.shape}, expected (T, J, 2) "
                         f"or (T, J, 3)")
    fields = _check_fields(path, kp, scores, data["layout"], data["image_size"], data["fps"],
                           data.get("camera_matrix"), data.get("dist_coeffs"))
    return PoseClip(**fields)


def save_clip(clip: PoseClip, path, overwrite: bool = False) -> Path:
    """Write ``clip`` as clip.npz v1, atomically (temp file in the same folder, then rename)."""
    if not isinstance(clip, PoseClip):
        raise InputError(f"save_clip: got {type(clip).__name__}, expected a PoseClip")
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(f"{path}: parent folder {path.parent} does not exist, expected an "
                         f"existing folder")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, expected a file path for the clip")
    if path.exists() and not overwrite:
        raise InputError(f"{path}: already exists, expected a new path (or overwrite=True)")
    arrays = {
        "keypoints": clip.keypoints.astype(np.float32),
        "scores": clip.scores.astype(np.float32),
        "layout": np.array(clip.layout),
        "image_size": np.array(clip.image_size, dtype=np.int64),
        "fps": np.array(clip.fps, dtype=np.float64),
        "format_version": np.array(FORMAT_VERSION, dtype=np.int64),
    }
    if clip.camera_matrix is not None:
        arrays["camera_matrix"] = clip.camera_matrix.astype(np.float64)
    if clip.dist_coeffs is not None:
        arrays["dist_coeffs"] = clip.dist_coeffs.astype(np.float64)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    return path


COLLAPSED_PX = 1.0  # a frame whose visible joints all lie within this of each other shows no pose


def drop_collapsed_frames(clip: PoseClip) -> tuple[PoseClip, str | None]:
    """Frames whose visible joints (two or more) all lie at one point, within ``COLLAPSED_PX``
    (a detector's placeholder, or a clip of zeros), carry no pose: their scores become 0, as an
    undetected frame's. Returns the clip and a note naming those frames (None where there are
    none); InputError where no frame is left with a pose."""
    visible = clip.scores > 0
    hi = np.where(visible[..., None], clip.keypoints, -np.inf).max(axis=1)
    lo = np.where(visible[..., None], clip.keypoints, np.inf).min(axis=1)
    collapsed = (visible.sum(axis=1) >= 2) & ((hi - lo).max(axis=1) < COLLAPSED_PX)
    if not collapsed.any():
        return clip, None
    frames = np.flatnonzero(collapsed)
    if (visible & ~collapsed[:, None]).sum(axis=1).max() < 2:
        raise InputError(f"clip: every frame's visible joints lie at one point (frame 0: {clip.keypoints[frames[0]][0]}), "
                         "expected a skeleton (an undetected frame has scores 0)")
    shown = ", ".join(map(str, frames[:8])) + (f" and {len(frames) - 8} more" if len(frames) > 8 else "")
    scores = np.where(collapsed[:, None], 0, clip.scores).astype(np.float32)
    return replace(clip, scores=scores), (f"frame{'s' if len(frames) > 1 else ''} {shown}: every visible joint at one "
                                          "point; treated as undetected")


def to_layout(clip: PoseClip, layout: str) -> PoseClip:
    """The same clip in another joint layout (see ``layouts.convert_keypoints``)."""
    kp, sc = convert_keypoints(clip.keypoints, clip.scores, clip.layout, layout)
    return replace(clip, keypoints=kp, scores=sc, layout=layout)


def time_grid(num_frames: int, fps_old: float, fps_new: float):
    """Source indices ``i0, i1`` and weights ``a`` of the frames of a clip resampled in time.

    T_new = round((T - 1) * fps_new / fps_old) + 1; new frame k sits at source position
    k * fps_old / fps_new (clamped to the last frame), between frames i0 and i1 = i0 + 1.
    """
    t_new = int(round((num_frames - 1) * fps_new / fps_old)) + 1
    pos = np.minimum(np.arange(t_new) * (fps_old / fps_new), num_frames - 1)
    i0 = np.floor(pos + 1e-9).astype(np.int64)
    a = np.clip(pos - i0, 0.0, 1.0)
    a[a < 1e-9] = 0.0
    i1 = np.minimum(i0 + 1, num_frames - 1)
    return i0, i1, a


def resample(clip: PoseClip, fps: float) -> PoseClip:
    """Linear interpolation in time to ``fps``.

    A joint is visible in a new frame only if visible in both neighbouring source frames (or in
    the one source frame it falls exactly on); its score is the interpolated score, else 0.
    """
    fps = float(fps)
    if not np.isfinite(fps) or fps <= 0:
        raise InputError(f"resample: fps is {fps}, expected a finite number > 0")
    if fps == clip.fps:
        return clip
    i0, i1, a = time_grid(clip.num_frames, clip.fps, fps)
    if len(i0) < MIN_FRAMES:
        raise InputError(f"resample: {clip.num_frames} frames at {clip.fps:g} fps give "
                         f"{len(i0)} frames at {fps:g} fps, expected at least {MIN_FRAMES} frames")
    exact = (a == 0)[:, None]
    s0, s1 = clip.scores[i0], clip.scores[i1]
    visible = (s0 > 0) & ((s1 > 0) | exact)
    aw = a[:, None].astype(np.float32)
    scores = np.where(visible, np.where(exact, s0, (1 - aw) * s0 + aw * s1), 0).astype(np.float32)
    kp = (1 - aw[..., None]) * clip.keypoints[i0] + aw[..., None] * clip.keypoints[i1]
    kp = np.where(visible[..., None], kp, 0).astype(np.float32)
    if not (scores > 0).any():
        raise InputError(f"resample: no joint stays visible at {fps:g} fps, expected at least one")
    return replace(clip, keypoints=kp, scores=scores, fps=fps)


def loop_clip(clip: PoseClip, num_frames: int) -> PoseClip:
    """``clip`` played forward and back (ping-pong) until it has ``num_frames`` frames: long test
    and benchmark clips from a short real one, with no jump where it turns."""
    period = 2 * clip.num_frames - 2
    idx = np.arange(num_frames) % period
    idx = np.where(idx < clip.num_frames, idx, period - idx)
    return replace(clip, keypoints=clip.keypoints[idx], scores=clip.scores[idx])
