"""Warm-up requests: before a replica takes traffic, one short request of each precompiled shape
runs through the replica's own path (``fpengine check``'s walking clip through the pose stack,
heatmaps, tokenizer and text encoder, the denoising loop, the side-stream decode), so that the first real request of that shape pays none
of the one-time costs outside the packages (Triton kernels compiled for the pose stack, pinned
buffers, lazy loads). The same idea as Triton Inference Server's ``model_warmup``."""
from __future__ import annotations

import time

from engine.check import CHECK_PROMPT, check_clip


def warm_up_requests(model, steps: int = 2, log=print) -> list[str]:
    """Run one ``steps``-step request of each of ``model.compiled_shapes()`` (``BxFxHxW``) through
    ``run_group`` as a replica does; returns the shapes warmed."""
    from engine.serve.batching import run_group
    from finephys.sampler.options import GenerateOptions
    from finephys.sampler.stream import generate_stream

    shapes = model.compiled_shapes()
    guided = float(model.config.guidance_scale) > 1
    for shape in shapes:
        b, f, h, w = (int(v) for v in shape.split("x"))
        start = time.perf_counter()
        clip = check_clip(f, float(model.config.fps), size=max(h, w))
        # an even UNet batch: b / 2 requests with guidance (two rows each), else b without
        n, scale = (b // 2, None) if guided and b % 2 == 0 else (b, 1.0)
        opts = GenerateOptions(CHECK_PROMPT, num_frames=f, height=h, width=w, num_inference_steps=steps,
                               guidance_scale=scale)
        for _ in run_group([generate_stream(model, clip, opts, progress=False) for _ in range(n)]):
            pass
        log(f"warm-up {n} request{'s' * (n > 1)} {f}x{h}x{w} (UNet batch {b}): {time.perf_counter() - start:.2f} s")
    return shapes
