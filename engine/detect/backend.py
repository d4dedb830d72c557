"""What the detection loop needs from a backend: a person detector and a pose model."""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from finephys.errors import InputError

from engine.detect.track import Box, Candidate

EXTRA_HINT = "install the detect extra: python -m pip install 'fpengine[detect]' (or -e '.[detect]' in a checkout)"


@dataclass(frozen=True)
class PoseOutput:
    keypoints: np.ndarray  # (17, 2) float32 COCO-17, pixels (pixel centres at integers)
    scores: np.ndarray  # (17,) float32 in [0, 1]
    predicted: Box | None  # region for the next frame, from this pose


class PersonDetector(Protocol):
    name: str

    def detect(self, frame: np.ndarray) -> list[Candidate]: ...

    def close(self) -> None: ...


class PoseModel(Protocol):
    name: str

    def estimate(self, frame: np.ndarray, box: Box) -> PoseOutput | None: ...

    def close(self) -> None: ...


class WholeFrame:
    """The person detector used when none is installed: one region, the whole frame."""

    name = "whole-frame"

    def detect(self, frame: np.ndarray) -> list[Candidate]:
        height, width = frame.shape[:2]
        return [Candidate(Box((width - 1) / 2, (height - 1) / 2, max(width, height) / 2), 1.0)]

    def close(self) -> None:
        pass


def mediapipe_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("mediapipe") is not None


@contextlib.contextmanager
def quiet_native_stderr():
    """Hold back what native code (TFLite, glog, ffmpeg) prints on fd 2 meanwhile: MediaPipe
    opens its models on worker threads and announces it there. On an error other than
    InputError the last captured line is added to the message."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        except Exception as exc:
            sys.stderr.flush()
            os.dup2(saved, 2)
            tmp.seek(0)
            lines = tmp.read().decode("utf-8", "replace").strip().splitlines()
            if lines and not isinstance(exc, InputError):
                raise RuntimeError(f"{exc} [native log: {lines[-1][:200]}]") from exc
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
