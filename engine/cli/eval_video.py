"""``fpengine eval-video``: how well a video follows its guiding joints (registered on ``engine.cli.app.main``)."""
from __future__ import annotations

from pathlib import Path

import click

from finephys.errors import InputError

from engine.cli.common import PATH


def _summary(m: dict) -> str:
    line = (f"PCK@0.1 {m['pck']:.3f}, joint error {m['joint_error_px']:.2f} px "
            f"(figure {m['figure_size_px']:.0f} px, joints found {100 * m['found']:.0f}%)")
    if "jitter_ratio" in m:
        line += f", jitter {m['jitter_px']:.2f} px vs guide {m['guide_jitter_px']:.2f} px ({m['jitter_ratio']:.2f}x)"
    if "shirt_ok" in m:
        line += (f", shirt {m['shirt_seen']} (wanted {m['shirt_wanted']}), "
                 f"trousers {m['trousers_seen']} (wanted {m['trousers_wanted']})")
    return line


@click.command("eval-video")
@click.option("--video", type=PATH, required=True, help="The generated video (mp4).")
@click.option("--poses", type=PATH, required=True, help="Its stages.npz from generate --save-poses (video_2d).")
@click.option("--prompt", default=None, help="The prompt; renderer-style prompts also get a clothing-colour check.")
@click.option("--json", "json_out", type=PATH, default=None, help="Write every measure to this JSON file.")
@click.option("--pose-model", type=PATH, default=None,
              help="Top-down ONNX pose model (default: the shipped judge, for the demo's figures).")
@click.option("--pose-model-norm", type=click.Choice(["imagenet", "imagenet-bgr", "unit", "none"]), default=None,
              help="Input normalisation of --pose-model (default: unit for the judge, else imagenet).")
@click.option("--mediapipe", is_flag=True, help="Use MediaPipe BlazePose (real footage) instead of an ONNX model.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --json file.")
def eval_video_cmd(video, poses, prompt, json_out, pose_model, pose_model_norm, mediapipe, overwrite):
    """PCK@0.1, joint error, jitter and clothing colours of a video against the joints that guided it."""
    import numpy as np

    from finephys.training.judge import JUDGE_ONNX

    from engine.detect.video_in import VideoReader
    from engine.outputs import check_output
    from engine.eval_video import evaluate, read_guide

    if mediapipe and pose_model is not None:
        raise InputError("--mediapipe and --pose-model exclude each other; pass one")
    if mediapipe and pose_model_norm is not None:
        raise InputError("--pose-model-norm goes with an ONNX pose model, not --mediapipe")
    if pose_model is not None and not Path(pose_model).is_file():
        raise InputError(f"--pose-model {pose_model}: file not found, expected an ONNX pose model")
    check_output(json_out, overwrite, "--json", (".json",))
    guide = read_guide(poses)
    reader = VideoReader(video)
    frames = list(reader)
    if not frames:
        raise InputError(f"--video {video}: no frames could be read, expected a video")
    frames = np.stack(frames)
    model = None if mediapipe else (pose_model or JUDGE_ONNX)
    norm = pose_model_norm or ("unit" if pose_model is None else "imagenet")
    metrics = evaluate(frames, guide, reader.info.fps, prompt, pose_model=model, norm=norm)
    metrics.update(video=str(video), poses=str(poses), prompt=prompt,
                   pose_model="mediapipe" if model is None else str(model))
    click.echo(_summary(metrics))
    if json_out is not None:
        from finephys.files import write_json

        write_json(Path(json_out), metrics)
        click.echo(f"wrote {json_out}")
