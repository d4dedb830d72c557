"""BVH motion capture files: parser, forward kinematics, and the CMU -> H36M-17 mapping.

Forward kinematics follows the file: each joint's local rotation is the product of its rotation
channels in the order listed (``Zrotation Yrotation Xrotation`` gives Rz @ Ry @ Rx), angles in
degrees; ``world_R = parent_R @ R`` and ``pos = parent_pos + parent_R @ (offset + translation)``,
where ``translation`` comes from the joint's position channels (the root's, usually).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from finephys.poses.clip import time_grid
from finephys.errors import InputError

# CMU mocap units (inches / 0.45) to metres, as in the cgspeed BVH conversion.
CMU_SCALE = 0.05644

# H36M-17 joint -> CMU (cgspeed) joint whose position it takes. ``Head_end`` is the End Site of
# ``Head`` (top of the head). Choices: pelvis is the root (``Hips``), not the mid-hips point;
# ``Chest`` (lower thorax, ~35% of the way up the trunk) is the spine joint; ``Neck`` (start of
# the upper neck, at shoulder height) is the thorax; ``Head`` (top of the neck, about chin level)
# is neck/nose; the limbs use the joints of the same name.
H36M_FROM_CMU = (
    "Hips", "RightHip", "RightKnee", "RightAnkle", "LeftHip", "LeftKnee", "LeftAnkle",
    "Chest", "Neck", "Head", "Head_end", "LeftShoulder", "LeftElbow", "LeftWrist",
    "RightShoulder", "RightElbow", "RightWrist",
)

# The same H36M-17 joints in the cgspeed "MotionBuilder-friendly" release (data/motion/cmu/README.md):
# there ``LeftShoulder`` is the clavicle (the arm joint is ``LeftArm``) and ``Neck`` the lower neck
# (the upper neck is ``Neck1``); its frame 0 is a converter T-pose, not captured data.
H36M_FROM_CMU_MOTIONBUILDER = (
    "Hips", "RightUpLeg", "RightLeg", "RightFoot", "LeftUpLeg", "LeftLeg", "LeftFoot",
    "Spine", "Neck1", "Head", "Head_end", "LeftArm", "LeftForeArm", "LeftHand",
    "RightArm", "RightForeArm", "RightHand",
)

_CHANNELS = {c.lower(): c for c in ("Xposition", "Yposition", "Zposition",
                                    "Xrotation", "Yrotation", "Zrotation")}


@dataclass(frozen=True, eq=False)
class Bvh:
    """A parsed BVH file. Joints are in file order (parents before children)."""

    names: tuple[str, ...]
    parents: np.ndarray  # (J,) int, -1 for the root
    offsets: np.ndarray  # (J, 3)
    channels: tuple[tuple[str, ...], ...]  # per joint, in file order
    motion: np.ndarray  # (F, C) all channel values
    frame_time: float  # seconds
    end_parents: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (E,)
    end_offsets: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))  # (E, 3)

    @property
    def num_frames(self) -> int:
        return int(self.motion.shape[0])

    @property
    def num_joints(self) -> int:
        return len(self.names)

    @property
    def fps(self) -> float:
        return 1.0 / self.frame_time

    @property
    def end_names(self) -> tuple[str, ...]:
        return tuple(f"{self.names[p]}_end" for p in self.end_parents)


class _Tokens:
    """Whitespace tokens of the HIERARCHY part, with their 1-based line numbers."""

    def __init__(self, lines: list[str], where: str):
        self.toks = [(t, n + 1) for n, line in enumerate(lines) for t in line.split()]
        self.i = 0
        self.where = where

    def next(self, what: str) -> tuple[str, int]:
        if self.i >= len(self.toks):
            raise InputError(f"{self.where}: file ends inside the HIERARCHY section, expected "
                             f"{what} (truncated file?)")
        self.i += 1
        return self.toks[self.i - 1]

    def expect(self, word: str):
        tok, line = self.next(repr(word))
        if tok != word:
            raise InputError(f"{self.where}:{line}: found {tok!r}, expected {word!r}")

    def numbers(self, n: int, what: str) -> list[float]:
        out = []
        for _ in range(n):
            tok, line = self.next(what)
            try:
                out.append(float(tok))
            except ValueError:
                raise InputError(f"{self.where}:{line}: found {tok!r}, expected {what}") from None
            if not np.isfinite(out[-1]):
                raise InputError(f"{self.where}:{line}: {what} is {tok}, expected a finite number")
        return out


def _parse_joint(tk: _Tokens, name: str, parent: int, out: dict):
    index = len(out["names"])
    out["names"].append(name)
    out["parents"].append(parent)
    out["offsets"].append(None)
    out["channels"].append(())
    tk.expect("{")
    while True:
        tok, line = tk.next("OFFSET, CHANNELS, JOINT, End Site or '}'")
        if tok == "}":
            break
        if tok == "OFFSET":
            if out["offsets"][index] is not None:
                raise InputError(f"{tk.where}:{line}: second OFFSET for joint {name!r}, "
                                 f"expected one")
            out["offsets"][index] = tk.numbers(3, "an OFFSET number")
        elif tok == "CHANNELS":
            count = tk.numbers(1, "a channel count")[0]
            chans = []
            for _ in range(int(count)):
                c, cl = tk.next("a channel name")
                if c.lower() not in _CHANNELS:
                    raise InputError(f"{tk.where}:{cl}: unknown channel {c!r}, expected one of "
                                     f"{list(_CHANNELS.values())}")
                chans.append(_CHANNELS[c.lower()])
            out["channels"][index] = tuple(chans)
        elif tok == "JOINT":
            child, _ = tk.next("a joint name")
            _parse_joint(tk, child, index, out)
        elif tok == "End":
            tk.expect("Site")
            tk.expect("{")
            tk.expect("OFFSET")
            out["end_parents"].append(index)
            out["end_offsets"].append(tk.numbers(3, "an OFFSET number"))
            tk.expect("}")
        else:
            raise InputError(f"{tk.where}:{line}: found {tok!r} in joint {name!r}, expected "
                             f"OFFSET, CHANNELS, JOINT, End Site or '}}'")
    if out["offsets"][index] is None:
        raise InputError(f"{tk.where}: joint {name!r} has no OFFSET, expected one")


def read_bvh(path) -> Bvh:
    """Parse a BVH file; malformed or truncated files raise InputError with the line number."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found, expected a .bvh file")
    try:
        lines = path.read_text(encoding="utf-8", errors="strict").splitlines()
    except (UnicodeDecodeError, OSError) as exc:
        raise InputError(f"{path}: cannot be read as text ({type(exc).__name__}), expected a "
                         f".bvh file") from None
    where = str(path)
    motion_at = next((n for n, l in enumerate(lines) if l.strip() == "MOTION"), None)
    if motion_at is None:
        raise InputError(f"{where}: no MOTION section, expected HIERARCHY ... MOTION "
                         f"(truncated file?)")
    tk = _Tokens(lines[:motion_at], where)
    tk.expect("HIERARCHY")
    tk.expect("ROOT")
    root, _ = tk.next("the root joint name")
    out = {k: [] for k in ("names", "parents", "offsets", "channels", "end_parents",
                           "end_offsets")}
    _parse_joint(tk, root, -1, out)
    if tk.i < len(tk.toks):
        tok, line = tk.toks[tk.i]
        raise InputError(f"{where}:{line}: found {tok!r} after the root joint, expected MOTION "
                         f"(one ROOT per file)")

    def header(n: int, label: str) -> str:
        if n >= len(lines) or not lines[n].strip().startswith(label):
            found = lines[n].strip() if n < len(lines) else "end of file"
            raise InputError(f"{where}:{n + 1}: found {found!r}, expected '{label} ...'")
        return lines[n].split(":", 1)[1].strip()

    text = header(motion_at + 1, "Frames:")
    if not text.isdigit():
        raise InputError(f"{where}:{motion_at + 2}: frame count {text!r}, expected an integer")
    frames = int(text)
    text = header(motion_at + 2, "Frame Time:")
    try:
        frame_time = float(text)
    except ValueError:
        frame_time = float("nan")
    if not np.isfinite(frame_time) or frame_time <= 0:
        raise InputError(f"{where}:{motion_at + 3}: frame time {text!r}, expected seconds > 0")

    num_ch = sum(len(c) for c in out["channels"])
    first = motion_at + 3
    body = [(n, l) for n, l in enumerate(lines[first:], start=first + 1) if l.strip()]
    if len(body) != frames:
        raise InputError(f"{where}: {len(body)} frame lines after line {first}, expected "
                         f"{frames} (the 'Frames:' count; truncated file?)")
    motion = np.empty((frames, num_ch), dtype=np.float64)
    for f, (n, l) in enumerate(body):
        parts = l.split()
        if len(parts) != num_ch:
            raise InputError(f"{where}:{n}: frame {f} has {len(parts)} values, expected "
                             f"{num_ch} (one per channel)")
        try:
            motion[f] = [float(v) for v in parts]
        except ValueError:
            raise InputError(f"{where}:{n}: frame {f} holds a non-number, expected {num_ch} "
                             f"numbers") from None
        if not np.isfinite(motion[f]).all():
            raise InputError(f"{where}:{n}: frame {f} holds NaN or inf, expected finite values")
    return Bvh(tuple(out["names"]), np.array(out["parents"], np.int64),
               np.array(out["offsets"], np.float64), tuple(out["channels"]), motion,
               frame_time, np.array(out["end_parents"], np.int64),
               np.array(out["end_offsets"], np.float64).reshape(-1, 3))


