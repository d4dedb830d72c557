"""The reference pipeline: pose stack (lift, physics, fuse, project), heatmaps, and DDIM with
classifier-free guidance over the pose-guided UNet, then VAE decode. Eager PyTorch; the ground
truth that every other backend is checked against."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from kernels.heatmap import render_heatmaps
from kernels.physnet import physnet_fused

from .camera import fit_and_project
from .clip import PoseClip, resample, to_layout
from .errors import InputError
from .lifter import lift_windows, normalise_2d
from .model import FinePhysModel
from .physnet import integrate


@dataclass(frozen=True)
class PoseStages:
    """Every stage of the pose stack for one clip, in the model's layout and frame rate."""

    input_2d: np.ndarray  # (T,J,2) pixels
    scores: np.ndarray  # (T,J)
    s_dd: np.ndarray  # (T,J,3) metres, root-relative
    s_pp: np.ndarray
    s_fused: np.ndarray
    projected_2d: np.ndarray  # (T,J,2) pixels
    image_size: tuple[int, int]
    fps: float
    layout: str

    def video_2d(self, height: int, width: int, frames: int | None = None) -> np.ndarray:
        """(frames,J,2) the guiding joints in the video's pixels, exactly as the heatmaps are drawn."""
        return to_video_pixels(self.projected_2d[:frames], self.image_size, height, width).astype(np.float32)

    def to_npz_dict(self, plan=None) -> dict:
        """The stages as arrays; with the generation's ``plan`` (height, width, frames) also
        ``video_2d``."""
        extra = {} if plan is None else {"video_2d": self.video_2d(plan.height, plan.width, plan.frames)}
        return {**extra,
            "input_2d": self.input_2d, "scores": self.scores, "s_dd": self.s_dd, "s_pp": self.s_pp,
            "s_fused": self.s_fused, "projected_2d": self.projected_2d,
            "image_size": np.asarray(self.image_size, dtype=np.int64), "fps": np.float64(self.fps),
            "layout": np.asarray(self.layout),
        }


def prepare_clip(clip: PoseClip, model: FinePhysModel) -> tuple[PoseClip, list[str]]:
    """Convert to the model's layout and frame rate; returns the clip and notes for the user."""
    notes = []
    cfg = model.config
    clip = to_layout(clip, cfg.layout)
    if abs(clip.fps - cfg.fps) > 1e-6:
        before, before_fps = clip.num_frames, clip.fps
        clip = resample(clip, cfg.fps)
        notes.append(f"resampled the clip from {before} frames at {before_fps:g} fps to {clip.num_frames} frames at "
                     f"{cfg.fps:g} fps")
    if clip.num_frames < 3:
        raise InputError(f"clip: at least 3 frames needed at {cfg.fps:g} fps, got {clip.num_frames}")
    return clip, notes


@torch.no_grad()
def pose_stack(parts, kp: torch.Tensor, sc: torch.Tensor, width: float, fps: float, fuse_weight: float,
               use_kernels: bool = False, K=None, dist=None):
    """Batched pose stack: 2D (B,T,J,2) pixels + scores (B,T,J) -> (S_dd, S_pp, S_fused, projected 2D)."""
    s_dd = lift_windows(parts.lifter, normalise_2d(kp, sc, width), sc)
    minv, jtau, coriolis = parts.physnet.predict(s_dd)
    # The reference integrates in plain torch; backends with use_kernels take the fused Triton kernel.
    step = physnet_fused if use_kernels else integrate
    s_pp, s_fused, _ = step(s_dd, minv, jtau, coriolis, 1.0 / fps, fuse_weight)
    return s_dd, s_pp, s_fused, fit_and_project(s_fused, kp, sc, K, dist)


