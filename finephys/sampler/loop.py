"""The denoising loop: DDIM with classifier-free guidance over overlapping context windows, for one
request or a batch of requests of one shape, with DeepCache where asked.

Window k's first frames overlap window k-1's last ones; after every step they are blended with
window k-1's latents of the same step, with weights ramping from window k-1 to window k across the
overlap, so seams do not show. Where those latents come from and where a window's own overlap
goes is a ``WindowChain``'s job: in one process every window runs in order and the chain keeps the
last window's trajectory; window-parallel generation (``engine.distributed``) gives the loop a
chain that receives and sends them between ranks, and the loop itself does not change.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from finephys.errors import InputError
from finephys.sampler.options import Plan


class StopRequested(KeyboardInterrupt):
    """Raised by ``denoise_windows`` between two denoising steps when its ``should_stop`` check
    says so (a signal handler set a flag): the run ends where no step is half done. A
    KeyboardInterrupt, so that whatever finishes outputs on Ctrl-C finishes them here too."""

    def __init__(self, done: int, total: int):
        super().__init__(f"after {done} of {total} denoising steps")
        self.done, self.total = done, total


class DdimSchedule:
    """DDIM (eta = 0) as diffusers' ``DDIMScheduler`` steps it, computed from the scheduler
    config alone (its betas, cumulative alphas and timesteps, in diffusers' own arithmetic), with
    every coefficient precomputed as a Python float: stepping never reads device memory back, so
    the denoising loop has no host synchronisation on any backend, and no diffusers import."""

    SPACINGS = ("leading", "trailing", "linspace")
    BETAS = ("linear", "scaled_linear")

    def __init__(self, config: dict, num_inference_steps: int, device):
        c = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
             "set_alpha_to_one": True, "steps_offset": 0, "prediction_type": "epsilon",
             "timestep_spacing": "leading", **dict(config)}
        if c["prediction_type"] != "epsilon":
            raise InputError(f"scheduler: prediction_type {c['prediction_type']!r}, expected 'epsilon'")
        if c["beta_schedule"] not in self.BETAS or c["timestep_spacing"] not in self.SPACINGS:
            raise InputError(f"scheduler: beta_schedule {c['beta_schedule']!r} / timestep_spacing "
                             f"{c['timestep_spacing']!r}, expected one of {self.BETAS} / {self.SPACINGS}")
        n, steps = int(c["num_train_timesteps"]), int(num_inference_steps)
        if not 1 <= steps <= n:
            raise InputError(f"steps {steps}: expected 1..{n} (the scheduler's training timesteps)")
        if c["beta_schedule"] == "linear":
            betas = torch.linspace(c["beta_start"], c["beta_end"], n, dtype=torch.float32)
        else:
            betas = torch.linspace(c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, n, dtype=torch.float32) ** 2
        alphas = torch.cumprod(1.0 - betas, dim=0)
        final = 1.0 if c["set_alpha_to_one"] else float(alphas[0])
        ratio = n // steps
        if c["timestep_spacing"] == "leading":
            t = (np.arange(0, steps) * ratio).round()[::-1].astype(np.int64) + int(c["steps_offset"])
        elif c["timestep_spacing"] == "trailing":
            t = np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1
        else:
            t = np.linspace(0, n - 1, steps).round()[::-1].astype(np.int64)
        alphas = alphas.double()
        self.coeffs = [(float(alphas[i]), float(alphas[i - ratio]) if i >= ratio else final) for i in t.tolist()]
        self.timesteps = torch.tensor(t.tolist(), device=device)
        self.init_noise_sigma = 1.0

    def step(self, i: int, eps: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        a, a_prev = self.coeffs[i]
        x0 = (x - (1 - a) ** 0.5 * eps) / a**0.5
        return a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps


def frame_noise(seed: int, start: int, stop: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """Initial noise (1,C,n,h,w) for frames start..stop-1; each frame's noise depends only on
    (seed, frame index), so overlapping windows and any window layout see the same noise."""
    out = []
    for i in range(start, stop):
        state = np.random.SeedSequence([int(seed), i]).generate_state(2, np.uint32)
        gen = torch.Generator("cpu").manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)
        out.append(torch.randn(shape, generator=gen, dtype=torch.float32))
    return torch.stack(out, dim=1)[None]


def context_windows(num_frames: int, length: int, stride: int) -> list[tuple[int, int]]:
    """Overlapping windows [start, stop) covering the clip; the last one ends at the clip's end."""
    if num_frames <= length:
        return [(0, num_frames)]
    starts = list(range(0, num_frames - length, stride)) + [num_frames - length]
    return [(s, s + length) for s in starts]


@dataclass(frozen=True)
class Request:
    """One video of a batch: the source of its heatmaps and what may differ between requests."""

    heatmaps: Callable[[int, int], torch.Tensor]  # (start, stop) -> (stop-start, J, H, W)
    prompt: str
    negative_prompt: str = ""
    guidance: float = 1.0
    seed: int = 0


class DeepCache:
    """DeepCache-style reuse of deep UNet features within one window: a full step every
    ``interval`` steps keeps the input of the last up block's pair ``n - depth``; the steps in
    between run only the shallow pairs around it (``PoseGuidedUNet.forward_shallow``)."""

    def __init__(self, interval: int, depth: int):
        self.interval, self.depth, self.deep = interval, depth, None

    def predict(self, model, i, x, t, ehs, feats):
        if self.deep is None or i % self.interval == 0:
            noise, self.deep = model.predict_noise_cached(x, t, ehs, feats, self.depth)
            return noise
        return model.predict_noise_shallow(x, t, ehs, feats, self.deep, self.depth)


class WindowChain:
    """The windows this process runs, and where each window's overlap comes from and goes: here
    every window in order, blending with the previous window's trajectory kept in memory (one
    window's overlap, whatever the clip's length)."""

    def begin(self, windows: list[tuple[int, int]], steps: int) -> None:
        self.windows, self.steps, self._prev, self._traj = windows, steps, None, []

    def schedule(self) -> Iterator[int | None]:
        """Window indices to run, in order; None for a round with nothing to do here."""
        yield from range(len(self.windows))

    def overlap(self, k: int, i: int, shape: tuple) -> torch.Tensor:
        """Window k-1's latents over window k's first frames after step i."""
        return self._prev[i]

    def tail(self, k: int, i: int, latents: torch.Tensor) -> None:
        """Window k's frames that window k+1 overlaps, after step i."""
        self._traj.append(latents.clone())

    def window_done(self, k: int) -> None:
        self._prev, self._traj = self._traj, []


def window_inputs(model, sched, heatmaps, text, seeds, start, cfg_on):
    """One window's initial latents (B,C,n,h,w), text embeddings (2B*n or B*n,77,C) and pose
    features (computed once per window; doubled for the guidance batch) for B requests: heatmaps
    (B*n,J,H,W) request-major, one seed per request, ``text`` [uncond_1..uncond_B, cond_1..cond_B].
    The pose features are encoded request by request: the heatmap encoder sees the frames of one
    window, whatever the batch (the shapes an engine's encoder was built for)."""
    n = heatmaps.shape[0] // len(seeds)
    height, width = heatmaps.shape[-2:]
    feats = [torch.cat(level) for level in zip(*(model.encode_pose(h) for h in heatmaps.split(n)))]
    if cfg_on:
        feats = [torch.cat([f, f]) for f in feats]
    ehs = text.repeat_interleave(n, dim=0)  # UNetMotionModel takes B*F text embeddings
    f = model.vae_scale_factor
    shape = (model.latent_channels, height // f, width // f)
    latents = torch.cat([frame_noise(seed, start, start + n, shape) for seed in seeds])
    return latents.to(model.device) * sched.init_noise_sigma, ehs, feats


def guided_step(model, sched, i, t, latents, ehs, feats, guidance_scale, cache: DeepCache | None = None):
    """One DDIM step with classifier-free guidance (both halves in one batch when on).

    ``guidance_scale``: a float, or a (B,1,1,1,1) tensor of per-request scales (all > 1)."""
    cfg_on = torch.is_tensor(guidance_scale) or guidance_scale > 1.0
    x = (torch.cat([latents, latents]) if cfg_on else latents).to(model.dtype)
    noise = (model.predict_noise(x, t, ehs, feats) if cache is None else cache.predict(model, i, x, t, ehs, feats))
    noise = noise.float()
    if cfg_on:
        uncond, cond = noise.chunk(2)
        noise = uncond + guidance_scale * (cond - uncond)
    return sched.step(i, noise, latents)


def _guidance(requests: list[Request], device):
    scales = [float(r.guidance) for r in requests]
    cfg_on = min(scales) > 1.0
    if cfg_on != (max(scales) > 1.0):
        raise InputError(f"guidance_scales: {scales} mix guidance on (> 1) and off (<= 1); batch them apart")
    if not cfg_on or len(set(scales)) == 1:
        return cfg_on, scales[0]
    return cfg_on, torch.tensor(scales, dtype=torch.float32, device=device).view(-1, 1, 1, 1, 1)


@torch.no_grad()
def denoise_windows(model, plan: Plan, requests: list[Request], progress: bool = True,
                    chain: WindowChain | None = None, should_stop: Callable[[], bool] | None = None):
    """Yields ``(start, stop, latents (B,C,stop-start,h,w))`` for consecutive frame ranges as
    soon as they are final, for B ``requests`` of ``plan``'s shape stacked on the batch axis.

    Each request keeps its own noise, text, pose features and guidance scale, and gets what it
    would get alone, up to float rounding; guidance must be on for all (every scale > 1) or off
    for all. Text and the guidance batch are computed once per clip, pose features once per
    window. ``plan.deep_cache`` (interval, depth) with interval > 1 runs ``DeepCache`` in each
    window. ``chain`` (default: every window here, in order) says which windows run here.
    ``should_stop`` is asked before every step (between UNet calls); True raises ``StopRequested``."""
    chain = WindowChain() if chain is None else chain
    cfg_on, guidance = _guidance(requests, model.device)
    sched = DdimSchedule(model.config.scheduler, plan.steps, model.device)
    # text batch order is request-major: [uncond_1..uncond_B, cond_1..cond_B] with guidance
    prompts = [r.prompt for r in requests]
    text = model.encode_text([r.negative_prompt for r in requests] + prompts if cfg_on else prompts)
    windows, steps = context_windows(plan.frames, plan.length, plan.stride), len(sched.timesteps)
    chain.begin(windows, steps)
    seeds = [r.seed for r in requests]
    order = list(chain.schedule())
    bar = tqdm(total=len(order) * steps, desc="denoising", disable=not progress, leave=False)
    done = 0
    for k in order:
        if k is None:  # nothing for this process in this round
            bar.update(steps)
            continue
        start, stop = windows[k]
        keep = windows[k + 1][0] if k + 1 < len(windows) else stop  # frames >= keep go on to window k+1
        heatmaps = torch.cat([r.heatmaps(start, stop) for r in requests])
        latents, ehs, feats = window_inputs(model, sched, heatmaps, text, seeds, start, cfg_on)
        overlap = max(windows[k - 1][1] - start, 0) if k else 0
        ramp = (torch.arange(1, overlap + 1, device=model.device) / (overlap + 1)).view(1, 1, -1, 1, 1)
        cache = DeepCache(*plan.deep_cache) if plan.deep_cache[0] > 1 else None
        for i, t in enumerate(sched.timesteps):
            if should_stop is not None and should_stop():
                bar.close()  # its line cleared before the caller says why the run ended
                raise StopRequested(done, len(order) * steps)
            latents = guided_step(model, sched, i, t, latents, ehs, feats, guidance, cache)
            if overlap:
                shape = (latents.shape[0], latents.shape[1], overlap, *latents.shape[3:])
                latents[:, :, :overlap] = ramp * latents[:, :, :overlap] + (1 - ramp) * chain.overlap(k, i, shape)
            if keep < stop:
                chain.tail(k, i, latents[:, :, keep - start :])
            bar.update(1)
            done += 1
        chain.window_done(k)
        yield start, keep, latents[:, :, : keep - start]
    bar.close()