def _axis_rotation(axis: str, deg: np.ndarray) -> np.ndarray:
    """(F, 3, 3) rotation matrices about one axis by ``deg`` degrees (right-handed)."""
    r = np.deg2rad(deg)
    c, s = np.cos(r), np.sin(r)
    m = np.zeros(deg.shape + (3, 3))
    i, j = {"X": (1, 2), "Y": (2, 0), "Z": (0, 1)}[axis]
    k = 3 - i - j
    m[:, k, k] = 1
    m[:, i, i], m[:, i, j], m[:, j, i], m[:, j, j] = c, -s, s, c
    return m


def forward_kinematics(bvh: Bvh, scale: float = 1.0, end_sites: bool = False) -> np.ndarray:
    """World joint positions ``(F, J, 3)`` times ``scale``; with ``end_sites`` the End Sites
    follow as ``(F, J + E, 3)`` (names in ``bvh.end_names``)."""
    frames = bvh.num_frames
    pos = np.zeros((frames, bvh.num_joints, 3))
    rot = np.zeros((frames, bvh.num_joints, 3, 3))
    col = 0
    for j, (parent, chans) in enumerate(zip(bvh.parents, bvh.channels)):
        local_r = np.broadcast_to(np.eye(3), (frames, 3, 3))
        trans = np.broadcast_to(bvh.offsets[j], (frames, 3)).copy()
        for ch in chans:
            values = bvh.motion[:, col]
            col += 1
            if ch.endswith("rotation"):
                local_r = local_r @ _axis_rotation(ch[0], values)
            else:
                trans[:, "XYZ".index(ch[0])] += values
        if parent < 0:
            pos[:, j], rot[:, j] = trans, local_r
        else:
            pos[:, j] = pos[:, parent] + np.einsum("fab,fb->fa", rot[:, parent], trans)
            rot[:, j] = rot[:, parent] @ local_r
    if end_sites and len(bvh.end_parents):
        ends = pos[:, bvh.end_parents] + np.einsum(
            "feab,eb->fea", rot[:, bvh.end_parents], bvh.end_offsets)
        pos = np.concatenate([pos, ends], axis=1)
    return pos * scale


