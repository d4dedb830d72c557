"""Real 3D motion -> training and evaluation samples for the pose stack.

Motion sources (``find_motion``): CMU BVH files (forward kinematics -> H36M-17), ``.npz`` files
with ``joints3d`` (T,17,3) metres (Y up) and ``fps``, and CMU Panoptic ``hdPose3d_stage1_coco19``
folders (one sequence per body; COCO-19 -> COCO-17 -> H36M-17, cm -> m, y down -> Y up). A
directory argument is searched recursively for all three.

Samples: a window of world motion (metres, Y up) is seen by a pinhole camera: rotation about the
vertical (yaw), elevation, roll, distance to the window's centre, focal length ~ image width. The
targets are the root-relative joints in camera axes (x right, y down, z forward); the inputs are
the projected pixels with detector-like noise and dropped joints (score 0).
"""
from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from finephys.poses.bvh import bvh_to_h36m, load_motion, read_bvh
from finephys.poses.camera import turn_towards
from finephys.errors import InputError
from finephys.poses.layouts import H36M17, convert_keypoints

PANOPTIC_FPS = 29.97
MAX_MOTION_M = 1e3  # joints farther from the origin are no metres of a person (a file in other units, or garbage)
# COCO-17 from Panoptic's COCO-19 (data/motion/README.md).
COCO19_TO_COCO17 = (1, 15, 17, 16, 18, 3, 9, 4, 10, 5, 11, 6, 12, 7, 13, 8, 14)
FLIP = np.array(H36M17.flip)
BONES = np.array(H36M17.edges)  # (16, 2) parent, child
_PANOPTIC_FILE = re.compile(r"body3DScene_(\d+)\.json")


@dataclass(frozen=True, eq=False)
class Motion:
    """One 3D joint sequence at its own frame rate: H36M-17, metres, Y up."""

    name: str
    joints: np.ndarray  # (F, 17, 3) float64
    fps: float

    @property
    def duration(self) -> float:
        return (len(self.joints) - 1) / self.fps


def check_motion(motion: Motion) -> Motion:
    """Refuse joints that are not finite metres within ``MAX_MOTION_M`` of the origin."""
    if not np.isfinite(motion.joints).all():
        raise InputError(f"{motion.name}: joint coordinates hold NaN or inf, expected finite metres")
    peak = float(np.abs(motion.joints).max(initial=0.0))
    if peak > MAX_MOTION_M:
        raise InputError(f"{motion.name}: joint coordinates reach {peak:.3g} m, expected metres with "
                         f"|x| <= {MAX_MOTION_M:,.0f} (H36M-17, Y up)")
    return motion


def _npz_fps(path: Path) -> float:
    """The npz's own fps when readable; else 1.0 and ``load_motion`` names the problem."""
    try:
        with np.load(path, allow_pickle=False) as data:
            fps = float(np.asarray(data["fps"]).reshape(()))
        if np.isfinite(fps) and fps > 0:
            return fps
    except Exception:  # noqa: BLE001 - load_motion reports the problem precisely
        pass
    return 1.0


