"""Checking and writing the files a command produces: checked before any work starts, written
to a temporary name and renamed, never overwritten without ``--overwrite``."""
from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
import importlib.util
from pathlib import Path

import numpy as np

from finephys.files import atomic_path, check_new_path
from finephys.poses.draw import render_pose_frames
from finephys.errors import InputError
from finephys.sampler.poses import PoseStages

from engine.host import available_cpus
from engine.video import VideoWriter, write_video


def check_output(path: Path | None, overwrite: bool, option: str, suffixes: tuple[str, ...]) -> None:
    if path is None:
        return
    path = Path(path)
    if suffixes and path.suffix.lower() not in suffixes:
        raise InputError(f"{option} {path}: expected a path ending in {' or '.join(suffixes)}")
    check_new_path(path, overwrite, option, folder=not suffixes)
    if path.suffix.lower() == ".mp4" and importlib.util.find_spec("imageio_ffmpeg") is None:
        raise InputError(f"{option} {path}: writing MP4 needs imageio-ffmpeg (pip install imageio-ffmpeg), "
                         "which is not installed here")


def check_distinct(paths: dict) -> None:
    seen = {}
    for option, p in paths.items():
        if p is None:
            continue
        key = Path(p).resolve()
        if key in seen:
            raise InputError(f"{option} and {seen[key]} name the same file {p}")
        seen[key] = option


def save_npz(path: Path, arrays: dict) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


PNG_LEVEL = 1  # zlib's fastest: 5x faster than PIL's default 6 for 29% larger files (a 512x512 frame: 15 against 75 ms)
PNG_THREADS = min(16, available_cpus())  # a window's frames (16 by default) at once, where the CPUs allow


class PngSequence:
    """Frames written one by one as ``folder/frame_00000.png`` ...: each file appears complete
    (temporary name, then rename), so an interrupted run leaves every finished frame. The folder
    is made (an old one replaced, with ``overwrite``) at the first frame: a run stopped before
    it leaves nothing. Frames are compressed on threads (zlib runs without the GIL): the 16
    frames of a window arrive at once, and one thread took 0.56 s for them at 512x512 on an H200's
    host. ``close`` waits for every frame handed over and raises the first failure."""

    def __init__(self, folder: Path, overwrite: bool, threads: int = PNG_THREADS):
        self.folder, self.count, self.threads = Path(folder), 0, max(1, threads)
        if self.folder.exists() and not overwrite:
            raise InputError(f"{self.folder} already exists (pass --overwrite to replace it)")
        self._pool, self._pending, self._failed = None, [], False

    def _write(self, frame: np.ndarray, index: int) -> None:
        from PIL import Image

        final = self.folder / f"frame_{index:05d}.png"
        tmp = final.with_name(f".{final.name}.tmp")
        try:
            Image.fromarray(frame).save(tmp, format="PNG", compress_level=PNG_LEVEL)
            os.replace(tmp, final)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise OSError(exc.errno, exc.strerror or str(exc), str(final)) from exc

    def append(self, frame: np.ndarray) -> None:
        if self.count == 0:
            if self.folder.exists():
                shutil.rmtree(self.folder) if self.folder.is_dir() else self.folder.unlink()
            self.folder.mkdir()
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="png")
        while len(self._pending) >= 2 * self.threads:  # a bounded queue: finished frames are not held in memory
            self._wait(self._pending.pop(0))
        self._pending.append(self._pool.submit(self._write, np.array(frame, copy=True), self.count))
        self.count += 1

    def _wait(self, written) -> None:
        try:
            written.result()
        except BaseException:
            self._failed = True
            raise

    def close(self) -> None:
        """Wait for every frame handed over; raise the first write that failed. After a failure
        the folder goes too where no frame was finished in it."""
        pending, self._pending = self._pending, []
        try:
            for f in pending:
                self._wait(f)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            if self._failed and self.folder.is_dir() and not any(self.folder.iterdir()):
                self.folder.rmdir()


