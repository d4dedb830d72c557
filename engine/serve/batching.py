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
    """Indices of ``streams`` (None = skip) grouped by shape key, in order of first arrival. A
    group holds only as many requests as its model runs as one batch (``fits_batch``: an engine's
    profile, its precompiled packages); the rest of that shape forms the next groups, in order."""
    groups: dict[tuple, list[int]] = {}
    for i, stream in enumerate(streams):
        if stream is not None:
            groups.setdefault(stream.plan.shape_key(), []).append(i)
    out = []
    for todo in groups.values():
        first = streams[todo[0]]
        while todo:
            n = len(todo)
            while n > 1 and not first.model.fits_batch(first.plan, n):
                n -= 1
            out.append(todo[:n])
            todo = todo[n:]
    return out


def decode_batch(model, latents: torch.Tensor) -> list[np.ndarray]:
    """(B,C,F,h,w) -> B arrays (F,H,W,3) uint8, request by request: the VAE sees the chunks one
    request of this shape gives it (the shapes an engine's decoder was built for)."""
    return [decode(model, latents[i:i + 1]) for i in range(latents.shape[0])]


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
