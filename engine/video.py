"""Writing and reading mp4 video (libx264, yuv420p, via imageio + imageio-ffmpeg); PNG frame folders
are ``engine.outputs.PngSequence``.

The writer goes to a temporary name in the target folder and renames at the end, so an
interrupted run never leaves a half-written file under the final name.
"""

from __future__ import annotations

import errno
import os
import struct
import tempfile
from pathlib import Path

import numpy as np

from finephys.files import file_mode
from finephys.errors import InputError


def _check_target(path: Path, overwrite: bool, what: str) -> None:
    if not path.parent.is_dir():
        raise InputError(f"{path}: parent folder {path.parent} does not exist, expected an "
                         f"existing folder for the {what}")
    if path.exists() and not overwrite:
        raise InputError(f"{path}: already exists, expected a new path (or overwrite=True)")


def _check_frame(frame, index: int, size=None) -> np.ndarray:
    arr = np.asarray(frame)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise InputError(f"frame {index} has shape {arr.shape} and dtype {arr.dtype}, expected "
                         f"(H, W, 3) uint8")
    if size is not None and arr.shape[:2] != size:
        raise InputError(f"frame {index} has size {arr.shape[:2]}, expected {size} like frame 0")
    return arr


def mp4_is_whole(path: Path) -> bool:
    """Whether the mp4's top-level boxes are whole and include its index (``moov``, written last).
    imageio-ffmpeg does not report ffmpeg's exit status, so a video ffmpeg could not finish (a
    full disk) would otherwise pass for a finished one."""
    size, pos, kinds = path.stat().st_size, 0, set()
    with open(path, "rb") as f:
        while pos < size:
            f.seek(pos)
            head = f.read(8)
            if len(head) < 8:
                return False
            length, kind = struct.unpack(">I4s", head)
            if length == 1:
                wide = f.read(8)
                if len(wide) < 8:
                    return False
                length = struct.unpack(">Q", wide)[0]
            elif length == 0:  # ffmpeg's placeholder until the box is finished: never in a whole file
                return False
            if length < 8 or pos + length > size:
                return False
            kinds.add(kind)
            pos += length
    return b"moov" in kinds


def close_quietly(writer) -> None:
    """Close an imageio writer that is being abandoned (an error is already on its way)."""
    if writer is not None:
        try:
            writer.close()
        except Exception:
            pass


class VideoWriter:
    """Append frames to an mp4 progressively; the file appears under ``path`` only on close.

    Use as a context manager: an exception inside the ``with`` block removes the temp file.
    Frames with an odd height or width are padded by one edge row/column (yuv420p needs even
    sizes). ``crf`` is libx264's constant rate factor (lower = better, 18 ~ visually lossless).
    """

    def __init__(self, path, fps: float, overwrite: bool = False, crf: int = 18):
        self.path = Path(path)
        fps = float(fps)
        if not np.isfinite(fps) or fps <= 0:
            raise InputError(f"{self.path}: fps is {fps}, expected a finite number > 0")
        _check_target(self.path, overwrite, "video")
        if self.path.is_dir():
            raise InputError(f"{self.path}: is a folder, expected a file path for the video")
        self.fps, self.crf = fps, int(crf)
        self.count = 0
        self._size = None
        self._writer = None
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=".tmp.mp4",
                                   dir=self.path.parent)
        os.close(fd)
        self._tmp = Path(tmp)

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def append(self, frame) -> None:
        if self._tmp is None:
            raise InputError(f"{self.path}: writer is closed, expected append before close")
        arr = _check_frame(frame, self.count, self._size)
        if self._writer is None:
            import imageio.v2 as iio

            self._size = arr.shape[:2]
            self._writer = iio.get_writer(
                self._tmp, format="FFMPEG", mode="I", fps=self.fps, codec="libx264",
                pixelformat="yuv420p", quality=None, macro_block_size=1,
                ffmpeg_log_level="error", output_params=["-crf", str(self.crf)])
        pad_h, pad_w = arr.shape[0] % 2, arr.shape[1] % 2
        if pad_h or pad_w:
            arr = np.pad(arr, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        self._writer.append_data(arr)
        self.count += 1

    def close(self) -> Path:
        """Finish the file and move it to ``path``; at least one frame is required."""
        if self._tmp is None:
            return self.path
        if self.count == 0:
            self.abort()
            raise InputError(f"{self.path}: no frames were written, expected at least one")
        try:
            self._writer.close()
            if not mp4_is_whole(self._tmp):
                raise OSError(errno.EIO, "ffmpeg could not finish the video (is the disk full?); nothing was written",
                              str(self.path))
            os.chmod(self._tmp, file_mode())
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self._tmp = None
        return self.path

    def abort(self) -> None:
        """Stop writing and delete the temp file; nothing appears under ``path``."""
        close_quietly(self._writer)
        self._writer = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None

    def __del__(self):
        if getattr(self, "_tmp", None) is not None:
            self.abort()


def write_video(frames, path, fps: float, overwrite: bool = False, crf: int = 18) -> Path:
    """Write ``frames`` (iterable of (H, W, 3) uint8, or a (T, H, W, 3) array) to an mp4."""
    with VideoWriter(path, fps, overwrite=overwrite, crf=crf) as writer:
        for frame in frames:
            writer.append(frame)
    return writer.path


def read_video(path) -> np.ndarray:
    """All frames of a video file as ``(T, H, W, 3)`` uint8."""
    import imageio.v2 as iio

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found, expected a video file")
    reader = iio.get_reader(path, format="FFMPEG")
    try:
        frames = [np.asarray(f)[..., :3] for f in reader]
    finally:
        reader.close()
    if not frames:
        raise InputError(f"{path}: holds no frames, expected at least one")
    return np.stack(frames)
