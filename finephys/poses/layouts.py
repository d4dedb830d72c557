"""Joint layouts (COCO-17, H36M-17, OpenPose-18) and conversions between them.

Joint names use ``l_``/``r_`` prefixes for the subject's left and right; the flip permutation and
the left/right colouring of drawings are derived from them. The internal layout is ``h36m17``
(VideoPose3D order); ``convert_keypoints`` maps the others to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from finephys.errors import InputError


@dataclass(frozen=True)
class Layout:
    """A joint order: names, skeleton edges for drawing, and the left/right flip permutation."""

    name: str
    joints: tuple[str, ...]
    edges: tuple[tuple[int, int], ...]

    @property
    def num_joints(self) -> int:
        return len(self.joints)

    @property
    def flip(self) -> tuple[int, ...]:
        """``kp[..., flip, :]`` swaps left and right joints (mirror the x coordinate too)."""
        index = {n: i for i, n in enumerate(self.joints)}
        return tuple(index[_mirror_name(n)] for n in self.joints)

    def side(self, joint: int) -> str:
        """'left', 'right' or 'center' for a joint index."""
        name = self.joints[joint]
        return "left" if name.startswith("l_") else "right" if name.startswith("r_") else "center"

    def edge_side(self, edge: tuple[int, int]) -> str:
        """'left' / 'right' when either end is on that side, else 'center'."""
        sides = {self.side(edge[0]), self.side(edge[1])}
        return "left" if "left" in sides else "right" if "right" in sides else "center"


def _mirror_name(name: str) -> str:
    if name.startswith("l_"):
        return "r_" + name[2:]
    if name.startswith("r_"):
        return "l_" + name[2:]
    return name


COCO17 = Layout(
    "coco17",
    ("nose", "l_eye", "r_eye", "l_ear", "r_ear", "l_shoulder", "r_shoulder", "l_elbow",
     "r_elbow", "l_wrist", "r_wrist", "l_hip", "r_hip", "l_knee", "r_knee", "l_ankle", "r_ankle"),
    ((15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7),
     (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6)),
)

H36M17 = Layout(
    "h36m17",
    ("pelvis", "r_hip", "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle", "spine", "thorax",
     "neck", "head", "l_shoulder", "l_elbow", "l_wrist", "r_shoulder", "r_elbow", "r_wrist"),
    ((0, 1), (1, 2), (2, 3), (0, 4), (4, 5), (5, 6), (0, 7), (7, 8), (8, 9), (9, 10),
     (8, 11), (11, 12), (12, 13), (8, 14), (14, 15), (15, 16)),
)

OPENPOSE18 = Layout(
    "openpose18",
    ("nose", "neck", "r_shoulder", "r_elbow", "r_wrist", "l_shoulder", "l_elbow", "l_wrist",
     "r_hip", "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle", "r_eye", "l_eye", "r_ear",
     "l_ear"),
    ((1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11),
     (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17)),
)

LAYOUTS: dict[str, Layout] = {lay.name: lay for lay in (COCO17, H36M17, OPENPOSE18)}

# Edges every drawing of the internal layout uses.
H36M_EDGES = H36M17.edges


def get_layout(name: str) -> Layout:
    """The Layout called ``name``; unknown names raise InputError listing the known ones."""
    if not isinstance(name, str) or name not in LAYOUTS:
        raise InputError(f"unknown joint layout {name!r}, expected one of {sorted(LAYOUTS)}")
    return LAYOUTS[name]


def num_joints(layout: str) -> int:
    return get_layout(layout).num_joints


def _by_name(src: Layout, dst: Layout) -> list[tuple[int, ...]]:
    return [(src.joints.index(n),) for n in dst.joints]


def _coco_to_h36m() -> list[tuple[int, ...]]:
    # MotionBERT's mapping (see data/motion/README.md); tuples are averaged.
    hips, shoulders = (11, 12), (5, 6)
    return [hips, (12,), (14,), (16,), (11,), (13,), (15,), hips + shoulders, shoulders,
            (0,), (1, 2), (5,), (7,), (9,), (6,), (8,), (10,)]


def _coco_to_openpose() -> list[tuple[int, ...]]:
    # The OpenPose neck is taken as the mid-shoulders point.
    return [(5, 6) if n == "neck" else (COCO17.joints.index(n),) for n in OPENPOSE18.joints]


def _openpose_to_coco() -> list[tuple[int, ...]]:
    return _by_name(OPENPOSE18, COCO17)  # the neck is dropped


def _spec(src: str, dst: str) -> list[list[tuple[int, ...]]] | None:
    """A chain of steps; each step lists, per target joint, the source joints it averages."""
    if src == dst:
        return [[(i,) for i in range(num_joints(src))]]
    table = {
        ("coco17", "h36m17"): [_coco_to_h36m()],
        ("openpose18", "h36m17"): [_openpose_to_coco(), _coco_to_h36m()],
        ("coco17", "openpose18"): [_coco_to_openpose()],
        ("openpose18", "coco17"): [_openpose_to_coco()],
    }
    return table.get((src, dst))


def _apply(kp: np.ndarray, scores: np.ndarray, step: list[tuple[int, ...]]):
    out_kp = np.empty(kp.shape[:-2] + (len(step), kp.shape[-1]), dtype=kp.dtype)
    out_sc = np.empty(scores.shape[:-1] + (len(step),), dtype=scores.dtype)
    for j, src in enumerate(step):
        idx = list(src)
        # Spine = midpoint(pelvis, thorax) = mean of the four hip/shoulder joints.
        out_kp[..., j, :] = kp[..., idx, :].mean(axis=-2)
        out_sc[..., j] = scores[..., idx].min(axis=-1)
    return out_kp, out_sc


def convert_keypoints(kp, scores, src: str, dst: str):
    """Convert ``kp (..., J, C)`` and ``scores (..., J)`` from layout ``src`` to ``dst``.

    A joint derived from several source joints is their mean, with the minimum of their scores.
    Coordinates of joints whose resulting score is 0 are set to 0 (they are ignored downstream).
    Raises InputError for unknown layouts, impossible conversions or mismatched shapes.
    """
    src_l, dst_l = get_layout(src), get_layout(dst)
    kp, scores = np.asarray(kp), np.asarray(scores)
    if kp.ndim < 2 or kp.shape[-2] != src_l.num_joints:
        raise InputError(
            f"keypoints have shape {kp.shape}, expected (..., {src_l.num_joints}, C) for layout {src}")
    if scores.shape != kp.shape[:-1]:
        raise InputError(
            f"scores have shape {scores.shape}, expected {kp.shape[:-1]} to match keypoints {kp.shape}")
    if kp.dtype.kind != "f":
        kp = kp.astype(np.float32)
    if scores.dtype.kind != "f":
        scores = scores.astype(np.float32)
    steps = _spec(src, dst)
    if steps is None:
        raise InputError(
            f"cannot convert joint layout {src} to {dst}: {src} lacks joints {dst} needs; "
            f"supported: any of {sorted(LAYOUTS)} -> h36m17, coco17 <-> openpose18")
    for step in steps:
        kp, scores = _apply(kp, scores, step)
    kp = np.where((scores > 0)[..., None], kp, 0).astype(kp.dtype)
    return kp, scores
