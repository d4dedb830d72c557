"""``fpengine detect``: 2D poses of one person in a reference video -> clip.npz v1."""
from __future__ import annotations

from pathlib import Path

import click

from finephys.errors import InputError
from finephys.poses.layouts import LAYOUTS

from engine.detect.onnx_pose import NORMS
from engine.detect.postprocess import DEFAULT_MAX_GAP, DEFAULT_MIN_SCORE

from engine.cli.common import PATH
from finephys.files import write_json


def detect_options(f):
    """The options ``detect`` shares with ``generate --video``."""
    opts = [
        click.option("--person", default="largest", show_default=True,
                     help="Who to follow: 'largest' (largest person where anyone is first seen) "
                          "or an ID (0, 1, ... numbered left to right in that frame)."),
        click.option("--pose-model", type=PATH, default=None,
                     help="Top-down ONNX pose model (RTMPose SimCC or heatmap outputs, K = 17, 26 "
                          "or 133) instead of MediaPipe BlazePose."),
        click.option("--pose-model-norm", type=click.Choice(NORMS), default="imagenet",
                     show_default=True, help="Input normalisation of --pose-model."),
        click.option("--min-score", type=float, default=DEFAULT_MIN_SCORE, show_default=True,
                     help="Joints with a lower confidence are missing (score 0)."),
        click.option("--max-gap", type=int, default=DEFAULT_MAX_GAP, show_default=True,
                     help="Missing stretches of at most this many frames are interpolated."),
        click.option("--min-detection", type=float, default=0.5, show_default=True,
                     help="Person detector threshold."),
        click.option("--person-detector", type=click.Choice(["auto", "blazepose", "none"]),
                     default="auto", show_default=True,
                     help="Where --pose-model looks: BlazePose's person detector (auto: when "
                          "mediapipe is installed) or none (the whole frame, then the region "
                          "around the last pose)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def make_options(person, pose_model, pose_model_norm, min_score, max_gap, min_detection,
                 person_detector="auto", layout="coco17", fps=None):
    from engine.detect.run import DetectOptions

    if pose_model is not None and not Path(pose_model).exists():
        raise InputError(f"--pose-model {pose_model} does not exist")
    return DetectOptions(person=person, layout=layout, min_score=min_score, max_gap=max_gap,
                         min_detection=min_detection, pose_model=pose_model,
                         pose_model_norm=pose_model_norm, fps=fps,
                         person_detector=person_detector).checked()


def run_detection(video: Path, options, echo=True):
    """Detect, print the summary and the lost-frame report on stderr; returns the result."""
    from engine.detect.run import detect_video

    if not Path(video).exists():
        raise InputError(f"--video {video} does not exist")
    result = detect_video(video, options)
    if echo:
        for line in result.summary():
            click.echo(line, err=True)
    return result


@click.command("detect")
@click.option("--video", type=PATH, required=True, help="Reference video (mp4, mov, avi, ...).")
@click.option("--out", type=PATH, required=True, help="clip.npz v1 to write.")
@click.option("--layout", type=click.Choice(sorted(LAYOUTS)), default="coco17", show_default=True,
              help="Joint layout of the written clip.")
@detect_options
@click.option("--preview", type=PATH, default=None, help="Draw the detected skeleton over the video into this .mp4.")
@click.option("--report", type=PATH, default=None, help="Write the per-frame report (lost frames, regions) to this .json.")
@click.option("--fps", type=float, default=None, help="Frame rate to use instead of the video's.")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
def detect(video, out, layout, person, pose_model, pose_model_norm, min_score, max_gap,
           min_detection, person_detector, preview, report, fps, overwrite):
    """Estimate the 2D pose of one person in every frame of VIDEO and write a clip.npz.

    Joints below --min-score are missing (score 0); gaps of at most --max-gap frames are
    interpolated linearly; frames where the person is lost are reported. A video where nobody
    is found is an error.
    """
    from finephys.poses.clip import save_clip

    from engine.detect.run import render_overlay
    from engine.outputs import check_distinct, check_output

    check_output(out, overwrite, "--out", (".npz",))
    check_output(preview, overwrite, "--preview", (".mp4",))
    check_output(report, overwrite, "--report", (".json",))
    check_distinct({"--out": out, "--preview": preview, "--report": report, "--video": video})
    options = make_options(person, pose_model, pose_model_norm, min_score, max_gap,
                           min_detection, person_detector, layout, fps)
    result = run_detection(video, options)
    save_clip(result.clip, out, overwrite=overwrite)
    if report is not None:
        write_json(report, result.report_dict())
    if preview is not None:
        render_overlay(video, result, preview, overwrite=overwrite, fps=fps)
    c = result.clip
    click.echo(f"wrote {out}: {c.num_frames} frames, {c.layout}, {c.image_size[0]}x{c.image_size[1]} "
               f"at {c.fps:g} fps", err=True)


_DETECT_DEFAULTS = {"person": "largest", "pose_model": None, "pose_model_norm": "imagenet",
                    "min_score": DEFAULT_MIN_SCORE, "max_gap": DEFAULT_MAX_GAP, "min_detection": 0.5,
                    "person_detector": "auto"}
DETECT_OPTION_NAMES = tuple(_DETECT_DEFAULTS)  # the parameters of ``detect_options``


def generate_input(poses: Path | None, video: Path | None, save_clip: Path | None, detect_kw: dict):
    """The clip ``generate`` runs on: ``--poses`` loaded, or ``--video`` detected first.

    Returns (clip, arrays to add to --save-poses): with --video the detected clip (COCO-17 or
    the chosen layout, at the video's size and fps) is kept there as ``detected_keypoints``,
    ``detected_scores``, ``detected_layout``, ``detected_image_size``, ``detected_fps``,
    ``detected_found`` (per-frame bool); the caller writes it to ``--save-clip`` (a clip.npz of its
    own) once its own checks have passed.
    """
    import numpy as np

    from finephys.poses.clip import load_clip

    if (poses is None) == (video is None):
        raise InputError("generate: pass exactly one of --poses clip.npz or --video ref.mp4")
    if video is None:
        changed = [k for k, v in detect_kw.items() if v != _DETECT_DEFAULTS.get(k, v)]
        if changed:
            raise InputError(f"--{changed[0].replace('_', '-')} goes with --video, not --poses")
        if save_clip is not None:
            raise InputError("--save-clip goes with --video, not --poses")
        if not Path(poses).exists():
            raise InputError(f"--poses {poses} does not exist")
        return load_clip(poses), {}
    result = run_detection(video, make_options(**detect_kw))
    c = result.clip
    return c, {"detected_keypoints": c.keypoints, "detected_scores": c.scores,
               "detected_layout": np.asarray(c.layout),
               "detected_image_size": np.asarray(c.image_size, np.int64),
               "detected_fps": np.float64(c.fps), "detected_found": result.found}