def interrupted_line(count: int, out: Path | None, frames_dir: Path | None, when: str = "") -> str:
    """What an interrupted run says it left: only outputs that exist, and none before a first frame;
    ``when``: where it stopped (``StopRequested``'s "after 3 of 20 denoising steps")."""
    head = f"interrupted {when}" if when else "interrupted"
    kept = [str(p) for p in (out, frames_dir) if p is not None and Path(p).exists()]
    if count == 0 or not kept:
        return f"{head}{',' if when else ''} before the first frame was finished: nothing was written"
    return f"{head}: {' and '.join(kept)} holds the {count} frames finished so far"


def stream_frames(frames, fps: float, out: Path | None, frames_dir: Path | None, overwrite: bool):
    """Write frames to an mp4 (growing under a temporary name, renamed when done) and/or a PNG
    folder as they arrive. Ctrl-C / SIGTERM (a KeyboardInterrupt, or the sampler's
    ``StopRequested`` between steps) stops the run and finishes the mp4 with every frame so far: a
    valid, playable file. Returns (frames written, the interrupt or None)."""
    video = VideoWriter(out, fps, overwrite=overwrite) if out is not None else None
    pngs = PngSequence(frames_dir, overwrite) if frames_dir is not None else None
    count, interrupt = 0, None
    try:
        for frame in frames:
            if video is not None:
                video.append(frame)
            if pngs is not None:
                pngs.append(frame)
            count += 1
    except KeyboardInterrupt as exc:
        interrupt = exc
    except BaseException:
        if video is not None:
            video.abort()
        if pngs is not None:
            with contextlib.suppress(Exception):  # the frames already handed over are finished; the first error stands
                pngs.close()
        raise
    if pngs is not None:
        pngs.close()
    if video is not None:
        video.close() if video.count else video.abort()
    return count, interrupt


def write_pose_preview(stages: PoseStages, path: Path, overwrite: bool) -> None:
    """Input 2D and projected fused skeleton side by side, at the clip's image size."""
    ones = np.ones_like(stages.scores)
    frames = render_pose_frames(
        [stages.input_2d, stages.projected_2d], [stages.scores, ones], stages.image_size,
        layout=stages.layout, titles=["input 2D", "lifted + physics, projected"],
    )
    write_video(frames, path, stages.fps, overwrite=overwrite)


@dataclass(frozen=True)
class GenerateOutputs:
    """Where ``fpengine generate`` writes (checked beforehand), and the detection's arrays that go
    into ``--save-poses`` beside the pose stages."""

    out: Path | None
    frames_dir: Path | None
    save_poses: Path | None
    preview: Path | None
    overwrite: bool
    detected: dict

    def write_poses(self, stream, log) -> None:
        """The stream's notes, then the pose stages (``--save-poses``) and preview, before any frame."""
        for note in stream.notes:
            log(note)
        if self.save_poses is not None:
            save_npz(self.save_poses, {**stream.stages.to_npz_dict(stream.plan), **self.detected})
        if self.preview is not None:
            write_pose_preview(stream.stages, self.preview, self.overwrite)

    def write_frames(self, frames, stream, log, how: str = "") -> tuple[int, bool]:
        """Frames to the video and/or PNG folder as they come, then one line saying what was written
        (``how``: added to it in brackets); returns (frames written, interrupted)."""
        count, interrupt = stream_frames(frames, stream.fps, self.out, self.frames_dir, self.overwrite)
        interrupted = interrupt is not None
        if interrupted:
            log(interrupted_line(count, self.out, self.frames_dir, str(interrupt)))
        else:
            target = " and ".join(str(p) for p in (self.out, self.frames_dir) if p is not None)
            p = stream.plan
            log(f"wrote {target}: {count} frames of {p.height}x{p.width} at {stream.fps:g} fps" + (f" ({how})" if how else ""))
        return count, interrupted
