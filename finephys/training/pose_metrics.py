"""Accuracy and smoothness of the pose stack against true 3D motion (``fpengine eval-pose``).

Protocol for one clip (a motion, or the time range [t0, t1] of one): the motion is resampled to
the model's fps at ``phases`` temporal phase offsets and seen by ``cameras`` fixed pinhole cameras
of one named framing (``FRAMINGS``: yaw spread evenly around the subject from 0.3 rad, 10 deg
elevation, roll 0; image size, focal length, the person's height in the image and where the
centre of the pelvis path lands). The projected 2D gets Gaussian noise of sigma ``noise_px``
pixels per 1000 px of the person's height in that view (``person_height_px``; the ``legacy``
framing keeps the old meaning, plain pixels), seeded, and ``drop`` of the joints lose their
score. The stack runs as at inference (mean-pose prior, no M^-1 noise).

Metrics (pooled over every phase and camera of the clip):
- MPJPE (mm) of S_dd, S_pp, S_fused against the true root-relative joints in camera axes, after
  root alignment (joint 0 subtracted from both);
- joint acceleration |q[t+1] - 2 q[t] + q[t-1]| fps^2 (m/s^2) of the root-aligned joints: mean
  and 95th percentile over joints and frames (a jitter measure), also of the true motion;
- bone-length standard deviation over time (mm), averaged over the 16 bones;
- 2D reprojection error (px) of S_fused (and S_dd) against the input 2D: the view's pinhole
  camera (known K, per-frame translation fitted to the input 2D, as ``fpengine poses`` does)
  over the visible joints;
- foot skating and ground penetration of the ankles (H36M joints 3 and 6) in the world: the
  prediction placed with that same fitted translation, then camera -> world with the view's
  R and C (Y up). The floor of an ankle is its lowest true height in the clip (one phase's
  frames). Contact, judged on the TRUE motion per ankle and frame interval [t, t+1] at the model
  fps: the true ankle is within ``CONTACT_HEIGHT_M`` (5 cm) of its floor at t and at t+1 and
  moves horizontally slower than ``CONTACT_SPEED`` (0.5 m/s) over the interval. Skating (m/s) =
  the mean horizontal speed of the predicted ankle over the contact intervals; penetration (mm)
  = the mean depth of the predicted ankle below its floor (0 above it) over all frames and both
  ankles. Both also of the true motion (its penetration is 0 by the floor's definition).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from types import SimpleNamespace

import numpy as np
import torch

from finephys.errors import InputError
from finephys.poses.camera import fit_pinhole_translation, project_pinhole
from finephys.sampler.poses import lift_and_fuse
from finephys.training.motion_classes import CLASSES, action_class
from finephys.training.pose_data import (BONES, Cameras, Motion, framed_cameras, frames_in, person_height_px,
                                         place_cameras, project, sample_at)

ANKLES = (3, 6)  # H36M-17 right, left ankle
CONTACT_HEIGHT_M = 0.05
CONTACT_SPEED = 0.5  # m/s
ELEVATION_DEG = 10.0
YAW0 = 0.3  # radians: the first camera's yaw, the others spread evenly from it


@dataclass(frozen=True)
class Framing:
    """A fixed camera set: image (width, height) px, focal length as a multiple of the width,
    the person's height in the image (px), the pelvis-path centre as fractions of the image
    width and height from the top-left corner. ``person_px`` None: the legacy protocol, a
    camera 4 m from the pelvis-path centre looking straight at it (principal point at
    (width / 2, 0.75 width / 2), as ``place_cameras`` puts it)."""

    image_wh: tuple[int, int]
    focal: float
    person_px: float | None
    centre: tuple[float, float] = (0.5, 0.5)

    def describe(self) -> str:
        w, h = self.image_wh
        if self.person_px is None:
            return f"{w}x{h} image, focal {self.focal * w:g} px, 4 m away, centred"
        where = "centred" if self.centre == (0.5, 0.5) else \
            f"pelvis path at {self.centre[0]:.0%} / {self.centre[1]:.0%} of the width / height"
        return f"person {self.person_px:g} px tall in {w}x{h}, focal {self.focal:g} x width, {where}"


FRAMINGS = {
    "medium": Framing((1920, 1080), 1.0, 500),
    "small": Framing((1920, 1080), 1.0, 240),  # a broadcast framing
    "tiny": Framing((1920, 1080), 1.0, 100),
    "large": Framing((3840, 2160), 1.5, 1000),
    "off-centre": Framing((1920, 1080), 0.6, 400, (0.15, 0.30)),  # a wide lens
    "legacy": Framing((1000, 750), 1.0, None),  # the protocol before issue 22
}


def get_framing(name: str) -> Framing:
    if name not in FRAMINGS:
        raise InputError(f"--framing: {name!r}, expected one of {', '.join(FRAMINGS)}")
    return FRAMINGS[name]


def framing_cameras(world: np.ndarray, framing: str, cameras: int) -> Cameras:
    """The cameras of a framing for world windows (N,T,J,3), N a multiple of ``cameras``: view
    i gets the yaw of camera i % ``cameras``."""
    spec = get_framing(framing)
    n = len(world)
    yaw = np.tile(2 * np.pi * np.arange(cameras) / cameras + YAW0, n // cameras)
    elevation, roll = np.full(n, np.deg2rad(ELEVATION_DEG)), np.zeros(n)
    width = float(spec.image_wh[0])
    if spec.person_px is None:
        return place_cameras(world, yaw, elevation, roll, np.full(n, 4.0), np.full(n, width),
                             np.full(n, spec.focal * width))
    wh = np.tile(np.asarray(spec.image_wh, np.float64), (n, 1))
    focal, person = np.full(n, spec.focal * width), np.full(n, float(spec.person_px))
    return framed_cameras(world, yaw, elevation, roll, wh, focal, person, wh * np.asarray(spec.centre))


def noise_sigma_px(uv: np.ndarray, noise_px: float, framing: str) -> np.ndarray:
    """(N,) the noise sigma of every view: ``noise_px`` per 1000 px of the person's height in
    the clean 2D ``uv`` (N,T,J,2); plain ``noise_px`` in the legacy framing."""
    if get_framing(framing).person_px is None:
        return np.full(len(uv), float(noise_px))
    return noise_px * person_height_px(uv) / 1000.0


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


def horizontal_speed(p: np.ndarray, fps: float) -> np.ndarray:
    """World points (..., T, A, 3), Y up -> (..., T-1, A) speed in the ground plane (m/s)."""
    step = np.diff(np.asarray(p, np.float64)[..., [0, 2]], axis=-3)
    return np.linalg.norm(step, axis=-1) * fps


def floor_heights(true: np.ndarray) -> np.ndarray:
    """True world points (..., T, A, 3) -> (..., 1, A) their lowest height in the clip."""
    return true[..., 1].min(axis=-2, keepdims=True)


def contacts(true: np.ndarray, fps: float) -> np.ndarray:
    """True world ankles (..., T, A, 3) -> (..., T-1, A) bool: in contact over [t, t+1] (the
    module docstring's rule)."""
    low = true[..., 1] - floor_heights(true) <= CONTACT_HEIGHT_M
    return low[..., 1:, :] & low[..., :-1, :] & (horizontal_speed(true, fps) < CONTACT_SPEED)


def foot_skating(pred: np.ndarray, true: np.ndarray, fps: float) -> tuple[float, int]:
    """World ankles (..., T, A, 3) -> (mean horizontal speed m/s of ``pred`` over the contact
    intervals of ``true``, their number); NaN without contact."""
    mask = contacts(true, fps)
    count = int(mask.sum())
    return (float(horizontal_speed(pred, fps)[mask].mean()) if count else float("nan")), count


def penetration_mm(pred: np.ndarray, true: np.ndarray) -> float:
    """World ankles (..., T, A, 3) -> mean depth (mm) of ``pred`` below the true floor of each
    ankle (0 above it), over all frames and ankles."""
    return float(np.maximum(floor_heights(true) - pred[..., 1], 0.0).mean() * 1000.0)


def eval_frames(seconds: float, fps: float, phases: int) -> int:
    """Frames at ``fps`` that a span of ``seconds`` holds at every one of ``phases`` phases."""
    return frames_in(seconds - (phases - 1) / (fps * phases), fps)


@dataclass(frozen=True)
class EvalInputs:
    true: np.ndarray  # (N,T,J,3) root-relative camera axes, metres
    world: np.ndarray  # (N,T,J,3) true world joints, metres, Y up
    keypoints: np.ndarray  # (N,T,J,2) pixels
    scores: np.ndarray  # (N,T,J)
    cams: Cameras
    person_px: np.ndarray  # (N,) the person's height in the clean 2D of every view
    sigma_px: np.ndarray  # (N,) the 2D noise sigma of every view

    def K(self, i: int) -> np.ndarray:
        return self.cams.K(i)


def eval_inputs(motion: Motion, t0: float, t1: float, fps: float, phases: int = 4, cameras: int = 4,
                noise_px: float = 2.0, drop: float = 0.0, seed: int = 0, max_frames: int | None = None,
                framing: str = "medium"):
    """The fixed evaluation views of motion[t0, t1] (see the module docstring); None if the
    range holds fewer than 3 frames at ``fps``."""
    step = 1.0 / (fps * phases)
    frames = eval_frames(t1 - t0, fps, phases)
    if max_frames is not None:
        frames = min(frames, max_frames)
    if frames < 3:
        return None
    times = t0 + np.arange(phases)[:, None] * step + np.arange(frames)[None] / fps
    world = np.repeat(sample_at(motion, times), cameras, axis=0)  # (P*C, T, J, 3)
    cams = framing_cameras(world, framing, cameras)
    uv, true = project(world, cams)
    sigma = noise_sigma_px(uv, noise_px, framing)
    rng = np.random.default_rng(seed)
    kp = uv + rng.normal(size=uv.shape) * sigma[:, None, None, None]
    keep = rng.random(uv.shape[:-1]) >= drop
    kp = np.where(keep[..., None], kp, 0.0)
    return EvalInputs(true, world, kp, keep.astype(np.float64), cams, person_height_px(uv), sigma)


@torch.no_grad()
def run_stack(lifter, physnet, inputs: EvalInputs, fps: float, fuse_weight):
    """-> (s_dd, s_pp, s_fused) numpy (N,T,J,3), exactly as at inference (``lift_and_fuse``: the
    virtual camera of each view's known K, the mean-pose prompt, long clips lifted in windows of
    the trained length, no M^-1 noise)."""
    kp = torch.as_tensor(inputs.keypoints, dtype=torch.float32)
    sc = torch.as_tensor(inputs.scores, dtype=torch.float32)
    K = torch.as_tensor(inputs.cams.matrices(), dtype=torch.float32)
    stages = lift_and_fuse(SimpleNamespace(lifter=lifter, physnet=physnet), kp, sc, K, fps, fuse_weight)
    return tuple(x.double().numpy() for x in stages)


def _torch(x, i: int) -> torch.Tensor:
    return torch.as_tensor(x[i:i + 1], dtype=torch.float32)


def placed(s: np.ndarray, inputs: EvalInputs) -> np.ndarray:
    """Root-relative camera-axes joints (N,T,J,3) -> camera-axes joints: every view's per-frame
    translation fitted to its input 2D with the known K (``fit_pinhole_translation``)."""
    trans = [fit_pinhole_translation(_torch(s, i), _torch(inputs.keypoints, i), _torch(inputs.scores, i),
                                     K=torch.as_tensor(inputs.K(i), dtype=torch.float32))[0]
             for i in range(len(s))]
    return s + torch.stack(trans).double().numpy()[:, :, None, :]


def to_world(cam: np.ndarray, cams: Cameras) -> np.ndarray:
    """Camera-axes joints (N,T,J,3) -> world (Y up): the inverse of ``R (world - C)``."""
    return np.einsum("nba,ntjb->ntja", cams.R, cam) + cams.C[:, None, None]


def reprojection_px(cam: np.ndarray, inputs: EvalInputs) -> float:
    """Mean pixel distance between the projection of camera-axes joints ``cam`` (N,T,J,3) and
    the visible input joints."""
    errs = []
    for i in range(len(cam)):
        uv = project_pinhole(_torch(cam, i), torch.zeros(1, cam.shape[1], 3),
                             K=torch.as_tensor(inputs.K(i), dtype=torch.float32))[0].double().numpy()
        errs.append(np.linalg.norm(uv - inputs.keypoints[i], axis=-1))
    seen = inputs.scores > 0
    return float((np.stack(errs) * seen).sum() / max(seen.sum(), 1))


@dataclass(frozen=True)
class ClipMetrics:
    clip: str
    action_class: str
    framing: str
    noise_px: float
    views: int
    frames: int
    person_px: float
    sigma_px: float
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
    contacts: int
    skate_dd: float
    skate_pp: float
    skate_fused: float
    skate_true: float
    pen_dd: float
    pen_pp: float
    pen_fused: float
    pen_true: float

    def to_dict(self) -> dict:
        return asdict(self)


def clip_metrics(name: str, inputs: EvalInputs, s_dd, s_pp, s_fused, fps: float, framing: str = "medium",
                 noise_px: float = 2.0) -> ClipMetrics:
    outs = {"dd": s_dd, "pp": s_pp, "fused": s_fused}
    acc = {k: joint_accelerations(v, fps) for k, v in (*outs.items(), ("true", inputs.true))}
    cam = {k: placed(v, inputs) for k, v in outs.items()}
    ankles = {k: to_world(v, inputs.cams)[:, :, ANKLES] for k, v in cam.items()}
    ankles["true"] = inputs.world[:, :, ANKLES]
    skate = {k: foot_skating(v, ankles["true"], fps) for k, v in ankles.items()}
    return ClipMetrics(
        clip=name, action_class=action_class(name), framing=framing, noise_px=float(noise_px),
        views=len(s_dd), frames=s_dd.shape[1],
        person_px=float(inputs.person_px.mean()), sigma_px=float(inputs.sigma_px.mean()),
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
        reproj_dd=reprojection_px(cam["dd"], inputs), reproj_fused=reprojection_px(cam["fused"], inputs),
        contacts=skate["true"][1],
        **{f"skate_{k}": v[0] for k, v in skate.items()},
        **{f"pen_{k}": penetration_mm(v, ankles["true"]) for k, v in ankles.items()},
    )


def check_tail(tail: float) -> None:
    if not 0 < tail <= 1:
        raise InputError(f"--tail: {tail:g}, expected a fraction in (0, 1]")


def too_short(motion: Motion, fps: float, tail: float, phases: int) -> str | None:
    """Why ``motion``'s last ``tail`` cannot be evaluated (fewer than 3 frames at ``fps`` at
    every phase), or None."""
    span = motion.duration * tail
    if eval_frames(span, fps, phases) >= 3:
        return None
    part = f"its last {tail:g}" if tail < 1 else "it"
    return f"{motion.name}: {part} spans {span:.3f} s, fewer than 3 frames at {fps:g} fps ({phases} phases)"


def check_lengths(motions: list[Motion], fps: float, tail: float, phases: int) -> None:
    """Every motion's last ``tail`` holds >= 3 frames at ``fps`` at every phase, else InputError."""
    for m in motions:
        problem = too_short(m, fps, tail, phases)
        if problem is not None:
            raise InputError(f"{problem}, expected a longer motion")


def evaluate(lifter, physnet, motions: list[Motion], fps: float, fuse_weight, tail: float = 1.0,
             phases: int = 4, cameras: int = 4, noise_px: float = 2.0, drop: float = 0.0,
             seed: int = 0, framing: str = "medium") -> list[ClipMetrics]:
    """Metrics of every motion (its last ``tail`` fraction) in one framing at one noise level."""
    check_tail(tail)
    get_framing(framing)
    check_lengths(motions, fps, tail, phases)
    results = []
    for k, m in enumerate(motions):
        inputs = eval_inputs(m, m.duration * (1 - tail), m.duration, fps, phases, cameras, noise_px, drop,
                             seed + k, framing=framing)
        outs = run_stack(lifter, physnet, inputs, fps, fuse_weight)
        results.append(clip_metrics(m.name, inputs, *outs, fps, framing, noise_px))
    return results


def mean_row(results: list[ClipMetrics], name: str = "mean", action: str = "all") -> ClipMetrics:
    """Mean of every metric, weighted by views x frames (skating: by contact intervals)."""
    w = np.array([r.views * r.frames for r in results], np.float64)
    c = np.array([r.contacts for r in results], np.float64)
    vals = {}
    for key, value in results[0].to_dict().items():
        if isinstance(value, float):
            weight = c if key.startswith("skate_") else w
            used = weight > 0  # a clip without contact has no skating (NaN)
            x = np.array([getattr(r, key) for r in results])[used]
            vals[key] = float(np.dot(weight[used], x) / weight.sum()) if used.any() else float("nan")
    return ClipMetrics(clip=name, action_class=action, framing=results[0].framing,
                       views=sum(r.views for r in results), contacts=int(c.sum()),
                       frames=int(round(np.dot(w, [r.frames for r in results]) / w.sum())), **vals)


def class_means(results: list[ClipMetrics]) -> list[ClipMetrics]:
    """The mean of every action class present (in ``CLASSES`` order), then of all clips."""
    present = [a for a in CLASSES if any(r.action_class == a for r in results)]
    return [mean_row([r for r in results if r.action_class == a], f"{a} mean", a) for a in present] + \
        [mean_row(results, "all clips")]


def format_table(results: list[ClipMetrics]) -> str:
    head = ("clip", "views x T", "MPJPE dd/pp/fused mm", "accel dd/fused/true m/s2",
            "p95 dd/fused/true", "bone std dd/fused/true mm", "reproj dd/fused px",
            "skate dd/fused/true m/s", "penetr. dd/fused/true mm")
    rows = [head]
    for r in results:
        rows.append((
            r.clip, f"{r.views}x{r.frames}",
            f"{r.mpjpe_dd:.1f} / {r.mpjpe_pp:.1f} / {r.mpjpe_fused:.1f}",
            f"{r.accel_dd:.2f} / {r.accel_fused:.2f} / {r.accel_true:.2f}",
            f"{r.accel_p95_dd:.2f} / {r.accel_p95_fused:.2f} / {r.accel_p95_true:.2f}",
            f"{r.bone_std_dd:.1f} / {r.bone_std_fused:.1f} / {r.bone_std_true:.1f}",
            f"{r.reproj_dd:.2f} / {r.reproj_fused:.2f}",
            f"{r.skate_dd:.2f} / {r.skate_fused:.2f} / {r.skate_true:.2f}",
            f"{r.pen_dd:.1f} / {r.pen_fused:.1f} / {r.pen_true:.1f}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def format_report(results: list[ClipMetrics]) -> str:
    """The tables of one (framing, noise) run: a header line, one table per action class
    present (its clips, then its mean), then the class means and the mean of all clips."""
    r0 = results[0]
    unit = "px" if get_framing(r0.framing).person_px is None else "px per 1000 px of person height"
    lines = [f"== framing {r0.framing} ({get_framing(r0.framing).describe()}), noise {r0.noise_px:g} {unit} =="]
    means = class_means(results)
    for mean in means[:-1]:
        clips = [r for r in results if r.action_class == mean.action_class]
        lines += ["", f"class {mean.action_class}:", format_table(clips + [mean])]
    lines += ["", "class means:", format_table(means)]
    return "\n".join(lines)
