"""Accuracy and smoothness of the pose stack against true 3D motion (``fpengine eval-pose``).

Protocol for one clip (a motion, or the time range [t0, t1] of one): the motion is resampled to
the model's fps at ``phases`` temporal phase offsets and seen by ``cameras`` fixed pinhole cameras
(yaw spread evenly around the subject, 10 deg elevation, 4 m, 1000 px image width and focal
length); the projected 2D gets Gaussian noise of ``noise_px`` pixels (seeded) and ``drop`` of the
joints lose their score. The stack runs as at inference (mean-pose prior, no M^-1 noise).

Metrics (pooled over every phase and camera of the clip):
- MPJPE (mm) of S_dd, S_pp, S_fused against the true root-relative joints in camera axes, after
  root alignment (joint 0 subtracted from both);
- joint acceleration |q[t+1] - 2 q[t] + q[t-1]| fps^2 (m/s^2) of the root-aligned joints: mean
  and 95th percentile over joints and frames (a jitter measure), also of the true motion;
- bone-length standard deviation over time (mm), averaged over the 16 bones;
- 2D reprojection error (px) of S_fused (and S_dd) against the input 2D: the clip's pinhole
  camera (known K, fitted translation, as ``fpengine poses`` does) over the visible joints.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from finephys.poses.camera import fit_and_project
from finephys.errors import InputError
from finephys.model.lifter import normalise_2d
from finephys.training.pose_data import BONES, Motion, frames_in, place_cameras, project, sample_at

EVAL_WIDTH = 1000.0


def root_align(s: np.ndarray) -> np.ndarray:
    return s - s[..., :1, :]


def mpjpe_mm(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Per-joint position errors (mm) after root alignment, shape (..., J)."""
    return np.linalg.norm(root_align(pred) - root_align(true), axis=-1) * 1000.0


def joint_accelerations(s: np.ndarray, fps: float) -> np.ndarray:
    """|second difference| * fps^2 of root-aligned joints (..., T, J, 3) -> (..., T-2, J) m/s^2."""
    q = root_align(np.asarray(s, np.float64))
    return np.linalg.norm(q[..., 2:, :, :] - 2 * q[..., 1:-1, :, :] + q[..., :-2, :, :], axis=-1) * fps**2


def bone_lengths(s: np.ndarray) -> np.ndarray:
    """(..., T, J, 3) -> (..., T, 16) metres, bones of the H36M-17 skeleton."""
    return np.linalg.norm(s[..., BONES[:, 1], :] - s[..., BONES[:, 0], :], axis=-1)


def bone_std_mm(s: np.ndarray) -> float:
    """Standard deviation over time of every bone's length (mm), averaged over bones and clips."""
    return float(bone_lengths(np.asarray(s, np.float64)).std(axis=-2).mean() * 1000.0)


@dataclass(frozen=True)
class EvalInputs:
    true: np.ndarray  # (N,T,J,3) root-relative camera axes, metres
    keypoints: np.ndarray  # (N,T,J,2) pixels
    scores: np.ndarray  # (N,T,J)
    K: np.ndarray  # (N,3,3)
    width: float


def eval_inputs(motion: Motion, t0: float, t1: float, fps: float, phases: int = 4, cameras: int = 4,
                noise_px: float = 2.0, drop: float = 0.0, seed: int = 0, max_frames: int | None = None):
    """The fixed evaluation views of motion[t0, t1] (see the module docstring); None if the
    range holds fewer than 3 frames at ``fps``."""
    step = 1.0 / (fps * phases)
    frames = frames_in(t1 - t0 - (phases - 1) * step, fps)
    if max_frames is not None:
        frames = min(frames, max_frames)
    if frames < 3:
        return None
    times = t0 + np.arange(phases)[:, None] * step + np.arange(frames)[None] / fps
    world = np.repeat(sample_at(motion, times), cameras, axis=0)  # (P*C, T, J, 3)
    n = len(world)
    yaw = np.tile(2 * np.pi * np.arange(cameras) / cameras + 0.3, phases)
    cams = place_cameras(world, yaw, np.full(n, np.deg2rad(10.0)), np.zeros(n), np.full(n, 4.0),
                         np.full(n, EVAL_WIDTH), np.full(n, EVAL_WIDTH))
    uv, true = project(world, cams)
    rng = np.random.default_rng(seed)
    kp = uv + rng.normal(size=uv.shape) * noise_px
    keep = rng.random(uv.shape[:-1]) >= drop
    scores = keep.astype(np.float64)
    kp = np.where(keep[..., None], kp, 0.0)
    K = np.stack([cams.K(i) for i in range(n)])
    return EvalInputs(true, kp, scores, K, EVAL_WIDTH)


@torch.no_grad()
def run_stack(lifter, physnet, inputs: EvalInputs, fps: float, fuse_weight: float):
    """-> (s_dd, s_pp, s_fused) numpy (N,T,J,3), as at inference (prior prompt, no noise)."""
    kp = torch.as_tensor(inputs.keypoints, dtype=torch.float32)
    sc = torch.as_tensor(inputs.scores, dtype=torch.float32)
    s_dd = lifter(normalise_2d(kp, sc), sc)
    s_pp, s_fused, _ = physnet(s_dd, dt=1.0 / fps, fuse_weight=fuse_weight)
    return tuple(x.double().numpy() for x in (s_dd, s_pp, s_fused))