def read_motion_file(path) -> Motion:
    """A ``.bvh`` or ``.npz`` motion file at its own frame rate."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".bvh":
        bvh = read_bvh(path)
        try:
            joints, fps = bvh_to_h36m(bvh), bvh.fps
        except InputError as exc:
            raise InputError(f"{path}: {exc}") from None
    elif suffix == ".npz":
        if not path.is_file():
            raise InputError(f"{path}: file not found, expected an .npz with joints3d and fps")
        fps = _npz_fps(path)
        joints = load_motion(path, fps)
    else:
        raise InputError(f"{path}: unsupported motion file type {suffix!r}, expected .bvh, .npz "
                         f"or a Panoptic hdPose3d_stage1_coco19 folder")
    return check_motion(Motion(str(path), np.asarray(joints, np.float64), float(fps)))


def read_panoptic(folder) -> list[Motion]:
    """One Motion per body id and run of consecutive frames of a Panoptic coco19 folder."""
    folder = Path(folder)
    files = sorted((int(m.group(1)), p) for p in folder.iterdir()
                   if (m := _PANOPTIC_FILE.fullmatch(p.name)))
    if not files:
        raise InputError(f"{folder}: no body3DScene_*.json files, expected a Panoptic "
                         f"hdPose3d_stage1_coco19 folder")
    tracks: dict[int, list[tuple[int, np.ndarray]]] = {}
    for frame, path in files:
        try:
            scene = json.loads(path.read_text())
            bodies = [(int(b["id"]), np.asarray(b["joints19"], np.float64)) for b in scene["bodies"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{path}: not a Panoptic body3DScene file ({type(exc).__name__}), "
                             f"expected bodies[].joints19") from None
        for body, j19 in bodies:
            if j19.size != 76 or not np.isfinite(j19).all():
                raise InputError(f"{path}: body {body} joints19 has {j19.size} values or non-finite "
                                 f"ones, expected 19 x [x, y, z, conf] finite numbers")
            j19 = j19.reshape(19, 4)
            if (j19[:, 3] < 0).any():  # a joint the reconstruction lost: ends the run
                continue
            tracks.setdefault(body, []).append((frame, j19[list(COCO19_TO_COCO17), :3]))
    out = []
    for body, items in sorted(tracks.items()):
        runs, run = [], [items[0]]
        for item in items[1:]:
            if item[0] == run[-1][0] + 1:
                run.append(item)
            else:
                runs.append(run)
                run = [item]
        runs.append(run)
        for run in runs:
            coco = np.stack([x for _, x in run]) / 100.0  # cm -> m
            h36m, _ = convert_keypoints(coco, np.ones(coco.shape[:2]), "coco17", "h36m17")
            h36m = h36m * np.array([1.0, -1.0, -1.0])  # y down -> Y up (a rotation about x)
            out.append(check_motion(Motion(f"{folder}:body{body}:{run[0][0]}-{run[-1][0]}", h36m, PANOPTIC_FPS)))
    return out


def find_motion(paths) -> list[Motion]:
    """Motion files and folders (searched recursively) -> Motion sequences, in a fixed order."""
    out = []
    for path in map(Path, paths):
        if path.is_dir():
            if any(_PANOPTIC_FILE.fullmatch(p.name) for p in path.iterdir()):
                out += read_panoptic(path)
                continue
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in (".bvh", ".npz"))
            panoptic = sorted({p.parent for p in path.rglob("body3DScene_*.json")})
            if not found and not panoptic:
                raise InputError(f"{path}: no .bvh, .npz or Panoptic body3DScene_*.json files "
                                 f"in this folder, expected motion files")
            out += [read_motion_file(p) for p in found]
            for p in panoptic:
                out += read_panoptic(p)
        elif path.exists():
            out.append(read_motion_file(path))
        else:
            raise InputError(f"{path}: not found, expected a motion file (.bvh, .npz) or folder")
    return out


def sample_at(motion: Motion, times: np.ndarray) -> np.ndarray:
    """Joint positions at ``times`` seconds (any shape), linear in time -> times.shape + (17, 3)."""
    pos = np.clip(np.asarray(times, np.float64) * motion.fps, 0, len(motion.joints) - 1)
    i0 = np.floor(pos).astype(np.int64)
    i1 = np.minimum(i0 + 1, len(motion.joints) - 1)
    a = (pos - i0)[..., None, None]
    return (1 - a) * motion.joints[i0] + a * motion.joints[i1]


def frames_in(seconds: float, fps: float) -> int:
    """How many frames at ``fps`` fit in a time span of ``seconds``."""
    return int(np.floor(seconds * fps + 1e-6)) + 1


def mirror(world: np.ndarray) -> np.ndarray:
    """Left-right mirror of (..., 17, 3) world joints: x -> -x, left and right joints swapped."""
    out = world[..., FLIP, :].copy()
    out[..., 0] *= -1
    return out


@dataclass(frozen=True)
class Cameras:
    """N pinhole cameras: world -> camera rotation R (N,3,3) (rows = x right, y down, z forward),
    centre C (N,3) metres, focal f (N,) and principal point c (N,2) pixels, image width (N,)."""

    R: np.ndarray
    C: np.ndarray
    f: np.ndarray
    c: np.ndarray
    width: np.ndarray

    def K(self, i: int) -> np.ndarray:
        return self.matrices()[i]

    def matrices(self) -> np.ndarray:
        """(N,3,3) the camera matrices."""
        K = np.zeros((len(self.f), 3, 3))
        K[:, 0, 0] = K[:, 1, 1] = self.f
        K[:, :2, 2] = self.c
        K[:, 2, 2] = 1.0
        return K


def look_rotation(yaw, elevation, roll) -> np.ndarray:
    """(N,) radians -> (N,3,3) world (Y up) -> camera rotations; elevation > 0 looks down."""
    yaw, elevation, roll = (np.asarray(v, np.float64) for v in (yaw, elevation, roll))
    fwd = np.stack([np.sin(yaw) * np.cos(elevation), -np.sin(elevation),
                    np.cos(yaw) * np.cos(elevation)], -1)
    right = np.cross(fwd, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right, axis=-1, keepdims=True)
    down = np.cross(fwd, right)
    rot = np.stack([right, down, fwd], -2)
    c, s = np.cos(roll), np.sin(roll)
    z = np.zeros_like(c)
    rz = np.stack([np.stack([c, -s, z], -1), np.stack([s, c, z], -1),
                   np.stack([z, z, z + 1], -1)], -2)
    return rz @ rot


def place_cameras(world, yaw, elevation, roll, distance, width, focal, min_depth=1.0) -> Cameras:
    """Cameras looking at the centre of each window's pelvis path, ``distance`` metres away,
    moved back where a joint would come closer than ``min_depth``. world (N,T,J,3)."""
    rot = look_rotation(yaw, elevation, roll)
    target = world[:, :, 0].mean(1)
    centre = target - distance[:, None] * rot[:, 2]
    depth = np.einsum("ntjk,nk->ntj", world - centre[:, None, None], rot[:, 2]).min(axis=(1, 2))
    centre = centre - np.maximum(min_depth - depth, 0)[:, None] * rot[:, 2]
    width = np.asarray(width, np.float64)
    c = np.stack([width / 2, width * 0.75 / 2], -1)
    return Cameras(rot, centre, np.asarray(focal, np.float64), c, width)


def framed_cameras(world, yaw, elevation, roll, image_wh, focal, person_px, centre_uv, min_depth=1.0) -> Cameras:
    """Cameras that frame each window's person at a given size and place: ``image_wh`` (N,2)
    pixels, ``focal`` (N,) pixels, ``person_px`` (N,) the person's height in the image (the
    window's tallest vertical extent in pixels), ``centre_uv`` (N,2) where the centre of the
    pelvis path lands. The camera first looks at the person from ``yaw`` / ``elevation`` /
    ``roll`` (as ``place_cameras``), then turns so the person is off-centre as asked: an
    off-centre person is seen obliquely, as through a real lens. The distance is then set so
    the person is ``person_px`` tall as seen (an oblique view stretches the image)."""
    world = np.asarray(world, np.float64)
    image_wh = np.asarray(image_wh, np.float64)
    focal = np.asarray(focal, np.float64)
    person_px = np.asarray(person_px, np.float64)
    c = image_wh / 2
    d = np.concatenate([(np.asarray(centre_uv, np.float64) - c) / focal[:, None], np.ones((len(c), 1))], -1)
    turn = turn_towards(torch.as_tensor(d / np.linalg.norm(d, axis=-1, keepdims=True))).numpy()
    height_m = (world[..., 1].max(-1) - world[..., 1].min(-1)).max(-1)  # (N,)
    distance = focal * height_m / person_px
    for _ in range(3):  # the seen height goes as 1 / distance, nearly: a few corrections
        cams = place_cameras(world, yaw, elevation, roll, distance, image_wh[:, 0], focal, min_depth)
        # world -> camera becomes turn @ R: the old optical axis (the person) now points along d.
        cams = Cameras(turn @ cams.R, cams.C, focal, c, image_wh[:, 0])
        distance = distance * person_height_px(project(world, cams)[0]) / person_px
    return cams


def random_cameras(rng: np.random.Generator, world: np.ndarray) -> Cameras:
    """Any framing: image width 256-3840 px (log-uniform; 16:9, 4:3, 1:1 or 9:16), focal
    0.5-3 x the width (wide to tele), the person 80-1000 px tall (at most 95% of the image
    height), anywhere in the frame; any yaw, elevation -5..35 deg, roll ~3 deg."""
    n = len(world)
    width = np.exp(rng.uniform(np.log(256), np.log(3840), n))
    aspect = rng.choice(np.array([16 / 9, 4 / 3, 1.0, 9 / 16]), n)
    wh = np.stack([width, width / aspect], -1)
    focal = width * np.exp(rng.uniform(np.log(0.5), np.log(3.0), n))
    person = np.minimum(np.exp(rng.uniform(np.log(80), np.log(1000), n)), 0.95 * wh[:, 1])
    margin = np.stack([np.minimum(person / 3, wh[:, 0] / 2), person / 2], -1)  # keep the body mostly inside
    centre = rng.uniform(margin, np.maximum(wh - margin, margin))
    return framed_cameras(world, rng.uniform(0, 2 * np.pi, n), np.deg2rad(rng.uniform(-5, 35, n)),
                          np.deg2rad(rng.normal(0, 3, n)), wh, focal, person, centre)


def project(world: np.ndarray, cams: Cameras):
    """world (N,T,J,3) -> (pixels (N,T,J,2), root-relative camera-axes joints (N,T,J,3))."""
    cam = np.einsum("nab,ntjb->ntja", cams.R, world - cams.C[:, None, None])
    uv = cam[..., :2] / cam[..., 2:3] * cams.f[:, None, None, None] + cams.c[:, None, None]
    return uv, cam - cam[:, :, :1]


def person_height_px(uv: np.ndarray) -> np.ndarray:
    """(N,T,J,2) pixels -> (N,) the person's height in the image: the tallest vertical extent."""
    return (uv[..., 1].max(-1) - uv[..., 1].min(-1)).max(-1)