def bvh_to_h36m(bvh: Bvh, scale: float = CMU_SCALE) -> np.ndarray:
    """H36M-17 joint positions ``(F, 17, 3)`` in metres (Y up, as in the file) from a CMU BVH."""
    names = bvh.names + bvh.end_names
    motionbuilder = "RightUpLeg" in names
    wanted = H36M_FROM_CMU_MOTIONBUILDER if motionbuilder else H36M_FROM_CMU
    missing = [n for n in wanted if n not in names]
    if missing:
        raise InputError(f"BVH lacks joints {missing}, expected the CMU skeleton "
                         f"(cgspeed conversion) names {list(wanted)}")
    pos = forward_kinematics(bvh, scale, end_sites=True)[:, [names.index(n) for n in wanted]]
    if motionbuilder:
        if len(pos) < 2:
            raise InputError("BVH (MotionBuilder release) has no frame after its T-pose frame 0")
        pos = pos[1:]  # frame 0 is the converter's T-pose
    return pos


def _resample_positions(x: np.ndarray, fps_old: float, fps_new: float) -> np.ndarray:
    if fps_new == fps_old:
        return x
    i0, i1, a = time_grid(len(x), fps_old, fps_new)
    a = a[:, None, None]
    return (1 - a) * x[i0] + a * x[i1]


def load_motion(path, fps: float, scale: float = CMU_SCALE) -> np.ndarray:
    """H36M-17 3D motion ``(T, 17, 3)`` float32 in metres at ``fps``, linearly resampled.

    Reads a CMU ``.bvh`` (positions times ``scale``) or an ``.npz`` with ``joints3d`` (T,17,3)
    metres and ``fps``.
    """
    path = Path(path)
    fps = float(fps)
    if not np.isfinite(fps) or fps <= 0:
        raise InputError(f"load_motion: fps is {fps}, expected a finite number > 0")
    suffix = path.suffix.lower()
    if suffix == ".bvh":
        bvh = read_bvh(path)
        joints, src_fps = bvh_to_h36m(bvh, scale), bvh.fps
    elif suffix == ".npz":
        if not path.is_file():
            raise InputError(f"{path}: file not found, expected an .npz with joints3d and fps")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except Exception as exc:
            raise InputError(f"{path}: cannot be read as an npz archive "
                             f"({' '.join(str(exc).split())})") from None
        for key in ("joints3d", "fps"):
            if key not in arrays:
                raise InputError(f"{path}: missing key '{key}', expected joints3d (T, 17, 3) "
                                 f"metres and fps")
        joints = arrays["joints3d"]
        if joints.dtype.kind not in "fiu" or joints.ndim != 3 or joints.shape[1:] != (17, 3) \
                or len(joints) < 1:
            raise InputError(f"{path}: key 'joints3d' has shape {joints.shape} and dtype "
                             f"{joints.dtype}, expected numbers of shape (T, 17, 3)")
        if not np.isfinite(joints).all():
            raise InputError(f"{path}: key 'joints3d' holds NaN or inf, expected finite metres")
        src = arrays["fps"]
        if src.dtype.kind not in "fiu" or src.size != 1 or not np.isfinite(src).all() \
                or float(src.reshape(())) <= 0:
            raise InputError(f"{path}: key 'fps' is {src!r}, expected one finite number > 0")
        src_fps = float(src.reshape(()))
    else:
        raise InputError(f"{path}: unsupported motion file type {suffix!r}, expected .bvh or .npz")
    return _resample_positions(np.asarray(joints, np.float64), src_fps, fps).astype(np.float32)
