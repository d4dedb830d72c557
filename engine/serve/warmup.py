"""Warm-up requests: before a replica takes traffic, one short request of each precompiled shape
runs through the replica's own path (pose stack, heatmaps, tokenizer and text encoder, the
denoising loop, the side-stream decode), so that the first real request of that shape pays none
of the one-time costs outside the packages (Triton kernels compiled for the pose stack, pinned
buffers, lazy loads). The same idea as Triton Inference Server's ``model_warmup``."""
from __future__ import annotations

import time

import numpy as np

from finephys.poses.clip import PoseClip
from finephys.poses.layouts import H36M17

# A standing figure in H36M-17, in units of its height, feet at y = 1, x about 0.
_STANDING = np.array([
    (0.00, 0.50), (-0.07, 0.50), (-0.08, 0.74), (-0.08, 0.98), (0.07, 0.50), (0.08, 0.74), (0.08, 0.98),
    (0.00, 0.38), (0.00, 0.25), (0.00, 0.19), (0.00, 0.10), (0.11, 0.26), (0.14, 0.39), (0.15, 0.51),
    (-0.11, 0.26), (-0.14, 0.39), (-0.15, 0.51)], dtype=np.float32)


def standing_clip(frames: int, height: int, width: int, fps: float) -> PoseClip:
    """A figure standing in the middle of a ``height`` x ``width`` picture, swaying a little."""
    t = np.arange(frames, dtype=np.float32)[:, None, None]
    scale = 0.7 * height
    origin = np.array([width / 2, 0.15 * height], dtype=np.float32)
    kp = _STANDING[None] * scale + origin + np.concatenate([np.sin(t / 4), 0 * t], -1) * 0.02 * width
    return PoseClip(kp.astype(np.float32), np.ones(kp.shape[:2], np.float32), H36M17.name, (height, width), fps)


def warm_up_requests(model, steps: int = 2, log=print) -> list[str]:
    """Run one ``steps``-step request of each of ``model.compiled_shapes()`` (``BxFxHxW``) through
    ``run_group`` as a replica does; returns the shapes warmed."""
    from engine.serve.batching import run_group
    from finephys.sampler.options import GenerateOptions
    from finephys.sampler.stream import generate_stream

    shapes = model.compiled_shapes()
    for shape in shapes:
        b, f, h, w = (int(v) for v in shape.split("x"))
        start = time.perf_counter()
        clip = standing_clip(max(f, 3), h, w, float(model.config.fps))
        opts = GenerateOptions("a person standing", num_frames=f, height=h, width=w, num_inference_steps=steps,
                               guidance_scale=None if b > 1 else 1.0)  # a UNet batch of 2: guidance on
        for _ in run_group([generate_stream(model, clip, opts, progress=False)]):
            pass
        log(f"warm-up request {f}x{h}x{w}: {time.perf_counter() - start:.2f} s")
    return shapes