def detector_noise(rng, uv, noise_px: float, drop: float):
    """Gaussian pixel noise (sigma up to ``noise_px`` at 1000 px person height, so in proportion
    to the person; 1% outliers at 5x), scores in 0.4-1, joints dropped with a per-clip rate up
    to ``drop`` (sometimes the legs)."""
    n, t, j, _ = uv.shape
    scale = (person_height_px(uv) / 1000.0)[:, None, None, None]
    sigma = rng.uniform(0, noise_px, (n, 1, 1, 1)) * scale
    sigma = sigma * np.where(rng.random((n, t, j, 1)) < 0.01, 5.0, 1.0)
    kp = uv + rng.normal(size=uv.shape) * sigma
    scores = rng.uniform(0.4, 1.0, (n, t, j))
    rate = rng.uniform(0, drop, (n, 1, 1))
    keep = rng.random((n, t, j)) >= rate
    legs = rng.random(n) < drop / 2  # legs out of view for the whole clip
    keep[legs, :, 1:7] = False
    scores = np.where(keep, scores, 0.0)
    kp = np.where(keep[..., None], kp, 0.0)
    return kp, scores


class WindowSampler:
    """Random windows of ``frames`` frames at ``fps`` from the time ranges [t0, t1] of motions,
    with temporal phase, speed (0.8-1.25 x), scale (0.9-1.1 x), mirroring and time reversal."""

    def __init__(self, ranges: list[tuple[Motion, float, float]], fps: float):
        self.ranges = ranges
        self.fps = fps

    def usable(self, frames: int, speed: float = 1.25) -> list[int]:
        need = (frames - 1) * speed / self.fps
        return [i for i, (_, t0, t1) in enumerate(self.ranges) if t1 - t0 >= need]

    def max_frames(self) -> int:
        return max((frames_in(t1 - t0, self.fps) for _, t0, t1 in self.ranges), default=0)

    def sample(self, rng: np.random.Generator, n: int, frames: int) -> np.ndarray:
        """(n, frames, 17, 3) world windows (metres, Y up)."""
        ids = self.usable(frames)
        if not ids:
            raise InputError(f"no training motion is long enough for {frames} frames at "
                             f"{self.fps:g} fps")
        span = np.array([self.ranges[i][2] - self.ranges[i][1] for i in ids])
        out = np.empty((n, frames, 17, 3))
        for k, pick in enumerate(rng.choice(len(ids), n, p=span / span.sum())):
            motion, t0, t1 = self.ranges[ids[pick]]
            speed = rng.uniform(0.8, 1.25)
            length = (frames - 1) * speed / self.fps
            start = rng.uniform(t0, max(t1 - length, t0))
            window = sample_at(motion, start + np.arange(frames) * speed / self.fps)
            root0 = window[:1, :1].copy()
            root0[..., 1] = 0.0
            window = (window - root0) * rng.uniform(0.9, 1.1) + root0
            if rng.random() < 0.5:
                window = mirror(window)
            if rng.random() < 0.5:
                window = window[::-1]
            out[k] = window
        return out


