"""An mp4 that can be sent while it is written: fragmented (``empty_moov``, one fragment per
frame), libx264 with no lookahead (``zerolatency``), yuv420p. ffmpeg writes it to a private file
in the working folder; ``write`` returns the bytes that appeared since the last call, ``finish``
the rest, and the file is removed either way."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from engine.video import close_quietly

from engine.serve.files import new_file

MOVFLAGS = "frag_keyframe+empty_moov+default_base_moof"


class Mp4Stream:
    def __init__(self, root: Path, fps: float, crf: int = 18):
        self.path = new_file(root, "videos", ".mp4")
        self.fps, self.crf = float(fps), int(crf)
        self.frames = 0
        self._writer = None
        self._reader = open(self.path, "rb")

    def _open(self) -> None:
        import imageio.v2 as iio

        self._writer = iio.get_writer(
            self.path, format="FFMPEG", mode="I", fps=self.fps, codec="libx264", pixelformat="yuv420p",
            quality=None, macro_block_size=1, ffmpeg_log_level="error",
            output_params=["-crf", str(self.crf), "-tune", "zerolatency", "-movflags", MOVFLAGS,
                           "-frag_duration", "1", "-flush_packets", "1"])

    def write(self, frames: np.ndarray) -> bytes:
        """Encode (F,H,W,3) uint8 frames (H, W even); the bytes ready so far."""
        if self._writer is None:
            self._open()
        for frame in frames:
            self._writer.append_data(frame)
            self.frames += 1
        return self._drain()

    def _drain(self, settle: float = 0.03, limit: float = 2.0) -> bytes:
        """What ffmpeg writes for the frames just sent: wait for the file to grow, then for it to
        stop growing (``settle`` s), at most ``limit`` s. (Each frame's fragment is written when
        the next frame arrives, so the last one goes out with the next call.)"""
        out, start = bytearray(), time.monotonic()
        last = start
        while True:
            data = self._reader.read()
            now = time.monotonic()
            if data:
                out += data
                last = now
            elif (out and now - last >= settle) or now - start >= limit:
                return bytes(out)
            time.sleep(0.005)

    def finish(self) -> bytes:
        """Close the video; its remaining bytes. The file is gone afterwards."""
        try:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            return self._reader.read()
        finally:
            self.abort()

    def abort(self) -> None:
        close_quietly(self._writer)
        self._writer = None
        if not self._reader.closed:
            self._reader.close()
        self.path.unlink(missing_ok=True)
