"""Training samples for ``fpengine train``: (video frames, 2D pose clip, caption).

``--data`` takes either
- ``render:PATH[,PATH...]``: figures drawn by the project's renderer (``finephys.training.scene``) from
  real motion capture (BVH, npz, Panoptic; files or folders), seen by random still cameras, or
- ``FOLDER``: real videos, ``NAME.mp4`` each beside ``NAME.npz`` (its clip.npz, as ``fpengine
  detect`` writes it, one pose per video frame) and ``NAME.txt`` (its caption).

Both hold out the last ``val_fraction`` of every sequence: ``batch(..., split="val")`` draws only
from there, ``split="train"`` never does.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from finephys.poses.clip import load_clip, to_layout
from finephys.errors import InputError
from finephys.training.pose_data import WindowSampler, check_apart, find_motion, split_ranges
from finephys.training.scene import random_cameras, random_look, render_clips
from finephys.model.text import MAX_LENGTH


@dataclass
class Batch:
    frames: torch.Tensor  # (B,T,3,H,W) in [-1, 1]
    keypoints: torch.Tensor  # (B,T,17,2) H36M-17 pixels of the frames
    scores: torch.Tensor  # (B,T,17)
    captions: list[str]


def check_caption(tokenizer, caption: str, where: str) -> None:
    n = len(tokenizer(caption).input_ids)
    if n > MAX_LENGTH:
        raise InputError(f"{where}: the caption has {n} CLIP tokens, expected at most {MAX_LENGTH}")
    if not caption.strip():
        raise InputError(f"{where}: the caption is empty, expected a sentence describing the video")


class RenderSource:
    """Figures rendered from motion capture at the model's size and frame rate."""

    kind = "render"

    def __init__(self, paths, size: tuple[int, int], fps: float, frames: int, val_fraction: float = 0.2,
                 held_out=()):
        motions = find_motion(paths)
        train, val = split_ranges(motions, val_fraction)
        extra = find_motion(held_out) if held_out else []
        check_apart(motions, extra, "--hold-out")
        val += [(m, 0.0, m.duration) for m in extra]
        self.samplers = {"train": WindowSampler(train, fps), "val": WindowSampler(val, fps)}
        self.size, self.frames = size, frames
        self.description = (f"{len(motions)} motion sequences (+{len(extra)} held out) rendered at "
                            f"{size[1]}x{size[0]}")
        if not self.samplers["train"].usable(frames):
            raise InputError(f"--data: no training motion is long enough for {frames} frames at {fps:g} fps")
        # held-out windows: as long as the held-out motion allows, up to ``frames``
        self.val_frames = max((n for n in range(3, frames + 1) if self.samplers["val"].usable(n)), default=0)
        if not self.val_frames:
            raise InputError(f"--data: no held-out motion is 3 frames long at {fps:g} fps (the last "
                             f"{val_fraction:.0%} of each sequence); pass longer motion or --hold-out")

    def batch(self, rng: np.random.Generator, n: int, device="cpu", split: str = "train") -> Batch:
        world = self.samplers[split].sample(rng, n, self.frames if split == "train" else self.val_frames)
        looks = [random_look(rng) for _ in range(n)]
        cams = random_cameras(rng, world, self.size)
        frames, uv = render_clips(world, looks, cams, device, seed=int(rng.integers(1 << 20)))
        kp = torch.as_tensor(uv, dtype=torch.float32, device=device)
        return Batch(frames * 2 - 1, kp, torch.ones(kp.shape[:-1], device=device), [lk.caption for lk in looks])

    def held_out_renders(self, n: int, seed: int = 0) -> list:
        """n held-out windows as a video shows them: (frames uint8 (T,H,W,3), joints (T,17,2)
        float64 pixels, caption), window i drawn from ``[seed, i]`` (the same for every caller)."""
        out = []
        for i in range(n):
            b = self.batch(np.random.default_rng([seed, i]), 1, split="val")
            frames = ((b.frames[0].permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
            out.append((frames, b.keypoints[0].numpy().astype(np.float64), b.captions[0]))
        return out


def _read_video(path: Path) -> tuple[np.ndarray, float]:
    import imageio.v2 as iio

    try:
        reader = iio.get_reader(path, format="FFMPEG")
        fps = float(reader.get_meta_data().get("fps") or 0)
        frames = np.stack([np.asarray(f) for f in reader])
        reader.close()
    except Exception as exc:  # noqa: BLE001 - ffmpeg errors: corrupt or not a video
        raise InputError(f"{path}: cannot be read as a video ({type(exc).__name__})") from None
    if not fps > 0:
        raise InputError(f"{path}: the frame rate cannot be read, expected a video with an fps")
    return frames, fps


class VideoSource:
    """Real videos with their poses, resampled to the model's frame rate and resized to its size."""

    kind = "videos"

    def __init__(self, folder, size: tuple[int, int], fps: float, frames: int, tokenizer,
                 val_fraction: float = 0.2):
        folder = Path(folder)
        if not folder.is_dir():
            raise InputError(f"--data {folder}: not a folder, expected render:MOTION or a folder of videos")
        videos = sorted(folder.glob("*.mp4"))
        if not videos:
            raise InputError(f"--data {folder}: no .mp4 files, expected NAME.mp4 + NAME.npz + NAME.txt samples")
        self.size, self.frames, self.val_fraction = size, frames, val_fraction
        items = []
        for video in videos:  # check everything before reading any pixels
            clip_path, text_path = video.with_suffix(".npz"), video.with_suffix(".txt")
            for p in (clip_path, text_path):
                if not p.is_file():
                    raise InputError(f"{video}: {p.name} missing, expected its clip.npz and caption beside it")
            caption = text_path.read_text(encoding="utf-8", errors="replace").strip()
            check_caption(tokenizer, caption, str(text_path))
            items.append((video, load_clip(clip_path), caption))
        self.samples = []
        for video, clip, caption in items:
            pixels, video_fps = _read_video(video)
            if len(pixels) != clip.num_frames:
                raise InputError(f"{video}: has {len(pixels)} frames but {video.with_suffix('.npz').name} has "
                                 f"{clip.num_frames}, expected one pose per video frame")
            if tuple(clip.image_size) != pixels.shape[1:3]:
                raise InputError(f"{video}: frames are {pixels.shape[2]}x{pixels.shape[1]} but the clip's image_size "
                                 f"is {clip.image_size[1]}x{clip.image_size[0]}, expected the same")
            idx = np.round(np.arange(0, len(pixels) / video_fps, 1 / fps) * video_fps).astype(int)
            idx = idx[idx < len(pixels)]
            if len(idx) < frames / (1 - val_fraction):
                raise InputError(f"{video}: {len(idx)} frames at {fps:g} fps, expected at least "
                                 f"{int(np.ceil(frames / (1 - val_fraction)))} ({frames} to train on)")
            h36m = to_layout(clip, "h36m17")
            img = torch.as_tensor(pixels[idx]).permute(0, 3, 1, 2).float() / 127.5 - 1
            img = torch.nn.functional.interpolate(img, size=size, mode="bilinear", antialias=True, align_corners=False)
            kp = torch.as_tensor(h36m.keypoints[idx], dtype=torch.float32)
            kp = (kp + 0.5) * torch.tensor([size[1] / clip.image_size[1], size[0] / clip.image_size[0]]) - 0.5
            sc = torch.as_tensor(h36m.scores[idx], dtype=torch.float32)
            self.samples.append((img, kp, sc, caption))
        self.description = f"{len(self.samples)} videos from {folder}"

    def batch(self, rng: np.random.Generator, n: int, device="cpu", split: str = "train") -> Batch:
        out = []
        for _ in range(n):
            img, kp, sc, caption = self.samples[rng.integers(len(self.samples))]
            cut = int(round(len(img) * (1 - self.val_fraction)))
            # held-out windows end at the video's end (they start earlier when its tail is short)
            start = int(rng.integers(0, max(cut - self.frames, 0) + 1)) if split == "train" else len(img) - self.frames
            s = slice(start, start + self.frames)
            out.append((img[s], kp[s], sc[s], caption))
        return Batch(torch.stack([o[0] for o in out]).to(device), torch.stack([o[1] for o in out]).to(device),
                     torch.stack([o[2] for o in out]).to(device), [o[3] for o in out])


def open_source(spec: str, size, fps: float, frames: int, tokenizer, val_fraction: float = 0.2, held_out=()):
    """The data source a ``--data`` spec names (module docstring)."""
    if not isinstance(spec, str) or not spec.strip():
        raise InputError("--data: empty, expected render:MOTION[,MOTION...] or a folder of videos")
    if spec.startswith("render:"):
        paths = [p for p in spec[len("render:"):].split(",") if p]
        if not paths:
            raise InputError("--data render: names no motion, expected render:PATH[,PATH...]")
        return RenderSource(paths, size, fps, frames, val_fraction, held_out)
    if held_out:
        raise InputError("--hold-out: only with --data render:...")
    return VideoSource(spec, size, fps, frames, tokenizer, val_fraction)