def split_ranges(motions: list[Motion], val_fraction: float):
    """(train ranges, held-out ranges): the last ``val_fraction`` of every motion is held out."""
    train, val = [], []
    for m in motions:
        cut = m.duration * (1.0 - val_fraction)
        if cut > 0:
            train.append((m, 0.0, cut))
        if val_fraction > 0:
            val.append((m, cut, m.duration))
    return train, val


def motion_stem(motion: Motion) -> str:
    """The file name of a motion without extension ('07_01'); a Panoptic body's is its folder's."""
    return Path(motion.name.split(":")[0]).stem


def check_apart(train: list[Motion], held: list[Motion], option: str) -> None:
    """Refuse held-out motion that is also trained on: the same joints, however the file was named."""
    seen = {}
    for m in train:
        seen.setdefault(m.joints.shape, []).append(m)
    for m in held:
        if any(np.array_equal(t.joints, m.joints) for t in seen.get(m.joints.shape, ())):
            raise InputError(f"{option}: the sequence {m.name} is also in the training motion; held-out motion "
                             f"must not be trained on (name other motion, or leave it out of the training set)")


def split_held_out(motions: list[Motion], patterns) -> tuple[list[Motion], list[Motion]]:
    """(kept, held out): motions whose ``motion_stem`` matches any glob pattern are held out."""
    patterns = list(patterns)
    for pat in patterns:
        if not any(fnmatch.fnmatchcase(motion_stem(m), pat) for m in motions):
            raise InputError(f"--hold-out {pat!r}: matches none of the {len(motions)} motion sequences, expected "
                             f"a file name pattern such as '09_11' or '05_0*'")
    held = [m for m in motions if any(fnmatch.fnmatchcase(motion_stem(m), p) for p in patterns)]
    if len(held) == len(motions) and motions:
        raise InputError(f"--hold-out {' '.join(patterns)}: holds out every motion sequence, expected some left "
                         f"to train on")
    return [m for m in motions if m not in held], held
