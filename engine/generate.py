"""Running one clip end to end on a backend, streaming frames out as soon as they are final."""
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
    DecodeJob, PoseStages, check_video_size, denoise_windows, pose_heatmaps, prepare_clip, run_pose_stack,
)

BACKENDS = ("reference", "onnxruntime", "tensorrt", "triton")  # all but the first run an engine directory (--engine)


@dataclass(frozen=True)
class GenerateOptions:
    prompt: str
    negative_prompt: str = ""
    num_frames: int | None = None  # default: the whole clip
    height: int | None = None
    width: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int = 0
    context_length: int | None = None  # frames the video model sees at once (default: the model's)
    context_stride: int | None = None  # window step (default: 3/4 of the window)
    deep_cache: int = 1  # DeepCache interval: a full UNet step every N steps (1 = off)
    deep_cache_depth: int = 1  # pairs of the last up block that the shallow steps recompute


@dataclass(frozen=True)
class Plan:
    frames: int
    height: int
    width: int
    steps: int
    guidance: float
    length: int
    stride: int
    deep_cache: tuple[int, int] = (1, 1)  # (interval, depth)


@dataclass(frozen=True)
class Generation:
    frames: np.ndarray  # (F,H,W,3) uint8
    latents: torch.Tensor  # (1,C,F,h,w) final latents
    stages: PoseStages
    notes: list[str]


def pick_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA device on this machine, expected cpu")
    return device


def load_model(ckpt: Path | None, device: str = "cpu", dtype=torch.float32, engine: Path | None = None,
               backend: str = "reference"):
    """The reference model of ``ckpt`` (default: the demo model), or with ``engine`` an engine
    directory on ``backend`` (``auto``: the fastest one available, see ``engine.backends``)."""
    if engine is not None:
        if ckpt is not None:
            raise InputError("pass --ckpt or --engine, not both (an engine directory names its checkpoint)")
        from .backends import load_backend

        return load_backend(engine, backend, device)
    if backend not in ("reference", "auto"):
        raise InputError(f"--backend {backend} runs an engine directory: pass --engine DIR (fpengine export writes one)")
    parts = load_demo() if ckpt is None else load_checkpoint(ckpt)
    return assemble(parts, device=pick_device(device), dtype=dtype)


class ConfigOnly:
    """Stands in for a model where only its config is read (clip preparation, planning), to check
    options before any weights load. Its DeepCache depths are the reference UNet's (the triton
    backend's are the same; the graph backends have none, which their own plan reports)."""

    def __init__(self, config):
        self.config = config

    def deep_cache_depths(self) -> range:
        from finephys.unet import cache_depths_of

        return cache_depths_of(self.config.unet)


def check_options(clip: PoseClip, opts: GenerateOptions, ckpt: Path | None = None, engine: Path | None = None) -> None:
    """``plan``'s checks from the config of ``ckpt`` / ``engine`` / the demo, before loading weights
    (seconds earlier); ``generate_stream`` checks again against the loaded backend."""
    if engine is not None:
        from export.manifest import engine_config, read_engine_manifest

        try:
            config = engine_config(read_engine_manifest(engine))
        except InputError:
            return  # loading the backend reports it, after what it checks first (a GPU for triton)
    elif ckpt is not None:
        from finephys.checkpoint import read_config

        config = read_config(ckpt)
    else:
        from finephys.demo import demo_config

        config = demo_config()
    model = ConfigOnly(config)
    plan(model, prepare_clip(clip, model)[0], opts)


@dataclass
class PoseModel:
    """What the pose stack reads of a model (``prepare_clip``, ``run_pose_stack``): its config, a
    lifter and PhysNet, on the CPU; for ``fpengine poses``, which needs no generator."""

    config: object
    parts: object  # .lifter, .physnet
    device: torch.device = torch.device("cpu")


def load_pose_model(ckpt: Path | None) -> PoseModel:
    from types import SimpleNamespace

    from finephys.checkpoint import load_pose_parts
    from finephys.demo import load_demo_pose_parts

    cfg, lifter, physnet = load_demo_pose_parts() if ckpt is None else load_pose_parts(ckpt)
    return PoseModel(cfg, SimpleNamespace(lifter=lifter, physnet=physnet))


def _pick(value, default):
    return default if value is None else value