@torch.no_grad()
def run_pose_stack(model: FinePhysModel, clip: PoseClip) -> PoseStages:
    """Lift, re-estimate with physics, fuse and project back; ``clip`` must be prepared."""
    dev = model.device
    kp = torch.as_tensor(clip.keypoints, dtype=torch.float32, device=dev)[None]
    sc = torch.as_tensor(clip.scores, dtype=torch.float32, device=dev)[None]
    K = None if clip.camera_matrix is None else torch.as_tensor(clip.camera_matrix, dtype=torch.float32)
    dist = None if clip.dist_coeffs is None else torch.as_tensor(clip.dist_coeffs, dtype=torch.float32)
    s_dd, s_pp, s_fused, projected = pose_stack(
        model.parts, kp, sc, clip.image_size[1], model.config.fps, model.config.pose.fuse_weight,
        getattr(model, "use_kernels", False), K, dist)
    f = lambda x: x[0].float().cpu().numpy()  # noqa: E731
    return PoseStages(
        input_2d=clip.keypoints, scores=clip.scores, s_dd=f(s_dd), s_pp=f(s_pp), s_fused=f(s_fused),
        projected_2d=f(projected), image_size=tuple(clip.image_size), fps=clip.fps, layout=clip.layout,
    )


def to_video_pixels(keypoints, image_size, height: int, width: int):
    """Pixels of an ``image_size`` (height, width) image -> pixels of the video (height x width)."""
    ih, iw = image_size
    kp = keypoints.clone() if torch.is_tensor(keypoints) else np.array(keypoints, dtype=np.float32)
    kp[..., 0] *= width / iw
    kp[..., 1] *= height / ih
    return kp


def guidance_heatmaps(config, keypoints: torch.Tensor, visibility: torch.Tensor, height: int, width: int,
                      use_kernel: bool = False) -> torch.Tensor:
    """Heatmaps (B,T,J,H,W) that guide the video from joints (B,T,J,2) in video pixels; the
    Gaussians' sigma is the model's ``heatmap_sigma`` at 512 px, scaled with the video size."""
    sigma = config.pose.heatmap_sigma * max(height, width) / 512.0
    return render_heatmaps(keypoints, visibility, height, width, sigma, use_kernel=use_kernel)


