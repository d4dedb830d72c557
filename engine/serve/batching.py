"""Dynamic batching: requests that share a shape are denoised as one batch, window by window.

A request's shape (``Plan.shape_key``) is everything its sampler loop depends on (frames, height,
width, steps, the context windows, guidance on or off, DeepCache); prompts, negative prompts,
seeds and guidance scales may differ within a batch. A batch of one runs
``GenerationStream.chunks()`` itself (the CLI's path); a larger batch runs the same loop
(``finephys.sampler.loop.denoise_windows``) with one ``Request`` per stream, stacked on the batch
axis: each request keeps its own noise, text and pose features, and gives the frames the same
request would give alone, up to float rounding.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from finephys.sampler.loop import denoise_windows
from finephys.sampler.stream import GenerationStream, decode


def group_by_shape(streams: list) -> list[list[int]]:
    """Indices of ``streams`` (None = skip) grouped by shape key, in order of first arrival."""
    groups: dict[tuple, list[int]] = {}
    for i, stream in enumerate(streams):
        if stream is not None:
            groups.setdefault(stream.plan.shape_key(), []).append(i)
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
    chunks = denoise_windows(first.model, first.plan, [s.request() for s in streams], progress=False)
    for _, _, latents in chunks:
        yield decode_batch(first.model, latents)
