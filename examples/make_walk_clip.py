"""Make examples/walk.npz: 24 frames (8 fps) of real walking from CMU mocap, as a 2D clip.

    python examples/make_walk_clip.py [BVH] [--out examples/walk.npz]

Steps: BVH -> forward kinematics -> H36M-17 metres (Y up) -> 8 fps -> the 24-frame window with
the fastest mean horizontal pelvis speed -> pinhole camera (f = 256 px, 256x256 image) placed
4 m from the centre of the box the window's joints sweep, 1 m high, looking at it from the subject's left and
30 degrees towards their front -> projection -> clip.npz v1 (layout h36m17, all scores 1).
"""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from finephys.poses.bvh import load_motion
from finephys.poses.clip import PoseClip, save_clip

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BVH = ROOT.parent / "shared" / "data" / "motion" / "131_01.bvh"
FPS, FRAMES, SIZE, FOCAL = 8.0, 24, (256, 256), 256.0
DISTANCE, HEIGHT, YAW_DEG = 4.0, 1.0, 30.0


def walking_window(joints: np.ndarray, frames: int) -> int:
    """Start of the ``frames``-long window with the highest mean horizontal pelvis speed."""
    step = np.linalg.norm(np.diff(joints[:, 0, [0, 2]], axis=0), axis=1)
    means = np.convolve(step, np.ones(frames - 1) / (frames - 1), mode="valid")
    return int(np.argmax(means))


def look_at(camera: np.ndarray, target: np.ndarray) -> np.ndarray:
    """World (Y up) -> camera (x right, y down, z forward) rotation, rows = camera axes."""
    forward = (target - camera) / np.linalg.norm(target - camera)
    right = np.cross(forward, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    return np.stack([right, down, forward])


def project(points: np.ndarray, rot: np.ndarray, camera: np.ndarray, k: np.ndarray) -> np.ndarray:
    cam = (points - camera) @ rot.T
    uv = cam[..., :2] / cam[..., 2:3]
    return uv * np.array([k[0, 0], k[1, 1]]) + k[:2, 2]


def make_clip(bvh_path: Path) -> tuple[PoseClip, int]:
    joints = load_motion(bvh_path, FPS).astype(np.float64)  # (T, 17, 3) metres, Y up
    start = walking_window(joints, FRAMES)
    window = joints[start:start + FRAMES]
    lo, hi = window.reshape(-1, 3).min(axis=0), window.reshape(-1, 3).max(axis=0)
    target = (lo + hi) / 2  # centre of the box the window's joints sweep
    walk = window[-1, 0] - window[0, 0]
    walk[1] = 0.0
    walk /= np.linalg.norm(walk)
    left = np.cross([0.0, 1.0, 0.0], walk)  # facing `walk` with Y up, the subject's left
    yaw = np.deg2rad(YAW_DEG)
    direction = np.cos(yaw) * left + np.sin(yaw) * walk
    camera = target + DISTANCE * direction
    camera[1] = HEIGHT
    rot = look_at(camera, target)
    height, width = SIZE
    k = np.array([[FOCAL, 0, (width - 1) / 2], [0, FOCAL, (height - 1) / 2], [0, 0, 1.0]])
    uv = project(window, rot, camera, k).astype(np.float32)
    if uv.min() < 0 or uv[..., 0].max() > width - 1 or uv[..., 1].max() > height - 1:
        raise click.ClickException(f"projected pose leaves the {width}x{height} image")
    scores = np.ones(uv.shape[:2], np.float32)
    clip = PoseClip(uv, scores, "h36m17", SIZE, FPS, camera_matrix=k)
    return clip, start


@click.command()
@click.argument("bvh", type=click.Path(path_type=Path), default=DEFAULT_BVH)
@click.option("--out", type=click.Path(path_type=Path), default=ROOT / "examples" / "walk.npz",
              show_default=True)
def main(bvh: Path, out: Path) -> None:
    clip, start = make_clip(bvh)
    save_clip(clip, out, overwrite=True)
    kp = clip.keypoints
    click.echo(f"wrote {out}: {clip.num_frames} frames at {clip.fps:g} fps, image "
               f"{clip.image_size} (h, w), window = frames {start}-{start + FRAMES - 1} at "
               f"{FPS:g} fps ({start / FPS:.3f}-{(start + FRAMES - 1) / FPS:.3f} s), "
               f"x {kp[..., 0].min():.0f}-{kp[..., 0].max():.0f}, "
               f"y {kp[..., 1].min():.0f}-{kp[..., 1].max():.0f} px")


if __name__ == "__main__":
    main()
