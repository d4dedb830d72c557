"""One clip end to end on a backend: prepare the clip, check the options, run the pose stages,
denoise window by window and decode, streaming frames out as soon as they are final."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from finephys.poses.clip import PoseClip
from finephys.sampler.loop import Request, WindowChain, denoise_windows
from finephys.sampler.options import GenerateOptions
from finephys.sampler.poses import PoseStages, pose_heatmaps, prepare


@dataclass(frozen=True)
class Generation:
    frames: np.ndarray  # (F,H,W,3) uint8
    latents: torch.Tensor  # (1,C,F,h,w) final latents
    stages: PoseStages
    notes: list[str]

    @staticmethod
    def from_chunks(chunks: list, stages: PoseStages, notes: list[str]) -> "Generation":
        """From a stream's ``(start, latents, frames)`` chunks, in frame order."""
        return Generation(frames=np.concatenate([c[2] for c in chunks]), latents=torch.cat([c[1] for c in chunks], dim=2),
                          stages=stages, notes=notes)


@torch.no_grad()
def frames_u8(model, latents: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """(1,C,F,h,w) latents -> (F,H,W,3) uint8 frames on the model's device, ``chunk`` frames at a
    time, contiguous as laid out (what writers and NCCL sends need)."""
    z = latents[0].permute(1, 0, 2, 3)
    out = [model.decode_latents(z[i : i + chunk]).float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
           for i in range(0, z.shape[0], chunk)]
    return torch.cat(out).permute(0, 2, 3, 1).contiguous()


def decode(model, latents: torch.Tensor, chunk: int = 8) -> np.ndarray:
    """(1,C,F,h,w) latents -> (F,H,W,3) uint8 frames, decoded ``chunk`` frames at a time."""
    return frames_u8(model, latents, chunk).cpu().numpy()


class DecodeJob:
    """One window's VAE decode, started at construction, its frames from ``result()``.

    On a CUDA model that allows it (``capabilities.async_decode``) the decode runs on a side
    stream, after the window's last denoising step, and copies its frames into pinned host memory:
    queued before the next window's steps, it overlaps with them, and ``result()`` waits only for
    this decode. Elsewhere it decodes at once (``is_async`` False)."""

    _streams: dict = {}

    def __init__(self, model, latents: torch.Tensor, chunk: int = 8):
        self.is_async = model.capabilities.async_decode and latents.is_cuda
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
            frames = frames_u8(model, latents, chunk)
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


class GenerationStream:
    """``generate_stream``'s result: iterate it for frames ((H,W,3) uint8) as soon as they are
    final; ``chunks()`` gives (start, latents, frames) per finished range. The pose stack runs
    once over the whole clip (PhysNet sees full context) when the stream is made.

    ``prepared``: (plan, stages, notes) made elsewhere (a rank that received them), instead of
    preparing ``clip`` here. ``should_stop``: asked between denoising steps (``denoise_windows``)."""

    def __init__(self, model, clip: PoseClip | None, opts: GenerateOptions, progress: bool = True,
                 prepared: tuple | None = None, should_stop=None):
        self.model, self.opts, self.progress, self.should_stop = model, opts, progress, should_stop
        self.plan, self.stages, self.notes = prepare(model, clip, opts) if prepared is None else prepared
        self.fps = model.config.fps

    def request(self) -> Request:
        p, o, m, stages = self.plan, self.opts, self.model, self.stages
        return Request(lambda a, b: pose_heatmaps(m, stages, p.height, p.width, a, b), o.prompt, o.negative_prompt,
                       p.guidance, o.seed)

    def latent_chunks(self, model=None, chain: WindowChain | None = None):
        """Finished, undecoded ``(start, stop, latents)`` in frame order (with ``chain``: this
        process's windows; ``model``: a wrapper of the stream's model, as guidance splitting uses)."""
        return denoise_windows(model or self.model, self.plan, [self.request()], self.progress, chain,
                               self.should_stop)

    def chunks(self):
        m = self.model
        pending = None  # an asynchronous decode, handed out once the next window's steps are queued
        for start, _, latents in self.latent_chunks():
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


def generate_stream(model, clip: PoseClip, opts: GenerateOptions, progress: bool = True,
                    should_stop=None) -> GenerationStream:
    return GenerationStream(model, clip, opts, progress, should_stop=should_stop)


def generate(model, clip: PoseClip, opts: GenerateOptions, progress: bool = True) -> Generation:
    """The whole clip at once (frames and final latents), through the same stream."""
    stream = generate_stream(model, clip, opts, progress)
    return Generation.from_chunks(list(stream.chunks()), stream.stages, stream.notes)