def reprojection_px(s: np.ndarray, inputs: EvalInputs) -> float:
    """Mean pixel distance between the projection of ``s`` and the visible input joints."""
    errs, weights = [], []
    for i in range(len(s)):
        proj = fit_and_project(torch.as_tensor(s[i:i + 1], dtype=torch.float32),
                               torch.as_tensor(inputs.keypoints[i:i + 1], dtype=torch.float32),
                               torch.as_tensor(inputs.scores[i:i + 1], dtype=torch.float32),
                               K=torch.as_tensor(inputs.K[i], dtype=torch.float32))[0].double().numpy()
        errs.append(np.linalg.norm(proj - inputs.keypoints[i], axis=-1))
        weights.append(inputs.scores[i] > 0)
    errs, weights = np.stack(errs), np.stack(weights)
    return float((errs * weights).sum() / max(weights.sum(), 1))


@dataclass(frozen=True)
class ClipMetrics:
    clip: str
    views: int
    frames: int
    mpjpe_dd: float
    mpjpe_pp: float
    mpjpe_fused: float
    accel_dd: float
    accel_pp: float
    accel_fused: float
    accel_true: float
    accel_p95_dd: float
    accel_p95_fused: float
    accel_p95_true: float
    bone_std_dd: float
    bone_std_fused: float
    bone_std_true: float
    reproj_dd: float
    reproj_fused: float

    def to_dict(self) -> dict:
        return asdict(self)


def clip_metrics(name: str, inputs: EvalInputs, s_dd, s_pp, s_fused, fps: float) -> ClipMetrics:
    acc = {k: joint_accelerations(v, fps) for k, v in
           (("dd", s_dd), ("pp", s_pp), ("fused", s_fused), ("true", inputs.true))}
    return ClipMetrics(
        clip=name, views=len(s_dd), frames=s_dd.shape[1],
        mpjpe_dd=float(mpjpe_mm(s_dd, inputs.true).mean()),
        mpjpe_pp=float(mpjpe_mm(s_pp, inputs.true).mean()),
        mpjpe_fused=float(mpjpe_mm(s_fused, inputs.true).mean()),
        accel_dd=float(acc["dd"].mean()), accel_pp=float(acc["pp"].mean()),
        accel_fused=float(acc["fused"].mean()), accel_true=float(acc["true"].mean()),
        accel_p95_dd=float(np.percentile(acc["dd"], 95)),
        accel_p95_fused=float(np.percentile(acc["fused"], 95)),
        accel_p95_true=float(np.percentile(acc["true"], 95)),
        bone_std_dd=bone_std_mm(s_dd), bone_std_fused=bone_std_mm(s_fused),
        bone_std_true=bone_std_mm(inputs.true),
        reproj_dd=reprojection_px(s_dd, inputs), reproj_fused=reprojection_px(s_fused, inputs),
    )


def evaluate(lifter, physnet, motions: list[Motion], fps: float, fuse_weight: float, tail: float = 1.0,
             phases: int = 4, cameras: int = 4, noise_px: float = 2.0, drop: float = 0.0,
             seed: int = 0) -> list[ClipMetrics]:
    """Metrics of every motion (its last ``tail`` fraction), then the frame-weighted mean."""
    if not 0 < tail <= 1:
        raise InputError(f"tail: {tail}, expected a fraction in (0, 1]")
    results = []
    for k, m in enumerate(motions):
        t0 = m.duration * (1 - tail)
        inputs = eval_inputs(m, t0, m.duration, fps, phases, cameras, noise_px, drop, seed + k)
        if inputs is None:
            part = f"its last {tail:g}" if tail < 1 else "it"
            raise InputError(f"{m.name}: {part} spans {m.duration * tail:.3f} s, fewer than 3 frames "
                             f"at {fps:g} fps ({phases} phases), expected a longer motion")
        outs = run_stack(lifter, physnet, inputs, fps, fuse_weight)
        results.append(clip_metrics(m.name, inputs, *outs, fps))
    return results


def mean_row(results: list[ClipMetrics], name: str = "mean") -> ClipMetrics:
    """Mean of every metric, weighted by views x frames."""
    w = np.array([r.views * r.frames for r in results], np.float64)
    vals = {}
    for key, value in results[0].to_dict().items():
        if isinstance(value, float):
            vals[key] = float(np.dot(w, [getattr(r, key) for r in results]) / w.sum())
    return ClipMetrics(clip=name, views=sum(r.views for r in results),
                       frames=int(round(np.dot(w, [r.frames for r in results]) / w.sum())), **vals)


def format_table(results: list[ClipMetrics]) -> str:
    head = ("clip", "views x T", "MPJPE dd/pp/fused mm", "accel dd/fused/true m/s2",
            "p95 dd/fused/true", "bone std dd/fused/true mm", "reproj dd/fused px")
    rows = [head]
    for r in results:
        rows.append((
            r.clip, f"{r.views}x{r.frames}",
            f"{r.mpjpe_dd:.1f} / {r.mpjpe_pp:.1f} / {r.mpjpe_fused:.1f}",
            f"{r.accel_dd:.2f} / {r.accel_fused:.2f} / {r.accel_true:.2f}",
            f"{r.accel_p95_dd:.2f} / {r.accel_p95_fused:.2f} / {r.accel_p95_true:.2f}",
            f"{r.bone_std_dd:.1f} / {r.bone_std_fused:.1f} / {r.bone_std_true:.1f}",
            f"{r.reproj_dd:.2f} / {r.reproj_fused:.2f}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)