def pose_heatmaps(model: FinePhysModel, stages: PoseStages, height: int, width: int,
                  start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Heatmaps (stop-start, J, H, W) at the video size from the projected skeleton."""
    kp = torch.as_tensor(stages.projected_2d[start:stop], dtype=torch.float32, device=model.device)
    kp = to_video_pixels(kp, stages.image_size, height, width)
    vis = torch.ones(kp.shape[:-1], device=model.device)
    return guidance_heatmaps(model.config, kp[None], vis[None], height, width,
                             use_kernel=getattr(model, "use_kernels", False))[0]


def check_video_size(height: int, width: int) -> None:
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or v <= 0 or v % 8:
            raise InputError(f"--{name} {v}: expected a positive multiple of 8")


class DdimSchedule:
    """DDIM (eta = 0) from a diffusers ``DDIMScheduler``'s own timesteps and alphas, with every
    coefficient precomputed as a Python float: stepping never reads device memory back, so the
    denoising loop has no host synchronisation on any backend."""

    def __init__(self, scheduler, num_inference_steps: int, device):
        if scheduler.config.prediction_type != "epsilon":
            raise InputError(f"scheduler: prediction_type {scheduler.config.prediction_type!r}, expected 'epsilon'")
        scheduler.set_timesteps(num_inference_steps)
        ratio = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        alphas = scheduler.alphas_cumprod.double()
        final = float(scheduler.final_alpha_cumprod)
        steps = [int(t) for t in scheduler.timesteps]
        self.coeffs = [(float(alphas[t]), float(alphas[t - ratio]) if t >= ratio else final) for t in steps]
        self.timesteps = torch.tensor(steps, device=device)
        self.init_noise_sigma = float(scheduler.init_noise_sigma)

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


def window_inputs(model, sched, heatmaps, text, seeds, start, cfg_on):
    """One window's initial latents (B,C,n,h,w), text embeddings (2B*n or B*n,77,C) and pose
    features (computed once per window; doubled for the guidance batch) for B requests: heatmaps
    (B*n,J,H,W) request-major, one seed per request, ``text`` [uncond_1..uncond_B, cond_1..cond_B]."""
    n = heatmaps.shape[0] // len(seeds)
    height, width = heatmaps.shape[-2:]
    feats = model.encode_pose(heatmaps)
    if cfg_on:
        feats = [torch.cat([f, f]) for f in feats]
    ehs = text.repeat_interleave(n, dim=0)  # UNetMotionModel takes B*F text embeddings
    shape = (model.latent_channels, height // 8, width // 8)
    latents = torch.cat([frame_noise(seed, start, start + n, shape) for seed in seeds])
    return latents.to(model.device) * sched.init_noise_sigma, ehs, feats


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


@torch.no_grad()
def denoise_windows(model, heatmaps_fn, num_frames, prompt, negative_prompt, num_inference_steps,
                    guidance_scale, seed, length, stride, progress=True, deep_cache=(1, 1)):
    """DDIM with classifier-free guidance over overlapping context windows, one window at a time.

    Yields ``(start, stop, latents)`` for consecutive frame ranges as soon as they are final
    (latents (1,C,stop-start,h,w)). Window k's first frames overlap window k-1's last ones; after
    every step they are blended with window k-1's latents of the same step, with weights ramping
    from window k-1 to window k across the overlap, so seams do not show. Memory holds one
    window and the overlap's trajectory, whatever the clip's length. ``heatmaps_fn(start, stop)``
    gives the window's heatmaps; text and the guidance batch are computed once per clip.
    ``deep_cache=(interval, depth)``: with interval > 1, ``DeepCache`` in each window (off: (1, 1)).
    One request; ``denoise_windows_batch`` runs the same loop for several at once.
    """
    yield from denoise_windows_batch(model, [heatmaps_fn], num_frames, [prompt], [negative_prompt],
                                     num_inference_steps, [guidance_scale], [seed], length, stride, progress,
                                     deep_cache)


@torch.no_grad()
def denoise_windows_batch(model, heatmap_fns, num_frames, prompts, negative_prompts, num_inference_steps,
                          guidance_scales, seeds, length, stride, progress=True, deep_cache=(1, 1)):
    """``denoise_windows`` for B requests of one shape stacked on the batch axis (one list entry
    each): yields ``(start, stop, latents (B,C,stop-start,h,w))``. Each request keeps its own
    noise, text, pose features and guidance scale, and gets what it would get alone, up to float
    rounding. Guidance must be on for all (every scale > 1) or off for all."""
    scales = [float(g) for g in guidance_scales]
    cfg_on = min(scales) > 1.0
    if cfg_on != (max(scales) > 1.0):
        raise InputError(f"guidance_scales: {scales} mix guidance on (> 1) and off (<= 1); batch them apart")
    sched = DdimSchedule(model.scheduler(), num_inference_steps, model.device)
    guidance = scales[0] if not cfg_on or len(set(scales)) == 1 else (
        torch.tensor(scales, dtype=torch.float32, device=model.device).view(-1, 1, 1, 1, 1))
    # text batch order is request-major: [uncond_1..uncond_B, cond_1..cond_B] with guidance
    text = model.encode_text(list(negative_prompts) + list(prompts) if cfg_on else list(prompts))
    windows = context_windows(num_frames, length, stride)
    bar = tqdm(total=len(windows) * len(sched.timesteps), desc="denoising", disable=not progress, leave=False)
    prev_stop, prev_traj = 0, []
    for k, (start, stop) in enumerate(windows):
        keep = windows[k + 1][0] if k + 1 < len(windows) else stop  # frames >= keep go on to window k+1
        heatmaps = torch.cat([fn(start, stop) for fn in heatmap_fns])
        latents, ehs, feats = window_inputs(model, sched, heatmaps, text, seeds, start, cfg_on)
        overlap = max(prev_stop - start, 0)
        ramp = (torch.arange(1, overlap + 1, device=model.device) / (overlap + 1)).view(1, 1, -1, 1, 1)
        traj = []
        cache = DeepCache(*deep_cache) if deep_cache[0] > 1 else None
        for i, t in enumerate(sched.timesteps):
            latents = guided_step(model, sched, i, t, latents, ehs, feats, guidance, cache)
            if overlap:
                latents[:, :, :overlap] = ramp * latents[:, :, :overlap] + (1 - ramp) * prev_traj[i]
            if keep < stop:
                traj.append(latents[:, :, keep - start :].clone())
            bar.update(1)
        yield start, keep, latents[:, :, : keep - start]
        prev_stop, prev_traj = stop, traj
    bar.close()


@torch.no_grad()
def denoise(model, heatmaps, prompt, negative_prompt, num_inference_steps, guidance_scale, seed,
            progress=True, length=None, stride=None):
    """All final latents (1,C,F,H/8,W/8) for heatmaps (F,J,H,W); one window unless ``length``."""
    frames = heatmaps.shape[0]
    length = length or frames
    chunks = denoise_windows(model, lambda a, b: heatmaps[a:b], frames, prompt, negative_prompt,
                             num_inference_steps, guidance_scale, seed, length, stride or length, progress)
    return torch.cat([lat for _, _, lat in chunks], dim=2)


@torch.no_grad()
def _frames_u8(model, latents: torch.Tensor, chunk: int) -> torch.Tensor:
    """(1,C,F,h,w) latents -> (F,H,W,3) uint8 frames on the model's device, ``chunk`` frames at a time."""
    z = latents[0].permute(1, 0, 2, 3)
    out = [model.decode_latents(z[i : i + chunk]).float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
           for i in range(0, z.shape[0], chunk)]
    return torch.cat(out).permute(0, 2, 3, 1).contiguous()  # frames as laid out: writers, NCCL sends


@torch.no_grad()
def decode(model, latents: torch.Tensor, chunk: int = 8) -> np.ndarray:
    """(1,C,F,h,w) latents -> (F,H,W,3) uint8 frames, decoded ``chunk`` frames at a time."""
    return _frames_u8(model, latents, chunk).cpu().numpy()


class DecodeJob:
    """One window's VAE decode, started at construction, its frames from ``result()``.

    On a CUDA model that allows it (``model.async_decode``) the decode runs on a side stream, after
    the window's last denoising step, and copies its frames into pinned host memory: queued before
    the next window's steps, it overlaps with them, and ``result()`` waits only for this decode.
    Elsewhere it decodes at once (``is_async`` False)."""

    _streams: dict = {}

    def __init__(self, model, latents: torch.Tensor, chunk: int = 8):
        self.is_async = bool(getattr(model, "async_decode", False)) and latents.is_cuda
        if not self.is_async:
            self._frames = decode(model, latents, chunk)
            return
        self._frames = None
        if latents.device not in self._streams:
            self._streams[latents.device] = torch.cuda.Stream(latents.device)
        stream = self._streams[latents.device]
        stream.wait_stream(torch.cuda.current_stream(latents.device))
        latents.record_stream(stream)  # the allocator must not reuse it before the side stream is done
        with torch.no_grad(), torch.cuda.stream(stream):
            frames = _frames_u8(model, latents, chunk)
            self._host = torch.empty(frames.shape, dtype=torch.uint8, pin_memory=True)
            self._host.copy_(frames, non_blocking=True)
            self._done = torch.cuda.Event()
            self._done.record(stream)
        self._gpu = frames  # alive until the copy is done

    def result(self) -> np.ndarray:
        if self._frames is None:
            self._done.synchronize()
            self._frames, self._gpu = self._host.numpy(), None
        return self._frames
