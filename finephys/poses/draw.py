"""Skeleton drawing in plain numpy (no OpenCV): limbs as thick segments, joints as discs."""

from __future__ import annotations

import numpy as np

from finephys.errors import InputError
from finephys.poses.layouts import get_layout

# Colours (r, g, b) of limbs and joints by body side.
SIDE_COLORS = {"left": (60, 140, 255), "right": (255, 90, 60), "center": (235, 235, 235)}
BACKGROUND = (20, 20, 24)


def _fill(image: np.ndarray, mask: np.ndarray, y0: int, x0: int, color) -> None:
    h, w = mask.shape
    image[y0:y0 + h, x0:x0 + w][mask] = color


def _box(image, lo_x, hi_x, lo_y, hi_y):
    """Integer pixel window clipped to the image, or None when empty."""
    height, width = image.shape[:2]
    x0, x1 = max(int(np.floor(lo_x)), 0), min(int(np.ceil(hi_x)), width - 1)
    y0, y1 = max(int(np.floor(lo_y)), 0), min(int(np.ceil(hi_y)), height - 1)
    if x1 < x0 or y1 < y0:
        return None
    return x0, x1, y0, y1


def draw_disc(image: np.ndarray, center, radius: float, color) -> None:
    """Fill the pixels (centres at integer coordinates) within ``radius`` of ``center``."""
    cx, cy = float(center[0]), float(center[1])
    box = _box(image, cx - radius, cx + radius, cy - radius, cy + radius)
    if box is None:
        return
    x0, x1, y0, y1 = box
    ys, xs = np.mgrid[y0:y1 + 1, x0:x1 + 1]
    _fill(image, (xs - cx) ** 2 + (ys - cy) ** 2 <= radius * radius, y0, x0, color)


def draw_line(image: np.ndarray, p0, p1, thickness: float, color) -> None:
    """Fill the pixels within ``thickness / 2`` of the segment p0-p1."""
    half = max(thickness / 2.0, 0.5)
    (ax, ay), (bx, by) = (float(p0[0]), float(p0[1])), (float(p1[0]), float(p1[1]))
    box = _box(image, min(ax, bx) - half, max(ax, bx) + half,
               min(ay, by) - half, max(ay, by) + half)
    if box is None:
        return
    x0, x1, y0, y1 = box
    ys, xs = np.mgrid[y0:y1 + 1, x0:x1 + 1].astype(np.float64)
    dx, dy = bx - ax, by - ay
    length2 = dx * dx + dy * dy
    t = 0.0 if length2 == 0 else np.clip(((xs - ax) * dx + (ys - ay) * dy) / length2, 0, 1)
    dist2 = (xs - ax - t * dx) ** 2 + (ys - ay - t * dy) ** 2
    _fill(image, dist2 <= half * half, y0, x0, color)


def draw_skeleton(image: np.ndarray, keypoints, scores, layout: str = "h36m17", color=None,
                  radius: float = 3.0, thickness: float = 2.0, min_score: float = 0.0):
    """Draw limbs and joints with score > ``min_score`` onto ``image`` (H, W, 3) uint8, in place.

    ``color`` (r, g, b) paints everything; None colours by side (``SIDE_COLORS``). A limb is drawn
    only when both of its joints are visible. Returns ``image``.
    """
    lay = get_layout(layout)
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 \
            or image.shape[2] != 3:
        raise InputError(f"draw_skeleton: image is {getattr(image, 'shape', type(image))} "
                         f"{getattr(image, 'dtype', '')}, expected (H, W, 3) uint8")
    kp, sc = np.asarray(keypoints, np.float64), np.asarray(scores, np.float64)
    if kp.shape != (lay.num_joints, 2) or sc.shape != (lay.num_joints,):
        raise InputError(f"draw_skeleton: keypoints {kp.shape} and scores {sc.shape}, expected "
                         f"({lay.num_joints}, 2) and ({lay.num_joints},) for layout {layout}")
    visible = (sc > min_score) & np.isfinite(kp).all(axis=1)
    for a, b in lay.edges:
        if visible[a] and visible[b]:
            c = color if color is not None else SIDE_COLORS[lay.edge_side((a, b))]
            draw_line(image, kp[a], kp[b], thickness, c)
    for j in np.flatnonzero(visible):
        c = color if color is not None else SIDE_COLORS[lay.side(j)]
        draw_disc(image, kp[j], radius, c)
    return image


def _title_panel(height: int, width: int, title: str | None) -> np.ndarray:
    panel = np.empty((height, width, 3), np.uint8)
    panel[:] = BACKGROUND
    if title:
        from PIL import Image, ImageDraw

        img = Image.fromarray(panel)
        ImageDraw.Draw(img).text((4, 2), str(title), fill=(255, 255, 255))
        panel = np.asarray(img).copy()
    return panel


def render_pose_frames(clips, scores, image_size, layout: str = "h36m17", titles=None,
                       radius: float | None = None, thickness: float | None = None) -> np.ndarray:
    """Side-by-side skeleton panels: ``(T, H, W * len(clips), 3)`` uint8.

    ``clips`` is a list of (T, J, 2) pixel keypoints, ``scores`` a list of (T, J); each clip gets
    one panel of ``image_size`` = (H, W) on a dark background, left limbs blue, right limbs red.
    """
    lay = get_layout(layout)
    if not isinstance(clips, (list, tuple)) or not clips:
        raise InputError("render_pose_frames: clips is empty, expected a list of (T, J, 2) arrays")
    if not isinstance(scores, (list, tuple)) or len(scores) != len(clips):
        raise InputError(f"render_pose_frames: {len(clips)} clips but "
                         f"{len(scores) if isinstance(scores, (list, tuple)) else 'no'} score "
                         f"arrays, expected one (T, J) array per clip")
    if titles is not None and len(titles) != len(clips):
        raise InputError(f"render_pose_frames: {len(titles)} titles for {len(clips)} clips, "
                         f"expected one per clip")
    try:
        height, width = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise InputError(f"render_pose_frames: image_size is {image_size!r}, expected "
                         f"(height, width)") from None
    if height <= 0 or width <= 0:
        raise InputError(f"render_pose_frames: image_size is {image_size!r}, expected positive")
    kps = [np.asarray(k, np.float64) for k in clips]
    scs = [np.asarray(s, np.float64) for s in scores]
    frames = kps[0].shape[0] if kps[0].ndim == 3 else -1
    for i, (k, s) in enumerate(zip(kps, scs)):
        if k.shape != (frames, lay.num_joints, 2) or s.shape != (frames, lay.num_joints):
            raise InputError(f"render_pose_frames: clip {i} has keypoints {k.shape} and scores "
                             f"{s.shape}, expected (T, {lay.num_joints}, 2) and "
                             f"(T, {lay.num_joints}) with the same T for all clips")
    size = min(height, width)
    radius = max(1.5, size / 128) if radius is None else radius
    thickness = max(2.0, size / 96) if thickness is None else thickness
    panels = [_title_panel(height, width, titles[i] if titles else None) for i in range(len(kps))]
    out = np.empty((frames, height, width * len(kps), 3), np.uint8)
    for t in range(frames):
        for i, (k, s) in enumerate(zip(kps, scs)):
            view = out[t, :, i * width:(i + 1) * width]
            view[:] = panels[i]
            draw_skeleton(view, k[t], s[t], layout, radius=radius, thickness=thickness)
    return out
