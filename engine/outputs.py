"""Checking and writing the files a command produces: checked before any work starts, written
to a temporary name and renamed, never overwritten without ``--overwrite``."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from finephys.draw import render_pose_frames
from finephys.errors import InputError
from finephys.pipeline import PoseStages

from .video import write_frames_dir, write_video


def check_output(path: Path | None, overwrite: bool, option: str, suffixes: tuple[str, ...]) -> None:
    if path is None:
        return
    path = Path(path)
    if suffixes and path.suffix.lower() not in suffixes:
        raise InputError(f"{option} {path}: expected a path ending in {' or '.join(suffixes)}")
    if not path.parent.is_dir():
        raise InputError(f"{option} {path}: the folder {path.parent} does not exist")
    if path.exists() and not overwrite:
        raise InputError(f"{option} {path}: already exists (pass --overwrite to replace it)")


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
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp.npz", dir=path.parent)
    os.close(fd)
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_frames(frames, path: Path, fps: float, overwrite: bool) -> None:
    """An .mp4 path gets a video; a path without a suffix gets a folder of PNGs."""
    if Path(path).suffix.lower() == ".mp4":
        write_video(frames, path, fps, overwrite=overwrite)
    else:
        write_frames_dir(frames, path, overwrite=overwrite)


def write_pose_preview(stages: PoseStages, path: Path, overwrite: bool) -> None:
    """Input 2D and projected fused skeleton side by side, at the clip's image size."""
    ones = np.ones_like(stages.scores)
    frames = render_pose_frames(
        [stages.input_2d, stages.projected_2d], [stages.scores, ones], stages.image_size,
        layout=stages.layout, titles=["input 2D", "lifted + physics, projected"],
    )
    write_video(frames, path, stages.fps, overwrite=overwrite)
