"""Dynamic batching: requests that share a shape are denoised as one batch, window by window.

A request's shape is everything its sampler loop depends on (frames, height, width, steps, the
context windows, guidance on or off); prompts, negative prompts, seeds and guidance scales may
differ within a batch. A batch of one runs ``GenerationStream.chunks()`` itself (the CLI's path);
a larger batch runs the same DDIM loop with the requests stacked on the batch axis, which the
backend calls (``encode_text``, ``encode_pose``, ``predict_noise``, ``decode_latents``) take as
they come: each request keeps its own noise (``frame_noise(seed, ...)``), text and pose features,
and gives the frames the same request would give alone, up to float rounding.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from engine.generate import GenerationStream, Plan
from finephys.pipeline import DeepCache, context_windows, decode, frame_noise, pose_heatmaps


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


@torch.no_grad()
def denoise_windows_batched(model, heatmap_fns, num_frames, prompts, negative_prompts, steps,
                            guidance_scales, seeds, length, stride,
                            deep_cache=(1, 1)) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``finephys.pipeline.denoise_windows`` for B requests at once: yields ``(start, stop,
    latents (B,C,stop-start,h,w))`` per finished frame range. ``deep_cache``: (interval, depth)."""
    b = len(prompts)
    sched = model.scheduler()
    sched.set_timesteps(steps, device=model.device)
    cfg_on = min(guidance_scales) > 1.0
    guidance = torch.tensor(guidance_scales, dtype=torch.float32, device=model.device).view(b, 1, 1, 1, 1)
    # Batch order is request-major: [uncond_1..uncond_B, cond_1..cond_B] with CFG.
    text = model.encode_text(list(negative_prompts) + list(prompts) if cfg_on else list(prompts))
    windows = context_windows(num_frames, length, stride)
    prev_stop, prev_traj = 0, []
    for k, (start, stop) in enumerate(windows):
        keep = windows[k + 1][0] if k + 1 < len(windows) else stop
        n = stop - start
        heatmaps = torch.cat([fn(start, stop) for fn in heatmap_fns])  # (B*n, J, H, W)
        height, width = heatmaps.shape[-2:]
        feats = model.encode_pose(heatmaps)
        if cfg_on:
            feats = [torch.cat([f, f]) for f in feats]
        ehs = text.repeat_interleave(n, dim=0)
        shape = (model.latent_channels, height // 8, width // 8)
        latents = torch.cat([frame_noise(s, start, stop, shape) for s in seeds]).to(model.device)
        latents = latents * sched.init_noise_sigma
        overlap = max(prev_stop - start, 0)
        ramp = (torch.arange(1, overlap + 1, device=model.device) / (overlap + 1)).view(1, 1, -1, 1, 1)
        traj = []
        cache = DeepCache(*deep_cache) if deep_cache[0] > 1 else None
        for i, t in enumerate(sched.timesteps):
            x = torch.cat([latents, latents]) if cfg_on else latents
            x = sched.scale_model_input(x, t).to(model.dtype)
            noise = (model.predict_noise(x, t, ehs, feats) if cache is None
                     else cache.predict(model, i, x, t, ehs, feats)).float()
            if cfg_on:
                uncond, cond = noise.chunk(2)
                noise = uncond + guidance * (cond - uncond)
            latents = sched.step(noise, t, latents).prev_sample
            if overlap:
                latents[:, :, :overlap] = ramp * latents[:, :, :overlap] + (1 - ramp) * prev_traj[i]
            if keep < stop:
                traj.append(latents[:, :, keep - start:].clone())
        yield start, keep, latents[:, :, : keep - start]
        prev_stop, prev_traj = stop, traj


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
    chunks = denoise_windows_batched(
        model, fns, p.frames, [s.opts.prompt for s in streams], [s.opts.negative_prompt for s in streams],
        p.steps, [s.plan.guidance for s in streams], [s.opts.seed for s in streams], p.length, p.stride,
        p.deep_cache,
    )
    for _, _, latents in chunks:
        yield decode_batch(model, latents)
