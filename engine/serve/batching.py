"""Dynamic batching: requests that share a shape are denoised as one batch, window by window.

A request's shape is everything its sampler loop depends on (frames, height, width, steps, the
context windows, guidance on or off); prompts, negative prompts, seeds and guidance scales may
differ within a batch. A batch of one runs ``GenerationStream.chunks()`` itself (the CLI's path);
a larger batch runs the same DDIM loop (``finephys.pipeline.denoise_windows_batch``) with the
requests stacked on the batch axis, which the backend calls (``encode_text``, ``encode_pose``,
``predict_noise``, ``decode_latents``) take as they come: each request keeps its own noise (``frame_noise(seed, ...)``), text and pose features,
and gives the frames the same request would give alone, up to float rounding.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from engine.generate import GenerationStream, Plan
from finephys.pipeline import decode, denoise_windows_batch, pose_heatmaps


def shape_key(plan: Plan) -> tuple:
    """Requests with equal keys can share a batch."""
    return (plan.frames, plan.height, plan.width, plan.steps, plan.length, plan.stride, plan.guidance > 1.0,
            plan.deep_cache)


def group_by_shape(streams: list) -> list[list[int]]:
    """Indices of ``streams`` (None = skip) grouped by shape key, in order of first arrival."""
    groups: dict[tuple, list[int]] = {}
    for i, stream in enumerate(streams):
        if stream is not None:
            groups.setdefault(shape_key(stream.plan), []).append(i)
    return list(groups.values())


def decode_batch(model, latents: torch.Tensor) -> list[np.ndarray]:
    """(B,C,F,h,w) -> B arrays (F,H,W,3) uint8, the VAE run over all B*F frames together."""
    b, c, f, h, w = latents.shape
    flat = latents.transpose(0, 1).reshape(1, c, b * f, h, w)
    frames = decode(model, flat)
    return [frames[i * f:(i + 1) * f] for i in range(b)]


def run_group(streams: list[GenerationStream]) -> Iterator[list[np.ndarray]]:
    """Frames of every stream, one finished range per step: yields [frames_1 .. frames_B]."""
    if len(streams) == 1:
        for _, _, frames in streams[0].chunks():
            yield [frames]
        return
    first = streams[0]
    model, p = first.model, first.plan
    fns = [
        (lambda a, z, s=s: pose_heatmaps(model, s.stages, p.height, p.width, a, z)) for s in streams
    ]
    chunks = denoise_windows_batch(
        model, fns, p.frames, [s.opts.prompt for s in streams], [s.opts.negative_prompt for s in streams],
        p.steps, [s.plan.guidance for s in streams], [s.opts.seed for s in streams], p.length, p.stride,
        progress=False, deep_cache=p.deep_cache,
    )
    for _, _, latents in chunks:
        yield decode_batch(model, latents)
