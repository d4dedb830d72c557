"""Running one clip end to end on a backend (the reference backend today)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from finephys.checkpoint import load_checkpoint
from finephys.clip import PoseClip
from finephys.demo import load_demo
from finephys.errors import InputError
from finephys.model import FinePhysModel, assemble
from finephys.pipeline import (
    PoseStages, check_video_size, decode, denoise, pose_heatmaps, prepare_clip, run_pose_stack,
)

BACKENDS = ("reference",)


@dataclass(frozen=True)
class GenerateOptions:
    prompt: str
    negative_prompt: str = ""
    num_frames: int | None = None
    height: int | None = None
    width: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int = 0


@dataclass(frozen=True)
class Generation:
    frames: np.ndarray  # (F,H,W,3) uint8
    latents: torch.Tensor  # (1,4,F,h,w) final latents
    stages: PoseStages
    notes: list[str]


def pick_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA device on this machine, expected cpu")
    return device


def load_model(ckpt: Path | None, device: str = "cpu", dtype=torch.float32) -> FinePhysModel:
    parts = load_demo() if ckpt is None else load_checkpoint(ckpt)
    return assemble(parts, device=device, dtype=dtype)


def prepare(model: FinePhysModel, clip: PoseClip, opts: GenerateOptions):
    """Validate the options against the model and the clip; returns (clip, stages, sizes, notes)."""
    cfg = model.config
    clip, notes = prepare_clip(clip, model)
    height = cfg.height if opts.height is None else opts.height
    width = cfg.width if opts.width is None else opts.width
    check_video_size(height, width)
    frames = min(clip.num_frames, cfg.num_frames) if opts.num_frames is None else opts.num_frames
    max_frames = int(cfg.unet.get("motion_max_seq_length", 32))
    if frames < 1:
        raise InputError(f"--frames: expected at least 1, got {frames}")
    if frames > clip.num_frames:
        raise InputError(f"--frames {frames}: the clip has only {clip.num_frames} frames at {cfg.fps:g} fps")
    if frames > max_frames:
        raise InputError(f"--frames {frames}: this model's motion modules see at most {max_frames} frames")
    steps = cfg.num_inference_steps if opts.num_inference_steps is None else opts.num_inference_steps
    if steps < 1 or steps > 1000:
        raise InputError(f"--steps: expected 1..1000, got {steps}")
    guidance = cfg.guidance_scale if opts.guidance_scale is None else opts.guidance_scale
    if not np.isfinite(guidance) or guidance < 0:
        raise InputError(f"--guidance: expected a finite number >= 0, got {guidance}")
    stages = run_pose_stack(model, clip)
    return stages, (frames, height, width, steps, guidance), notes


def generate(model: FinePhysModel, clip: PoseClip, opts: GenerateOptions, progress: bool = True) -> Generation:
    stages, (frames, height, width, steps, guidance), notes = prepare(model, clip, opts)
    heatmaps = pose_heatmaps(model, stages, height, width)[:frames]
    latents = denoise(model, heatmaps, opts.prompt, opts.negative_prompt, steps, guidance, opts.seed, progress)
    return Generation(frames=decode(model, latents), latents=latents, stages=stages, notes=notes)
