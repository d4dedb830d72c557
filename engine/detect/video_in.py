"""Reading the reference video frame by frame (imageio + imageio-ffmpeg), with one-line errors."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from finephys.errors import InputError


def _short(exc: BaseException) -> str:
    """The first meaningful line of an ffmpeg/imageio error, at most 160 characters."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if "error" in ln.lower() or "invalid" in ln.lower()
              or "no such" in ln.lower() or "could not" in ln.lower()]
    text = (useful or lines or [type(exc).__name__])[-1]
    return text if len(text) <= 160 else text[:157] + "..."


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    fps: float
    height: int
    width: int
    num_frames: int | None  # as the container says (None when it does not say); a hint only


class VideoReader:
    """Frames of a video file as (H, W, 3) uint8 RGB arrays, read lazily; re-iterable."""

    def __init__(self, path, fps: float | None = None):
        self.path = Path(path)
        if self.path.is_dir():
            raise InputError(f"{self.path}: is a folder, expected a video file")
        if not self.path.is_file():
            raise InputError(f"{self.path}: file not found, expected a video file")
        if self.path.stat().st_size == 0:
            raise InputError(f"{self.path}: is empty, expected a video file")
        reader = self._open()
        try:
            meta = reader.get_meta_data()
        finally:
            reader.close()
        size = meta.get("size") or (0, 0)
        width, height = int(size[0]), int(size[1])
        if width <= 0 or height <= 0:
            raise InputError(f"{self.path}: has no video stream with a frame size, expected a video file")
        if fps is None:
            fps = meta.get("fps")
            if fps is None or not np.isfinite(fps) or fps <= 0:
                raise InputError(f"{self.path}: the frame rate cannot be read ({fps!r}); pass --fps")
        elif not np.isfinite(fps) or fps <= 0:
            raise InputError(f"--fps {fps}: expected a finite number > 0")
        n = meta.get("nframes")
        n = int(n) if isinstance(n, (int, float)) and np.isfinite(n) and n > 0 else None
        self.info = VideoInfo(self.path, float(fps), height, width, n)

    def _open(self):
        import imageio.v2 as iio

        try:
            return iio.get_reader(self.path, format="FFMPEG")
        except Exception as exc:  # OSError/RuntimeError from ffmpeg: corrupt or not a video
            raise InputError(f"{self.path}: cannot be read as a video ({_short(exc)})") from None

    def __iter__(self) -> Iterator[np.ndarray]:
        reader = self._open()
        try:
            index = 0
            while True:
                try:
                    frame = reader.get_next_data()
                except (IndexError, StopIteration):
                    break
                except Exception as exc:
                    raise InputError(f"{self.path}: frame {index} cannot be decoded "
                                     f"({_short(exc)})") from None
                arr = np.asarray(frame)
                if arr.ndim == 2:
                    arr = np.repeat(arr[..., None], 3, axis=2)
                yield np.ascontiguousarray(arr[..., :3], dtype=np.uint8)
                index += 1
        finally:
            reader.close()
