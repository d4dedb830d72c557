"""The pose stages of one clip: lift to 3D, re-estimate with physics, fuse, project back to 2D,
and the heatmaps that guide the video, drawn from the projected skeleton."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from finephys.errors import InputError
from finephys.model.backend import Capabilities
from finephys.model.lifter import lift_windows, normalise_2d
from finephys.model.physnet import integrate, keep_bone_lengths
from finephys.poses.camera import fit_and_project, to_camera_axes, virtual_camera
from finephys.poses.clip import PoseClip, drop_collapsed_frames, resample, to_layout
from finephys.poses.layouts import H36M17
from finephys.poses.layout_check import layout_warning
from finephys.sampler.options import GenerateOptions, Plan, plan
from fpkernels.heatmap_ref import render_heatmaps_ref


@dataclass(frozen=True)
class PoseStages:
    """Every stage of the pose stack for one clip, in the model's layout and frame rate."""

    input_2d: np.ndarray  # (T,J,2) pixels
    scores: np.ndarray  # (T,J)
    s_dd: np.ndarray  # (T,J,3) metres, root-relative
    s_pp: np.ndarray
    s_fused: np.ndarray
    projected_2d: np.ndarray  # (T,J,2) pixels
    image_size: tuple[int, int]
    fps: float
    layout: str

    def video_2d(self, height: int, width: int, frames: int | None = None) -> np.ndarray:
        """(frames,J,2) the guiding joints in the video's pixels, exactly as the heatmaps are drawn."""
        return to_video_pixels(self.projected_2d[:frames], self.image_size, height, width).astype(np.float32)

    def to_npz_dict(self, plan=None) -> dict:
        """The stages as arrays; with the generation's ``plan`` (height, width, frames) also
        ``video_2d``."""
        extra = {} if plan is None else {"video_2d": self.video_2d(plan.height, plan.width, plan.frames)}
        return {**extra,
            "input_2d": self.input_2d, "scores": self.scores, "s_dd": self.s_dd, "s_pp": self.s_pp,
            "s_fused": self.s_fused, "projected_2d": self.projected_2d,
            "image_size": np.asarray(self.image_size, dtype=np.int64), "fps": np.float64(self.fps),
            "layout": np.asarray(self.layout),
        }


@dataclass
class PoseModel:
    """What the pose stack reads of a model: its config and ``parts.lifter`` / ``parts.physnet``,
    on the CPU; for ``fpengine poses``, which needs no generator."""

    config: object
    parts: object  # .lifter, .physnet
    device: torch.device = torch.device("cpu")
    capabilities: Capabilities = field(default_factory=Capabilities)

    @property
    def pose_device(self) -> torch.device:
        return self.device


def prepare_clip(clip: PoseClip, model) -> tuple[PoseClip, list[str]]:
    """Convert to the model's layout and frame rate; returns the clip and notes for the user (the
    first a warning where the motion does not fit the clip's declared layout)."""
    clip, dropped = drop_collapsed_frames(clip)
    warning = layout_warning(clip)
    notes = [line for line in (warning, dropped) if line is not None]
    cfg = model.config
    clip = to_layout(clip, cfg.layout)
    if abs(clip.fps - cfg.fps) > 1e-6:
        before, before_fps = clip.num_frames, clip.fps
        clip = resample(clip, cfg.fps)
        notes.append(f"resampled the clip from {before} frames at {before_fps:g} fps to {clip.num_frames} frames at "
                     f"{cfg.fps:g} fps")
    if clip.num_frames < 3:
        raise InputError(f"clip: at least 3 frames needed at {cfg.fps:g} fps, got {clip.num_frames}")
    return clip, notes


def prepare(model, clip: PoseClip, opts: GenerateOptions) -> tuple[Plan, PoseStages, list[str]]:
    """What a generation needs before denoising: the clip in the model's layout and frame rate,
    the options checked into a ``Plan``, the pose stages, and notes for the user."""
    clip, notes = prepare_clip(clip, model)
    checked = plan(model, clip, opts)
    return checked, run_pose_stack(model, clip), notes


