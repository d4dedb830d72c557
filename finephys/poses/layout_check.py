"""Does a clip's motion fit the joint layout it declares?

A clip in one joint order labelled with another (an H36M-17 clip saved as ``coco17``: the same
joint count, so nothing else notices) guides the video with a scrambled skeleton. Each check
looks at every frame where all joints are visible, in body sizes (the root mean square distance of
the frame's joints from their mean, about a quarter of a standing person's height), so framing,
camera and pose move it little, and counts the frames that contradict the layout:

- a face (nose, eyes, ears) is small: its joints lie within ``MAX_FACE`` of each other; more
  than a quarter of the frames otherwise (a detector's stray ear is allowed for) is a misfit;
- a central joint lies between two others (H36M-17: the spine between pelvis and thorax, the
  thorax between the shoulders, the neck between thorax and head; OpenPose-18: the neck between
  the shoulders); off it in more than half of the frames is a misfit;
- left and right agree: the hips do not point the other way from the shoulders (where both
  lines are seen, not side-on) in more than half of the frames (the hips' labels swapped, the
  MMPose H36M trap).

The limits sit between what real motion gives under its own layout and under the other 17-joint
one (tests/test_layout_check.py: the shared CMU mocap as H36M-17 seen by random cameras, CMU
Panoptic as COCO-17 seen by its real cameras): per frame, faces span at most 0.76 body sizes, and
an H36M-17 clip read as COCO-17 has a "face" over 1 in 38-100% of its frames; in H36M-17 clips
the spine, thorax and neck lie at most 0.26, 0.29 and 0.10 off, in COCO-17 clips read as H36M-17
their medians are 0.9, 0.9 and 1.1; hips point against the shoulders in at most 20% of frames,
in all of them when swapped.
"""
from __future__ import annotations

import numpy as np

from finephys.poses.layouts import LAYOUTS, get_layout

FACE = ("nose", "l_eye", "r_eye", "l_ear", "r_ear")
MAX_FACE = 1.0  # spread of the face joints, in body sizes
CENTRES = {  # layout: (joint, the two it lies between, most offset in body sizes)
    "h36m17": (("spine", "pelvis", "thorax", 0.35), ("thorax", "l_shoulder", "r_shoulder", 0.4),
               ("neck", "thorax", "head", 0.3)),
    "openpose18": (("neck", "l_shoulder", "r_shoulder", 0.4),),
}
MIN_LINE = 0.25  # hips and shoulders count only where both span this many body sizes (not side-on)
MIN_FRAMES = 3  # fewer frames with every joint visible: too little to tell


def _share(bad: np.ndarray, allowed: float, what: str, why: str = "") -> list[str]:
    """``what`` with the share of frames where it holds, if more than ``allowed`` do."""
    share = bad.mean() if len(bad) >= MIN_FRAMES else 0.0
    return [f"{what} in {share:.0%} of the frames{why}"] if share > allowed else []


def misfits(keypoints: np.ndarray, scores: np.ndarray, layout: str) -> list[str]:
    """What in ``keypoints`` (T,J,2) contradicts ``layout``, one phrase per check; empty when the
    motion fits, or when fewer than ``MIN_FRAMES`` frames show every joint. A face may look too
    wide in a quarter of the frames (a detector's stray ear), the rest in half of them."""
    lay = get_layout(layout)
    kp = np.asarray(keypoints, np.float64)[(np.asarray(scores) > 0).all(-1)]
    size = np.sqrt(((kp - kp.mean(1, keepdims=True)) ** 2).sum(-1).mean(-1))  # (T,) body size per frame
    keep = size > 0
    if keep.sum() < MIN_FRAMES:
        return []
    joint = {name: kp[keep, i] / size[keep, None] for i, name in enumerate(lay.joints)}
    found = []
    if all(n in joint for n in FACE):
        face = np.stack([joint[n] for n in FACE], 1)
        spread = np.linalg.norm(face[:, :, None] - face[:, None], axis=-1).max(axis=(1, 2))
        found += _share(spread > MAX_FACE, 0.25, f"the nose, eyes and ears lie over {MAX_FACE:g} body size apart")
    for centre, a, b, limit in CENTRES.get(layout, ()):
        offset = np.linalg.norm(joint[centre] - (joint[a] + joint[b]) / 2, axis=-1)
        found += _share(offset > limit, 0.5, f"the {centre} lies over {limit:g} body size off the middle of "
                                             f"{a.replace('_', ' ')} and {b.replace('_', ' ')}")
    hips, shoulders = joint["l_hip"] - joint["r_hip"], joint["l_shoulder"] - joint["r_shoulder"]
    both = (np.linalg.norm(hips, axis=-1) > MIN_LINE) & (np.linalg.norm(shoulders, axis=-1) > MIN_LINE)
    found += _share(((hips * shoulders).sum(-1) < 0)[both], 0.5, "the hips point the other way from the shoulders",
                    " (left and right swapped on the legs or arms?)")
    return found


def layout_warning(clip) -> str | None:
    """One line when ``clip``'s motion does not fit its declared layout (naming the layouts of its
    joint count that it does fit), else None."""
    found = misfits(clip.keypoints, clip.scores, clip.layout)
    if not found:
        return None
    others = [name for name, lay in LAYOUTS.items() if name != clip.layout and lay.num_joints == clip.num_joints
              and not misfits(clip.keypoints, clip.scores, name)]
    hint = f"; it fits {' or '.join(others)}" if others else ""
    return (f"warning: the clip's joints do not fit its layout {clip.layout}: {'; '.join(found)}{hint}. "
            f"Going on as {clip.layout}; check the clip's joint order and 'layout'")