def plan(model: FinePhysModel, clip: PoseClip, opts: GenerateOptions) -> Plan:
    """Validate the options against the model and the (prepared) clip."""
    cfg = model.config
    height, width = _pick(opts.height, cfg.height), _pick(opts.width, cfg.width)
    check_video_size(height, width)
    frames = _pick(opts.num_frames, clip.num_frames)
    if frames < 1 or frames > clip.num_frames:
        raise InputError(f"--frames {frames}: expected 1..{clip.num_frames} (the clip's frames at {cfg.fps:g} fps)")
    max_len = int(cfg.unet.get("motion_max_seq_length", 32))
    length = _pick(opts.context_length, min(cfg.num_frames, max_len))
    if length < 1 or length > max_len:
        raise InputError(f"--context-length {length}: expected 1..{max_len} (the motion modules' longest sequence)")
    stride = _pick(opts.context_stride, max(1, length * 3 // 4))
    if frames > length and not 1 <= stride < length:
        raise InputError(f"--context-stride {stride}: expected 1..{length - 1} so that windows overlap")
    steps = _pick(opts.num_inference_steps, cfg.num_inference_steps)
    if not 1 <= steps <= 1000:
        raise InputError(f"--steps: expected 1..1000, got {steps}")
    guidance = _pick(opts.guidance_scale, cfg.guidance_scale)
    if not np.isfinite(guidance) or guidance < 0:
        raise InputError(f"--guidance: expected a finite number >= 0, got {guidance}")
    if opts.seed < 0:
        raise InputError(f"--seed: expected a number >= 0, got {opts.seed}")
    if not 1 <= opts.deep_cache <= max(steps, 1):
        raise InputError(f"--deep-cache {opts.deep_cache}: expected 1 (off) .. {steps} (the number of steps)")
    if opts.deep_cache > 1:
        depths = model.deep_cache_depths()
        if not len(depths):
            raise InputError(f"--deep-cache: the {getattr(model, 'name', 'graph')} backend has no partial UNet; "
                             "use --backend triton or reference")
        if opts.deep_cache_depth not in depths:
            raise InputError(f"--deep-cache-depth {opts.deep_cache_depth}: expected {depths[0]}..{depths[-1]} "
                             "(pairs of the UNet's last up block)")
    return Plan(frames, height, width, steps, float(guidance), length, stride,
                (opts.deep_cache, opts.deep_cache_depth))


class GenerationStream:
    """``generate_stream``'s result: iterate it for frames ((H,W,3) uint8) as soon as they are
    final; ``chunks()`` gives (start, latents, frames) per finished range. The pose stack runs
    once over the whole clip (PhysNet sees full context) when the stream is made."""

    def __init__(self, model: FinePhysModel, clip: PoseClip, opts: GenerateOptions, progress: bool = True):
        self.model, self.opts, self.progress = model, opts, progress
        clip, self.notes = prepare_clip(clip, model)
        self.plan = plan(model, clip, opts)
        self.stages = run_pose_stack(model, clip)
        self.fps = model.config.fps

    def chunks(self):
        p, o, m = self.plan, self.opts, self.model
        heatmaps = lambda a, b: pose_heatmaps(m, self.stages, p.height, p.width, a, b)  # noqa: E731
        pending = None  # an asynchronous decode, handed out once the next window's steps are queued
        for start, _, latents in denoise_windows(
            m, heatmaps, p.frames, o.prompt, o.negative_prompt, p.steps, p.guidance, o.seed,
            p.length, p.stride, self.progress, p.deep_cache,
        ):
            job = DecodeJob(m, latents)
            if pending is not None:
                yield pending[0], pending[1], pending[2].result()
                pending = None
            if job.is_async:
                pending = (start, latents, job)
            else:
                yield start, latents, job.result()
        if pending is not None:
            yield pending[0], pending[1], pending[2].result()

    def __iter__(self):
        for _, _, frames in self.chunks():
            yield from frames


def generate_stream(model, clip: PoseClip, opts: GenerateOptions, progress: bool = True) -> GenerationStream:
    return GenerationStream(model, clip, opts, progress)


def generate(model, clip: PoseClip, opts: GenerateOptions, progress: bool = True) -> Generation:
    """The whole clip at once (frames and final latents), through the same stream."""
    stream = generate_stream(model, clip, opts, progress)
    chunks = list(stream.chunks())
    return Generation(
        frames=np.concatenate([c[2] for c in chunks]), latents=torch.cat([c[1] for c in chunks], dim=2),
        stages=stream.stages, notes=stream.notes,
    )
