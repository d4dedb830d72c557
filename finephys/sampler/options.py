"""What one generation is asked for (``GenerateOptions``), and the checked ``Plan`` the sampler runs."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from finephys.errors import InputError
from finephys.model.backend import Capabilities


MAX_PIXELS = 16 * 1024 * 1024  # per window: 16 frames at 1024x1024, 4x SD 1.5's 16 x 512x512
MAX_GUIDANCE = 100.0  # classifier-free guidance scales in use run 1..20; far beyond, the latents overflow


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
    max_pixels: int = MAX_PIXELS  # frames x height x width the UNet may see at once (one window)


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

    @property
    def cfg_on(self) -> bool:
        return self.guidance > 1.0

    def shape_key(self) -> tuple:
        """Plans with equal keys run the same loop and can share a batch (prompts, seeds and
        guidance scales may differ)."""
        return (self.frames, self.height, self.width, self.steps, self.length, self.stride, self.cfg_on,
                self.deep_cache)


class ConfigOnly:
    """Stands in for a model where only its config is read (clip preparation, planning), to check
    options before any weights load. Its DeepCache depths are the reference UNet's (the triton
    backend's are the same; the graph backends have none, which their own plan reports)."""

    name = "reference"

    def __init__(self, config):
        self.config = config

    @property
    def capabilities(self) -> Capabilities:
        from finephys.model.unet import cache_depths_of

        return Capabilities(deep_cache=cache_depths_of(self.config.unet))


def check_video_size(height: int, width: int) -> None:
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or v <= 0 or v % 8:
            raise InputError(f"--{name} {v}: expected a positive multiple of 8")


def _check_pixels(frames: int, height: int, width: int, max_pixels: int) -> None:
    """Refuse a window larger than ``max_pixels`` (a step of a 2048x2048 window runs for minutes
    and can exhaust memory), naming what would fit."""
    if frames * height * width <= max_pixels:
        return
    side = int((max_pixels / frames) ** 0.5) // 8 * 8
    fit_frames = max_pixels // (height * width)
    fits = [f"at {frames} frames at most {side}x{side}"] if side >= 8 else []
    if fit_frames:
        fits.append(f"at {height}x{width} at most {fit_frames} frames per window (--context-length)")
    fits = " or ".join(fits) or "raise --max-pixels"
    raise InputError(f"--height {height} --width {width}: {frames} frames x {height}x{width} = "
                     f"{frames * height * width:,} pixels per window, over --max-pixels {max_pixels:,} ({fits})")


def _pick(value, default):
    return default if value is None else value


def check_settings(model, opts: GenerateOptions) -> tuple[int, int, int, float]:
    """The checks that need no clip (the prompt, size, steps, guidance, seed, DeepCache) against
    the model (a backend or ``ConfigOnly``); returns (height, width, steps, guidance)."""
    cfg = model.config
    if not isinstance(opts.prompt, str) or not opts.prompt.strip():
        raise InputError(f"--prompt {opts.prompt!r}: empty, expected a description of the video "
                         "(for example \"a person in a red shirt walking\")")
    height, width = _pick(opts.height, cfg.height), _pick(opts.width, cfg.width)
    check_video_size(height, width)
    steps = _pick(opts.num_inference_steps, cfg.num_inference_steps)
    if not 1 <= steps <= 1000:
        raise InputError(f"--steps: expected 1..1000, got {steps}")
    guidance = _pick(opts.guidance_scale, cfg.guidance_scale)
    if not (np.isfinite(guidance) and 0 <= guidance <= MAX_GUIDANCE):
        raise InputError(f"--guidance: expected a number in 0..{MAX_GUIDANCE:g}, got {guidance}")
    if opts.seed < 0:
        raise InputError(f"--seed: expected a number >= 0, got {opts.seed}")
    if opts.deep_cache_depth < 1:
        raise InputError(f"--deep-cache-depth {opts.deep_cache_depth}: expected a number >= 1")
    if not 1 <= opts.deep_cache <= max(steps, 1):
        raise InputError(f"--deep-cache {opts.deep_cache}: expected 1 (off) .. {steps} (the number of steps)")
    if opts.deep_cache > 1:
        depths = model.capabilities.deep_cache
        if not len(depths):
            raise InputError(f"--deep-cache: the {model.name} backend has no partial UNet; "
                             "use --backend triton or reference")
        if opts.deep_cache_depth not in depths:
            raise InputError(f"--deep-cache-depth {opts.deep_cache_depth}: expected {depths[0]}..{depths[-1]} "
                             "(pairs of the UNet's last up block)")
    return height, width, steps, float(guidance)


def plan(model, clip, opts: GenerateOptions) -> Plan:
    """Validate the options against the model (a backend or ``ConfigOnly``) and the prepared clip."""
    cfg = model.config
    height, width, steps, guidance = check_settings(model, opts)
    frames = _pick(opts.num_frames, clip.num_frames)
    if frames < 1 or frames > clip.num_frames:
        raise InputError(f"--frames {frames}: expected 1..{clip.num_frames} (the clip's frames at {cfg.fps:g} fps)")
    max_len = cfg.max_frames
    length = _pick(opts.context_length, min(cfg.num_frames, max_len))
    if length < 1 or length > max_len:
        raise InputError(f"--context-length {length}: expected 1..{max_len} (the motion modules' longest sequence)")
    if frames > length and length < 2:
        raise InputError(f"--context-length {length}: expected 2..{max_len} for {frames} frames (windows that overlap)")
    _check_pixels(min(frames, length), height, width, opts.max_pixels)
    stride = _pick(opts.context_stride, max(1, length * 3 // 4))
    if stride < 1 or (frames > length and stride >= length):
        raise InputError(f"--context-stride {stride}: expected 1..{max(length - 1, 1)} so that windows overlap")
    return Plan(frames, height, width, steps, float(guidance), length, stride,
                (opts.deep_cache, opts.deep_cache_depth))