def lift_and_fuse(parts, kp: torch.Tensor, sc: torch.Tensor, K, fps: float, fuse_weight,
                  use_kernels: bool = False, dist=None):
    """2D (B,T,J,2) pixels of camera K ((3,3), (B,3,3) or None) + scores (B,T,J) -> (S_dd, S_pp, S_fused),
    root-relative metres in the camera's axes. The lifter and PhysNet work in the virtual camera
    that looks straight at the person (``virtual_camera``); the results are turned back.
    ``fuse_weight``: w of S_fused = w S_dd + (1 - w) S_pp, one number or one per joint."""
    view, turn = virtual_camera(kp, sc, K, dist)
    s_dd = lift_windows(parts.lifter, normalise_2d(view, sc), sc)
    minv, jtau, coriolis = parts.physnet.predict(s_dd)
    # The reference integrates in plain torch; backends with kernels take the fused Triton kernel
    # (imported only then: triton is not loaded on the reference and packaged paths).
    if use_kernels:
        from fpkernels.physnet import physnet_fused as step
    else:
        step = integrate
    per_joint = isinstance(fuse_weight, (list, tuple))
    s_pp, s_fused, _ = step(s_dd, minv, jtau, coriolis, 1.0 / fps, 0.0 if per_joint else fuse_weight)
    if per_joint:  # the kernel takes one weight: it gives S_pp, the blend is done here
        w = torch.as_tensor(fuse_weight, dtype=s_dd.dtype, device=s_dd.device)[:, None]  # (J,1)
        s_fused = w * s_dd + (1 - w) * s_pp
    s_fused = keep_bone_lengths(s_fused, H36M17.edges)
    return tuple(to_camera_axes(s, turn) for s in (s_dd, s_pp, s_fused))


@torch.no_grad()
def pose_stack(parts, kp: torch.Tensor, sc: torch.Tensor, fps: float, fuse_weight,
               use_kernels: bool = False, K=None, dist=None):
    """Batched pose stack: 2D (B,T,J,2) pixels + scores (B,T,J) -> (S_dd, S_pp, S_fused, projected
    2D). With the clip's camera matrix K the lifter sees the person through the virtual camera
    and the projection is pinhole; without, neither turn nor perspective: weak perspective."""
    s_dd, s_pp, s_fused = lift_and_fuse(parts, kp, sc, K, fps, fuse_weight, use_kernels, dist)
    return s_dd, s_pp, s_fused, fit_and_project(s_fused, kp, sc, K, dist)


@torch.no_grad()
def run_pose_stack(model, clip: PoseClip) -> PoseStages:
    """Lift, re-estimate with physics, fuse and project back; ``clip`` must be prepared."""
    dev = model.pose_device
    kp = torch.as_tensor(clip.keypoints, dtype=torch.float32, device=dev)[None]
    sc = torch.as_tensor(clip.scores, dtype=torch.float32, device=dev)[None]
    K = None if clip.camera_matrix is None else torch.as_tensor(clip.camera_matrix, dtype=torch.float32)
    dist = None if clip.dist_coeffs is None else torch.as_tensor(clip.dist_coeffs, dtype=torch.float32)
    s_dd, s_pp, s_fused, projected = pose_stack(
        model.parts, kp, sc, model.config.fps, model.config.pose.fuse_weight,
        model.capabilities.kernels, K, dist)
    f = lambda x: x[0].float().cpu().numpy()  # noqa: E731
    return PoseStages(
        input_2d=clip.keypoints, scores=clip.scores, s_dd=f(s_dd), s_pp=f(s_pp), s_fused=f(s_fused),
        projected_2d=f(projected), image_size=tuple(clip.image_size), fps=clip.fps, layout=clip.layout,
    )


def to_video_pixels(keypoints, image_size, height: int, width: int):
    """Pixels of an ``image_size`` (height, width) image -> pixels of the video (height x width)."""
    ih, iw = image_size
    kp = keypoints.clone() if torch.is_tensor(keypoints) else np.array(keypoints, dtype=np.float32)
    kp[..., 0] *= width / iw
    kp[..., 1] *= height / ih
    return kp


def guidance_heatmaps(config, keypoints: torch.Tensor, visibility: torch.Tensor, height: int, width: int,
                      use_kernel: bool = False) -> torch.Tensor:
    """Heatmaps (B,T,J,H,W) that guide the video from joints (B,T,J,2) in video pixels; the
    Gaussians' sigma is the model's ``heatmap_sigma`` at 512 px, scaled with the video size."""
    sigma = config.pose.heatmap_sigma * max(height, width) / 512.0
    if use_kernel:
        from fpkernels.heatmap import render_heatmaps

        return render_heatmaps(keypoints, visibility, height, width, sigma, use_kernel=True)
    return render_heatmaps_ref(keypoints, visibility, height, width, sigma)


def pose_heatmaps(model, stages: PoseStages, height: int, width: int,
                  start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Heatmaps (stop-start, J, H, W) at the video size from the projected skeleton."""
    kp = torch.as_tensor(stages.projected_2d[start:stop], dtype=torch.float32, device=model.device)
    kp = to_video_pixels(kp, stages.image_size, height, width)
    vis = torch.ones(kp.shape[:-1], device=model.device)
    return guidance_heatmaps(model.config, kp[None], vis[None], height, width,
                             use_kernel=model.capabilities.kernels)[0]
